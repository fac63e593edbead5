//! What both daemons' metrics and health listeners share: where they listen
//! ("off" disables it), the OpenMetrics response, and the `/healthz` and
//! `/readyz` answers. Each daemon renders its own metric families with
//! `prometheus-client`; the listener and the health routes are the same.

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What `/metrics` answers with (prometheus-client's text encoder writes
/// OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The address value that turns the listener off (an empty one does too).
pub const OFF: &str = "off";

/// Whether `address` asks for no listener.
pub fn is_off(address: &str) -> bool {
    let a = address.trim();
    a.is_empty() || a.eq_ignore_ascii_case(OFF)
}

/// Binds `address` and serves `app` on it in the background. A failure to
/// bind is logged, not fatal: the daemon's work does not depend on being
/// watched.
pub async fn serve(address: &str, app: Router) -> Option<tokio::task::JoinHandle<()>> {
    if is_off(address) {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(address, "metrics listener not started: {e}");
            return None;
        }
    };
    tracing::info!(address, "serving /metrics, /healthz and /readyz");
    Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics listener: {e}");
        }
    }))
}

/// The `/metrics` answer: the exposition, or a 500 naming the encoding error.
pub fn exposition(text: Result<String, std::fmt::Error>) -> Response {
    match text {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"error": format!("encoding metrics: {e}")})),
        )
            .into_response(),
    }
}

/// `/healthz`: the daemon answers.
pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// `/readyz`: 200 `{"ready": true}` when nothing is missing, else 503 with
/// the reasons, for probes and scripts.
pub fn readiness(not_ready: Vec<String>) -> Response {
    if not_ready.is_empty() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        )
            .into_response()
    } else {
        let body = serde_json::json!({"ready": false, "reasons": not_ready});
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// What a `/readyz` answer says, as read by `status` commands.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// The Grafana dashboard in docs/ built on both daemons' metric names.
pub const DASHBOARD: &str = include_str!("../../docs/grafana/oakestra-worker.json");

/// The metric names starting with `prefix` that `text` (a dashboard's
/// queries) uses, as written (`_total`, `_bucket` suffixes included), so
/// tests can hold the dashboard to what the daemons expose.
pub fn names_used(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Only whole names: not a suffix of a longer identifier.
        let whole = at == 0
            || !rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if whole {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

/// The family a sample name belongs to (`x_total`, `x_bucket` → `x`).
pub fn family_of(sample: &str) -> &str {
    ["_total", "_bucket", "_count", "_sum", "_created"]
        .iter()
        .find_map(|s| sample.strip_suffix(s))
        .unwrap_or(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_names() {
        let used = names_used(
            r#"{"expr": "sum by (le) (rate(nodeengine_deploy_duration_seconds_bucket[5m])) / netmanager_ready"}"#,
            "nodeengine_",
        );
        assert_eq!(
            used.into_iter().collect::<Vec<_>>(),
            ["nodeengine_deploy_duration_seconds_bucket"]
        );
        assert_eq!(family_of("nodeengine_deploys_total"), "nodeengine_deploys");
        // The dashboard parses and uses both daemons' names.
        let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
        assert!(d["panels"].as_array().is_some_and(|p| p.len() > 10));
        assert!(!names_used(DASHBOARD, "netmanager_").is_empty());
        assert!(!names_used(DASHBOARD, "nodeengine_").is_empty());
    }

    #[test]
    fn off_addresses() {
        assert!(is_off(""));
        assert!(is_off(" off "));
        assert!(is_off("OFF"));
        assert!(!is_off("127.0.0.1:9103"));
    }

    #[test]
    fn readiness_codes() {
        assert_eq!(readiness(vec![]).status(), StatusCode::OK);
        assert_eq!(
            readiness(vec!["not registered".into()]).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
