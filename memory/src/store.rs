//! The replicated store: collections + the ReasoningBank, write ops, apply, snapshots.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::collection::{
    prepare_vector, validate_id, Collection, CollectionInfo, CollectionRecord, CollectionSpec,
    GraphStats, PointWrite, PreparedPoint, RebuildRecord, SearchHit, SearchRequest, StoredPoint,
};
use crate::error::{MemoryError, Result};
use crate::reasoning::{
    pattern_spec, BankRecord, ConsolidateParams, ConsolidationReport, MemoryItem, NewPattern,
    Outcome, PreparedPattern, ReasoningBank, RetrieveParams, RetrievedItem,
};

/// Limits and tunables of a store.
///
/// The config is part of the replicated state: it is chosen when the store is created,
/// travels inside every snapshot, and a restored store uses the snapshot's config. All
/// replicas must be created with the same config, since validation and rebuild
/// thresholds depend on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Largest collection dimension.
    pub max_dimension: usize,
    /// Largest metadata JSON text, in bytes (default 16 KiB).
    pub max_metadata_bytes: usize,
    /// Longest point id, in bytes.
    pub max_id_bytes: usize,
    /// Largest k for search and retrieve.
    pub max_k: usize,
    /// Largest ef for search.
    pub max_ef: usize,
    /// Most points / ids / patterns in one op.
    pub max_batch: usize,
    /// Most collections.
    pub max_collections: usize,
    /// Rebuild a collection's graph once it has at least this many tombstones...
    pub rebuild_min_tombstones: usize,
    /// ...and more than this fraction of its live count.
    pub rebuild_tombstone_ratio: f64,
    /// Dimension of ReasoningBank embeddings (must match the embedder).
    pub pattern_dimension: usize,
    /// HNSW M of the pattern index.
    pub pattern_m: usize,
    /// HNSW ef_construction of the pattern index.
    pub pattern_ef_construction: usize,
    /// Default ef of pattern retrieval.
    pub pattern_ef_search: usize,
    /// Longest pattern title in bytes (descriptions may be 4× this).
    pub max_pattern_title_bytes: usize,
    /// Longest pattern content in bytes.
    pub max_pattern_content_bytes: usize,
    /// Most ReasoningBank patterns held. An add that goes beyond it evicts the least
    /// valuable tenth (longest unused, then least confident, then oldest id), so
    /// distilling every finished task keeps the bank bounded.
    pub max_patterns: usize,
    /// Beta prior α of pattern confidence.
    pub prior_alpha: f64,
    /// Beta prior β of pattern confidence.
    pub prior_beta: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_dimension: 4096,
            max_metadata_bytes: 16 * 1024,
            max_id_bytes: 256,
            max_k: 1000,
            max_ef: 10_000,
            max_batch: 10_000,
            max_collections: 1024,
            rebuild_min_tombstones: 256,
            rebuild_tombstone_ratio: 0.25,
            pattern_dimension: crate::embed::DEFAULT_HASH_DIMENSION,
            pattern_m: 16,
            pattern_ef_construction: 200,
            pattern_ef_search: 64,
            max_pattern_title_bytes: 256,
            max_pattern_content_bytes: 16 * 1024,
            max_patterns: 100_000,
            prior_alpha: 1.0,
            prior_beta: 1.0,
        }
    }
}

impl StoreConfig {
    /// Checks that every limit is usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(MemoryError::InvalidParams(format!("store config: {m}")));
        if self.max_dimension == 0 || self.max_k == 0 || self.max_ef == 0 || self.max_batch == 0 {
            return bad("max_dimension, max_k, max_ef and max_batch must be positive");
        }
        if self.max_k > 1_000_000 || self.max_ef > 1_000_000 || self.max_dimension > 65_536 {
            return bad("max_k and max_ef must be <= 1e6, max_dimension <= 65536");
        }
        if self.max_metadata_bytes < 2 || self.max_id_bytes == 0 || self.max_collections == 0 {
            return bad("max_metadata_bytes >= 2, max_id_bytes and max_collections > 0");
        }
        if !self.rebuild_tombstone_ratio.is_finite() || self.rebuild_tombstone_ratio < 0.0 {
            return bad("rebuild_tombstone_ratio must be finite and >= 0");
        }
        if !(self.prior_alpha.is_finite()
            && self.prior_alpha > 0.0
            && self.prior_beta.is_finite()
            && self.prior_beta > 0.0)
        {
            return bad("prior_alpha and prior_beta must be finite and > 0");
        }
        if self.max_patterns < 10 {
            return bad("max_patterns must be at least 10");
        }
        if self.max_pattern_title_bytes == 0 || self.max_pattern_content_bytes == 0 {
            return bad("pattern size limits must be positive");
        }
        pattern_spec(self).validate(self)
    }
}

