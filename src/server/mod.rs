//! Listeners and connections: plain (HTTP/1.1 and h2c), TLS (h2 and
//! http/1.1 by ALPN), and the per-connection task.
//!
//! Each connection task runs hyper's connection future beside three signals:
//! its session token (a revoked HTTP/1.1 session closes the connection at
//! once), the shutdown token (drain gracefully), and a watchdog that enforces
//! `header_timeout` (a head must arrive in time: slowloris) and `idle_timeout`
//! (a keep-alive connection with nothing in flight), and resets HTTP/2
//! streams whose client took nothing for `send_timeout`. Hyper's own header
//! timer is not used because it also cuts idle keep-alive connections short.
//! HTTP/2 streams run as tasks of [`StreamExecutor`], which a revocation or
//! a stalled send resets one by one.
//!
//! - [`io`]: the watched socket (activity, head scanning, abortive close).
//! - [`framing`]: follows a request stream's framing to find smuggling shapes.
//! - [`tls`]: the TLS configuration and its reload.

mod framing;
mod io;
mod tls;

pub use io::Abort;
pub use tls::{load_tls, TlsError, TlsReloader, TLS_RELOAD_INTERVAL};

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{ConnInfo, StreamExecutor};
use crate::decision::MAX_HEAD_BYTES;
use crate::proxy;
use crate::state::Shared;
use io::WatchedIo;

/// Most concurrent HTTP/2 streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before the server accepts them (rapid reset).
pub const H2_MAX_PENDING_RESETS: usize = 20;

/// The hyper connection builder used for every client connection.
pub fn http_builder() -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor);
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
    let http = Arc::new(http_builder());
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
        set_keepalive(&stream);
        let shared = Arc::clone(&shared);
        let http = Arc::clone(&http);
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let info = ConnInfo::new(peer, scheme, shared.sessions.connection());
            match tls {
                None => serve_connection(stream, info, &http, shared, shutdown).await,
                Some(tls) => {
                    let timeout = shared.config.server.header_timeout;
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, info, &http, shared, shutdown).await
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

/// TCP keepalive on accepted sockets: a client that vanished (power loss,
/// a NAT that dropped the mapping) is found within about two minutes
/// rather than the kernel's two hours.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Interval between keepalive probes once idle.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped.
pub const TCP_KEEPALIVE_RETRIES: u32 = 6;

fn set_keepalive(stream: &tokio::net::TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let keepalive = keepalive.with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %err, "TCP keepalive not set");
    }
}

/// Serves one client connection until it ends, is revoked, idles out, or
/// shutdown drains it.
pub async fn serve_connection<I>(
    io: I,
    info: ConnInfo,
    http: &auto::Builder<StreamExecutor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Abort + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let peer = info.peer;
    let activity = Arc::clone(&info.activity);
    let revoked = info.sessions.cancel.clone();
    let send_timeout = shared.config.server.send_timeout;
    let socket = Arc::clone(&info.sessions.socket);
    let io = TokioIo::new(WatchedIo::new(
        io,
        Arc::clone(&activity),
        socket,
        send_timeout,
    ));
    let service = {
        let shared = Arc::clone(&shared);
        let info = Arc::clone(&info);
        service_fn(move |request| proxy::handle(Arc::clone(&shared), Arc::clone(&info), request))
    };
    let connection = http.serve_connection(io, service);
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
    let check_every = header_timeout.min(idle_timeout).min(send_timeout);
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
                activity.mark_abortive();
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
                // HTTP/2 streams whose client took nothing for `send_timeout`
                // are reset; the connection and its other streams go on.
                let reset = activity.reset_stalled(send_timeout);
                if reset > 0 {
                    tracing::debug!(%peer, streams = reset, "HTTP/2 streams reset: the client took nothing for send_timeout");
                }
                watchdog.as_mut().reset(next_check(now));
            }
        }
    }
}
