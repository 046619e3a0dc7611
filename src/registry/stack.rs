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
    source: tokio::sync::Mutex<SourceState>,
    snapshot_jobs: tokio::sync::watch::Sender<Option<SnapshotJob>>,
    /// The registry version the snapshot file holds.
    snapshot_written: tokio::sync::watch::Sender<u64>,
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
            snapshot_jobs: tokio::sync::watch::Sender::new(None),
            snapshot_written: tokio::sync::watch::Sender::new(0),
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
        self.snapshot_written
            .send_replace(loaded.registry.version());
        self.install(Arc::new(loaded.registry), Instant::now(), loaded.synced_at);
        let mut status = self.lock_status();
        status.last_success = Some(loaded.synced_at);
        status.snapshot_written = Some(loaded.synced_at);
        Ok(Some(count))
    }

    /// Fetches the source and applies what changed. `force` applies removals
    /// that the mass-removal guard would hold back.
    pub async fn sync(&self, force: bool) -> (SyncReport, Option<Change>) {
        let mut state = self.source.lock().await;
        let refresh = force || state.pending_removal.is_some();
        let fetched = state.source.fetch(refresh).await;
        let now = Instant::now();
        let wall = SystemTime::now();
        let tokens = match fetched {
            Err(err) => {
                let mut status = self.lock_status();
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                status.last_error = Some(err.clone());
                status.last_error_at = Some(wall);
                let version = self.view().map_or(0, |v| v.registry.version());
                let report = SyncReport {
                    version,
                    held_back: status.held_back.clone(),
                    error: Some(err.to_string()),
                    ..SyncReport::default()
                };
                return (report, None);
            }
            Ok(Fetched::Unchanged) => None,
            Ok(Fetched::Tokens(tokens)) => Some(tokens),
        };

        let previous = self.view().map(|v| Arc::clone(&v.registry));
        let base = previous.clone().unwrap_or_default();
        let (tokens, held_back) = match tokens {
            Some(tokens) => self.guard_removals(&mut state, &base, tokens, force),
            None => (None, Vec::new()),
        };
        let next = tokens.and_then(|tokens| next(&base, tokens, unix_secs(wall)));
        let (registry, change) = match next {
            Some((registry, diff)) => {
                let registry = Arc::new(registry);
                let change = Change {
                    diff,
                    registry: Arc::clone(&registry),
                    learned_at: now,
                };
                (registry, Some(change))
            }
            None => (base, None),
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
            if change.is_some() || previous.is_none() || refresh_due {
                // Queued under the source lock, so snapshots follow versions.
                self.queue_snapshot(&registry, wall);
            }
        }
        drop(state);
        let report = SyncReport {
            diff: change.as_ref().map(|c| c.diff.clone()).unwrap_or_default(),
            held_back,
            version: registry.version(),
            error: None,
        };
        (report, change)
    }

    /// Keeps the tokens a too-large removal would drop, unless the previous
    /// sync already held the same removal back (confirmation) or `force`.
    fn guard_removals(
        &self,
        state: &mut SourceState,
        base: &Registry,
        mut tokens: Vec<Token>,
        force: bool,
    ) -> (Option<Vec<Token>>, Vec<String>) {
        let listed: std::collections::HashSet<&str> = tokens.iter().map(|t| &*t.uid).collect();
        let removed: BTreeSet<String> = base
            .tokens()
            .filter(|t| !listed.contains(&*t.uid))
            .map(|t| t.uid.to_string())
            .collect();
        let too_many = !base.is_empty()
            && removed.len() as f64 > self.settings.max_removal_ratio * base.len() as f64;
        if !too_many || force {
            state.pending_removal = None;
            return (Some(tokens), Vec::new());
        }
        let confirmed = state
            .pending_removal
            .as_ref()
            .is_some_and(|pending| pending.is_subset(&removed));
        if confirmed {
            state.pending_removal = None;
            return (Some(tokens), Vec::new());
        }
        tracing::warn!(
            stack = %self.name,
            removing = removed.len(),
            of = base.len(),
            max_removal_ratio = self.settings.max_removal_ratio,
            "holding back a mass removal until the next sync confirms it"
        );
        tokens.extend(
            base.tokens()
                .filter(|t| removed.contains(&*t.uid))
                .map(|t| Token::clone(t)),
        );
        let held: Vec<String> = removed.iter().cloned().collect();
        state.pending_removal = Some(removed);
        (Some(tokens), held)
    }

    /// Sets or lifts an admin revocation of `uid`. `Ok(None)` if it was
    /// already so; `Err` if the stack does not list the uid (and, to lift,
    /// has not revoked it).
    pub async fn set_admin_revocation(
        &self,
        uid: &str,
        revoked: bool,
    ) -> Result<Option<Change>, ()> {
        let state = self.source.lock().await;
        let Some(view) = self.view() else {
            return Err(());
        };
        let known = view.registry.get(uid).is_some() || view.registry.is_admin_revoked(uid);
        if !known {
            return Err(());
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
        drop(state);
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
            self.snapshot_jobs.send_replace(Some(SnapshotJob {
                registry: Arc::clone(registry),
                synced_at,
            }));
        }
    }

    /// Waits until the snapshot holds `version` or later; false after `timeout`
    /// (or when the stack has no snapshot file).
    pub async fn wait_snapshot(&self, version: u64, timeout: Duration) -> bool {
        if self.settings.snapshot.is_none() {
            return false;
        }
        let mut written = self.snapshot_written.subscribe();
        tokio::time::timeout(timeout, written.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Writes queued snapshots one at a time, in the order they were queued,
    /// until shutdown; then writes the last one still pending.
    pub async fn snapshot_writer(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
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
                self.write_snapshot(&path, job).await;
            }
            if stopping {
                return;
            }
        }
    }

    async fn write_snapshot(&self, path: &std::path::Path, job: SnapshotJob) {
        let SnapshotJob {
            registry,
            synced_at,
        } = job;
        let version = registry.version();
        let (path, name) = (path.to_owned(), Arc::clone(&self.name));
        let result = tokio::task::spawn_blocking(move || {
            snapshot::write(&path, &name, &registry, synced_at)
        })
        .await;
        let mut status = self.lock_status();
        match result {
            Ok(Ok(())) => {
                status.snapshot_written = Some(synced_at);
                status.snapshot_error = None;
                drop(status);
                self.snapshot_written.send_replace(version);
            }
            Ok(Err(err)) => {
                tracing::error!(stack = %self.name, error = %err, "snapshot not written");
                status.snapshot_error = Some(err.to_string());
            }
            Err(err) => {
                tracing::error!(stack = %self.name, error = %err, "snapshot task failed");
                status.snapshot_error = Some(err.to_string());
            }
        }
    }
}

/// A registry waiting to be written to the snapshot file.
#[derive(Clone)]
struct SnapshotJob {
    registry: Arc<Registry>,
    synced_at: SystemTime,
}
