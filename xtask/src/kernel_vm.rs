//! The real programs on an older kernel: `cargo xtask test --full` boots
//! Debian 12's Linux 6.1 under qemu and runs the eBPF test suites there.
//!
//! The kernel comes from Debian's own package (the newest bookworm
//! `linux-image-6.1.0-N-amd64`, cached under `target/old-kernel/`; see
//! [`xtask::debian_kernel`], shared with the unikernel test). The guest
//! is a small initramfs: busybox, bpftool and the compiled test binaries
//! with the shared libraries they need. Its `/init` mounts proc, sysfs and
//! bpffs, runs each suite and reports on the serial console between marker
//! lines, which we parse here. qemu runs with TCG: this machine's /dev/kvm
//! cannot boot stock kernels, and TCG needs about a minute.
//!
//! The last result is written into `docs/old-kernels.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ebpf::{run, workspace_root};
use xtask::debian_kernel;

/// TCG takes about a minute; leave room for a slow, shared machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const GUEST_MEMORY_MIB: u32 = 1024;
const DOC: &str = "docs/old-kernels.md";
const DOC_BEGIN: &str = "<!-- BEGIN last old-kernel run: written by `cargo xtask test --full` -->";
const DOC_END: &str = "<!-- END last old-kernel run -->";

/// Marker lines the guest prints on the serial console.
const MARK_KERNEL: &str = "OAK-GUEST-KERNEL ";
const MARK_BEGIN: &str = "OAK-GUEST-SUITE-BEGIN ";
const MARK_END: &str = "OAK-GUEST-SUITE-END ";
const MARK_DONE: &str = "OAK-GUEST-DONE";

/// A test binary run in the guest.
struct Suite {
    /// Its name in reports and in the guest's /tests.
    name: &'static str,
    /// `cargo test` target selection.
    cargo_target: &'static [&'static str],
    /// The artifact's target name and whether it is the library's unit tests.
    artifact: (&'static str, bool),
    /// Arguments for the test binary (filters).
    args: &'static str,
}

const SUITES: &[Suite] = &[
    // The start-up probes, whose answers differ on 6.1 (no TCX, no decap flags).
    Suite {
        name: "kernel_support",
        cargo_target: &["--lib"],
        artifact: ("netmanager", true),
        args: "kernel_support::",
    },
    // The probes as root, on the kit's harness.
    Suite {
        name: "kernel_check",
        cargo_target: &["--test", "kernel_support"],
        artifact: ("kernel_support", false),
        args: "",
    },
    // The probes as root, on the kit's harness.
    Suite {
        name: "kernel_check",
        cargo_target: &["--test", "kernel_support"],
        artifact: ("kernel_support", false),
        args: "",
    },
    // The real programs under BPF_PROG_TEST_RUN, exact bytes out.
    Suite {
        name: "dataplane_packets",
        cargo_target: &["--test", "dataplane_packets"],
        artifact: ("dataplane_packets", false),
        args: "",
    },
    // Decapsulated packets through the real stack into a container's socket
    // (namespaces, veths, classic tc on 6.1).
    Suite {
        name: "decap_delivery",
        cargo_target: &["--test", "decap_delivery"],
        artifact: ("decap_delivery", false),
        args: "",
    },
    // NetManager's netlink attach mode (classic tc, the only one before
    // 6.6): restarts and a moving uplink under a stream of tunnel
    // datagrams. The TCX variants and the mode switch need TCX: filtered
    // out here rather than reported (the kit would say "not run").
    Suite {
        name: "attach_modes",
        cargo_target: &["--test", "attach_modes"],
        artifact: ("attach_modes", false),
        args: "netlink_",
    },
];

/// Modules the namespace suite needs that Debian builds as modules (none
/// has dependencies); loaded by the guest's init.
const MODULES: &[&str] = &[
    "kernel/drivers/net/veth.ko",
    "kernel/net/sched/sch_ingress.ko",
    "kernel/net/sched/cls_bpf.ko",
];

