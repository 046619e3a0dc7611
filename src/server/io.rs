//! The client socket as the connection task sees it: reads are noted in the
//! connection's [`Activity`] (a head trickling in is timed), every HTTP/1.1
//! head is scanned for conflicting framing that hyper would resolve silently,
//! a write that makes no progress for `send_timeout` fails (so a client that
//! stops reading cannot hold its connection, nor the upstream connection
//! behind it), and a revoked connection closes with a reset.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::framing::Framing;
use crate::conn::Activity;
use crate::sessions::SocketHandle;

/// Notes when bytes arrive, so that a head trickling in is timed, and
/// follows the HTTP/1.1 request stream's framing to find every head with
/// conflicting framing headers ([`Framing`]).
pub struct WatchedIo<T: Abort> {
    inner: T,
    activity: Arc<Activity>,
    /// Armed with `inner`'s socket while this owns it (see [`SocketHandle`]).
    socket: Arc<SocketHandle>,
    framing: Framing,
    send: SendTimer,
}

impl<T: Abort> WatchedIo<T> {
    /// Watches `inner` for the connection whose activity this is; a write
    /// blocked for `send_timeout` without progress fails. `socket` is armed
    /// with `inner`'s socket until this is dropped, so that revocation can
    /// reset it.
    pub fn new(
        inner: T,
        activity: Arc<Activity>,
        socket: Arc<SocketHandle>,
        send_timeout: Duration,
    ) -> Self {
        socket.arm(inner.raw_fd());
        WatchedIo {
            inner,
            activity,
            socket,
            framing: Framing::default(),
            send: SendTimer {
                limit: send_timeout,
                timer: None,
                armed: false,
            },
        }
    }
}

/// Times a write that the socket does not take: armed when a write first
/// returns `Pending`, disarmed by any progress. A client reading normally
/// never arms it for long; the timer is allocated once, on the first block.
struct SendTimer {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl SendTimer {
    /// After a write or flush: `Pending` arms (or polls) the timer; once it
    /// expires the write fails with `TimedOut`. Anything else is progress.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.armed = true;
        if timer.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "send_timeout: the client took nothing for too long",
            )));
        }
        Poll::Pending
    }
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
            if this.framing.scan(&buf.filled()[before..]) {
                this.activity.mark_smuggled();
            }
        }
        result
    }
}

impl<T: Abort> Drop for WatchedIo<T> {
    fn drop(&mut self) {
        // Before `inner` closes its socket: the number must not be reset
        // once it may be reused.
        self.socket.disarm();
        if self.activity.is_abortive() {
            self.inner.abort_on_close();
        }
    }
}

/// A transport that can be closed with a reset: a revoked session is cut
/// off, and an abortive close costs both ends less than a FIN handshake.
pub trait Abort {
    /// Makes the coming close send RST (`SO_LINGER` 0).
    fn abort_on_close(&self);

    /// The socket's descriptor, for [`SocketHandle::arm`].
    fn raw_fd(&self) -> std::os::fd::RawFd;
}

impl Abort for TcpStream {
    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}

impl Abort for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.get_ref().0.raw_fd()
    }
}

impl<T: AsyncWrite + Abort + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.send.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.send.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.send.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
