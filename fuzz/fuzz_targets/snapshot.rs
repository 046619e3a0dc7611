//! Any bytes as a registry snapshot file: parsing may refuse, never panic
//! (an absurd `synced_at` or `version` used to), and an accepted snapshot
//! is a registry within the bounds the parser promises.

#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use stackgate::registry::snapshot::{parse, MAX_CLOCK_SKEW, MAX_VERSION};

fuzz_target!(|data: &[u8]| {
    // A fixed "now", so that a crash replays the same way.
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(loaded) = parse(data, "website", now) {
        assert!(loaded.registry.version() <= MAX_VERSION);
        assert!(loaded.synced_at <= now + MAX_CLOCK_SKEW);
        // What the gateway then computes from it must not overflow either.
        let _age = SystemTime::now().duration_since(loaded.synced_at);
        let _next = loaded.registry.version().saturating_add(1);
        for token in loaded.registry.tokens() {
            assert!(loaded.registry.get(&token.uid).is_some());
        }
    }
});