/// Outcome of one test in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    pub suite: String,
    pub test: String,
    pub outcome: String,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// `uname -r` and `uname -v` of the guest.
    pub kernel: String,
    pub tests: Vec<TestOutcome>,
    /// (suite, exit status) as the guest saw it.
    pub exits: Vec<(String, i32)>,
    /// The guest reached its last line.
    pub done: bool,
}

impl GuestReport {
    fn failures(&self) -> Vec<String> {
        let mut f: Vec<String> = self
            .tests
            .iter()
            .filter(|t| t.outcome != "ok")
            .map(|t| format!("{}::{} {}", t.suite, t.test, t.outcome))
            .collect();
        for (suite, code) in &self.exits {
            if *code != 0 {
                f.push(format!("suite {suite} exited with {code}"));
            }
        }
        for s in SUITES {
            if !self.exits.iter().any(|(n, _)| n == s.name) {
                f.push(format!("suite {} did not finish", s.name));
            } else if !self.tests.iter().any(|t| t.suite == s.name) {
                f.push(format!("suite {} ran no test", s.name));
            }
        }
        if !self.done {
            f.push("the guest did not finish".into());
        }
        f
    }
}

/// Boots the old kernel, runs the suites, records the result in docs/ and
/// fails when any test failed or the guest did not finish.
pub fn run_old_kernel_suites() -> Result<()> {
    let root = workspace_root();
    let cache = root.join("target").join("old-kernel");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    for tool in [
        "qemu-system-x86_64",
        "dpkg-deb",
        "busybox",
        "strip",
        "ldd",
        "bpftool",
    ] {
        if which(tool).is_none() {
            bail!("{tool} is missing: `cargo xtask setup` installs it");
        }
    }
    let kernel = debian_kernel::kernel_image(&cache, MODULES)?;
    println!("old kernel: {} ({})", kernel.package, kernel.deb.display());
    let binaries = build_test_binaries(&root)?;
    let initramfs = build_initramfs(&cache, &binaries, &kernel.modules)?;
    let log = cache.join("serial.log");
    boot(&kernel.vmlinuz, &initramfs, &log)?;
    let text = fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let report = parse_serial(&text);
    print_summary(&report, &kernel.package);
    record(&root.join(DOC), &report, &kernel.package)?;
    let failures = report.failures();
    if !failures.is_empty() {
        bail!(
            "old-kernel run failed (serial log: {}):\n  - {}",
            log.display(),
            failures.join("\n  - ")
        );
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Builds the suites' test binaries and returns (suite name, executable).
fn build_test_binaries(root: &Path) -> Result<Vec<(&'static Suite, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args([
        "test",
        "-p",
        "netmanager",
        "--no-run",
        "--message-format=json",
    ]);
    for s in SUITES {
        cmd.args(s.cargo_target);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed ({})", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_lib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "lib"));
        if let Some(s) = SUITES.iter().find(|s| s.artifact == (name, is_lib)) {
            found.push((s, PathBuf::from(exe)));
        }
    }
    for s in SUITES {
        if !found.iter().any(|(f, _)| f.name == s.name) {
            bail!("cargo built no test binary for suite {}", s.name);
        }
    }
    Ok(found)
}

/// Lays out the guest's root and packs it with busybox cpio (newc).
fn build_initramfs(
    cache: &Path,
    binaries: &[(&Suite, PathBuf)],
    modules: &[PathBuf],
) -> Result<PathBuf> {
    let root = cache.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
    }
    for d in [
        "bin", "tests", "modules", "proc", "sys", "dev", "tmp", "run",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    let busybox = which("busybox").context("busybox")?;
    fs::copy(&busybox, root.join("bin/busybox")).context("copying busybox")?;
    let bpftool = which("bpftool").context("bpftool")?;
    copy_with_libraries(&bpftool, &root, Path::new("usr/sbin/bpftool"))?;
    // iproute2's ip (namespaces, veth), not busybox's.
    let ip = which("ip").context("ip")?;
    copy_with_libraries(&ip, &root, Path::new("usr/sbin/ip"))?;
    for m in modules {
        fs::copy(
            m,
            root.join("modules").join(m.file_name().unwrap_or_default()),
        )
        .with_context(|| format!("copying {}", m.display()))?;
    }
    for (suite, exe) in binaries {
        let dest = root.join("tests").join(suite.name);
        // Without debug info: a third of the size, and the guest holds
        // the whole initramfs in memory.
        run(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dest)
                .arg(exe),
            "strip",
        )?;
        copy_libraries(exe, &root)?;
    }
    write_init(&root)?;
    let cpio = cache.join("initramfs.cpio");
    pack(&root, &cpio)?;
    Ok(cpio)
}

