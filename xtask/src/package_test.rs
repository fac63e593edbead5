//! The amd64 packages in a debootstrapped Debian 12 root (part of `cargo
//! xtask test --full`; docs/operations.md records the last result):
//! install, run the binaries, upgrade over a "running" node's dataplane
//! (which must survive), purge (which must remove it).
//!
//! The root is cached as a tarball under target/package-test/ (debootstrap
//! once, ~100 MB) and unpacked afresh for every run. Everything runs in new
//! network, mount and pid namespaces: the dataplane the test seeds (bridge,
//! nft table, pins on a private bpffs) and whatever the package scripts do
//! never touch the machine.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::ebpf::{run, workspace_root};
use crate::package::{Arch, Built};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// In the cached root, so installing the packages needs no network.
const ROOT_PACKAGES: &str = "nftables,iproute2,containerd";

fn cache_dir() -> PathBuf {
    workspace_root().join("target/package-test")
}

/// The cached Debian 12 root, made with debootstrap when absent.
fn cached_root() -> Result<PathBuf> {
    let tarball = cache_dir().join(format!("{SUITE}-root.tar"));
    if tarball.exists() {
        return Ok(tarball);
    }
    std::fs::create_dir_all(cache_dir())?;
    let tmp = cache_dir().join(format!("bootstrap-{}", std::process::id()));
    println!(
        "==> debootstrap {SUITE} (once; cached as {})",
        tarball.display()
    );
    let made = run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={ROOT_PACKAGES}"),
                SUITE,
            ])
            .arg(&tmp)
            .arg(MIRROR),
        "debootstrap (apt install debootstrap)",
    )
    .and_then(|()| {
        run(
            Command::new("tar")
                .arg("-C")
                .arg(&tmp)
                .arg("-cf")
                .arg(&tarball)
                .arg("."),
            "packing the root",
        )
    });
    let _ = std::fs::remove_dir_all(&tmp);
    made.map(|()| tarball)
}

/// Installs, upgrades and purges the amd64 packages in a fresh root.
pub fn install_test(built: &[Built]) -> Result<()> {
    let Some(amd64) = built.iter().find(|b| b.arch == Arch::Amd64) else {
        bail!("the install test needs the amd64 packages");
    };
    let tarball = cached_root()?;
    let root = cache_dir().join(format!("root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let result = (|| {
        run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-xf")
                .arg(&tarball),
            "unpacking the root",
        )?;
        let mut names = Vec::new();
        for deb in &amd64.debs {
            let name = deb
                .file_name()
                .context("package file name")?
                .to_string_lossy()
                .into_owned();
            std::fs::copy(deb, root.join("tmp").join(&name))?;
            names.push(format!("/tmp/{name}"));
        }
        let script = root.join("tmp/oakestra-install-test.sh");
        std::fs::write(&script, script_text(&names))?;
        // New pid namespace: /proc/1 is the test's own shell, in the test's
        // own network namespace, so default paths carry no netns suffix.
        run(
            Command::new("unshare")
                .args([
                    "--net",
                    "--mount",
                    "--pid",
                    "--fork",
                    "--propagation",
                    "private",
                ])
                .arg("sh")
                .arg("-c")
                .arg(format!(
                    "mount -t proc proc {root}/proc && mkdir -p {root}/sys/fs/bpf && \
                     mount -t bpf bpf {root}/sys/fs/bpf && \
                     chroot {root} sh /tmp/oakestra-install-test.sh",
                    root = root.display()
                )),
            "the package install test",
        )
    })();
    // The root is large; never leave it behind.
    let _ = Command::new("umount")
        .arg("-R")
        .arg(&root)
        .stderr(std::process::Stdio::null())
        .status();
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    result?;
    println!("ok: install, upgrade and purge in a Debian 12 root");
    Ok(())
}

/// The steps inside the root; `set -e` and explicit checks, each failure
/// saying what went wrong.
fn script_text(debs: &[String]) -> String {
    let debs = debs.join(" ");
    format!(
        r#"set -eu
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() {{ echo "INSTALL TEST FAILED: $*" >&2; exit 1; }}
# No service starts in a root without systemd; say so to invoke-rc.d.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d

echo "--> install"
apt-get install -y --no-install-recommends {debs}
NetManager --version | grep -q "^NetManager [0-9].* (git " || fail "NetManager --version"
NetManager --version
NodeEngine --help | grep -q "Usage: NodeEngine" || fail "NodeEngine --help"
nodeengined --version | grep -q "^nodeengined " || fail "nodeengined --version"
for f in /lib/systemd/system/netmanager.service /lib/systemd/system/nodeengine.service \
         /usr/share/man/man8/NetManager.8.gz /usr/share/man/man8/NodeEngine.8.gz \
         /usr/share/man/man8/nodeengined.8.gz /usr/share/bash-completion/completions/NodeEngine \
         /etc/netmanager/netcfg.json /etc/oakestra/conf.json /etc/logrotate.d/oakestra; do
    [ -e "$f" ] || fail "$f not installed"
done
dpkg-query -W -f='${{Conffiles}}\n' oakestra-netmanager | grep -q /etc/netmanager/netcfg.json \
    || fail "netcfg.json is not a conffile"
dpkg-query -W -f='${{Conffiles}}\n' oakestra-nodeengine | grep -q /etc/oakestra/conf.json \
    || fail "conf.json is not a conffile"
NodeEngine config cluster 198.51.100.10 >/dev/null
grep -q 198.51.100.10 /etc/oakestra/conf.json || fail "NodeEngine config did not write"

echo "--> a node's dataplane (as a running NetManager leaves it)"
ip link add goProxyBridge type bridge
nft add table inet oakestra
mkdir -p /sys/fs/bpf/oakestra /run/oakestra
echo '{{}}' > /run/oakestra/netmanager-state.json
present() {{
    ip link show goProxyBridge >/dev/null 2>&1 && nft list table inet oakestra >/dev/null 2>&1 \
        && [ -d /sys/fs/bpf/oakestra ] && [ -e /run/oakestra/netmanager-state.json ]
}}
present || fail "seeding the dataplane"

echo "--> upgrade (reinstall): the dataplane stays"
dpkg -i {debs}
present || fail "the upgrade removed the dataplane"

echo "--> purge: the dataplane and the configuration go"
apt-get purge -y oakestra-nodeengine oakestra-netmanager
ip link show goProxyBridge >/dev/null 2>&1 && fail "bridge left after purge"
nft list table inet oakestra >/dev/null 2>&1 && fail "nft table left after purge"
[ -e /sys/fs/bpf/oakestra ] && fail "pins left after purge"
[ -e /run/oakestra/netmanager-state.json ] && fail "state file left after purge"
[ -e /etc/netmanager/netcfg.json ] && fail "netcfg.json left after purge"
[ -e /etc/oakestra/conf.json ] && fail "conf.json left after purge"
[ -e /usr/bin/NetManager ] && fail "NetManager left after purge"
echo "install test passed"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script is valid shell and names every package it installs.
    #[test]
    fn script_is_valid_shell() {
        let text = script_text(&["/tmp/a.deb".into(), "/tmp/b.deb".into()]);
        assert!(text.contains("apt-get install -y --no-install-recommends /tmp/a.deb /tmp/b.deb"));
        let dir = std::env::temp_dir().join(format!("oak-script-{}", std::process::id()));
        std::fs::write(&dir, &text).unwrap();
        let ok = Command::new("sh").arg("-n").arg(&dir).status().unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(ok.success());
    }
}
