//! Prometheus `/metrics` as an operator's tools read it: parsed by the
//! Prometheus project's own OpenMetrics parser (python3-prometheus-client,
//! `Need::PrometheusClient`), so a format error fails the test.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::netns::NsPath;

/// The parser, printing `{"name{label=value,...}": value}` as JSON.
const SCRIPT: &str = "import json,sys,urllib.request\n\
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
    text=urllib.request.urlopen('http://'+sys.argv[1]+'/metrics',timeout=5).read().decode()\n\
    out={}\n\
    for fam in parse(text):\n\
    \x20 for s in fam.samples:\n\
    \x20   key=s.name+('{'+','.join('%s=%s'%kv for kv in sorted(s.labels.items()))+'}' if s.labels else '')\n\
    \x20   out[key]=s.value\n\
    print(json.dumps(out))";

/// `/metrics` at `address` (`host:port`), fetched from inside `ns` (None:
/// this namespace): every sample by `name{label=value,...}`.
pub fn scrape(ns: Option<&NsPath>, address: &str) -> Result<Value> {
    let args = ["python3", "-c", SCRIPT, address];
    let out = match ns {
        Some(ns) => ns.run(&args),
        None => crate::process::run(args[0], &args[1..]),
    }
    .with_context(|| format!("scraping http://{address}/metrics"))?;
    serde_json::from_str(&out).context("the parser's JSON")
}
