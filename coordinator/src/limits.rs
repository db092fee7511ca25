//! Byte limits that must agree with each other, in one place.
//!
//! A Raft entry is packed by the proposer up to [`ENTRY_BUDGET`]; every single op must
//! fit in one entry, so the API refuses an op larger than [`MAX_OP_BYTES`] (a submit's
//! payload, a task's output, a memory write, a restore chunk) with `413` before it is
//! proposed. Stored entries are decoded with [`ENTRY_DECODE_LIMIT`], and one entry
//! always fits in a Raft frame ([`RAFT_MAX_FRAME`]), so an AppendEntries that is too
//! large is retried by openraft with fewer entries and always makes progress. Snapshots
//! travel in chunks of [`SNAPSHOT_CHUNK`] bytes, each one frame.

/// Most bytes of ops packed into one Raft entry.
pub const ENTRY_BUDGET: usize = 8 << 20;

/// Room for what an op carries besides its payload-like fields (ids, labels, names) and
/// for the entry's own framing.
pub const ENTRY_OVERHEAD: usize = 64 << 10;

/// The largest single op: an op alone in an entry still fits the budget.
pub const MAX_OP_BYTES: usize = ENTRY_BUDGET - ENTRY_OVERHEAD;

/// Largest encoded log entry accepted when reading the log back (an entry at the budget
/// plus the overhead of one oversized op the estimate missed).
pub const ENTRY_DECODE_LIMIT: usize = ENTRY_BUDGET + 2 * ENTRY_OVERHEAD;

/// Largest Raft RPC frame, either way.
pub const RAFT_MAX_FRAME: usize = 48 << 20;

/// Snapshot bytes per InstallSnapshot RPC.
pub const SNAPSHOT_CHUNK: usize = 4 << 20;

/// Largest small record (vote, log ids, membership, checkpoint metadata) read back from
/// disk.
pub const RECORD_DECODE_LIMIT: usize = 1 << 20;

/// Largest access record (tokens, revoked certificates, enrolled names) read back from a
/// checkpoint. At its limits (10,000 tokens, 100,000 revocations, 200,000 enrolled names,
/// names and subjects at their longest) it takes about 140 MiB; it must also fit one dump
/// record ([`crate::raft::dump::MAX_RECORD`]).
pub const ACCESS_DECODE_LIMIT: usize = 256 << 20;

/// Largest schedules record read back from a checkpoint: their templates are at most
/// [`crate::state::schedules::MAX_TOTAL_TEMPLATE_BYTES`] (16 MiB) in all, plus at most
/// 10,000 names, cadences and counters.
pub const SCHEDULES_DECODE_LIMIT: usize = 64 << 20;

const _: () = assert!(ENTRY_DECODE_LIMIT + ENTRY_OVERHEAD < RAFT_MAX_FRAME);
const _: () = assert!(SNAPSHOT_CHUNK + ENTRY_OVERHEAD < RAFT_MAX_FRAME);
