//! The `/etc/resolv.conf` every container gets, picked as upstream picks it:
//! systemd-resolved's list of the real upstream servers when the host runs
//! systemd-resolved, otherwise a file naming a public nameserver. Never the
//! host's `/etc/resolv.conf`, whose resolver is often on the host's loopback
//! (systemd-resolved's stub 127.0.0.53, dnsmasq), which a container in its
//! own network namespace cannot reach.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// systemd-resolved's file with the upstream servers (not the stub).
pub const SYSTEMD_RESOLVED: &str = "/run/systemd/resolve/resolv.conf";
/// Upstream's fallback nameserver.
pub const FALLBACK_NAMESERVER: &str = "8.8.8.8";

/// Whether a resolv.conf names a nameserver a container can reach.
fn names_reachable_nameserver(text: &str) -> bool {
    text.lines().any(|l| {
        let mut words = l.split_whitespace();
        words.next() == Some("nameserver")
            && words
                .next()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some_and(|a| !a.is_loopback() && !a.is_unspecified())
    })
}

/// The file to bind-mount at the containers' `/etc/resolv.conf`.
pub fn resolver_file(state_dir: &Path) -> Result<PathBuf> {
    pick(Path::new(SYSTEMD_RESOLVED), state_dir)
}

fn pick(resolved: &Path, state_dir: &Path) -> Result<PathBuf> {
    if let Ok(text) = std::fs::read_to_string(resolved)
        && names_reachable_nameserver(&text)
    {
        return Ok(resolved.to_path_buf());
    }
    fallback_file(state_dir)
}

/// `<state_dir>/resolv.conf` naming the fallback nameserver, written once
/// (atomically, so a container starting meanwhile never sees half a file).
fn fallback_file(state_dir: &Path) -> Result<PathBuf> {
    let path = state_dir.join("resolv.conf");
    let content = format!("nameserver {FALLBACK_NAMESERVER}\n");
    if std::fs::read_to_string(&path).is_ok_and(|t| t == content) {
        return Ok(path);
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let tmp = tempfile_in(state_dir)?;
    (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        std::fs::rename(&tmp, &path)
    })()
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn tempfile_in(dir: &Path) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(dir.join(format!(".resolv.conf.{}.{nanos}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_never_used() {
        assert!(!names_reachable_nameserver(
            "nameserver 127.0.0.53\noptions edns0\n"
        ));
        assert!(!names_reachable_nameserver("nameserver ::1\n"));
        assert!(names_reachable_nameserver("# x\nnameserver 10.0.0.2\n"));
        assert!(names_reachable_nameserver("nameserver fe80::1%eth0\n"));
    }

    #[test]
    fn systemd_resolved_when_it_has_servers_else_the_fallback() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolved = dir.path().join("resolved.conf");
        let state = dir.path().join("state");
        // No systemd-resolved: the fallback file.
        let p = pick(&resolved, &state).expect("fallback");
        assert_eq!(p, state.join("resolv.conf"));
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "nameserver 8.8.8.8\n"
        );
        // Only a stub: still the fallback.
        std::fs::write(&resolved, "nameserver 127.0.0.53\n").expect("w");
        assert_eq!(pick(&resolved, &state).expect("fallback"), p);
        // Real servers: systemd-resolved's file.
        std::fs::write(&resolved, "nameserver 192.0.2.53\n").expect("w");
        assert_eq!(pick(&resolved, &state).expect("resolved"), resolved);
    }
}
