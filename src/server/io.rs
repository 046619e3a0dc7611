//! The client socket as the connection task sees it: reads are noted in the
//! connection's [`Activity`] (a head trickling in is timed), every HTTP/1.1
//! head is scanned for conflicting framing that hyper would resolve silently,
//! a write that makes no progress for `send_timeout` fails (so a client that
//! stops reading cannot hold its connection, nor the upstream connection
//! behind it), and a revoked connection closes with a reset. Bytes already
//! read can be put back in front of the socket's.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;

use bytes::{Buf, Bytes, BytesMut};
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
    /// Bytes already read (and scanned) put back, to be read first: the
    /// bytes read to tell HTTP/2's preface from HTTP/1.1, and what hyper
    /// had read but not used when its connection was parked.
    unread: Bytes,
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
            unread: Bytes::new(),
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

    /// The transport underneath.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Puts `bytes` in front of what is still to be read.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            // Dropped: an empty slice of hyper's read buffer would keep the
            // whole buffer alive.
            return;
        }
        self.unread = if self.unread.is_empty() {
            bytes
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.unread.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.unread);
            joined.freeze()
        };
    }

    /// Whether bytes put back are still to be read.
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// After a write or flush: times it ([`SendTimer`]) and tells the
    /// connection's activity when it starts or stops waiting for the client.
    fn sent<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let was_blocked = self.send.armed;
        let polled = self.send.check(cx, polled);
        if self.send.armed != was_blocked {
            self.activity.set_write_blocked(self.send.armed);
        }
        polled
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
        if !self.unread.is_empty() {
            // Noted and scanned when they were first read.
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            if self.unread.is_empty() {
                self.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
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

    /// The bare socket, when nothing sits between it and HTTP: an idle
    /// HTTP/1.1 connection can then be parked on its readiness. TLS keeps
    /// state and buffered bytes of its own, so it never parks.
    fn bare(&self) -> Option<&TcpStream>;
}

impl Abort for TcpStream {
    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }

    fn bare(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Abort for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.get_ref().0.raw_fd()
    }

    fn bare(&self) -> Option<&TcpStream> {
        None
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
        this.sent(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.sent(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Parking: HTTP/1.1 lets go of the socket, which stays open.
        if self.activity.keeps_socket() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.sent(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
