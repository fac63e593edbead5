//! A real MQTT broker per test: mosquitto on loopback (a free port) or
//! inside a namespace, stoppable and restartable on the same port (broker
//! outages are part of what the daemons must survive).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::which;
use crate::netns::NsPath;
use crate::process::{Proc, wait_for};

/// Where a broker listens, as clients reach it: a host (address), a port
/// and the namespace to connect from (None: this process's).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub netns: Option<NsPath>,
}

impl Endpoint {
    /// Whether something accepts connections there.
    pub fn accepting(&self) -> bool {
        let Ok(ip) = self.host.parse::<std::net::IpAddr>() else {
            return false;
        };
        let addr = SocketAddr::new(ip, self.port);
        match &self.netns {
            Some(ns) => ns.accepts(addr),
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok(),
        }
    }

    /// Waits until the broker accepts connections.
    pub fn wait_accepting(&self) -> Result<()> {
        wait_for(
            &format!("the MQTT broker on {}:{}", self.host, self.port),
            Duration::from_secs(10),
            || self.accepting(),
        )
    }
}

/// A free TCP port on 127.0.0.1 (of this namespace).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Anyone may connect.
const OPEN: &str = "allow_anonymous true";

/// Settings of every broker the kit starts. `set_tcp_nodelay`: with
/// mosquitto's default (Nagle on) a small PUBLISH that follows a PUBACK on
/// the same connection waits for the client's delayed ACK, about 40 ms per
/// table-query miss; upstream's deployments and the daemons (which set
/// TCP_NODELAY on their side) do not pay that, so the tests must not either.
const ALWAYS: &str = "set_tcp_nodelay true\npersistence false";

/// A broker that speaks TLS (server certificate only) and wants a user
/// name and password.
#[derive(Clone, Debug)]
pub struct BrokerSecurity {
    pub pki: crate::pki::Pki,
    pub user: String,
    pub password: String,
}

impl BrokerSecurity {
    /// mosquitto.conf lines for the listener, with the password file
    /// written to `dir` (by `mosquitto_passwd`, so it is hashed as mosquitto
    /// expects).
    pub fn settings(&self, dir: &Path) -> Result<String> {
        let passwd = dir.join("mosquitto.passwd");
        let program = which("mosquitto_passwd")
            .context("mosquitto_passwd is not installed (Need::Mosquitto)")?;
        let mut cmd = Command::new(program);
        cmd.args(["-b", "-c"])
            .arg(&passwd)
            .arg(&self.user)
            .arg(&self.password);
        crate::process::output(cmd)?;
        Ok(format!(
            "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate false",
            passwd.display(),
            self.pki.ca.display(),
            self.pki.server_cert.display(),
            self.pki.server_key.display()
        ))
    }
}

/// mosquitto as a child process; stopped on drop.
pub struct Mosquitto {
    endpoint: Endpoint,
    conf: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    /// On 127.0.0.1 and a free port of this namespace; files in `dir`.
    pub fn loopback(dir: &Path) -> Result<Mosquitto> {
        Mosquitto::loopback_with(dir, OPEN)
    }

    /// Like [`loopback`](Self::loopback), with `settings` (mosquitto.conf
    /// lines for the listener: TLS files, `password_file`, ...) instead of
    /// anonymous access.
    pub fn loopback_with(dir: &Path, settings: &str) -> Result<Mosquitto> {
        let port = free_port();
        Mosquitto::start(dir, ("127.0.0.1", port), settings, None)
    }

    /// On loopback, speaking TLS and wanting `security`'s user and password.
    pub fn loopback_secured(dir: &Path, security: &BrokerSecurity) -> Result<Mosquitto> {
        Mosquitto::loopback_with(dir, &security.settings(dir)?)
    }

    /// Inside `ns`, listening on `listen` (an address there, or 0.0.0.0)
    /// and `port`; files in `dir`.
    pub fn in_netns(ns: &NsPath, listen: &str, port: u16, dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start(dir, (listen, port), OPEN, Some(ns.clone()))
    }

    fn start(
        dir: &Path,
        (listen, port): (&str, u16),
        settings: &str,
        netns: Option<NsPath>,
    ) -> Result<Mosquitto> {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!("{ALWAYS}\nlistener {port} {listen}\n{settings}\n"),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let host = if listen == "0.0.0.0" {
            "127.0.0.1"
        } else {
            listen
        };
        let mut m = Mosquitto {
            endpoint: Endpoint {
                host: host.to_string(),
                port,
                netns,
            },
            conf,
            log: dir.join(format!("mosquitto-{port}.log")),
            proc: None,
        };
        m.resume()?;
        Ok(m)
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    pub fn port(&self) -> u16 {
        self.endpoint.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// What mosquitto logged (connections, disconnections, errors), for a
    /// failing test's message.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(no log at {}: {e})", self.log.display()))
    }

    /// Stops the broker (a broker outage); its port stays reserved for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Starts it (again) on the same port and waits until it accepts.
    pub fn resume(&mut self) -> Result<()> {
        self.stop();
        let program = which("mosquitto").context("mosquitto is not installed (Need::Mosquitto)")?;
        let mut cmd = match &self.endpoint.netns {
            Some(ns) => ns.command(&program)?,
            None => Command::new(&program),
        };
        cmd.arg("-c").arg(&self.conf);
        self.proc = Some(Proc::spawn_logged("mosquitto", cmd, &self.log)?);
        self.endpoint
            .wait_accepting()
            .with_context(|| format!("see {}", self.log.display()))
    }

    /// Stop, then start on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.resume()
    }
}
