//! The cluster's MQTT broker on port 10003: rumqttd in-process by default,
//! or the kit's mosquitto (which, unlike rumqttd, can be stopped and
//! started again: the broker-outage test needs that).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testkit::{Endpoint, Mosquitto, NsPath};

mod nodelay;

pub const MQTT_PORT: u16 = 10003;

pub enum Broker {
    /// Runs on its own threads until the process exits (rumqttd has no
    /// shutdown call); deleting the underlay namespace does not stop it.
    Embedded,
    Mosquitto(Box<Mosquitto>),
}

impl Broker {
    /// Starts rumqttd on a thread that has entered `netns`; its listener
    /// and the threads it spawns live there.
    pub fn embedded(netns: &NsPath) -> Result<Broker> {
        // Detached: it runs until the process exits.
        let _ = netns
            .spawn_within(|| {
                let mut broker = rumqttd::Broker::new(rumqttd_config());
                if let Err(e) = broker.start() {
                    eprintln!("broker stopped: {e}");
                }
            })
            .context("starting the broker thread")?;
        nodelay::on_listener(MQTT_PORT, Duration::from_secs(10))?;
        Ok(Broker::Embedded)
    }

    /// mosquitto on 0.0.0.0:10003 inside `netns`, files in `dir`.
    pub fn mosquitto(netns: &NsPath, dir: &Path) -> Result<Broker> {
        let m = Mosquitto::in_netns(netns, "0.0.0.0", MQTT_PORT, dir)?;
        Ok(Broker::Mosquitto(Box::new(m)))
    }

    /// Where the cluster reaches the broker: 127.0.0.1:10003 in `netns`.
    pub fn endpoint(netns: &NsPath) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: MQTT_PORT,
            netns: Some(netns.clone()),
        }
    }

    /// (Re)starts mosquitto; the embedded broker is always running.
    pub fn start(&mut self) -> Result<()> {
        match self {
            Broker::Embedded => Ok(()),
            Broker::Mosquitto(m) => m.resume(),
        }
    }

    /// Stops mosquitto (to simulate a broker outage).
    pub fn stop(&mut self) -> Result<()> {
        match self {
            Broker::Embedded => bail!("the embedded broker cannot be stopped"),
            Broker::Mosquitto(m) => {
                m.stop();
                Ok(())
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Mosquitto(m) => m.pid(),
            Broker::Embedded => None,
        }
    }
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
