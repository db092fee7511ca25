//! Vector memory and ReasoningBank for swarm.
//!
//! A library with no knowledge of Raft, QUIC or HTTP: the coordinator puts
//! [`MemoryOp`]s into its replicated log and calls [`MemoryStore::apply`] on every
//! replica; reads (`search`, `retrieve`, `get`) are plain `&self` calls.
//!
//! # Model
//!
//! * A [`MemoryStore`] holds named **collections** (namespaces) plus one
//!   **ReasoningBank**. A collection's dimension, [`Metric`] (cosine, L2, dot) and HNSW
//!   parameters are fixed at creation ([`CollectionSpec`]). Points have a string id, a
//!   vector, a JSON-object metadata (stored as canonical JSON text, default limit
//!   16 KiB) and an optional TTL.
//! * Search ([`MemoryStore::search`]) is approximate k-NN over an HNSW graph, with an
//!   optional [`MetadataFilter`] (all-of equality / one-of / exists on top-level fields)
//!   evaluated *during* the graph traversal: non-matching nodes are walked through but
//!   never collected. If that yields fewer than `k` visible matches, an exact scan settles
//!   the answer, so a filtered search returns `min(k, #matching)` results.
//! * **hnsw_rs builds the graph; we search a flat copy of it.** Inserts go through
//!   `hnsw_rs::Hnsw::insert_slice` (its neighbour heuristic and seeded level RNG). Queries
//!   run on a compressed-sparse-row copy of its adjacency lists (`graph.rs`) with plain
//!   `(f32, u32)` heaps, a bitset for visited nodes, vectors read from the collection's
//!   contiguous arena, and the first lines of all of a node's unvisited neighbours'
//!   vectors prefetched before any distance is computed. Once the beam is full, L2
//!   distances are computed with a bound ([`kernel::l2_squared_bounded`]): a neighbour
//!   is dropped as soon as a partial sum exceeds the current worst result, which decides
//!   exactly as the full distance would but reads a fraction of most vectors — in high
//!   dimension the search is bound by memory traffic, not arithmetic. For the same
//!   reason, from [`BF16_TRAVERSAL_MIN_DIMENSION`] dimensions up the walk evaluates a
//!   node's new neighbours four at a time (interleaved loads, [`kernel`]'s batch
//!   kernels) on a bfloat16 copy of the vectors (half the bytes), and the beam's `ef`
//!   nodes are then ranked by their exact f32 distances — the distances returned are
//!   always exact. The copy also
//!   restores reverse links hnsw_rs dropped (see limitations), which fixes nodes the
//!   hnsw_rs graph leaves unreachable. [`MemoryStore::search_via_hnsw_rs`] keeps
//!   hnsw_rs' own `search` on the same graph for comparison (`memory_recall
//!   --compare-hnsw-rs`).
//! * **Writes do not build the graph.** An upsert appends its points to the collection and
//!   hands their vectors to the collection's indexer thread (`indexer.rs`), which inserts
//!   them serially in slot order and takes a flat copy of the graph at *copy points*
//!   (each time `clamp(slots/32, 128, 2048)` more slots are in). A copy is searched only
//!   from the op that names it, [`MemoryOp::AdvanceIndex`], which the leader proposes once
//!   its own indexer has it ([`MemoryStore::index_advances`]; a single process calls
//!   [`MemoryStore::settle_indexes`]). Every query scans the slots after the copy exactly,
//!   so new points are visible immediately; a replica whose indexer has not reached the
//!   named copy yet (just restarted, or slower) scans everything exactly.
//! * The ReasoningBank stores [`MemoryItem`]s (title, description, content, outcome,
//!   confidence, use/success/failure counts, created/last-used times, contradictions),
//!   indexed by embedding in an internal cosine collection named [`PATTERN_COLLECTION`]
//!   (its dimension is [`StoreConfig::pattern_dimension`]). [`MemoryStore::retrieve`]
//!   scores HNSW candidates by `w_sim·similarity + w_rec·0.5^(age/half_life) +
//!   w_conf·confidence` and diversifies them with MMR; it never mutates.
//!   [`MemoryOp::PatternJudge`] updates counts, last-used time and confidence (the Beta
//!   posterior mean `(α+s)/(α+β+s+f)`); [`MemoryOp::Consolidate`] merges near-duplicates,
//!   flags contradictions and prunes stale items.
//! * [`distill`] turns finished tasks into items (agent-supplied `memory_items`, rules,
//!   or an LLM); [`embed`] provides the [`Embedder`] trait, a deterministic offline
//!   [`HashEmbedder`] and an OpenAI-compatible [`HttpEmbedder`]. Neither touches the store.
//!
//! # Determinism contract
//!
//! Same ops in the same order ⇒ same state on every replica: same items, metadata,
//! counters, ids, and byte-identical [`MemoryStore::snapshot_bytes`]. This holds because:
//!
//! * every op carries its `now_ms`; TTL expiry, `created_ms`/`last_used_ms` and pruning
//!   ages use it, never a clock (reads take `now_ms` from the caller too);
//! * all state lives in ordered containers (`BTreeMap`/`BTreeSet`/`Vec`); nothing
//!   iterates a `HashMap`; pattern ids come from a replicated sequence (`pat-000000000001`);
//! * `apply` validates the whole op before changing anything, so an op either applies
//!   fully or fails identically everywhere;
//! * the [`StoreConfig`] (limits, rebuild thresholds, priors) is part of the state and of
//!   every snapshot;
//! * **the HNSW graphs are derived but reproducible**: hnsw_rs draws node levels from an
//!   RNG *seeded with a constant* (397) in every new `Hnsw`, we only ever insert serially,
//!   and our distance kernels ([`kernel`]) use a fixed 32-lane summation order of fused
//!   multiply-adds, so the explicit AVX2 code selected at run time and the portable
//!   scalar code return the same bits on every platform (and neither the early exit of
//!   the bounded L2 kernel nor batching ever changes a decision, see above; the bfloat16
//!   copy is rounded the same way everywhere). Hence the graph is a pure function of
//!   the sequence of inserted slots, and so is the copy taken at a given slot count.
//!   Which copy is searched is replicated state (moved by [`MemoryOp::AdvanceIndex`]).
//!   Snapshots keep every slot of the current graph generation, tombstones included,
//!   plus the slots the copy in use covers; a restored replica's indexer re-inserts the
//!   slots in order and takes the copy at that same point, so once it has, the replica
//!   has exactly the same graph *and* copy as one that never restarted, and returns the
//!   same approximate results. Until then it answers exactly: reads on a replica whose
//!   indexer is behind may differ from the leader's (by being exact), never writes.
//!   Consolidation, which is a write, draws its candidate pairs from a search, so it
//!   waits for its replica's indexer to reach the named copy.
//!
//! Ops and snapshots go through the workspace codec (`swarm-codec`, postcard), so they
//! use no `serde_json::Value`, `untagged`, `flatten` or `skip_serializing_if`; see
//! [`encode_value`] / [`decode_value`].
//!
//! # Deletes, tombstones and rebuilds
//!
//! hnsw_rs has no delete. Deleting or replacing a point (an upsert of an existing id with
//! a different vector; same-vector upserts update metadata in place) tombstones its slot:
//! the node stays in the graph as a waypoint but is never returned (visibility — live,
//! not expired at the query's `now_ms`, matching the filter — is checked inside the
//! traversal). When a collection has at least
//! `rebuild_min_tombstones` (default 256) tombstones and more than
//! `rebuild_tombstone_ratio` (default 0.25) × its live count, the write that crossed the
//! threshold begins a rebuild of the graph from the live points, in slot order: at once
//! for at most [`INLINE_REBUILD_MAX_POINTS`] of them, else on a thread of its own while
//! writes and searches go on against the current graph, until
//! [`MemoryOp::FinishRebuild`] swaps the new graph in (the caller proposes it once
//! [`MemoryStore::ready_rebuilds`] lists the build; every replica swaps at that op, so
//! the graphs stay identical). [`MemoryOp::RebuildIndex`] forces one.
//! Expired points are swept (tombstoned) by any write to their collection and by
//! [`MemoryOp::ExpireSweep`]; until then reads hide them by `now_ms`.
//!
//! # hnsw_rs limitations met
//!
//! * No delete API: tombstones + rebuild, above.
//! * `Hnsw::new` calls `process::exit` if M > 256 — M is validated to 2..=128.
//! * Its `DistDot`/`DistCosine` kernels `assert!` on inputs that are not unit-norm (they
//!   would panic on user data), and every distance must be ≥ 0 (asserted in the search):
//!   we use our own kernels — cosine is `1 − dot` on vectors normalised at insert, L2 is
//!   squared L2, and dot (MIPS) ranks by a strictly increasing positive map of `−dot`,
//!   which builds the same graph as ranking by `−dot` since HNSW only compares distances.
//!   Vectors with NaN/∞ components or norm² > 1e36 are rejected so no distance is NaN.
//! * `parallel_insert` races can leave points unreachable and graphs then depend on
//!   thread timing: we insert serially only (deterministic, one indexer thread per
//!   collection), at the price of build throughput (one core per collection). Graph connectivity is not guaranteed even so; the exact
//!   fallback above covers short answers.
//! * hnsw_rs' search keeps its candidate heaps as `Arc`-allocated nodes and its visited
//!   set in a hash map, so per-node overhead, not distance arithmetic, bounds its
//!   queries/s; its `search_filter` descends the upper layers one greedy hop per layer,
//!   and with a filter it never stops early while fewer than `ef` matches are held. Hence
//!   the flat copy above. Its *insert* path has the same overheads (ef_construction
//!   searches), which bounds build speed; there is no public way to read one node's
//!   neighbour list without iterating the layer, which is why the copy is refreshed in
//!   bulk rather than per insert.
//! * When a new link overflows a node's list, hnsw_rs keeps the closest entries (no
//!   neighbour heuristic on reverse updates), which drops long links. In high dimension
//!   "hub" nodes end up as the *only* neighbour the heuristic keeps for dozens of nodes,
//!   and their own lists no longer link back: at 30k × 784 (M = 16, clustered data) 269
//!   nodes were unreachable from the entry point and recall@10 plateaued at 0.88 even at
//!   ef = 256 (hnsw_rs' own search: 0.81). The flat copy re-adds each missing reverse
//!   link (up to 8·M links per node): all nodes reachable, recall 0.98
//!   ([`MemoryStore::graph_stats`] reports reachability). `set_keeping_pruned(true)`
//!   made it worse (hub in-degree 3793, 5127 unreachable), so it stays off.
//! * Our filtered search shares the last property: while fewer than `ef` visible nodes
//!   are held the beam keeps expanding, so a very selective filter walks the whole
//!   reachable graph (correct, O(n)).
//! * Dropping an `Hnsw` (drop or rebuild of a collection) clears neighbour lists on the
//!   global rayon pool (spawning it on first use); with info-level logging enabled for
//!   `hnsw_rs` it also evaluates `SystemTime::elapsed().unwrap()`, which would panic if
//!   the wall clock stepped backwards during the drop — keep `hnsw_rs` logging at `warn`.
//! * The crate feature `anndists-simd` (for comparison benchmarks only) makes L2 graphs use
//!   anndists' simdeez kernel instead of ours; its results depend on the CPU's features.