fn copy_with_libraries(bin: &Path, root: &Path, dest: &Path) -> Result<()> {
    let target = root.join(dest);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(bin, &target).with_context(|| format!("copying {}", bin.display()))?;
    copy_libraries(bin, root)
}

/// Copies the shared libraries `ldd` lists (and the loader) to the same
/// paths under `root`.
fn copy_libraries(bin: &Path, root: &Path) -> Result<()> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed", bin.display());
    }
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        if dest.exists() {
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        // fs::copy follows symlinks: the guest gets the real file.
        fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// The guest's PID 1.
fn write_init(root: &Path) -> Result<()> {
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         for m in /modules/*.ko; do insmod $m; done\n\
         ip link set lo up\n",
    );
    script.push_str(&format!("echo \"{MARK_KERNEL}$(uname -r) $(uname -v)\"\n"));
    script.push_str("cd /tmp\n");
    for s in SUITES {
        script.push_str(&format!(
            "echo \"{MARK_BEGIN}{name}\"\n\
             /tests/{name} --test-threads=1 --color never {args} 2>&1\n\
             echo \"{MARK_END}{name} $?\"\n",
            name = s.name,
            args = s.args,
        ));
    }
    script.push_str(&format!("echo \"{MARK_DONE}\"\npoweroff -f\n"));
    let path = root.join("init");
    fs::write(&path, script)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn pack(root: &Path, cpio: &Path) -> Result<()> {
    let mut names = Vec::new();
    list_tree(root, Path::new("."), &mut names)?;
    let out = fs::File::create(cpio).with_context(|| format!("creating {}", cpio.display()))?;
    let mut child = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .context("running busybox cpio")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        stdin.write_all(names.join("\n").as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("busybox cpio failed ({status})");
    }
    Ok(())
}

/// Every path under `dir`, directories before their contents.
fn list_tree(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    out.push(dir.to_string_lossy().into_owned());
    let mut entries: Vec<_> = fs::read_dir(base.join(dir))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = dir.join(e.file_name());
        if e.file_type()?.is_dir() {
            list_tree(base, &rel, out)?;
        } else {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Runs qemu until the guest powers off, with the serial console in `log`.
fn boot(vmlinuz: &Path, initramfs: &Path, log: &Path) -> Result<()> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    println!(
        "booting {} under qemu (TCG, up to {} s) ...",
        vmlinuz.display(),
        BOOT_TIMEOUT.as_secs()
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-smp", "1", "-nographic", "-no-reboot"])
        .args(["-m", &GUEST_MEMORY_MIB.to_string()])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=3"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            println!("guest stopped after {} s", start.elapsed().as_secs());
            if !status.success() {
                bail!("qemu failed ({status}); serial log: {}", log.display());
            }
            return Ok(());
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            // Not fatal here: the report says what did not finish.
            eprintln!(
                "the guest did not power off within {} s",
                BOOT_TIMEOUT.as_secs()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Reads the marker lines and libtest's `test NAME ... RESULT` lines. A
/// marker may follow terminal escapes the firmware left on its line.
pub fn parse_serial(text: &str) -> GuestReport {
    let after = |line: &'_ str, mark: &str| {
        line.find(mark)
            .map(|i| line[i + mark.len()..].trim().to_string())
    };
    let mut r = GuestReport::default();
    let mut suite: Option<String> = None;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(k) = after(line, MARK_KERNEL) {
            r.kernel = k;
        } else if let Some(s) = after(line, MARK_BEGIN) {
            suite = Some(s);
        } else if let Some(rest) = after(line, MARK_END) {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                r.exits
                    .push((name.to_string(), code.parse().unwrap_or(i32::MIN)));
            }
            suite = None;
        } else if line.contains(MARK_DONE) {
            r.done = true;
        } else if let (Some(s), Some(rest)) = (&suite, line.strip_prefix("test "))
            && let Some((test, outcome)) = rest.rsplit_once(" ... ")
        {
            r.tests.push(TestOutcome {
                suite: s.clone(),
                // The kit's harness pads names to one column.
                test: test.trim_end().to_string(),
                outcome: outcome.trim().to_string(),
            });
        }
    }
    r
}

fn print_summary(r: &GuestReport, package: &str) {
    println!("guest kernel: {} ({package})", r.kernel);
    for t in &r.tests {
        println!("  {:<18} {:<70} {}", t.suite, t.test, t.outcome);
    }
    let passed = r.tests.iter().filter(|t| t.outcome == "ok").count();
    println!(
        "{passed} passed, {} failed",
        r.tests.len() - passed + usize::from(!r.done)
    );
}

/// Replaces the generated section of docs/old-kernels.md.
fn record(doc: &Path, r: &GuestReport, package: &str) -> Result<()> {
    let text = fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        bail!(
            "{} lacks the markers {DOC_BEGIN} ... {DOC_END}",
            doc.display()
        );
    };
    let section = render(r, package, &today()?);
    let new = format!("{}{DOC_BEGIN}\n{section}{}", &text[..b], &text[e..]);
    fs::write(doc, new).with_context(|| format!("writing {}", doc.display()))
}

fn render(r: &GuestReport, package: &str, date: &str) -> String {
    let passed = r.tests.iter().filter(|t| t.outcome == "ok").count();
    let failures = r.failures();
    let mut s = format!(
        "Last run: {date}, Debian package `{package}`, guest `uname -r -v`: `{}`, \
         qemu TCG. Result: {passed} passed, {} failed{}.\n\n\
         | suite | test | result |\n| --- | --- | --- |\n",
        r.kernel,
        failures.len(),
        if r.done {
            ""
        } else {
            " (the guest did not finish)"
        },
    );
    for t in &r.tests {
        s.push_str(&format!("| {} | `{}` | {} |\n", t.suite, t.test, t.outcome));
    }
    s
}

fn today() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "[    0.000000] Linux version 6.1.0\r\n\
        Probing EDD (edd=off to disable)... o\x1bc\x1b[?7l\x1b[2JOAK-GUEST-KERNEL 6.1.0-57-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3\r\n\
        OAK-GUEST-SUITE-BEGIN kernel_support\r\n\
        running 2 tests\r\n\
        test kernel_support::tests::a ... ok\r\n\
        test kernel_support::tests::b ... ok\r\n\
        OAK-GUEST-SUITE-END kernel_support 0\r\n\
        OAK-GUEST-SUITE-BEGIN dataplane_packets\r\n\
        test reply_through_tunnel                 ... FAILED\r\n\
        test result: FAILED. 0 passed; 1 failed\r\n\
        OAK-GUEST-SUITE-END dataplane_packets 101\r\n\
        OAK-GUEST-DONE\r\n";

    #[test]
    fn serial_markers_and_test_lines_are_parsed() {
        let r = parse_serial(LOG);
        assert_eq!(
            r.kernel,
            "6.1.0-57-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3"
        );
        assert_eq!(r.tests.len(), 3);
        assert_eq!(r.tests[2].suite, "dataplane_packets");
        assert_eq!(r.tests[2].outcome, "FAILED");
        assert_eq!(
            r.exits,
            vec![
                ("kernel_support".into(), 0),
                ("dataplane_packets".into(), 101)
            ]
        );
        assert!(r.done);
        let f = r.failures();
        assert!(f.contains(&"dataplane_packets::reply_through_tunnel FAILED".to_string()));
        assert!(f.contains(&"suite dataplane_packets exited with 101".to_string()));
    }

    #[test]
    fn a_guest_that_stops_early_fails() {
        let cut = &LOG[..LOG.find("OAK-GUEST-SUITE-BEGIN dataplane").unwrap()];
        let f = parse_serial(cut).failures();
        assert!(f.contains(&"suite dataplane_packets did not finish".to_string()));
        assert!(f.contains(&"the guest did not finish".to_string()));
    }
}
