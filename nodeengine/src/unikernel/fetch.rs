//! Downloading a unikernel image: HTTPS, or plain HTTP pinned by a digest;
//! streamed to disk and hashed on the way, never held in memory.
//!
//! A job's image URL may carry its SHA-256 in the fragment,
//! `https://host/app.tar.gz#sha256=<64 hex digits>` (the fragment never
//! reaches the server, and an unmodified cluster passes it through). With a
//! digest the download must match it; without one only HTTPS is accepted.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use worker_common::http;
use worker_common::tls::ClientTls;

/// Largest image we download.
pub const MAX_IMAGE: usize = 512 << 20;
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// An image URL split into where to fetch it and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    /// Without the fragment.
    pub url: String,
    /// Lower-case hex SHA-256, when the URL pins one.
    pub sha256: Option<String>,
}

impl ImageSource {
    /// Parses `url[#sha256=HEX]` (also `#sha256:HEX`) and applies the transport
    /// rule: https always, http only with a digest.
    pub fn parse(image: &str) -> Result<ImageSource> {
        let image = image.trim();
        let (url, fragment) = match image.split_once('#') {
            Some((u, f)) => (u, Some(f)),
            None => (image, None),
        };
        let sha256 = match fragment {
            None => None,
            Some(f) => {
                let hex = f
                    .strip_prefix("sha256=")
                    .or_else(|| f.strip_prefix("sha256:"))
                    .with_context(|| {
                        format!("unikernel URL fragment {f:?} is not sha256=<64 hex digits>")
                    })?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!("unikernel digest {hex:?} is not 64 hex digits");
                }
                Some(hex.to_ascii_lowercase())
            }
        };
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match (scheme.as_deref(), &sha256) {
            (Some("https"), _) | (Some("http"), Some(_)) => {}
            (Some("http"), None) => bail!(
                "refusing to download the unikernel {url} over plain HTTP without a digest: \
                 serve it over HTTPS or pin it with #sha256=<hex> in the job's image URL"
            ),
            _ => bail!("unikernel image {url:?} is not an https:// (or digest-pinned http://) URL"),
        }
        Ok(ImageSource {
            url: url.to_string(),
            sha256,
        })
    }

    /// Downloads to `dest` (through a temporary file next to it), checking the
    /// size limit and the digest.
    pub async fn download(&self, dest: &Path) -> Result<()> {
        let tls = ClientTls::system_roots()
            .build()
            .context("TLS setup for unikernel downloads")?;
        let client = http::Client::tcp(tls)
            .timeout(DOWNLOAD_TIMEOUT)
            .max_body(MAX_IMAGE)
            .user_agent(crate::cluster_link::USER_AGENT);
        let part = dest.with_extension("part");
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .await
            .with_context(|| format!("creating {}", part.display()))?;
        let mut hasher = Sha256::new();
        let got = client
            .download(&self.url, &mut file, |chunk| hasher.update(chunk))
            .await;
        drop(file);
        let size = match got {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e).context("downloading the unikernel");
            }
        };
        let actual: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if let Some(want) = &self.sha256
            && *want != actual
        {
            let _ = std::fs::remove_file(&part);
            bail!(
                "unikernel {} has SHA-256 {actual}, the job pins {want}",
                self.url
            );
        }
        tracing::info!(url = %self.url, size, sha256 = %actual, "unikernel image downloaded");
        std::fs::rename(&part, dest).with_context(|| format!("writing {}", dest.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn https_with_or_without_digest() {
        let s = ImageSource::parse("https://h/k.tar.gz").expect("ok");
        assert_eq!((s.url.as_str(), s.sha256), ("https://h/k.tar.gz", None));
        let s =
            ImageSource::parse(&format!("https://h/k#sha256={}", HEX.to_uppercase())).expect("ok");
        assert_eq!(s.url, "https://h/k");
        assert_eq!(s.sha256.as_deref(), Some(HEX));
    }

    #[test]
    fn plain_http_needs_a_digest() {
        assert!(ImageSource::parse("http://h/k.tar.gz").is_err());
        let s = ImageSource::parse(&format!("http://h/k.tar.gz#sha256:{HEX}")).expect("ok");
        assert_eq!(s.sha256.as_deref(), Some(HEX));
    }

    #[test]
    fn bad_urls_and_digests() {
        for bad in [
            "ftp://h/k",
            "/local/file",
            "https://h/k#md5=abc",
            "https://h/k#sha256=abc",
            &format!("https://h/k#sha256={}", "zz".repeat(32)),
        ] {
            assert!(ImageSource::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
