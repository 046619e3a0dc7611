//! One stack's registry as the rest of the gateway sees it: the current
//! immutable [`Registry`] behind an `ArcSwap`, how fresh it is, and the one
//! path (serialized by a lock) through which it changes.
//!
//! Invariants: a failed fetch changes nothing; a change is swapped in whole
//! and only then reported; a sync that would remove more than
//! `max_removal_ratio` of the tokens is held back until the next sync
//! confirms it (or it is forced).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio::time::Instant;

use super::diff::{next, Diff};
use super::model::{Registry, Token};
use super::snapshot::{self, unix_secs};
use super::source::{Fetched, Source, SyncError};
use crate::config::RegistrySettings;
use crate::memory::{drop_off_runtime, offload};

/// An unchanged registry is written to its snapshot again after this long,
/// so that the file's sync time stays recent.
pub const SNAPSHOT_REFRESH: Duration = Duration::from_secs(300);

/// The registry in force, with how long it may be trusted.
#[derive(Debug)]
pub struct View {
    pub registry: Arc<Registry>,
    /// Past this instant the stack answers `registry_stale`; `None` = never.
    pub fresh_until: Option<Instant>,
}

/// What the registry learned in one step, for revocation and metrics.
#[derive(Debug)]
pub struct Change {
    pub diff: Diff,
    pub registry: Arc<Registry>,
    /// When the gateway learned of it; revocation latency is measured from here.
    pub learned_at: Instant,
}

/// The result of one sync.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    /// The change applied, if any.
    #[serde(flatten)]
    pub diff: Diff,
    /// Uids whose removal was held back by the mass-removal guard.
    pub held_back: Vec<String>,
    /// The registry version after the sync.
    pub version: u64,
    /// Why it failed, if it did (nothing changed then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Health of the registry, for `/admin/stacks` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<SyncError>,
    pub last_error_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub held_back: Vec<String>,
    pub snapshot_written: Option<SystemTime>,
    pub snapshot_error: Option<String>,
}

struct SourceState {
    source: Source,
    pending_removal: Option<BTreeSet<String>>,
}

/// A stack and its registry.
pub struct StackRegistry {
    /// Position in the config, also the stack's index everywhere else.
    pub index: usize,
    pub name: Arc<str>,
    pub api_key: Box<str>,
    settings: RegistrySettings,
    current: ArcSwapOption<View>,
    status: Mutex<Status>,
    /// Held across a fetch: serializes syncs. Nothing a revocation needs.
    source: tokio::sync::Mutex<SourceState>,
    /// Held only to swap a new registry in (and queue its snapshot), never
    /// across I/O or a registry build.
    swap: Mutex<()>,
    snapshot_jobs: tokio::sync::watch::Sender<Option<SnapshotJob>>,
    /// What the snapshot file holds, and the last version that failed.
    persisted: tokio::sync::watch::Sender<Persisted>,
}

impl std::fmt::Debug for StackRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackRegistry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl StackRegistry {
    /// A stack whose registry has not loaded yet.
    pub fn new(
        index: usize,
        name: &str,
        api_key: &str,
        settings: RegistrySettings,
        source: Source,
    ) -> Self {
        StackRegistry {
            index,
            name: Arc::from(name),
            api_key: api_key.into(),
            settings,
            current: ArcSwapOption::empty(),
            status: Mutex::new(Status::default()),
            source: tokio::sync::Mutex::new(SourceState {
                source,
                pending_removal: None,
            }),
            swap: Mutex::new(()),
            snapshot_jobs: tokio::sync::watch::Sender::new(None),
            persisted: tokio::sync::watch::Sender::new(Persisted::default()),
        }
    }

    /// A stack serving `registry` as loaded just now (tests and benches).
    pub fn with_registry(
        index: usize,
        name: &str,
        api_key: &str,
        settings: RegistrySettings,
        registry: Registry,
    ) -> Self {
        let source = Source::File(super::source::FileSource::new(std::path::PathBuf::new()));
        let stack = StackRegistry::new(index, name, api_key, settings, source);
        stack.install(Arc::new(registry), Instant::now(), SystemTime::now());
        stack
    }

    /// The registry in force, if it ever loaded.
    pub fn view(&self) -> Option<Arc<View>> {
        self.current.load_full()
    }

    /// Cheap access for the request path.
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<View>>> {
        self.current.load()
    }

    /// A copy of the health record.
    pub fn status(&self) -> Status {
        self.lock_status().clone()
    }

