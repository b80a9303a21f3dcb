//! Fuzz target `bitmap`: the body is `fvd_sim::fuzz::bitmap`, which
//! `crates/fvd-sim/tests/fuzz_corpus.rs` also runs on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fvd_sim::fuzz::bitmap(data);
});
