//! Prometheus metrics: a rendering of the typed status (`status::Status`),
//! so `NetManager status`, `/status` and `/metrics` always agree. Counter
//! names, help texts and verdict/reason labels come from the generated
//! counter list in netmanager-common.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::resolver::LATENCY_BOUNDS;
use crate::status::{DataplaneReport, NodeStatus, Status};
use netmanager_common::{COUNTER_NAMES, Counter};

/// The Prometheus text exposition of `status`.
pub fn render(status: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("netmanager");
    registry.register_collector(Box::new(Snapshot(status.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Snapshot(Status);

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One metric family: `(labels, value)` rows of the same type.
fn family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels<'_>, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let f = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v).encode(f)?,
            _ => ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(f)?,
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let ready = self.0.not_ready().is_empty();
        gauge(
            &mut e,
            "ready",
            "1 when registered, attached and connected to the broker",
            i64::from(ready),
        )?;
        gauge(
            &mut e,
            "registered",
            "1 once NodeEngine registered the node",
            i64::from(self.0.registered),
        )?;
        match &self.0.node {
            Some(n) => encode_node(&mut e, n),
            None => Ok(()),
        }
    }
}

fn encode_node(e: &mut DescriptorEncoder, n: &NodeStatus) -> std::fmt::Result {
    if let DataplaneReport::Ok(dp) = &n.dataplane {
        dataplane_counters(e, &dp.counters)?;
        let entries: Vec<_> = dp
            .maps
            .iter()
            .map(|(m, used, _)| (vec![("map", m.as_str())], u64::from(*used)))
            .collect();
        family(
            e,
            "map_entries",
            "Entries in each dataplane map",
            MetricType::Gauge,
            &entries,
        )?;
        let capacity: Vec<_> = dp
            .maps
            .iter()
            .map(|(m, _, max)| (vec![("map", m.as_str())], u64::from(*max)))
            .collect();
        family(
            e,
            "map_capacity",
            "Maximum entries of each dataplane map",
            MetricType::Gauge,
            &capacity,
        )?;
        let attached: Vec<_> = dp
            .attachments
            .iter()
            .map(|(p, i, h)| {
                (
                    vec![
                        ("program", p.as_str()),
                        ("interface", i.as_str()),
                        ("hook", h.as_str()),
                    ],
                    1,
                )
            })
            .collect();
        family(
            e,
            "program_attached",
            "An eBPF program attached to an interface, by hook and attach mode",
            MetricType::Gauge,
            &attached,
        )?;
    }
    resolver(e, n)?;
    mqtt(e, n)?;
    let mut kinds: Vec<(&str, u64)> = Vec::new();
    for d in &n.deployments {
        match kinds.iter_mut().find(|(k, _)| *k == d.kind.as_str()) {
            Some((_, c)) => *c += 1,
            None => kinds.push((d.kind.as_str(), 1)),
        }
    }
    let rows: Vec<_> = kinds
        .iter()
        .map(|(k, c)| (vec![("kind", *k)], *c))
        .collect();
    family(
        e,
        "deployments",
        "Local deployments by kind",
        MetricType::Gauge,
        &rows,
    )?;
    gauge(
        e,
        "route_instances",
        "Instance entries written from cluster tables",
        n.routes.instances as i64,
    )?;
    gauge(
        e,
        "route_services",
        "Service entries written from cluster tables",
        n.routes.services as i64,
    )?;
    gauge(
        e,
        "interests",
        "Jobs whose updates the node follows",
        n.interests.len() as i64,
    )
}

/// Packets and bytes per dataplane counter, labelled by verdict and reason.
fn dataplane_counters(
    e: &mut DescriptorEncoder,
    counters: &[(String, u64, u64)],
) -> std::fmt::Result {
    let labelled: Vec<(Counter, u64, u64)> = counters
        .iter()
        .filter_map(|(name, p, b)| {
            let i = COUNTER_NAMES.iter().position(|n| n == name)?;
            Some((Counter::from_index(i as u32)?, *p, *b))
        })
        .collect();
    let labels = |c: &Counter| {
        vec![
            ("verdict", c.verdict()),
            ("reason", c.reason().unwrap_or("")),
        ]
    };
    let packets: Vec<_> = labelled.iter().map(|(c, p, _)| (labels(c), *p)).collect();
    family(
        e,
        "dataplane_packets",
        "Packets by dataplane verdict and drop reason (summed over CPUs)",
        MetricType::Counter,
        &packets,
    )?;
    let bytes: Vec<_> = labelled.iter().map(|(c, _, b)| (labels(c), *b)).collect();
    family(
        e,
        "dataplane_bytes",
        "Bytes by dataplane verdict and drop reason (summed over CPUs)",
        MetricType::Counter,
        &bytes,
    )
}

fn resolver(e: &mut DescriptorEncoder, n: &NodeStatus) -> std::fmt::Result {
    let r = &n.resolver;
    let rows = [
        (vec![("outcome", "resolved")], r.resolved),
        (vec![("outcome", "failed")], r.failed),
        (vec![("outcome", "refused_busy")], r.refused_busy),
        (vec![("outcome", "refused_rate")], r.refused_rate),
        (
            vec![("outcome", "refused_recent_failure")],
            r.refused_recent_failure,
        ),
        // Held tunnel datagrams whose sender the cluster does not place
        // their inner source on.
        (
            vec![("outcome", "refused_wrong_node")],
            r.refused_wrong_node,
        ),
    ];
    family(
        e,
        "miss_resolutions",
        "Dataplane misses by outcome",
        MetricType::Counter,
        &rows,
    )?;
    family(
        e,
        "miss_negative_cleared",
        "Failed lookups answered early by a table result (a new or moved instance)",
        MetricType::Counter,
        &[(vec![], r.negative_cleared)],
    )?;
    family(
        e,
        "miss_parked_reinjected",
        "Frames parked on a failed lookup and sent through once a table result answered it",
        MetricType::Counter,
        &[(vec![], r.parked_reinjected)],
    )?;
    // The status keeps cumulative counts; the encoder wants each bucket's own.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(LATENCY_BOUNDS.len() + 1);
    for (bound, cumulative) in LATENCY_BOUNDS.iter().zip(r.latency.buckets) {
        buckets.push((*bound, cumulative.saturating_sub(below)));
        below = cumulative;
    }
    buckets.push((f64::INFINITY, r.latency.count.saturating_sub(below)));
    let mut m = e.encode_descriptor(
        "miss_resolution_seconds",
        "Time from a dataplane miss to its outcome",
        None,
        MetricType::Histogram,
    )?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        r.latency.sum_micros as f64 / 1e6,
        r.latency.count,
        &buckets,
        None,
    )
}

fn mqtt(e: &mut DescriptorEncoder, n: &NodeStatus) -> std::fmt::Result {
    let m = &n.mqtt;
    gauge(
        e,
        "mqtt_connected",
        "1 while connected to the cluster's broker",
        i64::from(m.connected),
    )?;
    let c = ConstCounter::new(m.connections.saturating_sub(1));
    c.encode(e.encode_descriptor(
        "mqtt_reconnects",
        "Reconnections to the cluster's broker",
        None,
        c.metric_type(),
    )?)?;
    let rows = [
        (vec![("outcome", "sent")], m.queries_sent),
        (vec![("outcome", "answered")], m.queries_answered),
        (vec![("outcome", "timed_out")], m.queries_timed_out),
    ];
    family(
        e,
        "table_queries",
        "Table queries to the cluster by outcome",
        MetricType::Counter,
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_daemon_renders_readiness() {
        let text = render(&Status::default()).unwrap();
        assert!(text.contains("netmanager_ready 0"), "{text}");
        assert!(text.contains("netmanager_registered 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
