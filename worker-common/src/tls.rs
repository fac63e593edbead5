//! TLS client configuration (rustls with the ring provider), for every TLS
//! connection a worker makes: the registration handshake and kernel
//! downloads over HTTPS, and MQTTS to the cluster broker.
//!
//! The server is always verified, against the system's trust anchors plus an
//! optional CA file (the cluster's own CA). A client certificate is optional:
//! a broker may authenticate us by certificate or by username and password
//! over a server-verified connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a TLS client trusts and presents. The default trusts the system's
/// anchors and presents no certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// A PEM file of CA certificates trusted in addition to the system's.
    pub extra_ca: Option<PathBuf>,
    /// Our certificate chain and key, for servers that authenticate clients
    /// by certificate.
    pub identity: Option<Identity>,
}

/// A client certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA certificates from {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA certificate in {path} is not usable: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("reading client certificate {path}: {source}")]
    ReadCert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("reading client key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("client certificate {cert} and key {key} cannot be used together: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS protocol versions: {0}")]
    Versions(rustls::Error),
}

impl ClientTls {
    /// Server verification against the system's anchors only, no client
    /// certificate.
    pub fn system_roots() -> ClientTls {
        ClientTls::default()
    }

    /// Also trusts the CA certificates in `path`.
    pub fn with_extra_ca(mut self, path: impl Into<PathBuf>) -> ClientTls {
        self.extra_ca = Some(path.into());
        self
    }

    /// Presents this certificate chain and key.
    pub fn with_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> ClientTls {
        self.identity = Some(Identity {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// The rustls configuration. Files are read now, so a missing or broken
    /// file is reported here rather than at the first handshake.
    pub fn build(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        // A single unreadable system certificate is skipped, as browsers do.
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(ca) = &self.extra_ca {
            for cert in read_certs(ca).map_err(|source| TlsError::ReadCa {
                path: ca.clone(),
                source,
            })? {
                roots.add(cert).map_err(|source| TlsError::BadCa {
                    path: ca.clone(),
                    source,
                })?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(id) => {
                let certs = read_certs(&id.cert).map_err(|source| TlsError::ReadCert {
                    path: id.cert.clone(),
                    source,
                })?;
                let key =
                    PrivateKeyDer::from_pem_file(&id.key).map_err(|source| TlsError::ReadKey {
                        path: id.key.clone(),
                        source,
                    })?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|source| TlsError::Identity {
                        cert: id.cert.clone(),
                        key: id.key.clone(),
                        source,
                    })?
            }
        };
        Ok(Arc::new(config))
    }
}

/// The crypto provider every TLS connection uses (ring: no C toolchain or
/// cmake needed on small devices).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates of a PEM file; a file without any is an error, since a
/// caller who names a file means to use what is in it.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    let certs = CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(rustls::pki_types::pem::Error::NoItemsFound);
    }
    Ok(certs)
}
