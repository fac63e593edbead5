//! nodeengined's Prometheus metrics and readiness: deploys by outcome and
//! their latency, running instances by virtualization, the cluster link's
//! state, report publish failures and the node's resources as last
//! reported. Served with `/healthz` and `/readyz` on a local listener
//! (`--metrics-address`, 127.0.0.1:9103 by default, "off" disables it)
//! through `worker_common::metrics`, as NetManager's are.
//!
//! The figures are updated where things happen (the engine, the MQTT
//! session, the reporter); running instances are counted from the engine
//! at scrape time, so they can never drift from what runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::node_report::NodeDocument;

/// Where nodeengined serves metrics and health unless told otherwise (next
/// to NetManager's 9102).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9103";
/// The variable (and `--metrics-address`) both nodeengined and `NodeEngine
/// status` read.
pub const ADDRESS_ENV: &str = "NODEENGINE_METRICS_ADDRESS";

/// How a deploy request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// The instance runs (CREATED reported).
    Created,
    /// FAILED reported: invalid job, refused by policy, runtime error.
    Failed,
    /// A second delivery of a deploy for an instance that already runs.
    Duplicate,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Failed => "failed",
            Outcome::Duplicate => "duplicate",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Which report could not be handed to the MQTT client.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Report {
    /// `nodes/<id>/information`.
    Node,
    /// `nodes/<id>/jobs/resources`.
    Resources,
    /// `nodes/<id>/job`: a status change of one instance.
    Status,
}

impl Report {
    fn label(self) -> &'static str {
        match self {
            Report::Node => "node",
            Report::Resources => "resources",
            Report::Status => "status",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    report: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeLabels {
    virtualization: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The node's resources as the last node report stated them.
#[derive(Clone, Debug, Default)]
struct Resources {
    cpu_percent: FloatGauge,
    vcpus: Gauge,
    memory_percent: FloatGauge,
    memory_available_mib: Gauge,
    vgpus: Gauge,
    gpu_percent: FloatGauge,
}

/// Cheap to clone: every clone updates the same figures.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    deploys: Family<OutcomeLabels, Counter>,
    deploy_seconds: Histogram,
    publish_failures: Family<ReportLabels, Counter>,
    running: Family<RuntimeLabels, Gauge>,
    registered: Gauge,
    broker_connected: Gauge,
    broker_connects: Counter,
    /// None when the node runs without the overlay (network off).
    netmanager_registered: Option<Gauge>,
    resources: Resources,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(false)
    }
}

impl Metrics {
    /// `with_netmanager`: the node uses NetManager, so readiness waits for
    /// its registration there.
    pub fn new(with_netmanager: bool) -> Metrics {
        let mut registry = Registry::with_prefix("nodeengine");
        // Every outcome and report from the start: a series that appears
        // only with its first event hides that event from rate().
        let deploys = Family::<OutcomeLabels, Counter>::default();
        for o in [Outcome::Created, Outcome::Failed, Outcome::Duplicate] {
            let _ = deploys.get_or_create(&OutcomeLabels { outcome: o.label() });
        }
        registry.register("deploys", "Deploy requests by outcome", deploys.clone());
        // From a cached image (well under a second) to a slow pull (minutes).
        let deploy_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "deploy_duration_seconds",
            "Time from a deploy request to its CREATED or FAILED report",
            deploy_seconds.clone(),
        );
        let publish_failures = Family::<ReportLabels, Counter>::default();
        for r in [Report::Node, Report::Resources, Report::Status] {
            let _ = publish_failures.get_or_create(&ReportLabels { report: r.label() });
        }
        registry.register(
            "report_publish_failures",
            "Reports to the cluster that could not be queued for the broker",
            publish_failures.clone(),
        );
        let running = Family::<RuntimeLabels, Gauge>::default();
        registry.register(
            "running_instances",
            "Instances running on this node by virtualization",
            running.clone(),
        );
        let registered = Gauge::default();
        registry.register(
            "cluster_registered",
            "1 once the node is registered with the cluster",
            registered.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "cluster_broker_connected",
            "1 while the MQTT session with the cluster's broker is up",
            broker_connected.clone(),
        );
        let broker_connects = Counter::default();
        registry.register(
            "cluster_broker_connects",
            "MQTT sessions established with the cluster's broker (reconnects are the excess over 1)",
            broker_connects.clone(),
        );
        let netmanager_registered = with_netmanager.then(|| {
            let g = Gauge::default();
            registry.register(
                "netmanager_registered",
                "1 once the node is registered with its NetManager",
                g.clone(),
            );
            g
        });
        let resources = Resources::default();
        let node = registry.sub_registry_with_prefix("node");
        node.register(
            "cpu_percent",
            "CPU use as last reported to the cluster",
            resources.cpu_percent.clone(),
        );
        node.register("vcpus", "CPUs as last reported", resources.vcpus.clone());
        node.register(
            "memory_percent",
            "Memory use as last reported",
            resources.memory_percent.clone(),
        );
        node.register(
            "memory_available_mebibytes",
            "Available memory as last reported",
            resources.memory_available_mib.clone(),
        );
        node.register("vgpus", "GPUs as last reported", resources.vgpus.clone());
        node.register(
            "gpu_percent",
            "GPU use as last reported",
            resources.gpu_percent.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                deploys,
                deploy_seconds,
                publish_failures,
                running,
                registered,
                broker_connected,
                broker_connects,
                netmanager_registered,
                resources,
            }),
        }
    }

    /// A deploy request ended after `seconds` (duplicates are not timed).
    pub fn deploy(&self, outcome: Outcome, seconds: Option<f64>) {
        self.inner
            .deploys
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
        if let Some(s) = seconds {
            self.inner.deploy_seconds.observe(s);
        }
    }

    pub fn publish_failed(&self, report: Report) {
        self.inner
            .publish_failures
            .get_or_create(&ReportLabels {
                report: report.label(),
            })
            .inc();
    }

    pub fn set_registered(&self) {
        self.inner.registered.set(1);
    }

    pub fn set_netmanager_registered(&self) {
        if let Some(g) = &self.inner.netmanager_registered {
            g.set(1);
        }
    }

    pub fn set_broker_connected(&self, up: bool) {
        let was = self.inner.broker_connected.set(i64::from(up));
        if up && was == 0 {
            self.inner.broker_connects.inc();
        }
    }

    /// The node document just sent to the cluster.
    pub fn reported(&self, doc: &NodeDocument) {
        let r = &self.inner.resources;
        r.cpu_percent.set(doc.cpu_percent);
        r.vcpus.set(i64::try_from(doc.vcpus).unwrap_or(i64::MAX));
        r.memory_percent.set(doc.memory_percent);
        r.memory_available_mib
            .set(i64::try_from(doc.memory).unwrap_or(i64::MAX));
        r.vgpus.set(i64::try_from(doc.vgpus).unwrap_or(i64::MAX));
        r.gpu_percent.set(doc.gpu_usage);
    }

    /// Why the node is not ready (empty when it is): registered with the
    /// cluster, connected to its broker, registered with NetManager when
    /// the overlay is on.
    pub fn not_ready(&self) -> Vec<String> {
        let i = &self.inner;
        let mut why = Vec::new();
        if i.registered.get() == 0 {
            why.push("not registered with the cluster".to_string());
        }
        if i.broker_connected.get() == 0 {
            why.push("not connected to the cluster's MQTT broker".to_string());
        }
        if i.netmanager_registered
            .as_ref()
            .is_some_and(|g| g.get() == 0)
        {
            why.push("not registered with NetManager".to_string());
        }
        why
    }

    /// The text exposition, with `running` instances by virtualization (as
    /// counted by the engine when scraped).
    pub fn render(&self, running: &BTreeMap<String, u64>) -> Result<String, std::fmt::Error> {
        // Cleared first: a virtualization with no instance left shows no
        // series rather than a stale count.
        self.inner.running.clear();
        for (virtualization, n) in running {
            let virtualization = virtualization.clone();
            self.inner
                .running
                .get_or_create(&RuntimeLabels { virtualization })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)?;
        Ok(out)
    }
}

