//! The client socket as the connection task sees it: reads are noted in the
//! connection's [`Activity`] (a head trickling in is timed), HTTP/1.1 heads
//! are scanned for conflicting framing that hyper would resolve silently,
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

use crate::conn::Activity;

/// Notes when bytes arrive, so that a head trickling in is timed, and scans
/// HTTP/1.1 heads (not bodies) for conflicting framing headers.
pub struct WatchedIo<T: Abort> {
    inner: T,
    activity: Arc<Activity>,
    scanner: HeadScanner,
    send: SendTimer,
}

impl<T: Abort> WatchedIo<T> {
    /// Watches `inner` for the connection whose activity this is; a write
    /// blocked for `send_timeout` without progress fails.
    pub fn new(inner: T, activity: Arc<Activity>, send_timeout: Duration) -> Self {
        WatchedIo {
            inner,
            activity,
            scanner: HeadScanner::default(),
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
            let (finished, idle) = this.activity.head_boundary();
            if this.scanner.wants(finished, idle) && this.scanner.scan(&buf.filled()[before..]) {
                this.activity.mark_smuggled();
            }
        }
        result
    }
}

impl<T: Abort> Drop for WatchedIo<T> {
    fn drop(&mut self) {
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
