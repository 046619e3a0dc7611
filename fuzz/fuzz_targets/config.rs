//! Any bytes as a config file: parsing and validation may refuse, never
//! panic. Every environment variable the file names reads as "x".

#![no_main]

use libfuzzer_sys::fuzz_target;
use stackgate::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, &|_| Some("x".into()));
    }
});
