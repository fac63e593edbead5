//! The TLS client configuration against a real rustls server: server
//! verification with an extra CA, with and without a client certificate,
//! and clear errors for files that cannot be used.

mod common;

use common::{Pki, https_server};
use worker_common::http;
use worker_common::tls::{ClientTls, TlsError};

async fn get(tls: &ClientTls, port: u16) -> Result<String, http::Error> {
    let config = tls.build().expect("client config");
    let answer = http::Client::tcp(config)
        .get(&format!("https://localhost:{port}/x"))
        .await?
        .success()?;
    Ok(answer.text().into_owned())
}

#[tokio::test]
async fn server_verified_without_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let port = https_server(pki.server_config(false)).await;

    let with_ca = ClientTls::system_roots().with_extra_ca(&pki.ca);
    assert_eq!(get(&with_ca, port).await.expect("trusted"), "hello /x");

    // The system anchors alone do not know our test CA.
    let err = get(&ClientTls::system_roots(), port)
        .await
        .expect_err("unknown issuer must fail");
    assert!(format!("{err}").contains("certificate"), "{err}");
}

#[tokio::test]
async fn client_certificate_when_the_server_demands_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let port = https_server(pki.server_config(true)).await;

    let with_identity = ClientTls::system_roots()
        .with_extra_ca(&pki.ca)
        .with_identity(&pki.client_cert, &pki.client_key);
    assert_eq!(
        get(&with_identity, port).await.expect("accepted"),
        "hello /x"
    );

    let anonymous = ClientTls::system_roots().with_extra_ca(&pki.ca);
    assert!(get(&anonymous, port).await.is_err());
}

#[test]
fn unusable_files_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());

    let missing = dir.path().join("absent-ca.crt");
    match ClientTls::system_roots().with_extra_ca(&missing).build() {
        Err(e @ TlsError::ReadCa { .. }) => {
            assert!(e.to_string().contains("absent-ca.crt"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "not a pem file\n").expect("write");
    assert!(matches!(
        ClientTls::system_roots().with_extra_ca(&empty).build(),
        Err(TlsError::ReadCa { .. })
    ));

    match ClientTls::system_roots()
        .with_identity(&pki.client_cert, &pki.other_key)
        .build()
    {
        Err(e @ TlsError::Identity { .. }) => {
            assert!(e.to_string().contains("client.crt"), "{e}")
        }
        other => panic!("{other:?}"),
    }

    assert!(matches!(
        ClientTls::system_roots()
            .with_identity(dir.path().join("nope.crt"), &pki.client_key)
            .build(),
        Err(TlsError::ReadCert { .. })
    ));
    assert!(matches!(
        ClientTls::system_roots()
            .with_identity(&pki.client_cert, dir.path().join("nope.key"))
            .build(),
        Err(TlsError::ReadKey { .. })
    ));
}
