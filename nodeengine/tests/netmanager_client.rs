//! The NetManager client against a tiny HTTP server on a unix socket: exact
//! request bodies, and error answers surfacing as errors with NetManager's text.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use nodeengine::netmanager_client::{DeployRequest, NetManagerClient, UndeployRequest};
use serde_json::{Value, json};

type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Serves on `sock`, records (method, path, body) and answers per path.
fn serve(sock: std::path::PathBuf) -> Seen {
    async fn answer(
        State(seen): State<Seen>,
        method: Method,
        uri: Uri,
        body: axum::body::Bytes,
    ) -> (StatusCode, Json<Value>) {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = uri.path().to_string();
        seen.lock()
            .expect("lock")
            .push((method.to_string(), path.clone(), v));
        match path.as_str() {
            "/container/deploy" => (
                StatusCode::OK,
                Json(
                    json!({"serviceName": "a.b.c.d", "nsAddress": "10.18.0.2", "nsAddressv6": "fc00::2"}),
                ),
            ),
            "/register" | "/container/undeploy" => (StatusCode::OK, Json(json!({}))),
            _ => (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "no such route"})),
            ),
        }
    }
    let seen: Seen = Arc::default();
    let listener = tokio::net::UnixListener::bind(sock).expect("bind unix socket");
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    seen
}

#[tokio::test]
async fn bodies_are_exactly_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nm.sock");
    let seen = serve(sock.clone());
    let client = NetManagerClient::new(&sock);

    client
        .register("6650aa11bb22cc33dd44ee55", "192.168.1.10")
        .await
        .expect("register");
    let answer = client
        .deploy_container(&DeployRequest {
            pid: 4242,
            service_name: "clientsrvr.test.curl.test".into(),
            instance_number: 3,
            port_mappings: "9080:80/tcp;9081".into(),
        })
        .await
        .expect("deploy");
    assert_eq!(answer.ns_address, "10.18.0.2");
    assert_eq!(answer.ns_address_v6, "fc00::2");
    client
        .undeploy_container(&UndeployRequest {
            service_name: "clientsrvr.test.curl.test".into(),
            instance_number: 3,
        })
        .await
        .expect("undeploy");

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            (
                "POST".to_string(),
                "/register".to_string(),
                json!({"client_id": "6650aa11bb22cc33dd44ee55", "cluster_address": "192.168.1.10"})
            ),
            (
                "POST".to_string(),
                "/container/deploy".to_string(),
                json!({"pid": 4242, "serviceName": "clientsrvr.test.curl.test", "instanceNumber": 3, "portMappings": "9080:80/tcp;9081"})
            ),
            (
                "POST".to_string(),
                "/container/undeploy".to_string(),
                json!({"serviceName": "clientsrvr.test.curl.test", "instanceNumber": 3})
            ),
        ]
    );
}

#[tokio::test]
async fn error_answers_carry_netmanagers_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nm.sock");
    let _seen = serve(sock.clone());
    let client = NetManagerClient::new(&sock);
    let err = client
        .deploy_unikernel(&DeployRequest {
            pid: 0,
            service_name: "a.b.c.d".into(),
            instance_number: 0,
            port_mappings: "".into(),
        })
        .await
        .expect_err("400 must be an error");
    let text = format!("{err:#}");
    assert!(text.contains("400"), "{text}");
    assert!(text.contains("no such route"), "{text}");
}

#[tokio::test]
async fn missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = NetManagerClient::new(dir.path().join("absent.sock"));
    let err = client.register("x", "y").await.expect_err("no socket");
    assert!(format!("{err:#}").contains("absent.sock"));
}