    /// The settings this stack was configured with.
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    fn lock_status(&self) -> MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn install(&self, registry: Arc<Registry>, now: Instant, synced_at: SystemTime) {
        let age = SystemTime::now()
            .duration_since(synced_at)
            .unwrap_or_default();
        let fresh_until = self
            .settings
            .max_staleness
            .map(|max| now + max.saturating_sub(age));
        self.current.store(Some(Arc::new(View {
            registry,
            fresh_until,
        })));
    }

    /// Serves the snapshot, if the stack has one and it is readable.
    /// Returns the number of tokens loaded.
    pub fn load_snapshot(&self) -> Result<Option<usize>, snapshot::SnapshotError> {
        let Some(path) = &self.settings.snapshot else {
            return Ok(None);
        };
        let Some(loaded) = snapshot::read(path, &self.name)? else {
            return Ok(None);
        };
        let count = loaded.registry.len();
        let version = loaded.registry.version();
        self.persisted.send_modify(|p| p.written = version);
        self.install(Arc::new(loaded.registry), Instant::now(), loaded.synced_at);
        let mut status = self.lock_status();
        status.last_success = Some(loaded.synced_at);
        status.snapshot_written = Some(loaded.synced_at);
        Ok(Some(count))
    }

    /// Fetches the source and applies what changed. `force` applies removals
    /// that the mass-removal guard would hold back.
    ///
    /// The fetch holds only the source lock, which nothing on the way of a
    /// revocation takes; the next registry is built off the runtime; only the
    /// swap itself holds the short swap lock, over the registry current at
    /// that moment (so an admin revocation made during the fetch is carried
    /// over, never undone).
    pub async fn sync(&self, force: bool) -> (SyncReport, Option<Change>) {
        let mut state = self.source.lock().await;
        let refresh = force || state.pending_removal.is_some();
        let fetched = state.source.fetch(refresh).await;
        let tokens = match fetched {
            Err(err) => return (self.failed(err), None),
            Ok(Fetched::Unchanged) => None,
            Ok(Fetched::Tokens(tokens)) => Some(tokens),
        };
        let wall = SystemTime::now();

        // Under the source lock no other sync changes the token maps; the
        // admin API changes only the admin revocations and the version.
        let previous = self.view().map(|v| Arc::clone(&v.registry));
        let (next, held_back) = match tokens {
            Some(tokens) => {
                let base = previous.clone().unwrap_or_default();
                let guard = RemovalGuard {
                    stack: Arc::clone(&self.name),
                    max_removal_ratio: self.settings.max_removal_ratio,
                    pending: state.pending_removal.take(),
                    force,
                };
                let built = offload(move || {
                    let (tokens, held_back, pending) = guard.apply(&base, tokens);
                    (next(&base, tokens, unix_secs(wall)), held_back, pending)
                })
                .await;
                match built {
                    Ok((next, held_back, pending)) => {
                        state.pending_removal = pending;
                        (next, held_back)
                    }
                    Err(err) => {
                        let err = SyncError::Internal(err.to_string());
                        return (self.failed(err), None);
                    }
                }
            }
            None => (None, Vec::new()),
        };
        let now = Instant::now();
        let swap = self.lock_swap();
        let current = self.view().map(|v| Arc::clone(&v.registry));
        let (registry, change) = match next {
            Some((built, diff)) => {
                let registry = Arc::new(match &current {
                    Some(current) => {
                        let version = current.version().saturating_add(1).max(built.version());
                        built.rebased(version, current)
                    }
                    None => built,
                });
                let change = Change {
                    diff,
                    registry: Arc::clone(&registry),
                    learned_at: now,
                };
                (registry, Some(change))
            }
            None => (current.clone().unwrap_or_default(), None),
        };
        self.install(Arc::clone(&registry), now, wall);
        {
            let mut status = self.lock_status();
            status.last_success = Some(wall);
            status.consecutive_failures = 0;
            status.last_error = None;
            status.held_back = held_back.clone();
            let refresh_due = status
                .snapshot_written
                .is_none_or(|t| wall.duration_since(t).unwrap_or_default() >= SNAPSHOT_REFRESH);
            if change.is_some() || current.is_none() || refresh_due {
                // Queued under the swap lock, so snapshots follow versions.
                self.queue_snapshot(&registry, wall);
            }
        }
        drop(swap);
        drop(state);
        drop(previous);
        if change.is_some() {
            // A request still reading it may yet be the last to let go.
            drop_off_runtime(current);
        }
        let report = SyncReport {
            diff: change.as_ref().map(|c| c.diff.clone()).unwrap_or_default(),
            held_back,
            version: registry.version(),
            error: None,
        };
        (report, change)
    }