/// A write operation. The coordinator puts these in Raft log entries; every replica
/// applies them in log order with [`MemoryStore::apply`]. Each op carries the time it
/// applies at (`now_ms`, chosen once by the proposer), never read from a clock during
/// apply. Bincode-safe (no `deserialize_any`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MemoryOp {
    /// Create a collection.
    CreateCollection {
        /// Name: 1–64 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
        name: String,
        /// Dimension, metric, index parameters.
        spec: CollectionSpec,
        /// Apply time.
        now_ms: u64,
    },
    /// Drop a collection and everything in it.
    DropCollection {
        /// Collection name.
        name: String,
        /// Apply time.
        now_ms: u64,
    },
    /// Insert or replace points (all or nothing).
    Upsert {
        /// Collection name.
        collection: String,
        /// Points; ids must be distinct within the op.
        points: Vec<PointWrite>,
        /// Apply time; TTLs count from here, expired points are swept first.
        now_ms: u64,
    },
    /// Delete points by id (missing ids are reported, not an error).
    Delete {
        /// Collection name.
        collection: String,
        /// Ids to delete.
        ids: Vec<String>,
        /// Apply time.
        now_ms: u64,
    },
    /// Tombstone every point whose TTL has passed, in every collection.
    ExpireSweep {
        /// Apply time.
        now_ms: u64,
    },
    /// Rebuild a collection's graph now, dropping its tombstones.
    RebuildIndex {
        /// Collection name.
        collection: String,
        /// Apply time.
        now_ms: u64,
    },
    /// Add ReasoningBank patterns; ids are assigned from the bank's sequence.
    PatternAdd {
        /// Patterns with embeddings.
        items: Vec<NewPattern>,
        /// Apply time (becomes `created_ms`).
        now_ms: u64,
    },
    /// Record a task's outcome against the patterns it used.
    PatternJudge {
        /// The judged task, for the record.
        task_id: Option<u64>,
        /// Pattern ids the task used (duplicates count once; unknown ids are reported).
        item_ids: Vec<String>,
        /// The task's outcome.
        outcome: Outcome,
        /// Apply time (becomes `last_used_ms`).
        now_ms: u64,
    },
    /// Delete patterns by id.
    PatternDelete {
        /// Pattern ids.
        ids: Vec<String>,
        /// Apply time.
        now_ms: u64,
    },
    /// Merge near-duplicates, flag contradictions, prune stale patterns.
    Consolidate {
        /// Thresholds.
        params: ConsolidateParams,
        /// Apply time (pruning ages are measured against it).
        now_ms: u64,
    },
    /// Swap in the graph a background rebuild built (proposed by the leader once its
    /// build has finished; see [`MemoryStore::ready_rebuilds`]). A no-op if that rebuild
    /// is no longer under way.
    FinishRebuild {
        /// The collection; `None` for the ReasoningBank's pattern index.
        collection: Option<String>,
        /// The collection's generation when the rebuild began.
        generation: u64,
        /// Apply time.
        now_ms: u64,
    },
    /// Searches of a collection use its graph copy at `slots` from now on (proposed by
    /// the leader once its own indexer has taken that copy; see
    /// [`MemoryStore::index_advances`]). A no-op unless `slots` is a copy point after the
    /// copy in use, in the same generation.
    AdvanceIndex {
        /// The collection; `None` for the ReasoningBank's pattern index.
        collection: Option<String>,
        /// The collection's generation the copy belongs to.
        generation: u64,
        /// Slots the copy covers.
        slots: u64,
        /// Apply time.
        now_ms: u64,
    },
    /// Put a committed result in the distillation outbox (proposed with the result, and
    /// applied only if the result was recorded): the leader distils it later, and a leader
    /// change or a crash before then leaves it in the outbox for the next leader. Refused
    /// (not queued) while the outbox holds [`DISTILL_OUTBOX_LIMIT`] results.
    DistillQueue {
        /// The task whose result it is.
        task_id: u64,
        /// The attempt that produced it.
        attempt: u32,
        /// Apply time.
        now_ms: u64,
    },
    /// The leader distilled the result of `task_id`: take it out of the outbox and add
    /// what it taught. A no-op if the outbox no longer holds it (another leader already
    /// did), so each queued result adds its patterns once. Items that do not validate
    /// are dropped with the entry (an outcome says why), so a bad item cannot keep a
    /// result in the outbox for ever.
    DistillDone {
        /// The task whose result it was.
        task_id: u64,
        /// Patterns distilled from it (possibly none), with embeddings.
        items: Vec<NewPattern>,
        /// Apply time (becomes the patterns' `created_ms`).
        now_ms: u64,
    },
}

/// Results the distillation outbox holds at most; more are not queued (counted as
/// refused), so a distiller that is down cannot grow the replicated state without bound.
pub const DISTILL_OUTBOX_LIMIT: usize = 100_000;

/// A result waiting in the distillation outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistillEntry {
    /// The attempt that produced it.
    pub attempt: u32,
    /// When it was queued.
    pub queued_ms: u64,
}

impl MemoryOp {
    /// The time the op applies at.
    pub fn now_ms(&self) -> u64 {
        match self {
            MemoryOp::CreateCollection { now_ms, .. }
            | MemoryOp::DropCollection { now_ms, .. }
            | MemoryOp::Upsert { now_ms, .. }
            | MemoryOp::Delete { now_ms, .. }
            | MemoryOp::ExpireSweep { now_ms }
            | MemoryOp::RebuildIndex { now_ms, .. }
            | MemoryOp::PatternAdd { now_ms, .. }
            | MemoryOp::PatternJudge { now_ms, .. }
            | MemoryOp::PatternDelete { now_ms, .. }
            | MemoryOp::Consolidate { now_ms, .. }
            | MemoryOp::FinishRebuild { now_ms, .. }
            | MemoryOp::AdvanceIndex { now_ms, .. }
            | MemoryOp::DistillQueue { now_ms, .. }
            | MemoryOp::DistillDone { now_ms, .. } => *now_ms,
        }
    }

    /// Stable snake_case name of the op kind (for logs and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            MemoryOp::CreateCollection { .. } => "create_collection",
            MemoryOp::DropCollection { .. } => "drop_collection",
            MemoryOp::Upsert { .. } => "upsert",
            MemoryOp::Delete { .. } => "delete",
            MemoryOp::ExpireSweep { .. } => "expire_sweep",
            MemoryOp::RebuildIndex { .. } => "rebuild_index",
            MemoryOp::PatternAdd { .. } => "pattern_add",
            MemoryOp::PatternJudge { .. } => "pattern_judge",
            MemoryOp::PatternDelete { .. } => "pattern_delete",
            MemoryOp::Consolidate { .. } => "consolidate",
            MemoryOp::FinishRebuild { .. } => "finish_rebuild",
            MemoryOp::AdvanceIndex { .. } => "advance_index",
            MemoryOp::DistillQueue { .. } => "distill_queue",
            MemoryOp::DistillDone { .. } => "distill_done",
        }
    }
}

