//! Any bytes as a CMA token list (`GET /v3/stacks/delivery_tokens` or a
//! `tokens_file`): parsing may refuse, never panic, and an accepted list
//! builds a registry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stackgate::registry::parse::parse_token_list;
use stackgate::registry::diff::next;
use stackgate::registry::Registry;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = parse_token_list(data) {
        let count = page.tokens.len();
        if let Some((registry, _diff)) = next(&Registry::default(), page.tokens, 0) {
            assert!(registry.len() <= count);
        }
    }
});
