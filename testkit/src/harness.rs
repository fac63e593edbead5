//! The test harness of every suite that needs something of the machine:
//! each test declares its prerequisites, and a test whose prerequisite is
//! missing is reported as *ignored, not run: <why>* -- never as passed.
//! With `OAK_REQUIRE_ALL=1` (set by `cargo xtask test`, which CI runs) a
//! missing prerequisite fails the test instead.
//!
//! A suite using it is a test target with `harness = false` whose `main`
//! is [`crate::main!`]; it accepts the usual libtest arguments (filters,
//! `--list`, `--test-threads`, `--exact`, ...) through libtest-mimic.

use std::path::Path;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The environment variable that turns a missing prerequisite into a failure.
pub const REQUIRE_ALL_ENV: &str = "OAK_REQUIRE_ALL";

/// A file every suite appends its not-run tests to (`<suite> <test>: <why>`
/// lines), for a summary over all suites (`cargo xtask test` prints it).
pub const NOT_RUN_LOG_ENV: &str = "OAK_NOT_RUN_LOG";

/// Tests of this suite that did not run, with why.
static NOT_RUN: std::sync::Mutex<Vec<(&'static str, String)>> = std::sync::Mutex::new(Vec::new());

/// This suite's name: the test binary's, without cargo's hash.
fn suite_name() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem,
    }
}

/// Remembers that `name` did not run and appends it to the not-run log.
fn record_not_run(name: &'static str, why: &str) {
    NOT_RUN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((name, why.to_string()));
    if let Some(path) = std::env::var_os(NOT_RUN_LOG_ENV) {
        use std::io::Write;
        let line = format!("{} {name}: {why}\n", suite_name());
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("cannot append to {}: {e}", Path::new(&path).display());
        }
    }
}

/// The suite's closing words when tests did not run: after cargo's summary,
/// where nobody can miss them.
fn report_not_run() {
    let not_run = NOT_RUN.lock().unwrap_or_else(|p| p.into_inner());
    if not_run.is_empty() {
        return;
    }
    let counted = if require_all() {
        "each failed: OAK_REQUIRE_ALL=1"
    } else {
        "counted as ignored, not passed"
    };
    eprintln!(
        "\nNOT RUN: {} test(s) of {} lacked a prerequisite ({counted}):",
        not_run.len(),
        suite_name()
    );
    for (name, why) in not_run.iter() {
        eprintln!("  {name}: {why}");
    }
    if !require_all() {
        eprintln!(
            "  (`cargo xtask setup` installs the tools, root runs root's tests; \
             {REQUIRE_ALL_ENV}=1 makes such tests fail)"
        );
    }
}

/// Something a test needs of the machine it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Need {
    /// Effective uid 0: network namespaces, netlink, eBPF, nftables, cgroups.
    Root,
    /// bpffs mounted on /sys/fs/bpf (the dataplane pins maps and links there).
    Bpffs,
    /// The mosquitto broker (`/usr/sbin/mosquitto` or on PATH) and its
    /// `mosquitto_passwd` (brokers that want a password).
    Mosquitto,
    /// containerd, its `ctr` client and the `runc` runtime.
    Containerd,
    /// python3 (traffic generators and servers inside namespaces).
    Python3,
    /// The Prometheus project's Python client, whose OpenMetrics parser
    /// checks NetManager's /metrics (`cargo xtask setup` installs it).
    PrometheusClient,
    /// `openssl`, to make test certificates.
    Openssl,
    /// A static busybox at /bin/busybox (the offline container image, ping, nc).
    Busybox,
    /// `nft`, to look at the NAT rules NetManager writes.
    Nft,
    /// `tcpdump`, to capture the underlay.
    Tcpdump,
    /// `iperf3`.
    Iperf3,
    /// `bpftool`, to look at pinned maps.
    Bpftool,
    /// `qemu-system-<arch>` (unikernels, the old-kernel VM).
    Qemu,
    /// No systemd as PID 1 (tests of what the CLI does without it).
    NoSystemd,
    /// A kernel with TCX links (Linux 6.6 or newer).
    Tcx,
    /// iptables and ip6tables in both backends, `-nft` and `-legacy` (the
    /// FORWARD policy Docker sets).
    Iptables,
}