/// What a successfully applied op did. Bincode-safe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpOutcome {
    /// The collection was created.
    CollectionCreated {
        /// Its name.
        name: String,
    },
    /// The collection was dropped.
    CollectionDropped {
        /// Its name.
        name: String,
        /// Live points it held.
        points: u64,
    },
    /// Points were written.
    Upserted {
        /// New ids.
        inserted: u32,
        /// Existing ids replaced.
        replaced: u32,
        /// Expired points swept before writing.
        expired: u32,
        /// Whether the graph was rebuilt afterwards.
        rebuilt: bool,
    },
    /// Points were deleted.
    Deleted {
        /// How many existed and were deleted.
        deleted: u32,
        /// Ids that did not exist (or had expired).
        missing: Vec<String>,
        /// Expired points swept first.
        expired: u32,
        /// Whether the graph was rebuilt afterwards.
        rebuilt: bool,
    },
    /// Expired points were swept.
    Swept {
        /// How many.
        expired: u64,
    },
    /// A graph rebuild began ([`MemoryOp::RebuildIndex`]; done at once for small
    /// collections) or was swapped in ([`MemoryOp::FinishRebuild`]).
    Rebuilt {
        /// Live points.
        live: u64,
        /// Tombstones the rebuild drops (0 if one was already under way, or for a
        /// finish that found none).
        tombstones_removed: u64,
    },
    /// Patterns were added.
    PatternsAdded {
        /// Assigned ids, in input order.
        ids: Vec<String>,
    },
    /// A task outcome was recorded.
    Judged {
        /// Ids updated, in id order.
        updated: Vec<String>,
        /// Unknown ids, in id order.
        missing: Vec<String>,
    },
    /// Patterns were deleted.
    PatternsDeleted {
        /// How many.
        deleted: u32,
        /// Unknown ids.
        missing: Vec<String>,
    },
    /// Consolidation ran.
    Consolidated(ConsolidationReport),
    /// A graph copy was named ([`MemoryOp::AdvanceIndex`]).
    IndexAdvanced {
        /// Whether searches moved to it (false: stale or not a copy point).
        advanced: bool,
    },
    /// A result went into the distillation outbox ([`MemoryOp::DistillQueue`]), or not:
    /// already there, or the outbox is full.
    DistillQueued {
        /// Whether it was queued by this op.
        queued: bool,
        /// Results in the outbox now.
        waiting: u64,
    },
    /// A distilled result left the outbox ([`MemoryOp::DistillDone`]).
    Distilled {
        /// Whether the outbox held it (false: another leader's op took it out first, and
        /// nothing was added).
        found: bool,
        /// Ids of the patterns added.
        ids: Vec<String>,
        /// Why the items were not added, if they did not validate.
        refused: Option<String>,
    },
}

/// Validated op, ready to commit without further failure.
enum Prepared {
    Create(String, CollectionSpec),
    Drop(String),
    Upsert(String, Vec<PreparedPoint>),
    Delete(String, Vec<String>),
    Sweep,
    Rebuild(String),
    FinishRebuild(Option<String>, u64),
    AdvanceIndex(Option<String>, u64, u64),
    PatternAdd(Vec<PreparedPattern>),
    Judge(Vec<String>, Outcome),
    PatternDelete(Vec<String>),
    Consolidate(ConsolidateParams),
    DistillQueue(u64, DistillEntry),
    DistillDone(u64, std::result::Result<Vec<PreparedPattern>, String>),
}

/// Validates a collection name.
pub fn validate_collection_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(MemoryError::InvalidCollectionName {
            name: name.chars().take(80).collect(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return bad("only ASCII letters, digits, `_`, `-` and `.` are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit (names starting with `_` are reserved)");
    }
    Ok(())
}

/// Current snapshot format version. 5 added the distillation outbox, 4 the rebuilds
/// under way; 4 and 3 are still read.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 5;
/// Earlier formats, read and converted.
const SNAPSHOT_FORMAT_V4: u32 = 4;
const SNAPSHOT_FORMAT_V3: u32 = 3;
const SNAPSHOT_MAGIC: &[u8; 8] = b"SWMEMSNP";
const SNAPSHOT_HEADER: usize = 8 + 4 + 8 + 8;

/// The complete replicated state of a store, as a serde value.
///
/// Bincode-safe; embed it in a larger snapshot, or use [`MemoryStore::snapshot_bytes`]
/// for a self-describing, checksummed byte form. The HNSW graphs are not in it: they are
/// rebuilt on restore by re-inserting every slot (tombstones included) in order, which
/// reproduces the graphs of the replica the snapshot was taken from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSnapshot {
    format_version: u32,
    config: StoreConfig,
    collections: Vec<CollectionRecord>,
    bank: BankRecord,
    /// Background rebuilds under way: (collection, `None` for the pattern index).
    rebuilds: Vec<(Option<String>, RebuildRecord)>,
    /// The distillation outbox, by task id.
    outbox: Vec<(u64, DistillEntry)>,
}

/// Format 4: the same without the outbox (it was empty).
#[derive(Deserialize)]
struct StoreSnapshotV4 {
    format_version: u32,
    config: StoreConfig,
    collections: Vec<CollectionRecord>,
    bank: BankRecord,
    rebuilds: Vec<(Option<String>, RebuildRecord)>,
}

