//! The CSI drivers configured in conf.json (`csi_drivers`) and whether each
//! answers: probed at start and every [`REPROBE_INTERVAL`], so the node report
//! advertises only drivers that work, and a job never waits on a dead socket.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::plugin::{Plugin, PluginInfo};
use crate::config::CsiDriver;

/// How often every configured driver is probed again.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
enum Health {
    /// Not probed yet.
    Unknown,
    Ready(PluginInfo),
    /// The last probe failed (or the endpoint is unusable), with why.
    Down(String),
}

#[derive(Debug, Clone)]
struct Driver {
    config: CsiDriver,
    /// None when the configured endpoint is not a unix socket.
    plugin: Option<Plugin>,
    health: Health,
}

/// A driver a job may use: its client and what its probe said.
#[derive(Debug, Clone)]
pub struct ReadyDriver {
    /// The configured name (what the node advertises).
    pub name: String,
    pub plugin: Plugin,
    pub info: PluginInfo,
}

/// Shared by the deploy path, the reporter and the re-probe task.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    drivers: Arc<RwLock<Vec<Driver>>>,
}

impl Registry {
    pub fn new(configured: &[CsiDriver]) -> Registry {
        let drivers = configured
            .iter()
            .map(|c| {
                let (plugin, health) = match Plugin::new(&c.csi_driver_endpoint) {
                    Ok(p) => (Some(p), Health::Unknown),
                    Err(e) => (None, Health::Down(e.to_string())),
                };
                Driver {
                    config: c.clone(),
                    plugin,
                    health,
                }
            })
            .collect();
        Registry {
            drivers: Arc::new(RwLock::new(drivers)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Driver>> {
        self.drivers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Driver>> {
        self.drivers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Probes every configured driver (concurrently) and records the answers;
    /// logs each change of health.
    pub async fn probe_all(&self) {
        let targets: Vec<(usize, Plugin)> = self
            .read()
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.plugin.clone().map(|p| (i, p)))
            .collect();
        let results = futures::future::join_all(
            targets
                .into_iter()
                .map(|(i, p)| async move { (i, p.probe().await) }),
        )
        .await;
        let mut drivers = self.write();
        for (i, result) in results {
            let Some(d) = drivers.get_mut(i) else {
                continue;
            };
            d.health = record(&d.config, &d.health, result.map_err(|e| e.to_string()));
        }
    }

    /// Probes one driver now (a job names it and the last probe failed).
    async fn probe_one(&self, index: usize) -> Option<ReadyDriver> {
        let plugin = self.read().get(index)?.plugin.clone()?;
        let result = plugin.probe().await.map_err(|e| e.to_string());
        let mut drivers = self.write();
        let d = drivers.get_mut(index)?;
        d.health = record(&d.config, &d.health, result);
        ready(d)
    }

    /// Configured drivers whose last probe succeeded, as the node report lists
    /// them (`{csi_driver_name, csi_driver_endpoint}`, upstream's shape). An
    /// entry configured without a name is advertised under the name the
    /// plugin reports, as upstream does.
    pub fn advertised(&self) -> Vec<CsiDriver> {
        self.read()
            .iter()
            .filter_map(|d| match &d.health {
                Health::Ready(info) => Some(CsiDriver {
                    csi_driver_name: advertised_name(d, info),
                    csi_driver_endpoint: d.config.csi_driver_endpoint.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// The driver a volume names: by configured name, else by the name the
    /// plugin itself reports. A driver that failed its last probe is probed
    /// again before the volume is refused. The error is the reason for the
    /// job's FAILED report.
    pub async fn resolve(&self, name: &str) -> Result<ReadyDriver, String> {
        let found = {
            let drivers = self.read();
            let by_config = drivers.iter().position(|d| {
                !d.config.csi_driver_name.is_empty() && d.config.csi_driver_name == name
            });
            let by_plugin = || {
                drivers
                    .iter()
                    .position(|d| matches!(&d.health, Health::Ready(info) if info.name == name))
            };
            by_config
                .or_else(by_plugin)
                .map(|i| (i, ready(&drivers[i])))
        };
        match found {
            None => Err(format!(
                "CSI driver {name:?} is not configured on this node \
                 (NodeEngine config csi add {name} <endpoint>)"
            )),
            Some((_, Some(r))) => Ok(r),
            Some((i, None)) => match self.probe_one(i).await {
                Some(r) => Ok(r),
                None => Err(self.down_reason(i, name)),
            },
        }
    }

    fn down_reason(&self, index: usize, name: &str) -> String {
        let drivers = self.read();
        let (endpoint, why) = drivers
            .get(index)
            .map(|d| {
                let why = match &d.health {
                    Health::Down(e) => e.clone(),
                    _ => "not probed".to_string(),
                };
                (d.config.csi_driver_endpoint.clone(), why)
            })
            .unwrap_or_default();
        format!("CSI driver {name:?} at {endpoint} does not answer: {why}")
    }

    /// Re-probes every [`REPROBE_INTERVAL`] until `shutdown` turns true.
    pub async fn reprobe_until(self, mut shutdown: watch::Receiver<bool>) {
        if self.read().is_empty() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REPROBE_INTERVAL) => self.probe_all().await,
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

fn advertised_name(d: &Driver, info: &PluginInfo) -> String {
    if d.config.csi_driver_name.is_empty() {
        info.name.clone()
    } else {
        d.config.csi_driver_name.clone()
    }
}

fn ready(d: &Driver) -> Option<ReadyDriver> {
    match (&d.health, &d.plugin) {
        (Health::Ready(info), Some(plugin)) => Some(ReadyDriver {
            name: advertised_name(d, info),
            plugin: plugin.clone(),
            info: info.clone(),
        }),
        _ => None,
    }
}

/// The new health after a probe; logs when it changed.
fn record(config: &CsiDriver, old: &Health, result: Result<PluginInfo, String>) -> Health {
    let name = &config.csi_driver_name;
    let endpoint = &config.csi_driver_endpoint;
    match (old, result) {
        (Health::Ready(_), Ok(info)) => Health::Ready(info),
        (_, Ok(info)) => {
            tracing::info!(
                driver = %name, %endpoint, plugin = %info.name, version = %info.vendor_version,
                stage_unstage = info.stage_unstage, "CSI driver answers"
            );
            if !name.is_empty() && *name != info.name {
                tracing::warn!(
                    driver = %name, plugin = %info.name,
                    "the configured CSI driver name differs from the name the plugin reports; \
                     jobs may use either"
                );
            }
            Health::Ready(info)
        }
        (Health::Down(prev), Err(e)) if *prev == e => Health::Down(e),
        (_, Err(e)) => {
            tracing::warn!(driver = %name, %endpoint, "CSI driver does not answer: {e}");
            Health::Down(e)
        }
    }
}
