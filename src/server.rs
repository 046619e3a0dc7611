//! Listeners and connections: plain (HTTP/1.1 and h2c), TLS (h2 and
//! http/1.1 by ALPN), and the per-connection task.
//!
//! Each connection task runs hyper's connection future beside three signals:
//! its session token (a revoked HTTP/1.1 session closes the connection at
//! once), the shutdown token (drain gracefully), and a watchdog that enforces
//! `header_timeout` (a head must arrive in time: slowloris) and `idle_timeout`
//! (a keep-alive connection with nothing in flight). Hyper's own header timer
//! is not used because it also cuts idle keep-alive connections short.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TlsFiles;
use crate::decision::MAX_HEAD_BYTES;
use crate::sessions::ConnSessions;
use crate::{proxy, Shared};

/// Most concurrent HTTP/2 streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before the server accepts them (rapid reset).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// How often the TLS certificate files are checked for changes.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What a connection task knows about its connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`, for `x-forwarded-proto`.
    pub scheme: &'static str,
    /// The peer's address as an `x-forwarded-for` value, made once.
    pub client_ip: http::HeaderValue,
    pub sessions: ConnSessions,
    pub activity: Arc<Activity>,
}

/// When a connection last did something, for the header and idle timeouts.
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    served: AtomicU64,
    http2: AtomicBool,
    /// Milliseconds after `base` when the last request finished.
    idle_since: AtomicU64,
    /// 1 + milliseconds after `base` of the first byte of a head not yet
    /// complete; 0 when none is arriving.
    partial_since: AtomicU64,
    /// Requests finished, so the head scanner knows when a new head starts.
    finished: AtomicU64,
    /// A head with conflicting framing was read (SPEC §3 row 16).
    smuggled: AtomicBool,
    /// Close with a reset rather than a FIN: the connection was revoked.
    abortive: AtomicBool,
}

/// Marks a request in flight until dropped.
pub struct ActivityGuard(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            partial_since: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            smuggled: AtomicBool::new(false),
            abortive: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request head arrived.
    pub fn begin(self: &Arc<Self>, http2: bool) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.partial_since.store(0, Ordering::Release);
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        ActivityGuard(Arc::clone(self))
    }

    /// Whether the head of the request being served had conflicting framing
    /// (`Content-Length` with `Transfer-Encoding`, or two `Content-Length`s),
    /// which hyper resolves silently before a service could see it.
    pub fn smuggled(&self) -> bool {
        self.smuggled.load(Ordering::Acquire)
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.partial_since.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.partial_since
                .store(self.now_ms() + 1, Ordering::Release);
        }
    }

    /// When the connection must close unless something happens first.
    fn deadline(&self, header_timeout: Duration, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, plus: Duration| self.base + Duration::from_millis(ms) + plus;
        if self.served.load(Ordering::Relaxed) == 0 {
            return Some(at(0, header_timeout));
        }
        let partial = self.partial_since.load(Ordering::Acquire);
        if partial != 0 && !self.http2.load(Ordering::Relaxed) {
            return Some(at(partial - 1, header_timeout));
        }
        Some(at(self.idle_since.load(Ordering::Acquire), idle_timeout))
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since
            .store(activity.now_ms(), Ordering::Release);
        activity.finished.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Notes when bytes arrive, so that a head trickling in is timed, and scans
/// HTTP/1.1 heads (not bodies) for conflicting framing headers.
struct WatchedIo<T: Abort> {
    inner: T,
    activity: Arc<Activity>,
    scanner: HeadScanner,
}

impl<T: AsyncRead + Abort + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let this = &mut *self;
            this.activity.read_some();
            let finished = this.activity.finished.load(Ordering::Acquire);
            let idle = this.activity.in_flight.load(Ordering::Acquire) == 0;
            if this.scanner.wants(finished, idle) && this.scanner.scan(&buf.filled()[before..]) {
                this.activity.smuggled.store(true, Ordering::Release);
            }
        }
        result
    }
}

impl<T: Abort> Drop for WatchedIo<T> {
    fn drop(&mut self) {
        if self.activity.abortive.load(Ordering::Acquire) {
            self.inner.abort_on_close();
        }
    }
}