/// Format 3: the same without the rebuilds (none could be under way).
#[derive(Deserialize)]
struct StoreSnapshotV3 {
    format_version: u32,
    config: StoreConfig,
    collections: Vec<CollectionRecord>,
    bank: BankRecord,
}

impl StoreSnapshot {
    /// Format version of this snapshot.
    pub fn format_version(&self) -> u32 {
        self.format_version
    }

    /// Config of the store it was taken from.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }
}

/// FNV-1a, 64 bit.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Encodes a serde value with the workspace codec (`swarm-codec`, postcard), the
/// encoding used for ops and snapshots.
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    swarm_codec::encode(value).map_err(|e| MemoryError::Encode(e.to_string()))
}

/// Decodes a [`encode_value`] value of at most `limit` bytes. The codec never allocates
/// more than its input holds, so corrupt lengths cannot exhaust memory.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T> {
    swarm_codec::decode(bytes, limit)
        .map_err(|e| MemoryError::InvalidSnapshot(format!("decode: {e}")))
}

/// The memory store: named vector collections plus the ReasoningBank.
///
/// Writes go through [`MemoryStore::apply`] only; everything else is a read (`&self`)
/// and never mutates. See the crate docs for the determinism contract.
pub struct MemoryStore {
    config: StoreConfig,
    collections: BTreeMap<String, Collection>,
    bank: ReasoningBank,
    /// Committed results waiting to be distilled, by task id.
    outbox: BTreeMap<u64, DistillEntry>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("collections", &self.collections.keys().collect::<Vec<_>>())
            .field("bank", &self.bank)
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: StoreConfig) -> Result<Self> {
        config.validate()?;
        let bank = ReasoningBank::new(&config);
        Ok(MemoryStore {
            config,
            collections: BTreeMap::new(),
            bank,
            outbox: BTreeMap::new(),
        })
    }

    /// The store's config.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn collection(&self, name: &str) -> Result<&Collection> {
        self.collections
            .get(name)
            .ok_or_else(|| MemoryError::UnknownCollection(name.to_string()))
    }

    fn prepare(&self, op: &MemoryOp) -> Result<Prepared> {
        let cfg = &self.config;
        let check_batch = |n: usize| {
            if n > cfg.max_batch {
                Err(MemoryError::BatchTooLarge {
                    size: n,
                    limit: cfg.max_batch,
                })
            } else {
                Ok(())
            }
        };
        Ok(match op {
            MemoryOp::CreateCollection { name, spec, .. } => {
                validate_collection_name(name)?;
                spec.validate(cfg)?;
                if self.collections.contains_key(name) {
                    return Err(MemoryError::CollectionExists(name.clone()));
                }
                if self.collections.len() >= cfg.max_collections {
                    return Err(MemoryError::InvalidParams(format!(
                        "at most {} collections",
                        cfg.max_collections
                    )));
                }
                Prepared::Create(name.clone(), spec.clone())
            }
            MemoryOp::DropCollection { name, .. } => {
                self.collection(name)?;
                Prepared::Drop(name.clone())
            }
            MemoryOp::Upsert {
                collection,
                points,
                now_ms,
            } => {
                let c = self.collection(collection)?;
                Prepared::Upsert(collection.clone(), c.prepare_upsert(points, *now_ms, cfg)?)
            }
            MemoryOp::Delete {
                collection, ids, ..
            } => {
                self.collection(collection)?;
                check_batch(ids.len())?;
                for id in ids {
                    validate_id(id, cfg.max_id_bytes)?;
                }
                Prepared::Delete(collection.clone(), ids.clone())
            }
            MemoryOp::ExpireSweep { .. } => Prepared::Sweep,
            MemoryOp::RebuildIndex { collection, .. } => {
                self.collection(collection)?;
                Prepared::Rebuild(collection.clone())
            }
            MemoryOp::FinishRebuild {
                collection,
                generation,
                ..
            } => Prepared::FinishRebuild(collection.clone(), *generation),
            MemoryOp::AdvanceIndex {
                collection,
                generation,
                slots,
                ..
            } => Prepared::AdvanceIndex(collection.clone(), *generation, *slots),
            MemoryOp::PatternAdd { items, .. } => {
                Prepared::PatternAdd(self.bank.prepare_add(items, cfg)?)
            }
            MemoryOp::PatternJudge {
                item_ids, outcome, ..
            } => {
                check_batch(item_ids.len())?;
                Prepared::Judge(item_ids.clone(), *outcome)
            }
            MemoryOp::PatternDelete { ids, .. } => {
                check_batch(ids.len())?;
                Prepared::PatternDelete(ids.clone())
            }
            MemoryOp::Consolidate { params, .. } => {
                params.validate()?;
                Prepared::Consolidate(params.clone())
            }
            MemoryOp::DistillQueue {
                task_id,
                attempt,
                now_ms,
            } => Prepared::DistillQueue(
                *task_id,
                DistillEntry {
                    attempt: *attempt,
                    queued_ms: *now_ms,
                },
            ),
            MemoryOp::DistillDone { task_id, items, .. } => Prepared::DistillDone(
                *task_id,
                if items.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.bank.prepare_add(items, cfg).map_err(|e| e.to_string())
                },
            ),
        })
    }

    /// Checks an op against the current state without applying it, so a proposer can
    /// reject bad input before it reaches the log. `apply` re-validates anyway.
    pub fn validate(&self, op: &MemoryOp) -> Result<()> {
        self.prepare(op).map(|_| ())
    }

    /// Applies a write op. Deterministic: the same ops in the same order produce the same
    /// state (and the same snapshot bytes) on every replica. Atomic: on error nothing
    /// changed, and every replica returns the same error.
    pub fn apply(&mut self, op: MemoryOp) -> Result<OpOutcome> {
        let now_ms = op.now_ms();
        let prepared = self.prepare(&op)?;
        let cfg = &self.config;
        Ok(match prepared {
            Prepared::Create(name, spec) => {
                self.collections
                    .insert(name.clone(), Collection::new(name.clone(), spec, now_ms));
                OpOutcome::CollectionCreated { name }
            }
            Prepared::Drop(name) => {
                let points = self
                    .collections
                    .remove(&name)
                    .map_or(0, |c| c.live_len() as u64);
                OpOutcome::CollectionDropped { name, points }
            }
            Prepared::Upsert(name, points) => {
                let Some(c) = self.collections.get_mut(&name) else {
                    return Err(MemoryError::UnknownCollection(name));
                };
                let expired = c.purge_expired(now_ms) as u32;
                let stats = c.apply_upsert(points, now_ms);
                let rebuilt = c.maybe_rebuild(cfg);
                OpOutcome::Upserted {
                    inserted: stats.inserted,
                    replaced: stats.replaced,
                    expired,
                    rebuilt,
                }
            }
            Prepared::Delete(name, ids) => {
                let Some(c) = self.collections.get_mut(&name) else {
                    return Err(MemoryError::UnknownCollection(name));
                };
                let expired = c.purge_expired(now_ms) as u32;
                let (deleted, missing) = c.delete(&ids);
                let rebuilt = c.maybe_rebuild(cfg);
                OpOutcome::Deleted {
                    deleted,
                    missing,
                    expired,
                    rebuilt,
                }
            }
            Prepared::Sweep => {
                let mut expired = 0u64;
                for c in self.collections.values_mut() {
                    expired += c.purge_expired(now_ms) as u64;
                    c.maybe_rebuild(cfg);
                }
                OpOutcome::Swept { expired }
            }
            Prepared::Rebuild(name) => {
                let Some(c) = self.collections.get_mut(&name) else {
                    return Err(MemoryError::UnknownCollection(name));
                };
                let removed = c.start_rebuild();
                OpOutcome::Rebuilt {
                    live: c.live_len() as u64,
                    tombstones_removed: removed as u64,
                }
            }
            Prepared::FinishRebuild(name, generation) => {
                let c = match &name {
                    Some(name) => self.collections.get_mut(name),
                    None => Some(self.bank.index_mut()),
                };
                match c {
                    Some(c) if c.generation() == generation => {
                        let removed = c.finish_rebuild();
                        OpOutcome::Rebuilt {
                            live: c.live_len() as u64,
                            tombstones_removed: removed as u64,
                        }
                    }
                    // Dropped, or rebuilt since: nothing of that rebuild is left.
                    c => OpOutcome::Rebuilt {
                        live: c.map_or(0, |c| c.live_len() as u64),
                        tombstones_removed: 0,
                    },
                }
            }
            Prepared::AdvanceIndex(name, generation, slots) => {
                let c = match &name {
                    Some(name) => self.collections.get(name),
                    None => Some(self.bank.index()),
                };
                let advanced = match c {
                    Some(c)
                        if c.generation() == generation
                            && usize::try_from(slots).is_ok_and(|s| c.valid_copy(s)) =>
                    {
                        c.advance_index(slots as usize);
                        true
                    }
                    // Dropped, rebuilt since, or not a copy point: nothing to do.
                    _ => false,
                };
                OpOutcome::IndexAdvanced { advanced }
            }
            Prepared::PatternAdd(items) => OpOutcome::PatternsAdded {
                ids: self.bank.apply_add(items, now_ms, cfg),
            },
            Prepared::Judge(ids, outcome) => {
                let (updated, missing) = self.bank.judge(&ids, outcome, now_ms, cfg);
                OpOutcome::Judged { updated, missing }
            }
            Prepared::PatternDelete(ids) => {
                let (deleted, missing) = self.bank.delete(&ids, cfg);
                OpOutcome::PatternsDeleted { deleted, missing }
            }
            Prepared::Consolidate(params) => {
                OpOutcome::Consolidated(self.bank.consolidate(&params, now_ms, cfg))
            }
            Prepared::DistillQueue(task, entry) => {
                let queued =
                    self.outbox.len() < DISTILL_OUTBOX_LIMIT && !self.outbox.contains_key(&task);
                if queued {
                    self.outbox.insert(task, entry);
                }
                OpOutcome::DistillQueued {
                    queued,
                    waiting: self.outbox.len() as u64,
                }
            }
            Prepared::DistillDone(task, items) => {
                if self.outbox.remove(&task).is_none() {
                    OpOutcome::Distilled {
                        found: false,
                        ids: Vec::new(),
                        refused: None,
                    }
                } else {
                    match items {
                        Ok(items) => OpOutcome::Distilled {
                            found: true,
                            ids: if items.is_empty() {
                                Vec::new()
                            } else {
                                self.bank.apply_add(items, now_ms, cfg)
                            },
                            refused: None,
                        },
                        Err(e) => OpOutcome::Distilled {
                            found: true,
                            ids: Vec::new(),
                            refused: Some(e),
                        },
                    }
                }
            }
        })
    }

    fn check_search(&self, c: &Collection, req: &SearchRequest) -> Result<(Vec<f32>, usize)> {
        let cfg = &self.config;
        if req.k == 0 || req.k > cfg.max_k {
            return Err(MemoryError::InvalidK {
                k: req.k,
                max: cfg.max_k,
            });
        }
        let ef = req.ef.unwrap_or(c.spec().ef_search);
        if ef == 0 || ef > cfg.max_ef {
            return Err(MemoryError::InvalidEf {
                ef,
                max: cfg.max_ef,
            });
        }
        if let Some(f) = &req.filter {
            f.validate()?;
        }
        let q = prepare_vector(&req.vector, c.spec().dimension, c.spec().metric)?;
        Ok((q, ef))
    }

    /// Approximate k-NN search (HNSW). Deleted, replaced and expired points are never
    /// returned; the filter is applied during the graph search. If the graph search finds
    /// fewer than `k` visible matches, an exact scan settles the answer, so a filtered
    /// search returns `min(k, matching points)` results.
    pub fn search(&self, collection: &str, req: &SearchRequest) -> Result<Vec<SearchHit>> {
        let c = self.collection(collection)?;
        let (q, ef) = self.check_search(c, req)?;
        let slots = c.search_slots(&q, req.k, ef, req.filter.as_ref(), req.now_ms);
        Ok(c.to_hits(&q, &slots))
    }

    /// The same search answered by hnsw_rs' own `search`/`search_filter` over the same
    /// graph instead of the flat copy — kept as the reference the default path is
    /// benchmarked and tested against. Same validation and result shape as `search`.
    pub fn search_via_hnsw_rs(
        &self,
        collection: &str,
        req: &SearchRequest,
    ) -> Result<Vec<SearchHit>> {
        let c = self.collection(collection)?;
        let (q, ef) = self.check_search(c, req)?;
        let slots = c.search_slots_hnsw_rs(&q, req.k, ef, req.filter.as_ref(), req.now_ms);
        Ok(c.to_hits(&q, &slots))
    }

    /// Exact k-NN by brute force (ground truth for recall; also fine for small collections).
    pub fn search_exact(&self, collection: &str, req: &SearchRequest) -> Result<Vec<SearchHit>> {
        let c = self.collection(collection)?;
        let (q, _) = self.check_search(c, req)?;
        let slots = c.exact_slots(&q, req.k, req.filter.as_ref(), req.now_ms);
        Ok(c.to_hits(&q, &slots))
    }

    /// A point by id, if it exists and has not expired at `now_ms`.
    pub fn get(&self, collection: &str, id: &str, now_ms: u64) -> Result<Option<StoredPoint>> {
        Ok(self.collection(collection)?.get(id, now_ms))
    }

    /// Summary of one collection.
    pub fn collection_info(&self, name: &str) -> Result<CollectionInfo> {
        Ok(self.collection(name)?.info())
    }

    /// Shape and connectivity of a collection's graph (diagnostics; O(n)).
    pub fn graph_stats(&self, name: &str) -> Result<GraphStats> {
        Ok(self.collection(name)?.graph_stats())
    }

    /// Summaries of all collections, by name.
    pub fn list_collections(&self) -> Vec<CollectionInfo> {
        self.collections.values().map(Collection::info).collect()
    }

    /// ReasoningBank retrieval: HNSW candidates scored by similarity, recency and
    /// confidence, then diversified with MMR. A pure read: use counts and last-used times
    /// change only through [`MemoryOp::PatternJudge`].
    pub fn retrieve(
        &self,
        query_embedding: &[f32],
        k: usize,
        now_ms: u64,
        params: &RetrieveParams,
    ) -> Result<Vec<RetrievedItem>> {
        self.bank
            .retrieve(query_embedding, k, now_ms, params, &self.config)
    }

    /// A pattern by id.
    pub fn pattern(&self, id: &str) -> Option<&MemoryItem> {
        self.bank.get(id)
    }

    /// All patterns, in id order.
    pub fn patterns(&self) -> impl Iterator<Item = &MemoryItem> {
        self.bank.items()
    }

    /// Number of patterns.
    pub fn pattern_count(&self) -> usize {
        self.bank.len()
    }

    /// The stored (normalised) embedding of a pattern.
    pub fn pattern_embedding(&self, id: &str) -> Option<&[f32]> {
        self.bank.embedding(id)
    }

    /// Summary of the pattern index (live, tombstones, generation).
    pub fn pattern_index_info(&self) -> CollectionInfo {
        self.bank.index_info()
    }

    /// The replicated state as a serde value.
    pub fn snapshot(&self) -> StoreSnapshot {
        StoreSnapshot {
            format_version: SNAPSHOT_FORMAT_VERSION,
            config: self.config.clone(),
            collections: self
                .collections
                .values()
                .map(Collection::to_record)
                .collect(),
            bank: self.bank.to_record(),
            rebuilds: self
                .collections
                .iter()
                .filter_map(|(name, c)| Some((Some(name.clone()), c.rebuild_record()?)))
                .chain(self.bank.index().rebuild_record().map(|r| (None, r)))
                .collect(),
            outbox: self.outbox.iter().map(|(t, e)| (*t, *e)).collect(),
        }
    }

    /// Up to `max` results waiting in the distillation outbox, oldest task first.
    pub fn distill_outbox(&self, max: usize) -> Vec<(u64, DistillEntry)> {
        self.outbox
            .iter()
            .take(max)
            .map(|(t, e)| (*t, *e))
            .collect()
    }

    /// How many results wait in the distillation outbox.
    pub fn distill_waiting(&self) -> usize {
        self.outbox.len()
    }

    /// Background rebuilds whose build has finished on this replica, as (collection,
    /// generation): the leader proposes a [`MemoryOp::FinishRebuild`] for each.
    pub fn ready_rebuilds(&self) -> Vec<(Option<String>, u64)> {
        self.collections
            .iter()
            .map(|(name, c)| (Some(name.clone()), c))
            .chain(std::iter::once((None, self.bank.index())))
            .filter(|(_, c)| c.rebuild_ready())
            .map(|(name, c)| (name, c.generation()))
            .collect()
    }

    /// Graph copies this replica's indexers have taken past the ones in use, as
    /// (collection, generation, slots): the leader proposes a [`MemoryOp::AdvanceIndex`]
    /// for each.
    pub fn index_advances(&self) -> Vec<(Option<String>, u64, u64)> {
        self.collections
            .iter()
            .map(|(name, c)| (Some(name.clone()), c))
            .chain(std::iter::once((None, self.bank.index())))
            .filter_map(|(name, c)| Some((name, c.generation(), c.ready_copy()? as u64)))
            .collect()
    }

    /// Points of `collection` written but not yet inserted into its graph here.
    pub fn index_backlog(&self, collection: &str) -> Result<usize> {
        Ok(self.collection(collection)?.index_backlog())
    }

    /// Waits until every indexer (rebuilds' too) has inserted all it was handed, or has
    /// paused for an op to name its copies ([`MemoryStore::index_advances`]). For tests
    /// and benchmarks; a replica never needs it.
    pub fn wait_indexing(&self) {
        for c in self.collections.values() {
            c.wait_indexed();
        }
        self.bank.index().wait_indexed();
    }

    /// For a store used without replication (a single process, tests, benchmarks): what a
    /// leader does in the background, done now. Waits for the indexers and applies the
    /// [`MemoryOp::AdvanceIndex`] ops a leader would propose, until every point is in its
    /// graph and searches use the latest copy. Returns the ops applied, in order (other
    /// replicas apply the same).
    pub fn settle_indexes(&mut self, now_ms: u64) -> Result<Vec<MemoryOp>> {
        let mut applied = Vec::new();
        loop {
            self.wait_indexing();
            let ready = self.index_advances();
            if ready.is_empty() {
                return Ok(applied);
            }
            for (collection, generation, slots) in ready {
                let op = MemoryOp::AdvanceIndex {
                    collection,
                    generation,
                    slots,
                    now_ms,
                };
                self.apply(op.clone())?;
                applied.push(op);
            }
        }
    }

    /// Whether any background rebuild is under way.
    pub fn rebuilding(&self) -> bool {
        self.collections.values().any(Collection::rebuilding) || self.bank.index().rebuilding()
    }

    /// Restores a store from a snapshot value, validating it and rebuilding the graphs.
    pub fn from_snapshot(snap: StoreSnapshot) -> Result<Self> {
        if snap.format_version != SNAPSHOT_FORMAT_VERSION {
            return Err(MemoryError::InvalidSnapshot(format!(
                "format version {} (supported: {SNAPSHOT_FORMAT_VERSION})",
                snap.format_version
            )));
        }
        snap.config
            .validate()
            .map_err(|e| MemoryError::InvalidSnapshot(e.to_string()))?;
        let config = snap.config;
        let mut collections = BTreeMap::new();
        for rec in snap.collections {
            validate_collection_name(&rec.name)
                .map_err(|e| MemoryError::InvalidSnapshot(e.to_string()))?;
            let name = rec.name.clone();
            let c = Collection::from_record(rec, &config)?;
            if collections.insert(name.clone(), c).is_some() {
                return Err(MemoryError::InvalidSnapshot(format!(
                    "duplicate collection `{name}`"
                )));
            }
        }
        let mut bank = ReasoningBank::from_record(snap.bank, &config)?;
        for (name, rec) in snap.rebuilds {
            let c = match &name {
                Some(n) => collections.get_mut(n).ok_or_else(|| {
                    MemoryError::InvalidSnapshot(format!("rebuild of unknown collection `{n}`"))
                })?,
                None => bank.index_mut(),
            };
            c.resume_rebuild(rec)?;
        }
        Ok(MemoryStore {
            config,
            collections,
            bank,
            outbox: snap.outbox.into_iter().collect(),
        })
    }

    /// The snapshot as bytes: an 8-byte magic, format version (u32 LE), payload length
    /// (u64 LE), FNV-1a-64 of the payload (u64 LE), then the payload (`swarm-codec`).
    /// Replicas with the same state produce identical bytes.
    pub fn snapshot_bytes(&self) -> Result<Vec<u8>> {
        let payload = encode_value(&self.snapshot())?;
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER + payload.len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// The earliest time a point of any collection expires (an [`MemoryOp::ExpireSweep`]
    /// at or after it tombstones something).
    pub fn next_point_expiry(&self) -> Option<u64> {
        self.collections
            .values()
            .filter_map(Collection::next_expiry)
            .min()
    }

    /// Restores a store from [`MemoryStore::snapshot_bytes`] output.
    pub fn restore_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| Err(MemoryError::InvalidSnapshot(m.to_string()));
        if bytes.len() < SNAPSHOT_HEADER || &bytes[..8] != SNAPSHOT_MAGIC {
            return bad("not a swarm-memory snapshot (bad magic)");
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&bytes[r]);
            u64::from_le_bytes(b)
        };
        let version = word(8..12);
        if ![
            SNAPSHOT_FORMAT_VERSION,
            SNAPSHOT_FORMAT_V4,
            SNAPSHOT_FORMAT_V3,
        ]
        .iter()
        .any(|v| version == *v as u64)
        {
            return Err(MemoryError::InvalidSnapshot(format!(
                "format version {version} (supported: {SNAPSHOT_FORMAT_VERSION})"
            )));
        }
        let len = word(12..20);
        let payload = &bytes[SNAPSHOT_HEADER..];
        if payload.len() as u64 != len {
            return bad("truncated or padded snapshot");
        }
        if fnv1a64(payload) != word(20..28) {
            return bad("checksum mismatch");
        }
        let snap = if version == SNAPSHOT_FORMAT_V3 as u64 {
            let v3 = decode_value::<StoreSnapshotV3>(payload, payload.len())?;
            if v3.format_version != SNAPSHOT_FORMAT_V3 {
                return bad("format version in the payload does not match the header");
            }
            StoreSnapshot {
                format_version: SNAPSHOT_FORMAT_VERSION,
                config: v3.config,
                collections: v3.collections,
                bank: v3.bank,
                rebuilds: Vec::new(),
                outbox: Vec::new(),
            }
        } else if version == SNAPSHOT_FORMAT_V4 as u64 {
            let v4 = decode_value::<StoreSnapshotV4>(payload, payload.len())?;
            if v4.format_version != SNAPSHOT_FORMAT_V4 {
                return bad("format version in the payload does not match the header");
            }
            StoreSnapshot {
                format_version: SNAPSHOT_FORMAT_VERSION,
                config: v4.config,
                collections: v4.collections,
                bank: v4.bank,
                rebuilds: v4.rebuilds,
                outbox: Vec::new(),
            }
        } else {
            decode_value::<StoreSnapshot>(payload, payload.len())?
        };
        Self::from_snapshot(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(dim: usize) -> NewPattern {
        NewPattern {
            title: "retry with backoff".into(),
            description: "d".into(),
            content: "c".into(),
            embedding: vec![0.5; dim],
            source_task: Some(7),
            outcome: crate::Outcome::Success,
        }
    }

    /// A queued result is distilled once: the first `DistillDone` adds its patterns, a
    /// second (another leader's) adds nothing; duplicates and a full outbox queue
    /// nothing; items that do not validate leave with their entry; the outbox survives a
    /// snapshot.
    #[test]
    fn distillation_outbox_adds_each_result_once() {
        let config = StoreConfig {
            pattern_dimension: 4,
            ..StoreConfig::default()
        };
        let mut s = MemoryStore::new(config).unwrap();
        let queue = |task_id| MemoryOp::DistillQueue {
            task_id,
            attempt: 1,
            now_ms: 10,
        };
        let done = |task_id, items| MemoryOp::DistillDone {
            task_id,
            items,
            now_ms: 20,
        };
        assert_eq!(
            s.apply(queue(7)).unwrap(),
            OpOutcome::DistillQueued {
                queued: true,
                waiting: 1
            }
        );
        assert_eq!(
            s.apply(queue(7)).unwrap(),
            OpOutcome::DistillQueued {
                queued: false,
                waiting: 1
            }
        );
        s.apply(queue(8)).unwrap();
        assert_eq!(s.distill_outbox(10).len(), 2);
        // Survives a snapshot, byte for byte.
        let bytes = s.snapshot_bytes().unwrap();
        let back = MemoryStore::restore_bytes(&bytes).unwrap();
        assert_eq!(back.distill_outbox(10), s.distill_outbox(10));
        assert_eq!(back.snapshot_bytes().unwrap(), bytes);
        let OpOutcome::Distilled { found, ids, .. } = s.apply(done(7, vec![pattern(4)])).unwrap()
        else {
            panic!("not a distill outcome")
        };
        assert!(found);
        assert_eq!(ids.len(), 1);
        assert_eq!(
            s.apply(done(7, vec![pattern(4)])).unwrap(),
            OpOutcome::Distilled {
                found: false,
                ids: vec![],
                refused: None
            }
        );
        assert_eq!(s.pattern_count(), 1);
        // A wrong dimension: the entry leaves, nothing is added.
        let OpOutcome::Distilled { found, refused, .. } =
            s.apply(done(8, vec![pattern(3)])).unwrap()
        else {
            panic!("not a distill outcome")
        };
        assert!(found && refused.is_some());
        assert_eq!((s.distill_waiting(), s.pattern_count()), (0, 1));
        // Full: not queued.
        for t in 0..DISTILL_OUTBOX_LIMIT as u64 {
            s.outbox.insert(
                1000 + t,
                DistillEntry {
                    attempt: 1,
                    queued_ms: 0,
                },
            );
        }
        assert_eq!(
            s.apply(queue(9)).unwrap(),
            OpOutcome::DistillQueued {
                queued: false,
                waiting: DISTILL_OUTBOX_LIMIT as u64
            }
        );
    }

    /// A format-4 snapshot (before the outbox) still loads, with an empty outbox.
    #[test]
    fn format_4_snapshots_load() {
        let config = StoreConfig {
            pattern_dimension: 4,
            ..StoreConfig::default()
        };
        let mut s = MemoryStore::new(config).unwrap();
        s.apply(MemoryOp::PatternAdd {
            items: vec![pattern(4)],
            now_ms: 1,
        })
        .unwrap();
        let snap = s.snapshot();
        // Format 4's fields, in order: what postcard wrote for `StoreSnapshotV4`.
        let payload = encode_value(&(
            SNAPSHOT_FORMAT_V4,
            &snap.config,
            &snap.collections,
            &snap.bank,
            &snap.rebuilds,
        ))
        .unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_FORMAT_V4.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let back = MemoryStore::restore_bytes(&bytes).unwrap();
        assert_eq!(back.pattern_count(), 1);
        assert_eq!(back.distill_waiting(), 0);
        assert_eq!(back.snapshot_bytes().unwrap(), s.snapshot_bytes().unwrap());
    }

    #[test]
    fn collection_names() {
        for ok in ["a", "docs", "A-1.b_c", "0x"] {
            validate_collection_name(ok).unwrap();
        }
        let long = "x".repeat(65);
        for bad in ["", "_patterns", "-a", "a b", "é", "a/b", long.as_str()] {
            assert_eq!(
                validate_collection_name(bad).unwrap_err().code(),
                "invalid_collection_name",
                "{bad}"
            );
        }
    }

    #[test]
    fn fnv_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }
}
