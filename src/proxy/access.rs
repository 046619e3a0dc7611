//! The access log: one line per request, target `stackgate::access`, with
//! the same fields on every line (SPEC §7): request id, stack, token uid,
//! route, the status answered (none when the request was aborted), the
//! reason of a refusal, the error that aborted a request, and the duration.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{NO_STACK, NO_TOKEN};

/// Who a request was for, as far as it is known.
pub struct Access<'a> {
    pub request_id: &'a str,
    pub stack: &'a str,
    pub token: &'a str,
    pub route: &'static str,
}

/// How a request ended.
pub enum Outcome<'a> {
    /// Answered by the upstream with this status.
    Forwarded(u16),
    /// Refused with this status and reason.
    Refused(u16, &'static str),
    /// A CORS preflight answered by the gateway.
    Preflight,
    /// Cut off without a response.
    Aborted(&'a dyn std::fmt::Display),
}

impl<'a> Access<'a> {
    /// A request about which nothing is known but its id.
    pub fn anonymous(request_id: &'a str) -> Self {
        Access {
            request_id,
            stack: NO_STACK,
            token: NO_TOKEN,
            route: "",
        }
    }

    /// Writes the request's access line.
    pub fn write(&self, outcome: Outcome<'_>, elapsed: Duration) {
        let (message, status, reason, error) = match outcome {
            Outcome::Forwarded(status) => ("forwarded", Some(status), None, None),
            Outcome::Refused(status, reason) => ("refused", Some(status), Some(reason), None),
            Outcome::Preflight => ("preflight", Some(204), None, None),
            Outcome::Aborted(error) => ("request aborted", None, None, Some(error)),
        };
        tracing::info!(
            target: crate::logging::ACCESS_TARGET,
            request_id = %self.request_id,
            stack = %self.stack,
            token = %self.token,
            route = %self.route,
            status,
            reason,
            error = error.map(tracing::field::display),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "{message}"
        );
    }
}

/// A forwarded request's access line, owed until it is written. If the
/// request's future is dropped first (an HTTP/1.1 connection closed by a
/// revocation drops its request with it; so does a client that goes away),
/// the line is written on drop, as an aborted request.
pub struct Pending<'a> {
    access: Access<'a>,
    started: Instant,
    written: bool,
}

impl<'a> Pending<'a> {
    /// The line of a request that started at `started`.
    pub fn new(access: Access<'a>, started: Instant) -> Self {
        Pending {
            access,
            started,
            written: false,
        }
    }

    /// Who the request was for.
    pub fn access(&self) -> &Access<'a> {
        &self.access
    }

    /// Writes the line now.
    pub fn write(&mut self, outcome: Outcome<'_>) {
        self.write_elapsed(outcome, self.started.elapsed());
    }

    /// Writes the line now, `elapsed` after the request started (read from
    /// the clock by the caller, who needed it too).
    pub fn write_elapsed(&mut self, outcome: Outcome<'_>, elapsed: Duration) {
        self.written = true;
        self.access.write(outcome, elapsed);
    }

    /// Another path (a refusal) writes the line.
    pub fn hand_off(&mut self) {
        self.written = true;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.written {
            let why = "dropped before its response: connection revoked or client gone";
            self.access
                .write(Outcome::Aborted(&why), self.started.elapsed());
        }
    }
}
