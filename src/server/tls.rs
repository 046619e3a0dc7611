//! The TLS listener's configuration: rustls with ALPN h2 and http/1.1,
//! rebuilt when the certificate or key file changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;

/// How often the TLS certificate files are checked for changes.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls.key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("tls: {0}")]
    Config(String),
}

/// The TLS server config, rebuilt when the certificate or key file changes.
pub struct TlsReloader {
    files: TlsFiles,
    current: ArcSwap<rustls::ServerConfig>,
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

impl TlsReloader {
    /// Loads the files now; fails if they are unusable.
    pub fn new(files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let config = load_tls(&files)?;
        let stamp = file_stamps(&files);
        Ok(Arc::new(TlsReloader {
            files,
            current: ArcSwap::from_pointee(config),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Reloads if either file changed. A bad new pair keeps the old one.
    pub fn reload_if_changed(&self) {
        let stamp = file_stamps(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if stamp.is_none() || stamp == *last {
            return;
        }
        match load_tls(&self.files) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                *last = stamp;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                tracing::error!(error = %err, "TLS certificate not reloaded; keeping the current one")
            }
        }
    }

    /// Checks the files every [`TLS_RELOAD_INTERVAL`] until shutdown.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.reload_if_changed(),
                () = shutdown.cancelled() => return,
            }
        }
    }
}

fn file_stamps(files: &TlsFiles) -> Option<(SystemTime, SystemTime)> {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Some((modified(&files.cert)?, modified(&files.key)?))
}

/// Builds a rustls server config (TLS 1.2+, ALPN h2 and http/1.1).
pub fn load_tls(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.clone(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_error("no certificate found".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| match e {
        // A PEM block whose contents are not a certificate.
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            cert_error(e.to_string())
        }
        rustls::Error::InconsistentKeys(_) => TlsError::Key {
            path: files.key.clone(),
            reason: format!(
                "does not match the certificate in tls.cert {}: {e}",
                files.cert.display()
            ),
        },
        // The key could not be loaded (unsupported or malformed).
        _ => TlsError::Key {
            path: files.key.clone(),
            reason: e.to_string(),
        },
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