    /// Records a failed sync (which changes nothing) and reports it.
    fn failed(&self, err: SyncError) -> SyncReport {
        let mut status = self.lock_status();
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
        status.last_error = Some(err.clone());
        status.last_error_at = Some(SystemTime::now());
        let version = self.view().map_or(0, |v| v.registry.version());
        SyncReport {
            version,
            held_back: status.held_back.clone(),
            error: Some(err.to_string()),
            ..SyncReport::default()
        }
    }

    fn lock_swap(&self) -> MutexGuard<'_, ()> {
        self.swap
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets or lifts an admin revocation of `uid`. `Ok(None)` if it was
    /// already so; `Err` if the stack does not list the uid (and, to lift,
    /// has not revoked it).
    ///
    /// Never waits on I/O: it takes only the swap lock, which a sync holds
    /// for a pointer swap, not for its fetch. Costs O(admin-revoked uids),
    /// not O(tokens): the new version shares the token maps.
    pub fn set_admin_revocation(
        &self,
        uid: &str,
        revoked: bool,
    ) -> Result<Option<Change>, UnknownUid> {
        let swap = self.lock_swap();
        let Some(view) = self.view() else {
            return Err(UnknownUid);
        };
        let known = view.registry.get(uid).is_some() || view.registry.is_admin_revoked(uid);
        if !known {
            return Err(UnknownUid);
        }
        let Some(next) = view.registry.with_admin_revocation(uid, revoked) else {
            return Ok(None);
        };
        let registry = Arc::new(next);
        // Keep freshness as it was: an admin action is not a sync.
        self.current.store(Some(Arc::new(View {
            registry: Arc::clone(&registry),
            fresh_until: view.fresh_until,
        })));
        let synced_at = self
            .lock_status()
            .last_success
            .unwrap_or_else(SystemTime::now);
        self.queue_snapshot(&registry, synced_at);
        drop(swap);
        let mut diff = Diff::default();
        if revoked {
            diff.removed.push(uid.to_owned());
        } else {
            diff.added.push(uid.to_owned());
        }
        Ok(Some(Change {
            diff,
            registry,
            learned_at: Instant::now(),
        }))
    }

    /// Installs a registry learned from elsewhere (cluster mode, SPEC §10),
    /// serialized with syncs and admin revocations: `make` sees the registry
    /// in force and returns the one to install, or `None` to keep it (a
    /// version that is not newer). Marks a success synced at `synced_at` and
    /// queues a snapshot. Returns the registry replaced and the new one;
    /// revocation is the caller's (through `Shared::apply_change`).
    pub async fn install_published(
        &self,
        synced_at: SystemTime,
        make: impl FnOnce(Option<&Registry>) -> Option<Registry>,
    ) -> Option<(Option<Arc<Registry>>, Arc<Registry>)> {
        let state = self.source.lock().await;
        let previous = self.view().map(|v| Arc::clone(&v.registry));
        let registry = Arc::new(make(previous.as_deref())?);
        self.install(Arc::clone(&registry), Instant::now(), synced_at);
        {
            let mut status = self.lock_status();
            status.last_success = Some(synced_at);
            status.consecutive_failures = 0;
            status.last_error = None;
        }
        self.queue_snapshot(&registry, synced_at);
        drop(state);
        Some((previous, registry))
    }

    /// Hands the registry to the snapshot writer (latest wins).
    fn queue_snapshot(&self, registry: &Arc<Registry>, synced_at: SystemTime) {
        if self.settings.snapshot.is_some() {
            let replaced = self.snapshot_jobs.send_replace(Some(SnapshotJob {
                registry: Arc::clone(registry),
                synced_at,
            }));
            // It may hold the last reference to an older registry's maps.
            drop_off_runtime(replaced);
        }
    }

    /// Waits until the snapshot file holds `version` or later (written,
    /// fsynced, renamed, its directory fsynced): true then. False at once
    /// when the stack has no snapshot file or a write of `version` or later
    /// failed, and after `timeout`.
    pub async fn wait_snapshot(&self, version: u64, timeout: Duration) -> bool {
        if self.settings.snapshot.is_none() {
            return false;
        }
        let mut persisted = self.persisted.subscribe();
        let settled = async {
            persisted
                .wait_for(|p| p.written >= version || p.failed >= version)
                .await
                .is_ok_and(|p| p.written >= version)
        };
        tokio::time::timeout(timeout, settled)
            .await
            .unwrap_or(false)
    }

