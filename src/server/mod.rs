//! Listeners and connections: plain (HTTP/1.1 and h2c), TLS (h2 and
//! http/1.1 by ALPN), and the per-connection task.
//!
//! Each connection is a task (`serve`): hyper's connection beside its
//! session token, the shutdown token and a watchdog for its timeouts; an
//! idle HTTP/1.1 connection is parked without hyper's buffers. HTTP/2
//! streams run as tasks of [`crate::conn::StreamExecutor`], which a
//! revocation or a stalled send resets one by one.
//!
//! - `serve`: one connection, from its first bytes to its close.
//! - `io`: the watched socket (activity, head scanning, abortive close),
//!   and bytes put back in front of it.
//! - `framing`: follows a request stream's framing to find smuggling shapes.
//! - `tls`: the TLS configuration and its reload.

mod framing;
mod io;
mod serve;
mod tls;

pub use io::Abort;
pub use serve::{
    serve_connection, Http, H2_MAX_CONCURRENT_STREAMS, H2_MAX_PENDING_RESETS, PARK_AFTER,
};
pub use tls::{load_tls, TlsError, TlsReloader, TLS_RELOAD_INTERVAL};

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::ConnInfo;
use crate::state::Shared;

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
    let http = Arc::new(Http::new());
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
            let info = Arc::new(ConnInfo::new(peer, scheme, shared.sessions.connection()));
            match tls {
                None => serve_connection(stream, info, &http, shared, shutdown).await,
                // Boxed: the handshake and rustls's state would otherwise
                // make every plain connection's task as large.
                Some(tls) => {
                    Box::pin(async move {
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
                    })
                    .await
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
