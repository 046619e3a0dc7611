//! The registry changes: one every tick, in a fixed cycle of kinds (add,
//! remove, narrow, admin revoke, remove, lift, re-add, narrow), each on a
//! random token. A change is recorded in the [`History`] before it is made
//! and confirmed when the gateway's admin API has answered for it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::harness::AdminClient;
use crate::model::{uid, ChangeKind, History, Tok, Version};

const CYCLE: [ChangeKind; 8] = [
    ChangeKind::Add,
    ChangeKind::Remove,
    ChangeKind::Narrow,
    ChangeKind::Revoke,
    ChangeKind::Remove,
    ChangeKind::Lift,
    ChangeKind::ReAdd,
    ChangeKind::Narrow,
];

/// Where the gateway reads the token list from.
pub enum Source {
    Cma(crate::cma::FakeCma),
    File(PathBuf),
}

impl Source {
    fn publish(&self, version: &Version) {
        let list = version.list();
        match self {
            Source::Cma(cma) => cma.set_tokens(list),
            Source::File(path) => {
                // Renamed into place, so that the gateway's own polling never
                // reads half a file.
                let staged = path.with_extension("staged");
                let text = serde_json::json!({ "tokens": list }).to_string();
                std::fs::write(&staged, text).unwrap();
                std::fs::rename(&staged, path).unwrap();
            }
        }
    }
}

/// What the changes did.
#[derive(Default)]
pub struct ChangeStats {
    pub applied: [AtomicU64; 6],
    pub failures: AtomicU64,
    /// Admin call durations, microseconds.
    pub sync_total_us: AtomicU64,
    pub sync_max_us: AtomicU64,
    pub syncs: AtomicU64,
    pub admin_total_us: AtomicU64,
    pub admin_max_us: AtomicU64,
    pub admins: AtomicU64,
    pub first_failure: std::sync::Mutex<Option<String>>,
}

