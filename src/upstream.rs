//! The pooled HTTP client used for upstreams and the CMA: HTTP/1.1 or h2 by
//! ALPN, TLS by rustls with the web PKI roots plus an optional private CA;
//! and the lighter HTTP/1.1 pool that HTTP/1.1 client requests take
//! ([`h1pool`]).

pub mod h1pool;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Idle upstream connections are closed after this long.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections are kept per upstream host.
pub const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The client type: request bodies are buffered (they are small: GraphQL
/// queries under `max_body_bytes`); response bodies stream.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("upstream.ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
}

/// Builds the pooled client. `ca_file`'s certificates are trusted beside the web PKI roots.
pub fn build_client(
    connect_timeout: Duration,
    ca_file: Option<&Path>,
) -> Result<HttpClient, ClientError> {
    let https = connector(connect_timeout, ca_file, true)?;
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(https))
}

/// The connector: TCP with `connect_timeout`, then TLS by rustls for
/// `https` upstreams, offering h2 by ALPN only if `http2`.
pub fn connector(
    connect_timeout: Duration,
    ca_file: Option<&Path>,
    http2: bool,
) -> Result<HttpsConnector<HttpConnector>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_error = |reason: String| ClientError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|err| ca_error(err.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| ca_error(err.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no certificates found".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|err| ca_error(err.to_string()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .map_err(|err| ClientError::CaFile {
        path: String::new(),
        reason: err.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    Ok(if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    })
}

/// Whether `err` or one of its sources is an I/O timeout (a connect that
/// did not complete within `connect_timeout`).
pub fn timed_out(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = cause.source();
    }
    false
}
