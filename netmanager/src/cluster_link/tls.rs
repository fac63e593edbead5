//! TLS for MQTTS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};

/// rustls client configuration for MQTTS: the node's certificate and key, and
/// the system roots plus an optional extra CA (`NETMANAGER_MQTT_CA`), since
/// Oakestra clusters usually run their broker with a private CA.
pub(super) fn config(
    cert: &PathBuf,
    key: &PathBuf,
    ca: Option<&Path>,
) -> Result<rumqttc::TlsConfiguration> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("reading MqttCert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("reading MqttKey {}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(ca) = ca {
        for c in CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("reading the MQTT CA {}: {e}", ca.display()))?
        {
            roots
                .add(c)
                .with_context(|| format!("adding CA from {}", ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .context("MQTT client certificate and key do not match")?;
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}
