//! The cluster's MQTT broker on port 10003: rumqttd in-process by default,
//! or a mosquitto child (which, unlike rumqttd, can be stopped and started
//! again: the broker-outage test needs that).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::procs::{Proc, enter_netns, wait_for};

pub const MQTT_PORT: u16 = 10003;

pub enum Broker {
    /// Runs on its own threads until the process exits (rumqttd has no
    /// shutdown call); deleting the underlay namespace does not stop it.
    Embedded,
    Mosquitto {
        netns: PathBuf,
        conf: PathBuf,
        log: PathBuf,
        proc: Option<Proc>,
    },
}

impl Broker {
    /// Starts rumqttd on a thread that has entered `netns`; its listener
    /// and the threads it spawns live there.
    pub fn embedded(netns: &Path) -> Result<Broker> {
        let f = std::fs::File::open(netns).with_context(|| format!("{}", netns.display()))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: only this thread (and threads it creates) switch.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    eprintln!("broker: setns: {}", std::io::Error::last_os_error());
                    return;
                }
                let mut broker = rumqttd::Broker::new(rumqttd_config());
                if let Err(e) = broker.start() {
                    eprintln!("broker stopped: {e}");
                }
            })
            .context("starting the broker thread")?;
        Ok(Broker::Embedded)
    }

    pub fn mosquitto(netns: &Path, dir: &Path) -> Result<Broker> {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {MQTT_PORT} 0.0.0.0\nallow_anonymous true\npersistence false\n"),
        )
        .context("writing mosquitto.conf")?;
        let mut b = Broker::Mosquitto {
            netns: netns.to_path_buf(),
            conf,
            log: dir.join("mosquitto.log"),
            proc: None,
        };
        b.start()?;
        Ok(b)
    }

    /// (Re)starts mosquitto; the embedded broker is always running.
    pub fn start(&mut self) -> Result<()> {
        let Broker::Mosquitto {
            netns,
            conf,
            log,
            proc,
        } = self
        else {
            return Ok(());
        };
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&*conf);
        enter_netns(&mut cmd, netns)?;
        *proc = Some(Proc::spawn("mosquitto", cmd, log)?);
        Ok(())
    }

    /// Stops mosquitto (to simulate a broker outage).
    pub fn stop(&mut self) -> Result<()> {
        match self {
            Broker::Embedded => bail!("the embedded broker cannot be stopped"),
            Broker::Mosquitto { proc, .. } => {
                *proc = None;
                Ok(())
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Mosquitto { proc: Some(p), .. } => Some(p.pid()),
            _ => None,
        }
    }
}

/// Waits until something accepts on `addr` (run from the broker's namespace).
pub fn wait_listening(netns: &Path, port: u16) -> Result<()> {
    let netns = netns.to_path_buf();
    wait_for(
        "the MQTT broker to listen",
        Duration::from_secs(10),
        move || super::procs::netns_connect(&netns, port),
    )
}

fn rumqttd_config() -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 4 << 20,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4-1".into(),
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], MQTT_PORT)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}
