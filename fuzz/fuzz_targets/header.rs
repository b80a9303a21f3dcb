//! Fuzz target `header`: the body is `fvd_core::sim::fuzz::header`, which
//! `crates/fvd-core/tests/fuzz_corpus.rs` also runs on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fvd_core::sim::fuzz::header(data);
});
