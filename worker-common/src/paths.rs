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
