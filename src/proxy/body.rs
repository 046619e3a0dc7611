//! The response body wrapper: a forwarded body ends in an error the moment
//! its upstream falls silent too long, tells the connection's watchdog when
//! an HTTP/2 client takes nothing (`send_timeout`), and holds the request's
//! session and activity guards until it is done. (A revoked HTTP/2 stream is
//! reset by dropping its task, see [`crate::conn::StreamExecutor`]; a revoked
//! HTTP/1.1 session closes its connection.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::conn::{ActivityGuard, SendClock};
use crate::response::BoxError;
use crate::sessions::RequestGuard;

/// Why a request was aborted without a response.
#[derive(Debug, thiserror::Error)]
pub enum Aborted {
    #[error("client body: {0}")]
    ClientBody(String),
    #[error("upstream body stalled longer than request_timeout")]
    UpstreamStalled,
}

/// A response body that ends in an error the moment its upstream falls
/// silent too long, and that holds the request's session and activity guards
/// until it is done.
pub struct Tracked<B> {
    inner: B,
    stall: Option<Stall>,
    /// HTTP/2 only: tells the connection's watchdog when a handed frame is
    /// not taken (`send_timeout`).
    send: Option<SendClock>,
    _session: Option<RequestGuard>,
    _activity: Option<ActivityGuard>,
}

/// The longest silence allowed between two frames of an upstream body. The
/// timer is armed only once the body has to wait, so a response that is
/// already buffered (the usual small JSON answer) costs no timer at all.
struct Stall {
    limit: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last armed.
    progressed: bool,
}

impl Stall {
    /// Polls the silence timer; true once the limit is exceeded.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if self.progressed {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.progressed = false;
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<B> Tracked<B> {
    /// Wraps `inner`; `stall` bounds each silence of the upstream body.
    pub fn new(
        inner: B,
        session: Option<RequestGuard>,
        activity: Option<ActivityGuard>,
        stall: Option<std::time::Duration>,
    ) -> Self {
        let token = session.as_ref().and_then(RequestGuard::cancel);
        // A forwarded HTTP/2 body (its stream can be cancelled) is watched;
        // a stall resets its stream as a revocation would.
        let send = match (token, &activity) {
            (Some(token), Some(activity)) => Some(activity.activity().send_clock(token.clone())),
            _ => None,
        };
        let stall = stall.map(|limit| Stall {
            limit,
            timer: None,
            progressed: false,
        });
        Tracked {
            inner,
            stall,
            send,
            _session: session,
            _activity: activity,
        }
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(stall) = self.stall.as_mut() {
                    stall.progressed = true;
                }
                if let Some(send) = &self.send {
                    send.handed(matches!(frame, Some(Ok(_))));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if let Some(send) = &self.send {
                    send.handed(false);
                }
                let expired = self.stall.as_mut().is_some_and(|s| s.poll_expired(cx));
                if expired {
                    Poll::Ready(Some(Err(Box::new(Aborted::UpstreamStalled))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
