//! In a test target with `harness = false`, `#[test]` compiles to nothing:
//! such a test would silently never run. Every workspace test target on the
//! kit's harness must list its tests in `testkit::main!` instead.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// (crate directory, test name) of every `[[test]]` with `harness = false`.
fn harnessless_targets(root: &Path) -> Vec<(PathBuf, String)> {
    let top = std::fs::read_to_string(root.join("Cargo.toml")).expect("workspace Cargo.toml");
    let members = top
        .split("members = [")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("workspace members");
    let mut found = Vec::new();
    for m in members.split(',').map(|m| m.trim().trim_matches('"')) {
        let dir = root.join(m);
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        for block in manifest.split("[[test]]").skip(1) {
            let block = block.split("\n[").next().unwrap_or("");
            if !block.contains("harness = false") {
                continue;
            }
            let name = block
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
                .expect("a [[test]] with a name");
            found.push((dir.clone(), name));
        }
    }
    found
}

#[test]
fn kit_harness_files_declare_their_tests_in_main() {
    let targets = harnessless_targets(&workspace());
    assert!(
        !targets.is_empty(),
        "no harness = false targets found: is the scan broken?"
    );
    for (dir, name) in targets {
        let file = dir.join("tests").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains("testkit::main!"),
            "{} has harness = false but no testkit::main!",
            file.display()
        );
        for attr in ["#[test]", "#[tokio::test"] {
            assert!(
                !text.contains(attr),
                "{} uses {attr}, which never runs without the standard harness: \
                 list the test in testkit::main! instead",
                file.display()
            );
        }
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A standard-harness test that returns early when something is missing
/// reads as passed. Such tests belong on the kit's harness (`Need`).
#[test]
fn no_test_passes_by_skipping() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in [
        "netmanager",
        "nodeengine",
        "worker-common",
        "tests",
        "xtask",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(!files.is_empty(), "no sources found: is the scan broken?");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if !text.contains("#[test]") && !text.contains("#[tokio::test") {
            continue;
        }
        for marker in [
            "eprintln!(\"SKIP",
            "eprintln!(\"skip",
            "println!(\"SKIP",
            "println!(\"skip",
            "can_run(",
        ] {
            assert!(
                !text.contains(marker),
                "{} has a test that skips itself ({marker}...) and so passes without \
                 running: declare what it needs with testkit::main! (testkit/README.md)",
                file.display()
            );
        }
    }
}

/// A file with `testkit::main!` under the standard harness compiles its
/// `main` away: its tests would silently never run. Every such file must be
/// a `harness = false` target of its crate.
#[test]
fn kit_suites_are_harness_false_targets() {
    let root = workspace();
    let declared: Vec<PathBuf> = harnessless_targets(&root)
        .into_iter()
        .map(|(dir, name)| dir.join("tests").join(format!("{name}.rs")))
        .collect();
    let mut files = Vec::new();
    for dir in [
        "netmanager",
        "nodeengine",
        "worker-common",
        "tests",
        "xtask",
        "testkit",
    ] {
        rust_files(&root.join(dir).join("tests"), &mut files);
    }
    assert!(
        !files.is_empty(),
        "no test files found: is the scan broken?"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        // The invocation itself: at the start of a line.
        if text.lines().any(|l| l.starts_with("testkit::main! {")) {
            assert!(
                declared.contains(&file),
                "{} uses testkit::main! but is no `harness = false` [[test]] of its \
                 crate: its tests would never run",
                file.display()
            );
        }
    }
}
