//! The HTTP client against real servers: axum on a unix socket and on TCP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};
use worker_common::http::{self, Client, ErrorKind};

/// (method path, Host, Content-Type, body) of every request.
type Seen = Arc<Mutex<Vec<(String, String, String, Value)>>>;

fn router(seen: Seen) -> Router {
    async fn echo(
        State(seen): State<Seen>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        let h = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        seen.lock().expect("lock").push((
            "POST /echo".into(),
            h("host"),
            h("content-type"),
            body.clone(),
        ));
        Json(json!({"echo": body}))
    }
    Router::new()
        .route(
            "/status",
            get(|| async { Json(json!({"registered": true})) }),
        )
        .route("/echo", post(echo))
        .route(
            "/refuse",
            post(|| async {
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "no such route"})),
                )
            }),
        )
        .route("/big", get(|| async { "x".repeat(64 * 1024) }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                "late"
            }),
        )
        .route("/text", get(|| async { "not json" }))
        .with_state(seen)
}

fn serve_unix(sock: &Path) -> Seen {
    let seen = Seen::default();
    let listener = tokio::net::UnixListener::bind(sock).expect("bind");
    let app = router(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

async fn serve_tcp() -> (u16, Seen) {
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = router(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

fn socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("api.sock")
}

#[tokio::test]
async fn unix_socket_json_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = serve_unix(&socket(&dir));
    let client = Client::unix(socket(&dir));

    let status: Value = client.get_json("/status").await.expect("status");
    assert_eq!(status, json!({"registered": true}));

    let answer = client
        .post_json("/echo", &json!({"serviceName": "a.b.c.d"}))
        .await
        .expect("echo")
        .success()
        .expect("2xx");
    assert_eq!(
        answer.json::<Value>().expect("json"),
        json!({"echo": {"serviceName": "a.b.c.d"}})
    );
    assert_eq!(
        seen.lock().expect("lock").clone(),
        vec![(
            "POST /echo".to_string(),
            "localhost".to_string(),
            "application/json".to_string(),
            json!({"serviceName": "a.b.c.d"})
        )]
    );
    // A second request reuses the pool and still works.
    assert!(
        client
            .get("/status")
            .await
            .expect("again")
            .status
            .is_success()
    );
}

#[tokio::test]
async fn errors_say_what_went_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _seen = serve_unix(&socket(&dir));
    let client = Client::unix(socket(&dir));

    let err = client
        .post_json("/refuse", &json!({}))
        .await
        .expect("answered")
        .success()
        .expect_err("400");
    assert_eq!(err.status(), Some(http::StatusCode::BAD_REQUEST));
    let text = err.to_string();
    assert!(
        text.contains("400") && text.contains("no such route"),
        "{text}"
    );
    assert!(
        text.contains("POST /refuse") && text.contains("api.sock"),
        "{text}"
    );

    let err = client
        .clone()
        .max_body(1024)
        .get("/big")
        .await
        .expect_err("too large");
    assert!(matches!(err.kind, ErrorKind::TooLarge(1024)), "{err}");

    let err = client
        .clone()
        .timeout(Duration::from_millis(200))
        .get("/slow")
        .await
        .expect_err("timeout");
    assert!(matches!(err.kind, ErrorKind::Timeout(_)), "{err}");

    let err = client
        .get_json::<Value>("/text")
        .await
        .expect_err("not json");
    assert!(matches!(err.kind, ErrorKind::Json(_)), "{err}");

    let err = client.get("status").await.expect_err("not a path");
    assert!(matches!(err.kind, ErrorKind::Target(_)), "{err}");

    let absent = Client::unix(dir.path().join("absent.sock"));
    let err = absent.get("/status").await.expect_err("no socket");
    assert!(matches!(err.kind, ErrorKind::Transport(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("absent.sock"), "{text}");
    assert!(text.contains("No such file"), "{text}");
}

#[tokio::test]
async fn tcp_urls() {
    let (port, _seen) = serve_tcp().await;
    let tls = worker_common::tls::ClientTls::system_roots()
        .build()
        .expect("tls");
    let client = Client::tcp(tls);
    let v: Value = client
        .get_json(&format!("http://127.0.0.1:{port}/status"))
        .await
        .expect("status");
    assert_eq!(v["registered"], true);
    let answer = client
        .post_json(&format!("http://127.0.0.1:{port}/echo"), &json!([1]))
        .await
        .expect("echo");
    assert_eq!(answer.json::<Value>().expect("json"), json!({"echo": [1]}));

    for bad in ["ftp://127.0.0.1/x", "/status", "http:///x", "not a url"] {
        let err = client.get(bad).await.expect_err(bad);
        assert!(matches!(err.kind, ErrorKind::Target(_)), "{bad}: {err}");
    }
    // Nothing listens on port 1 of loopback.
    let err = client
        .get("http://127.0.0.1:1/")
        .await
        .expect_err("refused");
    assert!(matches!(err.kind, ErrorKind::Transport(_)), "{err}");
}

#[test]
fn blocking_client_for_synchronous_callers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = socket(&dir);
    // The server runs on its own runtime thread, as a daemon would.
    let server = tokio::runtime::Runtime::new().expect("runtime");
    let _seen = server.block_on(async { serve_unix(&sock) });
    let client = http::blocking::Client::unix(&sock).expect("client");
    let v: Value = client.get_json("/status").expect("status");
    assert_eq!(v["registered"], true);
    let answer = client.post_json("/echo", &json!({"a": 1})).expect("echo");
    assert_eq!(
        answer.json::<Value>().expect("json"),
        json!({"echo": {"a": 1}})
    );
}
