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

#[cfg(test)]
mod tests {
    use super::*;

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