impl Need {
    /// What the prerequisite means, for the README and error messages.
    pub fn meaning(self) -> &'static str {
        match self {
            Need::Root => "running as root (namespaces, netlink, eBPF, nftables, cgroups)",
            Need::Bpffs => "bpffs mounted on /sys/fs/bpf",
            Need::Mosquitto => "the mosquitto MQTT broker and mosquitto_passwd",
            Need::Containerd => "containerd, ctr and runc",
            Need::Python3 => "python3",
            Need::PrometheusClient => "the python3 module prometheus_client",
            Need::Openssl => "openssl",
            Need::Busybox => "a static busybox at /bin/busybox",
            Need::Nft => "nft (nftables)",
            Need::Tcpdump => "tcpdump",
            Need::Iperf3 => "iperf3",
            Need::Bpftool => "bpftool",
            Need::Qemu => "qemu-system for this architecture",
            Need::NoSystemd => "a machine without systemd as PID 1",
            Need::Tcx => "a kernel with TCX links (Linux 6.6 or newer)",
            Need::Iptables => "iptables and ip6tables, -nft and -legacy",
        }
    }

    /// Ok when the machine has it; otherwise why not.
    pub fn check(self) -> Result<(), String> {
        let ok = match self {
            Need::Root => {
                if worker_common::privileges::is_root() {
                    return Ok(());
                }
                return Err(format!(
                    "needs root (running as uid {})",
                    nix::unistd::geteuid()
                ));
            }
            Need::Bpffs => bpffs_mounted(),
            Need::Mosquitto => ["mosquitto", "mosquitto_passwd"]
                .iter()
                .all(|b| which(b).is_some()),
            Need::Containerd => ["containerd", "ctr", "runc"]
                .iter()
                .all(|b| which(b).is_some()),
            Need::Python3 => which("python3").is_some(),
            Need::PrometheusClient => std::process::Command::new("python3")
                .args(["-c", "import prometheus_client"])
                .output()
                .is_ok_and(|o| o.status.success()),
            Need::Openssl => which("openssl").is_some(),
            Need::Busybox => Path::new("/bin/busybox").is_file(),
            Need::Nft => which("nft").is_some(),
            Need::Tcpdump => which("tcpdump").is_some(),
            Need::Iperf3 => which("iperf3").is_some(),
            Need::Bpftool => which("bpftool").is_some(),
            Need::Qemu => which(&format!("qemu-system-{}", std::env::consts::ARCH)).is_some(),
            Need::NoSystemd => !Path::new("/run/systemd/system").is_dir(),
            Need::Tcx => kernel_at_least(6, 6),
            Need::Iptables => [
                "iptables-nft",
                "ip6tables-nft",
                "iptables-legacy",
                "ip6tables-legacy",
            ]
            .iter()
            .all(|b| which(b).is_some()),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("needs {}", self.meaning()))
        }
    }
}

/// Whether the running kernel's release is `major.minor` or newer.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (major, minor)
}

/// Whether a bpffs is mounted on /sys/fs/bpf.
pub fn bpffs_mounted() -> bool {
    nix::sys::statfs::statfs("/sys/fs/bpf")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Where `program` is: on PATH, or in the sbin directories a non-login
/// shell may leave out.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(Into::into))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether `OAK_REQUIRE_ALL=1` asks for every prerequisite to be present.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1")
}

/// The reasons why `needs` are not met here (empty: all present).
pub fn missing(needs: &[Need]) -> Vec<String> {
    needs.iter().filter_map(|n| n.check().err()).collect()
}

