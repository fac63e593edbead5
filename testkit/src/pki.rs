//! Throwaway certificates for brokers that speak TLS: a CA and a server
//! certificate for 127.0.0.1/localhost, as PEM files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA and one server certificate it signed, written to a directory.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    /// Makes a fresh CA and a server certificate for 127.0.0.1 and
    /// localhost; the PEM files go to `dir`.
    pub fn new(dir: &Path) -> Result<Pki> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?
            .signed_by(&key, &ca)?;
        let write = |name: &str, pem: String| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, pem).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        Ok(Pki {
            ca: write("ca.crt", ca.pem())?,
            server_cert: write("server.crt", cert.pem())?,
            server_key: write("server.key", key.serialize_pem())?,
        })
    }

    /// A client configuration that trusts this CA (and the usual roots).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        worker_common::tls::ClientTls::default()
            .with_extra_ca(&self.ca)
            .build()
            .context("a TLS client configuration trusting the test CA")
    }
}