/// A transport that can be closed with a reset: a revoked session is cut
/// off, and an abortive close costs both ends less than a FIN handshake.
pub trait Abort {
    /// Makes the coming close send RST (`SO_LINGER` 0).
    fn abort_on_close(&self);
}

impl Abort for TcpStream {
    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Abort for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }
}

/// Reads request heads byte by byte until their blank line, counting the
/// framing headers. Cheap: it sees only head bytes, a few hundred a request.
#[derive(Default)]
struct HeadScanner {
    /// The `finished` count when the current head started.
    generation: u64,
    /// The current head is complete (or this is not HTTP/1).
    done: bool,
    disabled: bool,
    started: bool,
    name: [u8; 18],
    name_len: usize,
    in_name: bool,
    line_len: usize,
    content_length: u8,
    transfer_encoding: bool,
}

impl HeadScanner {
    const H2_PREFACE: &'static [u8] = b"PRI * HTTP/2.0";

    /// Whether these bytes may belong to a head: a new head starts once the
    /// previous request has finished and nothing is in flight.
    fn wants(&mut self, finished: u64, idle: bool) -> bool {
        if self.disabled {
            return false;
        }
        if self.done && idle && finished != self.generation {
            *self = HeadScanner {
                generation: finished,
                ..HeadScanner::default()
            };
        }
        !self.done
    }

    /// Scans `bytes`; true when a complete head had conflicting framing.
    /// Only header names are looked at byte by byte; the rest of each line
    /// (values, the request line) is skipped to its end with `memchr`.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return false;
        }
        if !self.started {
            self.started = true;
            self.in_name = false;
            if bytes.starts_with(Self::H2_PREFACE) {
                self.disabled = true;
                return false;
            }
        }
        let mut at = 0;
        while at < bytes.len() {
            if !self.in_name && bytes[at] != b'\n' {
                let rest = &bytes[at..];
                let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                if rest[..end].iter().any(|&b| b != b'\r') {
                    self.line_len += 1;
                }
                at += end;
                continue;
            }
            if let Some(conflicting) = self.step(bytes[at]) {
                return conflicting;
            }
            at += 1;
        }
        false
    }

    /// One byte of a header name or a line end; `Some` once the head ends.
    fn step(&mut self, byte: u8) -> Option<bool> {
        match byte {
            b'\n' => {
                if self.line_len == 0 {
                    self.done = true;
                    return Some(
                        self.content_length > 1
                            || (self.content_length > 0 && self.transfer_encoding),
                    );
                }
                self.line_len = 0;
                self.name_len = 0;
                self.in_name = true;
            }
            b'\r' => {}
            b':' if self.in_name => {
                let name = &self.name[..self.name_len];
                if name == b"content-length" {
                    self.content_length = self.content_length.saturating_add(1);
                } else if name == b"transfer-encoding" {
                    self.transfer_encoding = true;
                }
                self.in_name = false;
                self.line_len += 1;
            }
            _ => {
                if self.in_name {
                    if self.name_len < self.name.len() {
                        self.name[self.name_len] = byte.to_ascii_lowercase();
                        self.name_len += 1;
                    } else {
                        self.in_name = false;
                    }
                }
                self.line_len += 1;
            }
        }
        None
    }
}