/// What a test function may return: nothing (it panics on failure) or a
/// `Result` whose error fails the test.
pub trait TestOutcome {
    fn into_outcome(self) -> Result<(), Failed>;
}

impl TestOutcome for () {
    fn into_outcome(self) -> Result<(), Failed> {
        Ok(())
    }
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), Failed> {
        self.map_err(|e| Failed::from(format!("{e:?}")))
    }
}

thread_local! {
    static ON_FAILURE: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keep `text` (daemon logs, a transcript) for the message of the running
/// test, should it fail. A fixture that is dropped before its test's error
/// is reported (a `?` returns after locals drop) cannot tell whether the
/// test failed; it leaves what it knows here, and the harness shows it
/// only with a failure.
pub fn on_failure(text: String) {
    ON_FAILURE.with(|k| k.borrow_mut().push(text));
}

fn take_kept() -> Vec<String> {
    ON_FAILURE.with(|k| std::mem::take(&mut *k.borrow_mut()))
}

/// The body's outcome, with what fixtures kept for a failure appended.
fn with_kept(outcome: Result<(), Failed>) -> Result<(), Failed> {
    let kept = take_kept();
    outcome.map_err(|f| {
        let mut msg = f.message().map(str::to_string).unwrap_or_default();
        for k in kept {
            msg.push_str("\n\n");
            msg.push_str(&k);
        }
        Failed::from(msg)
    })
}

/// One test of a suite: its name, what it needs, and its body.
pub struct Test {
    name: &'static str,
    needs: &'static [Need],
    body: Box<dyn FnOnce() -> Result<(), Failed> + Send>,
}

impl Test {
    pub fn new<R: TestOutcome>(
        name: &'static str,
        needs: &'static [Need],
        body: impl FnOnce() -> R + Send + 'static,
    ) -> Test {
        Test {
            name,
            needs,
            body: Box::new(move || {
                take_kept();
                with_kept(body().into_outcome())
            }),
        }
    }

    fn into_trial(self) -> Trial {
        let Test { name, needs, body } = self;
        Trial::ignorable_test(name, move || {
            let missing = missing(needs);
            if !missing.is_empty() {
                record_not_run(name, &missing.join(", "));
            }
            decide(&missing, require_all(), body)
        })
    }
}

/// What becomes of test `name` whose prerequisites lack `missing`: it runs
/// when nothing is missing; otherwise its body never runs and it is
/// ignored with the reason, or failed when every prerequisite is required.
fn decide(
    missing: &[String],
    require_all: bool,
    body: impl FnOnce() -> Result<(), Failed>,
) -> Result<Completion, Failed> {
    if missing.is_empty() {
        return body().map(|()| Completion::Completed);
    }
    let why = format!("not run: {}", missing.join(", "));
    if require_all {
        return Err(
            format!("{why} ({REQUIRE_ALL_ENV}=1: every prerequisite must be present)").into(),
        );
    }
    Ok(Completion::ignored_with(why))
}

/// Runs a suite with the command-line arguments cargo passed; the exit code
/// for `main`.
pub fn run(tests: Vec<Test>) -> ExitCode {
    let args = Arguments::from_args();
    let trials = tests.into_iter().map(Test::into_trial).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    report_not_run();
    conclusion.exit_code()
}

/// `main` of a suite: each test function with what it needs.
///
/// ```text
/// testkit::main! {
///     deploy_and_undeploy: [Root, Mosquitto, Nft],
///     parses_the_fixture: [],
///     // One function, several tests: `f(args) as name`.
///     attaches("tcx") as tcx_attaches: [Root, Bpffs, Tcx],
///     attaches("netlink") as netlink_attaches: [Root, Bpffs],
/// }
/// fn deploy_and_undeploy() { /* panics or returns Result on failure */ }
/// fn attaches(mode: &str) { /* ... */ }
/// ```
#[macro_export]
macro_rules! main {
    ($($tests:tt)*) => {
        fn main() -> ::std::process::ExitCode {
            let mut tests = ::std::vec::Vec::new();
            $crate::__tests!(tests; $($tests)*);
            $crate::harness::run(tests)
        }
    };
}

/// The entries of [`main!`], one at a time.
#[doc(hidden)]
#[macro_export]
macro_rules! __tests {
    ($v:ident;) => {};
    ($v:ident; $name:ident: [$($need:ident),* $(,)?] $(, $($rest:tt)*)?) => {
        $v.push($crate::harness::Test::new(
            ::std::stringify!($name),
            &[$($crate::harness::Need::$need),*],
            $name,
        ));
        $crate::__tests!($v; $($($rest)*)?);
    };
    ($v:ident; $f:ident($($arg:expr),* $(,)?) as $name:ident: [$($need:ident),* $(,)?] $(, $($rest:tt)*)?) => {
        $v.push($crate::harness::Test::new(
            ::std::stringify!($name),
            &[$($crate::harness::Need::$need),*],
            move || $f($($arg),*),
        ));
        $crate::__tests!($v; $($($rest)*)?);
    };
}

/// Runs an async test body on a fresh multi-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// A multi-threaded runtime for servers a test runs beside its blocking
/// code (`rt.spawn(...)`); they stop when it drops.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_prerequisite_says_what_it_means() {
        for n in [
            Need::Root,
            Need::Bpffs,
            Need::Mosquitto,
            Need::Containerd,
            Need::Python3,
            Need::PrometheusClient,
            Need::Openssl,
            Need::Busybox,
            Need::Nft,
            Need::Tcpdump,
            Need::Iperf3,
            Need::Bpftool,
            Need::Qemu,
            Need::NoSystemd,
            Need::Tcx,
            Need::Iptables,
        ] {
            assert!(!n.meaning().is_empty());
            if let Err(why) = n.check() {
                assert!(why.starts_with("needs "), "{why}");
            }
        }
    }

    #[test]
    fn what_fixtures_keep_shows_only_with_a_failure() {
        let failing = Test::new("f", &[], || -> Result<(), String> {
            on_failure("worker log tail".into());
            Err("no answer".into())
        });
        let msg = (failing.body)().expect_err("fails");
        assert_eq!(msg.message(), Some("\"no answer\"\n\nworker log tail"));
        let passing = Test::new("p", &[], || -> Result<(), String> {
            on_failure("worker log tail".into());
            Ok(())
        });
        assert!((passing.body)().is_ok());
        assert!(
            take_kept().is_empty(),
            "a pass leaves nothing for the next test"
        );
    }

    #[test]
    fn a_missing_prerequisite_is_never_a_pass() {
        let ran = std::cell::Cell::new(false);
        let body = || {
            ran.set(true);
            Ok(())
        };
        let missing = vec!["needs root (running as uid 1000)".to_string()];
        // Ignored with the reason, body not run.
        let c = decide(&missing, false, body).expect("not a failure");
        assert!(matches!(
            c,
            Completion::Ignored { reason: Some(r) } if r == "not run: needs root (running as uid 1000)"
        ));
        assert!(!ran.get());
        // Required: a failure naming what is missing.
        let Err(e) = decide(&missing, true, body) else {
            panic!("a missing prerequisite passed under {REQUIRE_ALL_ENV}=1");
        };
        assert!(
            e.message()
                .is_some_and(|m| m.contains("needs root") && m.contains(REQUIRE_ALL_ENV)),
            "{e:?}"
        );
        assert!(!ran.get());
        // Nothing missing: the body decides.
        assert!(matches!(decide(&[], true, body), Ok(Completion::Completed)));
        assert!(ran.get());
        let failing = || Err(Failed::from("boom"));
        assert!(decide(&[], false, failing).is_err());
    }

    #[test]
    fn which_finds_sh_and_not_nonsense() {
        assert!(which("sh").is_some());
        assert!(which("no-such-program-oak").is_none());
    }
}
