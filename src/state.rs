//! The state the request path, the admin API and the registry services act
//! on, and the one function that applies a registry change to it.
//!
//! [`Shared`] sits below the listeners: [`crate::proxy`], [`crate::admin`]
//! and the sync services call down into it, and it calls nothing above it.
//! Every registry change, whatever learned of it (a sync, an admin
//! revocation), goes through [`Shared::apply_change`]: sessions the change
//! no longer allows are cut, per-token state of tokens that are gone is
//! forgotten, and the registry metrics follow.

use std::sync::Arc;

use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::{Metrics, RouteDurations};
use crate::registry::snapshot::unix_secs;
use crate::registry::source::{CmaBudget, SyncError};
use crate::registry::{Change, Registry, StackRegistry, Stacks, SyncReport, Token};
use crate::route::{RouteKind, Router};
use crate::sessions::Sessions;
use crate::upstream::h1pool::H1Pool;
use crate::upstream::HttpClient;

/// Everything the request path and the admin API share.
pub struct Shared {
    pub config: Config,
    pub router: Router,
    pub stacks: Stacks,
    pub sessions: Arc<Sessions>,
    pub client: HttpClient,
    /// The HTTP/1.1 upstream pool HTTP/1.1 client requests take.
    pub h1pool: H1Pool,
    pub metrics: Metrics,
    /// The duration histograms, resolved per route kind.
    pub durations: RouteDurations,
    /// Rate limits (SPEC §6).
    pub limits: Limits,
    /// The CMA request budget every stack's client spends (shared with the
    /// other nodes in cluster mode).
    pub cma_budget: Arc<CmaBudget>,
}

impl Shared {
    /// Syncs one stack now and applies what changed.
    pub async fn sync_stack(&self, stack: &StackRegistry, force: bool) -> SyncReport {
        let (report, change) = stack.sync(force).await;
        self.after_sync(stack, &report, change);
        report
    }

    fn after_sync(&self, stack: &StackRegistry, report: &SyncReport, change: Option<Change>) {
        let name = &*stack.name;
        let status = stack.status();
        if let Some(err) = &status.last_error {
            self.metrics
                .registry_sync_failures
                .with_label_values(&[name])
                .inc();
            // A bad credential fails every poll: say so once per streak.
            let first = status.consecutive_failures == 1;
            if first || !matches!(err, SyncError::Credential(_)) {
                tracing::error!(stack = name, failures = status.consecutive_failures, error = %err, "registry sync failed; serving the last good registry");
            }
            return;
        }
        if let Some(view) = stack.view() {
            record_registry(&self.metrics, stack, &view.registry);
        }
        self.metrics
            .registry_held_back
            .with_label_values(&[name])
            .set(report.held_back.len() as i64);
        if let Some(change) = change {
            self.apply_change(stack, &change, false);
        }
    }

    /// Ends the sessions a change no longer allows and drops the metric
    /// series of tokens that are gone. Returns how many sessions and
    /// requests it cut.
    pub fn apply_change(&self, stack: &StackRegistry, change: &Change, admin: bool) -> usize {
        let diff = &change.diff;
        let revocation = self.sessions.revoke(stack.index, change, admin);
        if !admin {
            for uid in &diff.removed {
                self.metrics.forget_token(&stack.name, uid);
                self.limits.forget(stack.index, uid);
            }
        }
        record_registry(&self.metrics, stack, &change.registry);
        tracing::info!(
            stack = %stack.name,
            version = change.registry.version(),
            added = diff.added.len(),
            removed = diff.removed.len(),
            preview_removed = diff.preview_removed.len(),
            rotated = diff.rotated.len(),
            narrowed = diff.narrowed.len(),
            changed = diff.changed.len(),
            sessions_cancelled = revocation.cancelled,
            "registry changed"
        );
        revocation.cancelled
    }
}

impl Shared {
    /// Counts a forwarded request of `token` on a `kind` route (usage and
    /// `requests_total`), unless the token is gone by now; `version`: the
    /// registry version that allowed it.
    pub fn record_forwarded(
        &self,
        stack: &StackRegistry,
        token: &Token,
        kind: RouteKind,
        version: u64,
    ) {
        token
            .usage
            .forwarded(&self.metrics, &stack.name, &token.uid, kind);
        self.forget_if_gone(stack, &token.uid, Some(version));
    }

    /// Forgets `uid`'s per-token state (`requests_total` series,
    /// limiter bucket) again if the stack's current registry no longer lists
    /// it. The request path calls it after recording anything for a token:
    /// a request decided on an older version must not re-create what
    /// [`Shared::apply_change`] forgot. Race-free because a registry is
    /// swapped in before its change is applied: either this check sees the
    /// token gone, or the forgetting comes after what was recorded.
    /// `decided_on`: the version the request was decided on (if that is
    /// still the current one, the token is there and nothing is looked up).
    pub fn forget_if_gone(&self, stack: &StackRegistry, uid: &str, decided_on: Option<u64>) {
        let gone = match &*stack.load() {
            Some(view) => {
                decided_on != Some(view.registry.version()) && view.registry.get(uid).is_none()
            }
            None => true,
        };
        if gone {
            self.metrics.forget_token(&stack.name, uid);
            self.limits.forget(stack.index, uid);
        }
    }
}

/// Sets a stack's registry gauges: token count, version, last success.
pub fn record_registry(metrics: &Metrics, stack: &StackRegistry, registry: &Registry) {
    let name = &*stack.name;
    metrics
        .registry_tokens
        .with_label_values(&[name])
        .set(registry.len() as i64);
    metrics
        .registry_version
        .with_label_values(&[name])
        .set(i64::try_from(registry.version()).unwrap_or(i64::MAX));
    if let Some(success) = stack.status().last_success {
        metrics
            .registry_last_success
            .with_label_values(&[name])
            .set(unix_secs(success) as f64);
    }
}