/// Running instances by virtualization, counted when scraped (the engine
/// knows them; the metrics do not keep a copy that could drift).
pub type RunningCount = Arc<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>;

/// What the listener's handlers read.
#[derive(Clone)]
struct Served {
    metrics: Metrics,
    running: RunningCount,
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Metrics, running: RunningCount) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(worker_common::metrics::healthz))
        .route("/readyz", get(readyz))
        .with_state(Served { metrics, running })
}

async fn scrape(State(s): State<Served>) -> Response {
    let running = (s.running)();
    worker_common::metrics::exposition(s.metrics.render(&running))
}

async fn readyz(State(s): State<Served>) -> Response {
    worker_common::metrics::readiness(s.metrics.not_ready())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_link() {
        let m = Metrics::new(true);
        assert_eq!(m.not_ready().len(), 3);
        m.set_registered();
        m.set_broker_connected(true);
        assert_eq!(m.not_ready(), ["not registered with NetManager"]);
        m.set_netmanager_registered();
        assert!(m.not_ready().is_empty());
        m.set_broker_connected(false);
        assert_eq!(
            m.not_ready(),
            ["not connected to the cluster's MQTT broker"]
        );
    }

    #[test]
    fn reconnects_count_sessions_not_events() {
        let m = Metrics::new(false);
        m.set_broker_connected(true);
        m.set_broker_connected(true);
        m.set_broker_connected(false);
        m.set_broker_connected(true);
        let text = m.render(&BTreeMap::new()).expect("encodes");
        assert!(
            text.contains("nodeengine_cluster_broker_connects_total 2\n"),
            "{text}"
        );
    }

    /// Every nodeengine name the Grafana dashboard in docs/ queries is one
    /// this daemon describes.
    #[test]
    fn the_dashboard_queries_these_names() {
        let running = BTreeMap::from([("docker".to_string(), 1)]);
        let text = Metrics::new(true).render(&running).expect("encodes");
        let used =
            worker_common::metrics::names_used(worker_common::metrics::DASHBOARD, "nodeengine_");
        assert!(used.len() >= 10, "{used:?}");
        for name in used {
            let family = worker_common::metrics::family_of(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {name}, which nodeengined does not expose:\n{text}"
            );
        }
    }

    #[test]
    fn names_and_labels() {
        let m = Metrics::new(false);
        m.deploy(Outcome::Created, Some(0.2));
        m.deploy(Outcome::Failed, Some(1.0));
        m.publish_failed(Report::Status);
        let text = m.render(&BTreeMap::new()).expect("encodes");
        for line in [
            "nodeengine_deploys_total{outcome=\"created\"} 1",
            "nodeengine_deploys_total{outcome=\"failed\"} 1",
            "nodeengine_deploy_duration_seconds_count 2",
            "nodeengine_report_publish_failures_total{report=\"status\"} 1",
            "nodeengine_node_vcpus 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("netmanager_registered"), "{text}");
    }
}
