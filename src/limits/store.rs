//! Governor state stores that can look at a bucket without taking from it
//! (governor has no "peek"): one for a stack's origin bucket, one for the
//! capped map of its clients' failed-authentication buckets.

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;

/// Whether a check takes a cell or only looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Probe {
    Take,
    Peek,
}

/// One bucket's GCRA state: the theoretical arrival time in nanoseconds
/// since its limiter started, 0 for a bucket never used.
#[derive(Debug, Default)]
struct Tat(AtomicU64);

impl Tat {
    /// Governor's compare-and-swap loop, but a [`Probe::Peek`] stores nothing.
    fn measure<T, F, E>(&self, probe: Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            if probe == Probe::Peek {
                return Ok(result);
            }
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

/// A direct limiter's state that can be looked at without taking.
#[derive(Debug, Default)]
pub struct PeekState(Tat);

impl StateStore for PeekState {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, key: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure(*key, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpProbe {
    pub ip: IpAddr,
    pub probe: Probe,
}

/// The failed-authentication buckets of a stack's clients, at most `cap`.
/// Looking never inserts; a client that would go over the cap is
/// measured against a fresh bucket that is not kept.
#[derive(Debug)]
pub struct IpStore {
    map: DashMap<IpAddr, Tat>,
    cap: usize,
    warned: AtomicBool,
}

impl IpStore {
    /// An empty store that tracks at most `cap` clients.
    pub fn new(cap: usize) -> Self {
        IpStore {
            map: DashMap::new(),
            cap,
            warned: AtomicBool::new(false),
        }
    }
}

impl StateStore for IpStore {
    type Key = IpProbe;

    fn measure_and_replace<T, F, E>(&self, key: &IpProbe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(tat) = self.map.get(&key.ip) {
            return tat.measure(key.probe, f);
        }
        if key.probe == Probe::Peek {
            return Tat::default().measure(Probe::Peek, f);
        }
        if self.map.len() >= self.cap {
            // Once between prunes: a flood of addresses must not flood the logs.
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    cap = self.cap,
                    "too many client IPs with failed authentications; new ones are not tracked"
                );
            }
            return Tat::default().measure(Probe::Peek, f);
        }
        let tat = self.map.entry(key.ip).or_default();
        tat.measure(Probe::Take, f)
    }
}

impl ShrinkableKeyedStateStore<IpProbe> for IpStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.map
            .retain(|_, tat| tat.0.load(Ordering::Relaxed) > drop_below);
        self.warned.store(false, Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
