//! Default locations on a worker. Every one can be overridden on the command
//! line (and through the environment) of the daemon that uses it.

/// NetManager's local API socket (docs/contract.md, NetManager local API).
pub const NETMANAGER_SOCKET: &str = "/etc/netmanager/netmanager.sock";
/// NetManager's configuration file.
pub const NETMANAGER_CONFIG: &str = "/etc/netmanager/netcfg.json";
/// NodeEngine's configuration file (upstream's format).
pub const NODEENGINE_CONFIG: &str = "/etc/oakestra/conf.json";
/// Where both daemons' log files live when they write their own.
pub const LOG_DIR: &str = "/var/log/oakestra";
/// NodeEngine's log without systemd (`NodeEngine -a -d` appends the
/// daemon's output here); under systemd the journal has it.
pub const NODEENGINE_LOG: &str = "/var/log/oakestra/nodeengine.log";
/// NetManager's log without systemd (nodeengined appends its NetManager
/// child's output here); under systemd the journal has it.
pub const NETMANAGER_LOG: &str = "/var/log/oakestra/netmanager.log";

/// A name for the network namespace this process runs in, when it is not
/// the machine's own: default paths of daemons that run side by side in
/// namespaces (tests, the sandbox) get it as a suffix so they never share
/// state, pins or sockets by accident. A namespace named by `ip netns` gives
/// its name; another one that differs from PID 1's gives `netns<inode>`.
pub fn netns_suffix() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    let same = |m: &std::fs::Metadata| m.ino() == ours.ino() && m.dev() == ours.dev();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            if std::fs::metadata(e.path()).is_ok_and(|m| same(&m)) {
                return Some(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    // PID 1's namespace is the machine's own; unreadable (a restricted
    // /proc) means we cannot tell, and the plain default is kept.
    let init = std::fs::metadata("/proc/1/ns/net").ok()?;
    (!same(&init)).then(|| format!("netns{}", ours.ino()))
}

/// `default`, made unique to this network namespace when it is not the
/// machine's own: `/a/b.json` becomes `/a/b.netns<inode>.json`.
pub fn per_netns(default: &str) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(default);
    let Some(suffix) = netns_suffix() else {
        return path;
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{suffix}"),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_netns_keeps_the_default_in_the_machines_namespace() {
        // Tests run in the machine's namespace unless a harness moved them.
        match netns_suffix() {
            None => assert_eq!(
                per_netns("/run/x/state.json"),
                std::path::PathBuf::from("/run/x/state.json")
            ),
            Some(s) => assert_eq!(
                per_netns("/run/x/state.json"),
                std::path::PathBuf::from(format!("/run/x/state.{s}.json"))
            ),
        }
    }
}
