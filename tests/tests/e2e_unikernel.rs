//! A unikernel job end to end through the sandbox: the real NodeEngine
//! downloads the image from an HTTP server, NetManager prepares the
//! instance's namespace, qemu boots the guest, and QMP `quit` stops it on
//! undeploy.
//!
//! No unikernel image can be fetched here, so the guest is Debian 12's stock
//! kernel with a busybox initramfs whose init does what a unikernel does with
//! upstream's command line: it reads its network from the `netdev.*`
//! arguments, configures it, and reports (on the serial console, which is
//! the app log) `/proc/cmdline`, its arguments after `--`, address, gateway,
//! mask and MAC, a ping of the gateway, the 9p share `fs0` and then serves
//! HTTP. The archive has upstream's layout: `kernel`, `initramfs.cpio`,
//! `files/`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use oakestra_worker_tests::e2e::{E2e, eventually};
use serde_json::{Value, json};
use testkit::cluster::{JobSpec, job_document};
use testkit::process::{all_pids, kill_matching};
use testkit::{NsPath, Proc, sh, wait_for};
use xtask::debian_kernel;
use xtask::sandbox::workers::Worker;

testkit::main! {
    unikernel_boots_with_upstreams_network_and_stops_by_qmp:
        [Root, Bpffs, Mosquitto, Containerd, Busybox, Nft, Python3, Qemu],
}

/// The guest's drivers: virtio PCI and net, 9p over virtio (Debian builds
/// them as modules). The init loads them in a few passes, so order is free.
const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/fs/netfs/netfs.ko",
    "kernel/fs/fscache/fscache.ko",
    "kernel/net/9p/9pnet.ko",
    "kernel/net/9p/9pnet_virtio.ko",
    "kernel/fs/9p/9p.ko",
];

