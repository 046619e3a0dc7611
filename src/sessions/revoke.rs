//! Revocation: ending the sessions a registry change no longer allows, and
//! measuring how long the last of them took to close.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use super::{Revocation, Sessions, TokenKey, Tracker, Usage};
use crate::decision::SessionKind;
use crate::registry::{Change, Token};

impl Sessions {
    /// Ends the sessions a registry change no longer allows. `admin` marks an
    /// admin-API revocation (for the `cause` label).
    pub fn revoke(&self, stack: usize, change: &Change, admin: bool) -> Revocation {
        let (done_tx, done_rx) = watch::channel(false);
        // Starts at one for this call, so that sessions closing while the
        // loop below still runs cannot finish the measurement early.
        let tracker = Arc::new(Tracker {
            remaining: AtomicUsize::new(1),
            cancelled_any: std::sync::atomic::AtomicBool::new(false),
            learned_at: change.learned_at,
            metrics: self.metrics.clone(),
            done: done_tx,
        });
        let diff = &change.diff;
        let whole = if admin {
            "admin_revoked"
        } else {
            "token_deleted"
        };
        let mut cancelled = 0;
        for uid in &diff.removed {
            cancelled += self.end(stack, uid, whole, &tracker, &Ending::All);
        }
        for uid in &diff.rotated {
            cancelled += self.end(stack, uid, "token_rotated", &tracker, &Ending::All);
        }
        for uid in &diff.preview_removed {
            let ending = Ending::Kind(SessionKind::Preview);
            cancelled += self.end(stack, uid, "preview_deleted", &tracker, &ending);
        }
        for uid in &diff.narrowed {
            let ending = Ending::Uncovered(change.registry.get(uid).map(|t| Token::clone(t)));
            cancelled += self.end(stack, uid, "scope_narrowed", &tracker, &ending);
        }
        tracker
            .cancelled_any
            .store(cancelled > 0, Ordering::Release);
        tracker.finish_one();
        Revocation {
            cancelled,
            done: done_rx,
        }
    }

    /// Cancels the sessions of one token that `ending` hits. An HTTP/1.1
    /// session is hit if any use seen on it is; HTTP/2 streams one by one.
    fn end(
        &self,
        stack: usize,
        uid: &str,
        cause: &str,
        tracker: &Arc<Tracker>,
        ending: &Ending,
    ) -> usize {
        let key = TokenKey {
            stack,
            uid: Arc::from(uid),
        };
        // Marked under the lock, cancelled after it is released: a woken
        // connection task must not find its token's entry still locked.
        let mut to_cancel = Vec::new();
        let mut empty = false;
        if let Some(mut entry) = self.by_token.get_mut(&key) {
            for session in entry.values_mut() {
                let kind = session.kind;
                if session.closes_connection {
                    let hit = session.used.iter().any(|u| ending.hits(kind, u))
                        || (session.used_overflow && ending.ends_session_or_narrows(kind));
                    if session.tracker.is_none() && hit {
                        tracker.remaining.fetch_add(1, Ordering::AcqRel);
                        session.tracker = Some(Arc::clone(tracker));
                        to_cancel.push((session.cancel.clone(), session.socket.clone()));
                    }
                    continue;
                }
                for inflight in session.requests.values_mut() {
                    if inflight.tracker.is_none() && ending.hits(kind, &inflight.usage) {
                        tracker.remaining.fetch_add(1, Ordering::AcqRel);
                        inflight.tracker = Some(Arc::clone(tracker));
                        to_cancel.push((inflight.cancel.clone(), None));
                    }
                }
                // The connection stays up for other tokens; this token's
                // session on it ends once its cancelled streams are gone.
                session.ended |= ending.ends_session(kind);
            }
            entry.retain(|_, s| !(s.ended && s.requests.is_empty()));
            empty = entry.is_empty();
        }
        if empty {
            self.remove_if_empty(&key);
        }
        let cancelled = to_cancel.len();
        // An HTTP/1.1 session's socket is reset here, so that the client
        // sees the close now rather than once its connection task has been
        // scheduled. All of them first: woken tasks cleaning up on another
        // worker would contend with the resets for the descriptor table.
        // The tasks, woken by their tokens, then only clean up.
        for (_, socket) in &to_cancel {
            if let Some(socket) = socket {
                socket.abort();
            }
        }
        for (cancel, _) in to_cancel {
            cancel.cancel();
        }
        if cancelled > 0 {
            self.metrics
                .sessions_dropped
                .with_label_values(&[self.stack_name(stack), cause])
                .inc_by(cancelled as u64);
        }
        cancelled
    }
}

/// Which of a token's sessions a change ends.
enum Ending {
    /// Every session: the token is gone.
    All,
    /// Sessions of one kind: a preview token deleted alone.
    Kind(SessionKind),
    /// Uses the token's new scope (`None`: gone) no longer covers.
    Uncovered(Option<Token>),
}

impl Ending {
    fn hits(&self, kind: SessionKind, usage: &Usage) -> bool {
        match self {
            Ending::All => true,
            Ending::Kind(k) => *k == kind,
            Ending::Uncovered(now) => !usage.covered_by(now.as_ref()),
        }
    }

    /// Whether a session of `kind` whose uses are not all known may be hit.
    fn ends_session_or_narrows(&self, kind: SessionKind) -> bool {
        match self {
            Ending::Kind(k) => *k == kind,
            Ending::All | Ending::Uncovered(_) => true,
        }
    }

    /// Whether a session of `kind` ends whatever it was used for.
    fn ends_session(&self, kind: SessionKind) -> bool {
        match self {
            Ending::All => true,
            Ending::Kind(k) => *k == kind,
            Ending::Uncovered(now) => now.is_none(),
        }
    }
}
