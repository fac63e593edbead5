//! The systemd units as packaged: `systemd-analyze verify` accepts them
//! (every directive known, ExecStart executable, Documentation= man pages
//! present) and `systemd-analyze security --offline=yes` scores them no
//! worse than docs/operations.md states. No systemd runs as PID 1 here, so
//! both run against a staged root: the units, the generated man pages, the
//! host's target units, and stand-in executables (verify checks only that
//! ExecStart names an executable; the real binaries are tested elsewhere).

use std::path::{Path, PathBuf};
use std::process::Command;

/// docs/operations.md states these; lower is better.
const MAX_EXPOSURE: &[(&str, f32)] = &[("netmanager", 5.0), ("nodeengine", 3.3)];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

fn staged_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let units = root.path().join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    // What the units refer to (multi-user.target, network-online.target, ...).
    let host_units = ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|d| d.join("multi-user.target").exists())
        .expect("the host's systemd units (apt install systemd)");
    for e in std::fs::read_dir(host_units).unwrap().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".target") && e.path().is_file() {
            std::fs::copy(e.path(), units.join(&name)).unwrap();
        }
    }
    for unit in ["netmanager.service", "nodeengine.service"] {
        std::fs::copy(units_dir().join(unit), units.join(unit)).unwrap();
    }
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let me = std::env::current_exe().unwrap();
    for b in ["NetManager", "NodeEngine", "nodeengined"] {
        std::fs::copy(&me, bin.join(b)).unwrap();
    }
    oakestra_package_assets::write_all(&root.path().join("usr")).expect("man pages");
    root
}

fn analyze(root: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .args(args)
        .env("MANPATH", root.join("usr/share/man"))
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("systemd-analyze (apt install systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn units_verify_cleanly() {
    let root = staged_root();
    let units = root.path().join("lib/systemd/system");
    let (ok, text) = analyze(
        root.path(),
        &[
            "verify",
            units.join("netmanager.service").to_str().unwrap(),
            units.join("nodeengine.service").to_str().unwrap(),
        ],
    );
    // verify exits 0 after "unknown directive, ignoring": silence is the pass.
    assert!(ok && text.trim().is_empty(), "{text}");

    // And it does complain: a missing binary is an error.
    std::fs::remove_file(root.path().join("usr/bin/nodeengined")).unwrap();
    let (ok, text) = analyze(
        root.path(),
        &["verify", units.join("nodeengine.service").to_str().unwrap()],
    );
    assert!(!ok && text.contains("/usr/bin/nodeengined"), "{text}");
}

#[test]
fn hardening_scores_hold() {
    let root = staged_root();
    for (unit, max) in MAX_EXPOSURE {
        let path = root
            .path()
            .join(format!("lib/systemd/system/{unit}.service"));
        let (_, text) = analyze(
            root.path(),
            &["security", "--offline=yes", path.to_str().unwrap()],
        );
        let score: f32 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no score for {unit}:\n{text}"));
        assert!(score <= *max, "{unit}: exposure {score} > {max}\n{text}");
    }
}

/// The readiness protocol, the watchdog and the ordering between the units.
#[test]
fn units_use_notify_watchdog_and_a_one_way_dependency() {
    let read = |u: &str| std::fs::read_to_string(units_dir().join(u)).unwrap();
    let directives = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let nm = read("netmanager.service");
    let ne = read("nodeengine.service");
    for text in [&nm, &ne] {
        assert_eq!(directives(text, "Type"), ["notify"]);
        assert_eq!(directives(text, "WatchdogSec").len(), 1);
        // One copy of each line: the journal, never a log file as well.
        assert!(directives(text, "StandardOutput").is_empty());
        assert!(directives(text, "StandardError").is_empty());
    }
    assert!(directives(&ne, "Wants").contains(&"netmanager.service".to_string()));
    assert!(directives(&ne, "After").contains(&"netmanager.service".to_string()));
    // Never the other way round: nodeengined waits for NetManager's socket.
    for key in ["After", "Wants", "Requires", "BindsTo", "PartOf"] {
        assert!(
            !directives(&nm, key).contains(&"nodeengine.service".to_string()),
            "netmanager.service {key}=nodeengine.service would deadlock"
        );
    }
    // containerd bind-mounts files nodeengined writes: no private /tmp.
    assert!(directives(&ne, "PrivateTmp").iter().all(|v| v == "no"));
}