/// The guest's PID 1. Its output goes to the serial console (the instance's
/// app log); the kernel's own messages do not (no console= argument).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/ttyS0 2>&1
for pass in 1 2 3 4; do
  for m in /modules/*.ko; do
    n=$(basename $m .ko | tr - _)
    grep -q "^$n " /proc/modules || insmod $m 2>/dev/null
  done
done
echo "OAK-UK-CMDLINE $(cat /proc/cmdline)"
echo "OAK-UK-ARGS $*"
for w in $(cat /proc/cmdline); do
  case $w in
    netdev.ipv4_addr=*) addr=${w#*=} ;;
    netdev.ipv4_gw_addr=*) gw=${w#*=} ;;
    netdev.ipv4_subnet_mask=*) mask=${w#*=} ;;
  esac
done
ip link set lo up
ifconfig eth0 "$addr" netmask "$mask" up
route add default gw "$gw"
echo "OAK-UK-NET addr=$(ifconfig eth0 | grep -o 'inet addr:[0-9.]*' | cut -d: -f2) mask=$(ifconfig eth0 | grep -o 'Mask:[0-9.]*' | cut -d: -f2) gw=$(route -n | grep '^0.0.0.0' | tr -s ' ' | cut -d' ' -f2) mac=$(cat /sys/class/net/eth0/address)"
if ping -c 1 -W 5 "$gw" >/dev/null 2>&1; then echo "OAK-UK-PING ok"; else echo "OAK-UK-PING failed"; fi
mkdir -p /mnt/fs0
if mount -t 9p -o trans=virtio,version=9p2000.L fs0 /mnt/fs0; then echo "OAK-UK-FILES $(cat /mnt/fs0/greeting.txt)"; fi
mkdir -p /www
echo "hello from the unikernel" > /www/index.html
httpd -p 8080 -h /www
echo "OAK-UK-READY"
while true; do sleep 3600; done
"#;

/// Marker lines of the guest's report, by name (`OAK-UK-<NAME> rest`).
fn report(log: &str, name: &str) -> Option<String> {
    let mark = format!("OAK-UK-{name}");
    log.lines()
        .filter_map(|l| {
            l.find(&mark)
                .map(|i| l[i + mark.len()..].trim().to_string())
        })
        .next_back()
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
}

/// Builds `<dir>/uk.tar.gz` (kernel, initramfs.cpio, files/greeting.txt);
/// returns its SHA-256.
fn build_image(dir: &Path) -> Result<String> {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .context("workspace root")?;
    let kernel = debian_kernel::kernel_image(&root.join("target/old-kernel"), MODULES)?;
    let guest = dir.join("guest");
    for d in ["bin", "modules", "proc", "sys", "dev", "mnt", "tmp"] {
        std::fs::create_dir_all(guest.join(d))?;
    }
    std::fs::copy("/bin/busybox", guest.join("bin/busybox")).context("busybox")?;
    for m in &kernel.modules {
        std::fs::copy(
            m,
            guest
                .join("modules")
                .join(m.file_name().unwrap_or_default()),
        )?;
    }
    let init = guest.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = dir.join("image");
    std::fs::create_dir_all(image.join("files"))?;
    std::fs::copy(&kernel.vmlinuz, image.join("kernel"))?;
    std::fs::write(image.join("files/greeting.txt"), "hello-over-9p\n")?;
    sh(&format!(
        "cd {} && find . | busybox cpio -o -H newc > {} 2>/dev/null",
        guest.display(),
        image.join("initramfs.cpio").display()
    ))?;
    sh(&format!(
        "tar -C {} -czf {} kernel initramfs.cpio files",
        image.display(),
        dir.join("uk.tar.gz").display()
    ))?;
    let sum = sh(&format!("sha256sum {}", dir.join("uk.tar.gz").display()))?;
    Ok(sum.split_whitespace().next().unwrap_or("").to_string())
}

/// An HTTP server for `dir` on 127.0.0.1:`port` in the worker's namespace
/// (where NodeEngine downloads from).
fn serve(w: &Worker, dir: &Path, port: u16) -> Result<Proc> {
    let port_arg = port.to_string();
    let dir_arg = dir.display().to_string();
    let mut cmd = w.node.ns.command("python3")?;
    cmd.args([
        "-m",
        "http.server",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--directory",
        &dir_arg,
    ]);
    let p = Proc::spawn_logged("http.server", cmd, &w.dir.join("http-server.log"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait_for("the image server", Duration::from_secs(10), || {
        w.node.ns.accepts(addr)
    })?;
    Ok(p)
}

/// Turns on `virtualization unikernel` in the worker's conf.json and
/// restarts its NodeEngine.
fn enable_unikernels(e: &mut E2e) -> Result<()> {
    let w = e.sb.worker_mut(1)?;
    let conf = w.dir.join("conf.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&conf)?)?;
    cfg["virtualizations"]
        .as_array_mut()
        .context("virtualizations")?
        .push(
            json!({"virutalizaiton_name": "unikraft", "virutalizaiton_runtime": "unikernel",
                     "virutalizaiton_active": true, "virutalizaiton_config": []}),
        );
    std::fs::write(&conf, cfg.to_string())?;
    // Some hosts' KVM passes NodeEngine's probe and then hangs in the guest
    // kernel (this machine's PVM runs SeaBIOS, not a stock Linux): the test
    // checks what the guest sees, so it pins TCG (the probe has unit tests).
    w.set_nodeengine_env("NODEENGINE_UNIKERNEL_ACCEL", "tcg");
    w.stop_nodeengine();
    w.start_nodeengine()
}

fn unikernel_doc(e: &E2e, job: &str, image: &str) -> Result<Value> {
    let spec = JobSpec {
        job_name: job.into(),
        image: image.into(),
        cmd: vec!["report".into(), "--verbose".into()],
        environment: Vec::new(),
    };
    let (rr, _) = e.sb.cluster.service_ips(job);
    let mut doc = job_document(&spec, 0, &rr)?;
    doc["virtualization"] = "unikernel".into();
    doc["arch"] = json!(["amd64"]);
    doc["memory"] = 256.into();
    doc["vcpus"] = 1.into();
    Ok(doc)
}

/// Why `job` failed, as its worker reported.
fn failure(e: &E2e, job: &str) -> String {
    e.sb.cluster.failure(job).unwrap_or_default()
}

/// Removes what a failed run would leave: the instance's qemu and the
/// namespace NetManager made for it (the sandbox only removes its own).
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let name = format!("{},debug-threads=on", self.0);
        kill_matching(|cmdline| cmdline.contains("qemu-system") && cmdline.contains(&name));
        testkit::netns::delete_named(&self.0);
    }
}

/// Whether a qemu of instance `task` still runs.
fn qemu_runs(task: &str) -> bool {
    all_pids().into_iter().any(|pid| {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&raw);
        cmdline.contains("qemu-system") && cmdline.contains(task)
    })
}

fn unikernel_boots_with_upstreams_network_and_stops_by_qmp() -> Result<()> {
    let mut e = E2e::start("uk", 1)?;
    let files = tempfile::tempdir()?;
    let sha = build_image(files.path())?;
    enable_unikernels(&mut e)?;
    let port = 20000 + (std::process::id() % 20000) as u16;
    let _server = serve(e.worker(1), files.path(), port)?;
    let node = e.worker(1).id.clone();
    let url = format!("http://127.0.0.1:{port}/uk.tar.gz");

    // Plain HTTP without a digest is refused (and shows NodeEngine is up again).
    let unpinned = e.job("nodigest");
    eventually(
        "the restarted NodeEngine to refuse an unpinned image",
        || {
            e.sb.cluster
                .deploy_document(&node, &unikernel_doc(&e, &unpinned, &url)?)?;
            wait_for("FAILED", Duration::from_secs(5), || {
                e.sb.cluster
                    .statuses(&unpinned, 0)
                    .iter()
                    .any(|s| s == "FAILED")
            })
        },
    )?;
    ensure!(
        failure(&e, &unpinned).contains("plain HTTP"),
        "{}",
        failure(&e, &unpinned)
    );

    // A digest that does not match is refused.
    let wrong = e.job("wrongsum");
    let bad = format!("{url}#sha256={}", "0".repeat(64));
    e.sb.cluster
        .deploy_document(&node, &unikernel_doc(&e, &wrong, &bad)?)?;
    e.sb.cluster.wait_status(&wrong, 0, "FAILED", 1)?;
    ensure!(
        failure(&e, &wrong).contains("SHA-256"),
        "{}",
        failure(&e, &wrong)
    );

    // The real one.
    let job = e.job("guest");
    let task = format!("{job}.instance.0");
    let _leftovers = Leftovers(task.clone());
    let pinned = format!("{url}#sha256={sha}");
    e.sb.cluster
        .deploy_document(&node, &unikernel_doc(&e, &job, &pinned)?)?;
    e.sb.cluster.wait_status(&job, 0, "CREATED", 1)?;
    let log = e.worker(1).app_log(&job, 0);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    // A Debian kernel under TCG boots in about a minute on an idle 2-CPU
    // machine; the bound is for a busy one.
    wait_for("the guest to report", Duration::from_secs(300), || {
        text().contains("OAK-UK-READY")
    })
    .with_context(|| format!("guest output so far:\n{}", text()))?;
    let out = text();

    // What the guest sees, as with upstream's NetManager: the instance's own
    // address on the node subnet (the guest took it over from eth0), the
    // bridge as gateway, tap0's MAC (a macvtap passes only its own frames).
    let status = e.worker(1).status()?;
    let deployment = status["deployments"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["serviceName"] == job.as_str()))
        .with_context(|| format!("no deployment of {job} in {status}"))?;
    let instance_ip = deployment["nsAddress"].as_str().unwrap_or("").to_string();
    let subnet: std::net::Ipv4Addr = status["subnet"]
        .as_str()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no subnet in {status}"))?;
    let gateway = std::net::Ipv4Addr::from(u32::from(subnet) + 1).to_string();
    let cmdline = report(&out, "CMDLINE").context("cmdline")?;
    ensure!(
        cmdline
            == format!(
                "netdev.ipv4_addr={instance_ip} netdev.ipv4_gw_addr={gateway} \
                 netdev.ipv4_subnet_mask=255.255.255.192 -- report --verbose"
            ),
        "guest cmdline: {cmdline:?}"
    );
    ensure!(
        report(&out, "ARGS").as_deref() == Some("report --verbose"),
        "{out}"
    );
    let net = report(&out, "NET").context("net")?;
    ensure!(field(&net, "addr") == instance_ip, "{net}");
    ensure!(field(&net, "mask") == "255.255.255.192", "{net}");
    ensure!(field(&net, "gw") == gateway, "{net}");
    let tap = NsPath::named(&task)
        .link("tap0")?
        .context("no tap0 in the instance's namespace")?;
    ensure!(tap.kind.as_deref() == Some("macvtap"), "{tap:?}");
    let tap_mac = tap
        .mac
        .map(|m| m.map(|b| format!("{b:02x}")).join(":"))
        .unwrap_or_default();
    ensure!(field(&net, "mac") == tap_mac, "{net} (tap0 {tap_mac})");
    ensure!(report(&out, "PING").as_deref() == Some("ok"), "{out}");
    ensure!(
        report(&out, "FILES").as_deref() == Some("hello-over-9p"),
        "{out}"
    );

    // The guest answers on the instance's address itself.
    let page = eventually("the guest's HTTP server", || {
        let answer = e.worker(1).node.ns.http_get(
            &format!("http://{instance_ip}:8080/"),
            Duration::from_secs(5),
        )?;
        let body = answer.text().into_owned();
        ensure!(body.contains("hello from the unikernel"), "{body:?}");
        Ok(answer)
    })?;
    ensure!(page.status.is_success(), "{page:?}");

    // Undeploy: QMP quit, qemu gone, namespace gone.
    e.sb.cluster.undeploy(&node, &job, 0)?;
    e.sb.cluster.wait_status(&job, 0, "UNDEPLOYED", 1)?;
    let nodeengine = std::fs::read_to_string(e.worker(1).log("nodeengine"))?;
    ensure!(
        nodeengine
            .lines()
            .any(|l| l.contains("unikernel stopped through QMP quit") && l.contains(&task)),
        "no QMP stop in the NodeEngine log"
    );
    ensure!(!qemu_runs(&task), "qemu of {task} still runs");
    let namespaces = testkit::netns::list_named();
    ensure!(
        !namespaces.contains(&task),
        "namespace left: {namespaces:?}"
    );
    Ok(())
}