#![warn(missing_docs)]

pub mod collection;
pub mod distill;
pub mod embed;
pub mod error;
mod graph;
mod indexer;
pub mod kernel;
pub mod metadata;
pub mod reasoning;
pub mod store;
pub mod synthetic;

pub use collection::{
    CollectionInfo, CollectionSpec, GraphStats, Metric, PointWrite, SearchHit, SearchRequest,
    StoredPoint, BF16_TRAVERSAL_MIN_DIMENSION, INLINE_REBUILD_MAX_POINTS,
};
pub use distill::{
    classify_error, embed_items, AgentItemsDistiller, AgentMemoryItem, DistilledItem, Distiller,
    LlmDistiller, LlmDistillerConfig, RuleDistiller, TaskSummary,
};
pub use embed::{BoxFuture, Embedder, HashEmbedder, HttpEmbedder, HttpEmbedderConfig};
pub use error::MemoryError;
pub use graph::{search_totals, SearchTotals};
pub use metadata::{Condition, MetadataFilter, Scalar};
pub use reasoning::{
    beta_confidence, ConsolidateParams, ConsolidationReport, MemoryItem, MergeRecord, NewPattern,
    Outcome, RetrieveParams, RetrievedItem, PATTERN_COLLECTION,
};
pub use store::{
    decode_value, encode_value, validate_collection_name, DistillEntry, MemoryOp, MemoryStore,
    OpOutcome, StoreConfig, StoreSnapshot, DISTILL_OUTBOX_LIMIT, SNAPSHOT_FORMAT_VERSION,
};
