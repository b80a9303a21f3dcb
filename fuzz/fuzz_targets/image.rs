//! Fuzz target `image`: the input is a whole image file in a MemStorage,
//! opened, exercised and closed by `fvd_sim::fuzz::image`, which
//! `crates/fvd-sim/tests/fuzz_corpus.rs` also runs on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fvd_sim::fuzz::image(data);
});
