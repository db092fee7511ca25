//! Test support for the property tests that feed decoders hostile input (never a
//! dependency of anything but tests):
//!
//! * [`bytes`]: edits of a binary encoding (flipped bits, inserted and deleted bytes,
//!   truncation, lying varint and fixed-width lengths) as proptest strategies;
//! * [`text`]: edits of a text (JSON, TOML) with the characters parsers trip on;
//! * [`alloc`]: a global allocator that records the largest single allocation, to prove a
//!   decoder never trusts a length it read;
//! * [`config`]: the proptest settings every such test runs with.

pub mod alloc;
pub mod bytes;
pub mod text;

use proptest::test_runner::Config;

/// `cases` cases, generous shrinking, and nothing written into the source tree: a
/// failure prints its minimal input.
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..Config::default()
    }
}