impl ChangeStats {
    pub fn total(&self) -> u64 {
        self.applied.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

pub struct Driver {
    pub history: Arc<History>,
    pub admin: AdminClient,
    pub source: Source,
    pub stats: Arc<ChangeStats>,
    /// The gateway's registry version for the history's latest version.
    pub gateway_version: u64,
    /// At most this many distinct tokens are ever listed (0: no limit); past
    /// it, an addition re-lists a removed token.
    pub universe: u32,
    pub rng: SmallRng,
}

impl Driver {
    pub fn new(
        history: Arc<History>,
        admin: AdminClient,
        source: Source,
        gateway_version: u64,
        universe: u32,
        seed: u64,
    ) -> Driver {
        Driver {
            history,
            admin,
            source,
            stats: Arc::new(ChangeStats::default()),
            gateway_version,
            universe,
            rng: SmallRng::seed_from_u64(seed ^ 0xc4a2_63e5),
        }
    }

    /// Makes one change every `every` until `stop`; on a failed change it
    /// cancels `stop` (the model no longer matches the gateway).
    pub async fn run(mut self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut step = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let kind = CYCLE[step % CYCLE.len()];
            step += 1;
            let next = self.plan(kind);
            let number = self.history.begin(next.clone());
            let started = Instant::now();
            match self.apply(&next).await {
                Ok(()) => {
                    self.history.confirm(number);
                    let us = started.elapsed().as_micros() as u64;
                    let (total, max, count) = if next.kind.is_sync() {
                        (
                            &self.stats.sync_total_us,
                            &self.stats.sync_max_us,
                            &self.stats.syncs,
                        )
                    } else {
                        (
                            &self.stats.admin_total_us,
                            &self.stats.admin_max_us,
                            &self.stats.admins,
                        )
                    };
                    total.fetch_add(us, Ordering::Relaxed);
                    max.fetch_max(us, Ordering::Relaxed);
                    count.fetch_add(1, Ordering::Relaxed);
                    let i = ChangeKind::ALL
                        .iter()
                        .position(|k| *k == next.kind)
                        .unwrap();
                    self.stats.applied[i].fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    eprintln!("CHANGE FAILED (v{number}, {}): {err}", next.kind.name());
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.stats.first_failure.lock().unwrap().get_or_insert(err);
                    stop.cancel();
                    return;
                }
            }
        }
    }

    /// The next version: a change of `kind`, or the nearest kind that is
    /// possible now (nothing to lift: revoke; nothing to re-add: add; no
    /// fresh token left in the universe: re-add).
    fn plan(&mut self, kind: ChangeKind) -> Version {
        let latest = self.history.latest();
        let mut next = Version::clone(&latest);
        let listed: Vec<u32> = latest.tokens.keys().copied().collect();
        let unrevoked: Vec<u32> = listed
            .iter()
            .copied()
            .filter(|n| !latest.revoked.contains(n))
            .collect();
        let revoked: Vec<u32> = latest.revoked.iter().copied().collect();
        let removed = self.history.read().removed();
        let full =
            self.universe > 0 && self.history.next_fresh.load(Ordering::SeqCst) >= self.universe;
        let rng = &mut self.rng;
        let kind = match kind {
            ChangeKind::Lift if revoked.is_empty() => ChangeKind::Revoke,
            ChangeKind::ReAdd if removed.is_empty() => ChangeKind::Add,
            ChangeKind::Add if full && !removed.is_empty() => ChangeKind::ReAdd,
            ChangeKind::Remove | ChangeKind::Narrow if listed.len() < 4 => ChangeKind::Add,
            ChangeKind::Revoke if unrevoked.is_empty() => ChangeKind::Add,
            other => other,
        };
        let target = match kind {
            ChangeKind::Add | ChangeKind::Initial => {
                let n = self.history.next_fresh.load(Ordering::SeqCst);
                next.tokens
                    .insert(n, Arc::new(Tok::new(n, rng.random_range(0..5))));
                n
            }
            ChangeKind::Remove => {
                let n = *listed.choose(rng).unwrap();
                next.tokens.remove(&n);
                n
            }
            ChangeKind::Narrow => {
                let n = *listed.choose(rng).unwrap();
                let narrowed = latest.tokens[&n].narrowings();
                let scope = narrowed.choose(rng).unwrap().clone();
                next.tokens.insert(n, Arc::new(scope));
                n
            }
            ChangeKind::Revoke => {
                let n = *unrevoked.choose(rng).unwrap();
                next.revoked.insert(n);
                n
            }
            ChangeKind::Lift => {
                let n = *revoked.choose(rng).unwrap();
                next.revoked.remove(&n);
                n
            }
            ChangeKind::ReAdd => {
                let n = *removed.choose(rng).unwrap();
                next.tokens.insert(n, Arc::new(Tok::original(n)));
                n
            }
        };
        next.kind = kind;
        next.target = Some(target);
        next
    }

    /// Makes the gateway take `next`: through the source and `POST
    /// /admin/sync`, or through the admin revoke API. Checks that its
    /// registry version moved by exactly one.
    async fn apply(&mut self, next: &Version) -> Result<(), String> {
        let Some(n) = next.target else {
            return Err("a change without a target".into());
        };
        let expected = self.gateway_version + 1;
        match next.kind {
            ChangeKind::Revoke | ChangeKind::Lift => {
                let method = if next.kind == ChangeKind::Revoke {
                    "POST"
                } else {
                    "DELETE"
                };
                let path = format!("/admin/tokens/{}/revoke", uid(n));
                let (status, body) = self.admin.call(method, &path).await?;
                let json: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|e| format!("{method} {path}: {status} {body:?}: {e}"))?;
                if status != 200 || json["revoked"] != (next.kind == ChangeKind::Revoke) {
                    return Err(format!("{method} {path}: {status} {body}"));
                }
            }
            _ => {
                self.source.publish(next);
                let (status, body) = self.admin.call("POST", "/admin/sync").await?;
                let json: serde_json::Value = serde_json::from_str(&body)
                    .map_err(|e| format!("sync: {status} {body:?}: {e}"))?;
                let report = &json["stacks"]["soak"];
                let held = report["held_back"].as_array().map_or(0, Vec::len);
                if status != 200 || !report["error"].is_null() || held > 0 {
                    return Err(format!("sync: {status} {body}"));
                }
                if report["version"].as_u64() != Some(expected) {
                    return Err(format!(
                        "sync ({} {}): gateway at version {}, the model expects {expected}: {body}",
                        next.kind.name(),
                        uid(n),
                        report["version"]
                    ));
                }
            }
        }
        self.gateway_version = expected;
        Ok(())
    }
}