    /// Writes queued snapshots one at a time, in the order they were queued,
    /// until shutdown; then writes the last one still pending.
    /// Every failed write counts in `failures`.
    pub async fn snapshot_writer(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
        failures: prometheus::IntCounter,
    ) {
        let Some(path) = self.settings.snapshot.clone() else {
            return;
        };
        let mut jobs = self.snapshot_jobs.subscribe();
        jobs.mark_changed();
        loop {
            let stopping = tokio::select! {
                changed = jobs.changed() => changed.is_err(),
                () = shutdown.cancelled() => true,
            };
            let pending = stopping && !jobs.has_changed().unwrap_or(false);
            let job = jobs.borrow_and_update().clone();
            if let (Some(job), false) = (job, pending) {
                if !self.write_snapshot(&path, job).await {
                    failures.inc();
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes one snapshot off the runtime; true once it is on disk.
    async fn write_snapshot(&self, path: &std::path::Path, job: SnapshotJob) -> bool {
        let SnapshotJob {
            registry,
            synced_at,
        } = job;
        let version = registry.version();
        let (path, name) = (path.to_owned(), Arc::clone(&self.name));
        let result = offload(move || snapshot::write(&path, &name, &registry, synced_at))
            .await
            .map_err(|err| err.to_string())
            .and_then(|written| written.map_err(|err| err.to_string()));
        let mut status = self.lock_status();
        match result {
            Ok(()) => {
                status.snapshot_written = Some(synced_at);
                status.snapshot_error = None;
                drop(status);
                self.persisted
                    .send_modify(|p| p.written = p.written.max(version));
                true
            }
            Err(err) => {
                tracing::warn!(stack = %self.name, version, error = %err, "snapshot not written: the registry is not persisted");
                status.snapshot_error = Some(err);
                drop(status);
                self.persisted
                    .send_modify(|p| p.failed = p.failed.max(version));
                false
            }
        }
    }
}

/// The stack neither lists the uid nor has it revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stack does not list this uid")]
pub struct UnknownUid;

/// How far the snapshot file has got.
#[derive(Debug, Default, Clone, Copy)]
struct Persisted {
    /// The registry version the file holds.
    written: u64,
    /// The latest version whose write failed.
    failed: u64,
}

/// The mass-removal guard's inputs, moved to the thread that builds the
/// next registry.
struct RemovalGuard {
    stack: Arc<str>,
    max_removal_ratio: f64,
    /// The removal the previous sync held back, if any.
    pending: Option<BTreeSet<String>>,
    force: bool,
}

impl RemovalGuard {
    /// Keeps the tokens a too-large removal would drop, unless the previous
    /// sync already held the same removal back (confirmation) or `force`.
    /// Returns the tokens to apply, the uids held back, and the removal
    /// pending for the next sync.
    fn apply(
        self,
        base: &Registry,
        mut tokens: Vec<Token>,
    ) -> (Vec<Token>, Vec<String>, Option<BTreeSet<String>>) {
        let listed: std::collections::HashSet<&str> = tokens.iter().map(|t| &*t.uid).collect();
        let removed: BTreeSet<String> = base
            .tokens()
            .filter(|t| !listed.contains(&*t.uid))
            .map(|t| t.uid.to_string())
            .collect();
        let too_many =
            !base.is_empty() && removed.len() as f64 > self.max_removal_ratio * base.len() as f64;
        if !too_many || self.force {
            return (tokens, Vec::new(), None);
        }
        let confirmed = self
            .pending
            .as_ref()
            .is_some_and(|pending| pending.is_subset(&removed));
        if confirmed {
            return (tokens, Vec::new(), None);
        }
        tracing::warn!(
            stack = %self.stack,
            removing = removed.len(),
            of = base.len(),
            max_removal_ratio = self.max_removal_ratio,
            "holding back a mass removal until the next sync confirms it"
        );
        tokens.extend(
            base.tokens()
                .filter(|t| removed.contains(&*t.uid))
                .map(|t| Token::clone(t)),
        );
        let held: Vec<String> = removed.iter().cloned().collect();
        (tokens, held, Some(removed))
    }
}

/// A registry waiting to be written to the snapshot file.
#[derive(Clone)]
struct SnapshotJob {
    registry: Arc<Registry>,
    synced_at: SystemTime,
}