impl<T: AsyncWrite + Abort + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The hyper connection builder used for every client connection.
pub fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true)
        .half_close(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_header_list_size(2 * MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Accepts connections until shutdown; sheds those beyond `max_connections`.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<TlsReloader>>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let scheme = if tls.is_some() { "https" } else { "http" };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::debug!(%peer, "connection shed: max_connections reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, scheme, shared, shutdown).await,
                Some(tls) => {
                    let timeout = shared.config.server.header_timeout;
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, scheme, shared, shutdown).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one client connection until it ends, is revoked, idles out, or
/// shutdown drains it.
pub async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Abort + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let info = Arc::new(ConnInfo {
        peer,
        scheme,
        client_ip: http::HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
        sessions: shared.sessions.connection(),
        activity: Arc::clone(&activity),
    });
    let revoked = info.sessions.cancel.clone();
    let io = TokioIo::new(WatchedIo {
        inner: io,
        activity: Arc::clone(&activity),
        scanner: HeadScanner::default(),
    });
    let service = {
        let shared = Arc::clone(&shared);
        let info = Arc::clone(&info);
        service_fn(move |request| proxy::handle(Arc::clone(&shared), Arc::clone(&info), request))
    };
    let connection = shared.http.serve_connection(io, service);
    tokio::pin!(connection);
    let (header_timeout, idle_timeout) = (
        shared.config.server.header_timeout,
        shared.config.server.idle_timeout,
    );
    // The watchdog needs no wake-up from the request path. Every deadline is
    // an event's time plus `header_timeout` or `idle_timeout`, and events
    // happen after the watchdog last looked, so waking at the earlier of the
    // known deadline and `now + min(header_timeout, idle_timeout)` is never
    // late. Requests only store timestamps; the timer is re-armed when it
    // fires, at most once per that minimum.
    let check_every = header_timeout.min(idle_timeout);
    let next_check = |now: Instant| match activity.deadline(header_timeout, idle_timeout) {
        Some(deadline) => deadline.min(now + check_every),
        None => now + check_every,
    };
    let watchdog = tokio::time::sleep_until(next_check(Instant::now()));
    tokio::pin!(watchdog);
    let mut draining = false;
    loop {
        // Biased, revocation first: once a session is cancelled, hyper is
        // not polled again, so not one more byte goes out on it.
        tokio::select! {
            biased;
            () = revoked.cancelled() => {
                tracing::debug!(%peer, "connection closed: its session was revoked");
                activity.abortive.store(true, Ordering::Release);
                break;
            }
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                break;
            }
            () = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            () = watchdog.as_mut() => {
                let now = Instant::now();
                if activity.deadline(header_timeout, idle_timeout).is_some_and(|d| d <= now) {
                    tracing::debug!(%peer, "connection closed: header or idle timeout");
                    break;
                }
                watchdog.as_mut().reset(next_check(now));
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::HeadScanner;

    fn conflicting(head: &str) -> bool {
        let mut scanner = HeadScanner::default();
        assert!(scanner.wants(0, true));
        scanner.scan(head.as_bytes())
    }

    #[test]
    fn finds_conflicting_framing_in_heads() {
        assert!(conflicting(
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(conflicting(
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
        ));
        assert!(conflicting(
            "POST / HTTP/1.1\r\ncontent-length: 4\r\ncontent-length: 4\r\n\r\n"
        ));
        assert!(!conflicting(
            "POST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody"
        ));
        assert!(!conflicting(
            "GET / HTTP/1.1\r\nx-content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(!conflicting("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }

    #[test]
    fn every_split_of_a_head_gives_the_same_answer() {
        let heads = [
            ("POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", true),
            ("POST / HTTP/1.1\r\ncontent-length: 4\r\nCONTENT-LENGTH: 4\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nx-note: content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nx-a-very-long-header-name-indeed: 1\r\ncontent-length: 0\r\n\r\n", false),
            ("GET / HTTP/1.1\nhost: a\ncontent-length: 1\ntransfer-encoding: x\n\n", true),
        ];
        for (head, expected) in heads {
            for cut in 0..=head.len() {
                let mut scanner = HeadScanner::default();
                assert!(scanner.wants(0, true));
                let (a, b) = head.as_bytes().split_at(cut);
                let found = scanner.scan(a) || scanner.scan(b);
                assert_eq!(found, expected, "{head:?} cut at {cut}");
                assert!(
                    scanner.done,
                    "{head:?} cut at {cut}: the head's end was missed"
                );
            }
        }
    }

    #[test]
    fn heads_split_across_reads_and_bodies_are_not_scanned() {
        let mut scanner = HeadScanner::default();
        assert!(scanner.wants(0, true));
        assert!(!scanner.scan(b"POST / HTTP/1.1\r\nContent-Le"));
        assert!(scanner.scan(b"ngth: 4\r\nTransfer-Encoding: chunked\r\n\r\n"));
        // The body of the first request is not a head.
        assert!(!scanner.wants(0, false));
        // After it finished, the next head is scanned afresh.
        assert!(scanner.wants(1, true));
        assert!(!scanner.scan(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
    }
}
