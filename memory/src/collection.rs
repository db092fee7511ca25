//! One vector collection: stored points (the replicated data) and its HNSW graph (derived).

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use hnsw_rs::filter::FilterT;
use hnsw_rs::hnsw::Hnsw;
use serde::{Deserialize, Serialize};

use crate::error::{MemoryError, Result};
use crate::graph::Cand;
#[cfg(test)]
use crate::graph::FlatGraph;
use crate::indexer::{is_copy_point_after, Indexer};
use crate::kernel::{self, IndexDistance, BATCH};
use crate::metadata::{self, MetaMap, MetadataFilter};
use crate::store::StoreConfig;

/// Largest accepted squared L2 norm of a vector. Bounding norms keeps every dot product
/// and distance finite (by Cauchy–Schwarz), so no distance is ever NaN or infinite.
pub const MAX_NORM_SQUARED: f64 = 1e36;

/// hnsw_rs supports at most 16 layers.
const HNSW_MAX_LAYERS: usize = 16;

/// Similarity metric of a collection, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// Cosine similarity. Vectors are L2-normalised on the way in; zero vectors are
    /// rejected. Reported distance: `1 − cos`.
    Cosine,
    /// Euclidean distance. Reported distance: `‖a − b‖`.
    L2,
    /// Inner product (maximum-inner-product search). Reported distance: `−a·b`.
    Dot,
}

impl Metric {
    pub(crate) fn index_distance(self) -> IndexDistance {
        match self {
            Metric::Cosine => IndexDistance::CosineUnit,
            Metric::L2 => IndexDistance::L2Squared,
            Metric::Dot => IndexDistance::NegDot,
        }
    }

    /// The user-facing distance between a (prepared) query and a stored vector.
    pub(crate) fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => 1.0 - kernel::dot(a, b),
            Metric::L2 => kernel::l2_squared(a, b).sqrt(),
            Metric::Dot => -kernel::dot(a, b),
        }
    }

    /// Stable lowercase name (`cosine`, `l2`, `dot`).
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
            Metric::Dot => "dot",
        }
    }

    /// Parses `cosine`, `l2`/`euclidean` or `dot`/`ip`.
    pub fn parse(s: &str) -> Option<Metric> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" | "cos" => Some(Metric::Cosine),
            "l2" | "euclidean" => Some(Metric::L2),
            "dot" | "ip" | "inner_product" => Some(Metric::Dot),
            _ => None,
        }
    }
}

/// Shape and index parameters of a collection, fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionSpec {
    /// Vector dimension.
    pub dimension: usize,
    /// Similarity metric.
    pub metric: Metric,
    /// HNSW M: links per node per layer (layer 0 keeps 2·M). 2..=128.
    pub m: usize,
    /// HNSW ef at construction. 1..=4096.
    pub ef_construction: usize,
    /// Default ef at search when the request gives none.
    pub ef_search: usize,
}

impl CollectionSpec {
    /// A spec with default index parameters (M = 16, ef_construction = 200, ef_search = 64).
    pub fn new(dimension: usize, metric: Metric) -> Self {
        CollectionSpec {
            dimension,
            metric,
            m: 16,
            ef_construction: 200,
            ef_search: 64,
        }
    }

    pub(crate) fn validate(&self, cfg: &StoreConfig) -> Result<()> {
        if self.dimension == 0 || self.dimension > cfg.max_dimension {
            return Err(MemoryError::InvalidDimension {
                dimension: self.dimension,
                max: cfg.max_dimension,
            });
        }
        if !(2..=128).contains(&self.m) {
            return Err(MemoryError::InvalidParams(format!(
                "m = {} must be between 2 and 128",
                self.m
            )));
        }
        if !(1..=4096).contains(&self.ef_construction) {
            return Err(MemoryError::InvalidParams(format!(
                "ef_construction = {} must be between 1 and 4096",
                self.ef_construction
            )));
        }
        if self.ef_search == 0 || self.ef_search > cfg.max_ef {
            return Err(MemoryError::InvalidEf {
                ef: self.ef_search,
                max: cfg.max_ef,
            });
        }
        Ok(())
    }
}

/// One point to insert or replace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointWrite {
    /// Caller-chosen id, unique within the collection (1..=`max_id_bytes` bytes, no
    /// control characters). Writing an existing id replaces that point.
    pub id: String,
    /// The vector; must have the collection's dimension.
    pub vector: Vec<f32>,
    /// Metadata as JSON object text (`""` means `{}`).
    pub metadata: String,
    /// Time to live in ms from the op's `now_ms`; `None` means forever.
    pub ttl_ms: Option<u64>,
}

/// A k-nearest-neighbour query against a collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchRequest {
    /// Query vector (collection dimension).
    pub vector: Vec<f32>,
    /// Number of results, 1..=`max_k`.
    pub k: usize,
    /// Search breadth (default: the collection's `ef_search`); raised to `k` if smaller.
    pub ef: Option<usize>,
    /// Metadata filter, applied during the graph search.
    pub filter: Option<MetadataFilter>,
    /// Points with `expires_at_ms <= now_ms` are invisible.
    pub now_ms: u64,
}

impl SearchRequest {
    /// A plain top-k request with default ef and no filter.
    pub fn new(vector: Vec<f32>, k: usize, now_ms: u64) -> Self {
        SearchRequest {
            vector,
            k,
            ef: None,
            filter: None,
            now_ms,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// Point id.
    pub id: String,
    /// Distance under the collection's metric (smaller is closer; see [`Metric`]).
    pub distance: f32,
    /// Metadata JSON object text (canonical form).
    pub metadata: String,
}

/// A stored point as returned by `get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPoint {
    /// Point id.
    pub id: String,
    /// Stored vector (L2-normalised for cosine collections).
    pub vector: Vec<f32>,
    /// Metadata JSON object text (canonical form).
    pub metadata: String,
    /// Absolute expiry time, if any.
    pub expires_at_ms: Option<u64>,
    /// `now_ms` of the op that last wrote this point.
    pub updated_ms: u64,
}

/// Summary of a collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    /// Collection name.
    pub name: String,
    /// Its spec.
    pub spec: CollectionSpec,
    /// Live points (including ones whose TTL passed but that no write has swept yet).
    pub live: usize,
    /// Deleted or replaced points still in the graph.
    pub tombstones: usize,
    /// Number of index rebuilds so far.
    pub generation: u64,
    /// `now_ms` of the creating op.
    pub created_ms: u64,
    /// A rebuild of the graph is under way in the background (searches use the current
    /// graph until it is swapped in).
    pub rebuilding: bool,
    /// Points written but not yet inserted into the graph by this replica's indexer
    /// (searches scan them exactly). Local to the replica, like `rebuilding`.
    pub unindexed: usize,
}

/// Shape of a collection's HNSW graph (as last copied for search), for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphStats {
    /// Slots of the collection (live and tombstoned).
    pub slots: usize,
    /// Of those, how many this replica's indexer has inserted into the graph.
    pub indexed: usize,
    /// Slots covered by the copy searched (the rest are scanned exactly).
    pub copied_slots: usize,
    /// Of those, how many a search starting at the entry point can reach on layer 0.
    /// hnsw_rs does not guarantee connectivity; unreachable nodes are found only by the
    /// exact fallback.
    pub reachable: usize,
    /// Directed layer-0 edges.
    pub layer0_edges: usize,
    /// Highest layer (0-based).
    pub top_layer: usize,
}

/// Counts of an upsert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UpsertStats {
    pub inserted: u32,
    pub replaced: u32,
}

/// A validated point ready to apply.
#[derive(Debug, Clone)]
pub(crate) struct PreparedPoint {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: String,
    pub parsed: MetaMap,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Slot {
    /// Empty for tombstones.
    id: String,
    /// Canonical JSON; empty for tombstones.
    metadata: String,
    /// Derived from `metadata`.
    parsed: Option<MetaMap>,
    expires_at_ms: Option<u64>,
    updated_ms: u64,
    live: bool,
}

/// Serialized form of a slot (part of the snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SlotRecord {
    pub id: String,
    pub vector: Vec<f32>,
    pub metadata: String,
    pub expires_at_ms: Option<u64>,
    pub updated_ms: u64,
    pub live: bool,
}

/// Serialized form of a rebuild under way (part of the snapshot): enough to start the
/// same build again on a replica that loads the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RebuildRecord {
    /// Slots when the rebuild began.
    pub base: u64,
    /// The slots below `base` that were live then, in order.
    pub keep: Vec<u32>,
}

/// Collections of at most this many live points swap in their rebuilt graph at the op
/// that triggers the rebuild (searches scan exactly for the moment its indexer needs);
/// larger ones keep searching the current graph until the new one is built
/// ([`Collection::start_rebuild`]).
pub const INLINE_REBUILD_MAX_POINTS: usize = 1000;

/// A graph rebuild under way on its own thread.
///
/// It began at a deterministic op (the write that crossed the tombstone threshold, or
/// [`crate::MemoryOp::RebuildIndex`]) and builds the graph of the slots live then, in
/// slot order, from a copy of their vectors, on an indexer of its own — holding no lock,
/// so the op sequence goes on meanwhile (writes land in the current graph, searches use
/// it). It is swapped in by [`crate::MemoryOp::FinishRebuild`], which the leader proposes
/// once its own build has its first copy: every replica swaps at the same op, so the
/// graphs stay identical (a replica whose build is behind does not wait: it scans exactly
/// until its build catches up).
struct PendingRebuild {
    /// Slots when it began: slots at or past it are not in the new graph yet.
    base: u32,
    /// Slots below `base` live when it began, in order: slot `i` of the new graph.
    keep: Vec<u32>,
    /// The new graph's indexer: the kept slots are handed to it at once, its first
    /// copy is taken when they are all in.
    indexer: Indexer,
}

/// Serialized form of a collection (part of the snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CollectionRecord {
    pub name: String,
    pub spec: CollectionSpec,
    pub created_ms: u64,
    pub generation: u64,
    pub slots: Vec<SlotRecord>,
    /// Slots covered by the flat graph copy when the snapshot was taken.
    pub flat_slots: u64,
}

/// A vector collection.
///
/// Points live in *slots*, numbered in insertion order since the last index rebuild; the
/// slot number is the id the HNSW graph knows a point by. Deleting or replacing a point
/// turns its slot into a tombstone (hnsw_rs cannot delete); tombstones keep their vector
/// so the graph can be rebuilt identically from the slot sequence, and are dropped when
/// the index is rebuilt.
///
/// The graph is built by the collection's [`Indexer`] thread, off the op sequence.
/// Searches run on a copy of its adjacency ([`FlatGraph`]) plus an exact scan of the slots
/// after the copy; which copy is decided by ops ([`crate::MemoryOp::AdvanceIndex`]) and
/// recorded in snapshots, so every replica searches the same one (see `indexer.rs`).
pub(crate) struct Collection {
    name: String,
    spec: CollectionSpec,
    created_ms: u64,
    generation: u64,
    slots: Vec<Slot>,
    /// Slot-major vector arena: slot `s` is `vectors[s*dim..(s+1)*dim]`.
    vectors: Vec<f32>,
    /// For dimensions of at least [`BF16_TRAVERSAL_MIN_DIMENSION`]: the same vectors
    /// rounded to bfloat16 ([`kernel::to_bf16`]), laid out alike — what the graph search
    /// reads while it walks (half the bytes of `vectors`: the walk waits on memory, not
    /// arithmetic). Empty for smaller dimensions. Derived from `vectors`, never stored.
    traversal: Vec<u16>,
    by_id: BTreeMap<String, u32>,
    expiry: BTreeSet<(u64, u32)>,
    tombstones: usize,
    indexer: Indexer,
    pending: Option<PendingRebuild>,
}

impl fmt::Debug for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collection")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("live", &self.by_id.len())
            .field("tombstones", &self.tombstones)
            .field("generation", &self.generation)
            .field("rebuilding", &self.pending.is_some())
            .finish()
    }
}

/// Most links per node and layer in the flat copy (8·M): hnsw_rs keeps at most 2·M on
/// layer 0 (M above), and restored reverse links may add more. In high dimension a few
/// "hub" nodes are the single heuristic-selected neighbour of dozens of nodes; the cap
/// must leave room for the hub's links back to them, or those nodes are unreachable
/// (measured at 30k × 784, M = 16: hub in-degree up to 107; a cap of 4·M left 91 nodes
/// unreachable, 8·M none).
fn flat_degree(spec: &CollectionSpec) -> usize {
    8 * spec.m
}

/// Smallest dimension whose graph search walks bfloat16 copies of the vectors and then
/// re-ranks the beam exactly. Below it vectors are a few cache lines, the f32 walk is
/// bound by arithmetic and bookkeeping rather than memory, and the re-ranking would cost
/// more than the halved reads save (measured at 10k × 128: about 10% fewer queries/s with
/// the copy; at 10k × 784: 5–15% more).
pub const BF16_TRAVERSAL_MIN_DIMENSION: usize = 256;

/// An indexer of an empty graph for `spec`, whose first copy is at `first_copy` slots.
fn start_indexer(name: &str, spec: &CollectionSpec, capacity: usize, first_copy: usize) -> Indexer {
    Indexer::start(
        name,
        new_index(spec, capacity),
        spec.dimension,
        flat_degree(spec),
        first_copy,
    )
}

fn new_index(spec: &CollectionSpec, capacity: usize) -> Hnsw<'static, f32, IndexDistance> {
    Hnsw::new(
        spec.m,
        capacity.max(1024),
        HNSW_MAX_LAYERS,
        spec.ef_construction,
        spec.metric.index_distance(),
    )
}

/// Validates a vector for a collection and returns its stored form (normalised for
/// cosine). Norms are computed in f64 so tiny or large components neither underflow nor
/// overflow.
pub(crate) fn prepare_vector(v: &[f32], dimension: usize, metric: Metric) -> Result<Vec<f32>> {
    if v.len() != dimension {
        return Err(MemoryError::DimensionMismatch {
            expected: dimension,
            got: v.len(),
        });
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(MemoryError::InvalidVector(format!(
            "component {i} is {} (NaN and infinities are not allowed)",
            v[i]
        )));
    }
    let norm_sq: f64 = v.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    if norm_sq > MAX_NORM_SQUARED {
        return Err(MemoryError::InvalidVector(format!(
            "squared norm {norm_sq:e} exceeds {MAX_NORM_SQUARED:e}"
        )));
    }
    match metric {
        Metric::Cosine => {
            if norm_sq == 0.0 {
                return Err(MemoryError::InvalidVector(
                    "zero vector has no direction under the cosine metric".into(),
                ));
            }
            let norm = norm_sq.sqrt();
            Ok(v.iter().map(|x| (*x as f64 / norm) as f32).collect())
        }
        Metric::L2 | Metric::Dot => Ok(v.to_vec()),
    }
}

/// Validates a point id.
pub(crate) fn validate_id(id: &str, max_bytes: usize) -> Result<()> {
    if id.is_empty() {
        return Err(MemoryError::InvalidId("empty id".into()));
    }
    if id.len() > max_bytes {
        return Err(MemoryError::InvalidId(format!(
            "id is {} bytes, at most {max_bytes}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(MemoryError::InvalidId(
            "id contains control characters".into(),
        ));
    }
    Ok(())
}

struct VisibleFilter<'a> {
    coll: &'a Collection,
    now_ms: u64,
    filter: Option<&'a MetadataFilter>,
}

impl FilterT for VisibleFilter<'_> {
    fn hnsw_filter(&self, id: &usize) -> bool {
        self.coll.visible(*id, self.now_ms, self.filter)
    }
}

/// hnsw_rs' own search (reference path): without a user filter, dead points are
/// post-filtered with over-fetching as long as at most this many can be dead; beyond that
/// the filter runs inside hnsw_rs' search.
const MAX_OVERFETCH: usize = 64;

impl Collection {
    pub(crate) fn new(name: String, spec: CollectionSpec, created_ms: u64) -> Self {
        let indexer = start_indexer(&name, &spec, 0, 0);
        Collection {
            name,
            spec,
            created_ms,
            generation: 0,
            slots: Vec::new(),
            vectors: Vec::new(),
            traversal: Vec::new(),
            by_id: BTreeMap::new(),
            expiry: BTreeSet::new(),
            tombstones: 0,
            indexer,
            pending: None,
        }
    }

    pub(crate) fn spec(&self) -> &CollectionSpec {
        &self.spec
    }

    pub(crate) fn live_len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn graph_stats(&self) -> GraphStats {
        let copy = self.indexer.view().copy.unwrap_or_default();
        let (layer0_edges, top_layer, reachable) = copy.stats();
        GraphStats {
            slots: self.slots.len(),
            indexed: self.indexer.indexed(),
            copied_slots: copy.slots(),
            reachable,
            layer0_edges,
            top_layer,
        }
    }

    pub(crate) fn info(&self) -> CollectionInfo {
        CollectionInfo {
            name: self.name.clone(),
            spec: self.spec.clone(),
            live: self.by_id.len(),
            tombstones: self.tombstones,
            generation: self.generation,
            created_ms: self.created_ms,
            rebuilding: self.pending.is_some(),
            unindexed: self.indexer.backlog(),
        }
    }

    #[inline]
    pub(crate) fn vector(&self, slot: u32) -> &[f32] {
        let d = self.spec.dimension;
        let s = slot as usize * d;
        &self.vectors[s..s + d]
    }

    /// The bfloat16 copy of a slot's vector (see `traversal`).
    fn traversal_vector(&self, slot: u32) -> &[u16] {
        let d = self.spec.dimension;
        let s = slot as usize * d;
        &self.traversal[s..s + d]
    }

    /// Whether the graph search walks the bfloat16 copy.
    fn bf16_traversal(&self) -> bool {
        self.spec.dimension >= BF16_TRAVERSAL_MIN_DIMENSION
    }

    /// Appends a vector to the arena (and to the bfloat16 copy, if kept).
    fn push_vector(&mut self, v: &[f32]) {
        self.vectors.extend_from_slice(v);
        if self.bf16_traversal() {
            self.traversal.extend(v.iter().map(|&x| kernel::to_bf16(x)));
        }
    }

    pub(crate) fn slot_id(&self, slot: u32) -> &str {
        &self.slots[slot as usize].id
    }

    pub(crate) fn slot_of(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// Live ids in id order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_id.iter().map(|(k, v)| (k.as_str(), *v))
    }

    #[inline]
    fn visible(&self, slot: usize, now_ms: u64, filter: Option<&MetadataFilter>) -> bool {
        let Some(s) = self.slots.get(slot) else {
            return false;
        };
        s.live
            && s.expires_at_ms.is_none_or(|e| e > now_ms)
            && filter.is_none_or(|f| s.parsed.as_ref().is_some_and(|m| f.matches(m)))
    }

    pub(crate) fn get(&self, id: &str, now_ms: u64) -> Option<StoredPoint> {
        let slot = *self.by_id.get(id)?;
        if !self.visible(slot as usize, now_ms, None) {
            return None;
        }
        let s = &self.slots[slot as usize];
        Some(StoredPoint {
            id: s.id.clone(),
            vector: self.vector(slot).to_vec(),
            metadata: s.metadata.clone(),
            expires_at_ms: s.expires_at_ms,
            updated_ms: s.updated_ms,
        })
    }

    /// Validates a batch of writes without changing anything.
    pub(crate) fn prepare_upsert(
        &self,
        points: &[PointWrite],
        now_ms: u64,
        cfg: &StoreConfig,
    ) -> Result<Vec<PreparedPoint>> {
        if points.len() > cfg.max_batch {
            return Err(MemoryError::BatchTooLarge {
                size: points.len(),
                limit: cfg.max_batch,
            });
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(points.len());
        for p in points {
            validate_id(&p.id, cfg.max_id_bytes)?;
            if !seen.insert(p.id.as_str()) {
                return Err(MemoryError::DuplicateId(p.id.clone()));
            }
            let vector = prepare_vector(&p.vector, self.spec.dimension, self.spec.metric)?;
            let (metadata, parsed) = metadata::canonicalize(&p.metadata, cfg.max_metadata_bytes)?;
            let expires_at_ms = match p.ttl_ms {
                None => None,
                Some(0) => return Err(MemoryError::InvalidTtl("ttl_ms must be positive".into())),
                Some(t) => Some(now_ms.saturating_add(t)),
            };
            out.push(PreparedPoint {
                id: p.id.clone(),
                vector,
                metadata,
                parsed,
                expires_at_ms,
            });
        }
        Ok(out)
    }

    /// Applies prepared writes. Cannot fail.
    pub(crate) fn apply_upsert(&mut self, points: Vec<PreparedPoint>, now_ms: u64) -> UpsertStats {
        let mut stats = UpsertStats::default();
        let first_new = self.slots.len();
        for p in points {
            if let Some(&slot) = self.by_id.get(&p.id) {
                stats.replaced += 1;
                if self.vector(slot) == p.vector.as_slice() {
                    // Same vector: update in place, the graph is unchanged.
                    let s = &mut self.slots[slot as usize];
                    if let Some(e) = s.expires_at_ms {
                        self.expiry.remove(&(e, slot));
                    }
                    if let Some(e) = p.expires_at_ms {
                        self.expiry.insert((e, slot));
                    }
                    s.metadata = p.metadata;
                    s.parsed = Some(p.parsed);
                    s.expires_at_ms = p.expires_at_ms;
                    s.updated_ms = now_ms;
                    continue;
                }
                self.tombstone(slot);
            } else {
                stats.inserted += 1;
            }
            self.push_slot(p, now_ms);
        }
        let d = self.spec.dimension;
        self.indexer.push(&self.vectors[first_new * d..]);
        stats
    }

    /// Appends a point (the caller hands its vector to the indexer).
    fn push_slot(&mut self, p: PreparedPoint, now_ms: u64) {
        let slot = self.slots.len() as u32;
        self.push_vector(&p.vector);
        if let Some(e) = p.expires_at_ms {
            self.expiry.insert((e, slot));
        }
        self.by_id.insert(p.id.clone(), slot);
        self.slots.push(Slot {
            id: p.id,
            metadata: p.metadata,
            parsed: Some(p.parsed),
            expires_at_ms: p.expires_at_ms,
            updated_ms: now_ms,
            live: true,
        });
    }

    fn tombstone(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.live {
            return;
        }
        s.live = false;
        self.by_id.remove(&s.id);
        if let Some(e) = s.expires_at_ms.take() {
            self.expiry.remove(&(e, slot));
        }
        s.id = String::new();
        s.metadata = String::new();
        s.parsed = None;
        self.tombstones += 1;
    }

    /// Deletes ids; returns (deleted, missing) in request order.
    pub(crate) fn delete(&mut self, ids: &[String]) -> (u32, Vec<String>) {
        let mut deleted = 0;
        let mut missing = Vec::new();
        for id in ids {
            match self.by_id.get(id) {
                Some(&slot) => {
                    self.tombstone(slot);
                    deleted += 1;
                }
                None => missing.push(id.clone()),
            }
        }
        (deleted, missing)
    }

    /// The earliest expiry of a live point, if any point has a TTL.
    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|&(e, _)| e)
    }

    /// Tombstones every point whose expiry is `<= now_ms`; returns how many.
    pub(crate) fn purge_expired(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(&(e, slot)) = self.expiry.first() {
            if e > now_ms {
                break;
            }
            self.tombstone(slot);
            n += 1;
        }
        n
    }

    /// Starts a rebuild if tombstones exceed the configured threshold and none is under
    /// way. Returns whether it did.
    pub(crate) fn maybe_rebuild(&mut self, cfg: &StoreConfig) -> bool {
        let live = self.by_id.len();
        let t = self.tombstones;
        if t == 0 || self.pending.is_some() {
            return false;
        }
        if live == 0
            || (t >= cfg.rebuild_min_tombstones
                && t as f64 > cfg.rebuild_tombstone_ratio * live as f64)
        {
            self.start_rebuild();
            true
        } else {
            false
        }
    }

    /// Begins a rebuild of the graph from the live points, in slot order, dropping the
    /// tombstones: at once for at most [`INLINE_REBUILD_MAX_POINTS`] live points, else
    /// on a thread of its own ([`PendingRebuild`]). Returns the tombstones it drops (or
    /// will); 0 if a rebuild is already under way.
    pub(crate) fn start_rebuild(&mut self) -> usize {
        if self.pending.is_some() {
            return 0;
        }
        let removed = self.tombstones;
        let keep: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].live)
            .collect();
        let base = self.slots.len() as u32;
        let inline = keep.len() <= INLINE_REBUILD_MAX_POINTS;
        self.pending = Some(PendingRebuild {
            indexer: self.rebuild_indexer(&keep),
            base,
            keep,
        });
        if inline {
            self.finish_rebuild();
        }
        removed
    }

    /// An indexer for the graph of `keep`, renumbered 0, 1, …, with their vectors
    /// handed over; its first copy covers them all.
    fn rebuild_indexer(&self, keep: &[u32]) -> Indexer {
        let mut indexer = start_indexer(
            &format!("{}-g{}", self.name, self.generation + 1),
            &self.spec,
            keep.len(),
            keep.len(),
        );
        for part in keep.chunks(4096) {
            indexer.push(&self.vectors_of(part));
        }
        indexer
    }

    /// The vectors of `slots`, in order, slot-major (what a rebuild builds from).
    fn vectors_of(&self, slots: &[u32]) -> Vec<f32> {
        let mut vectors = Vec::with_capacity(slots.len() * self.spec.dimension);
        for &s in slots {
            vectors.extend_from_slice(self.vector(s));
        }
        vectors
    }

    /// Whether a rebuild is under way and its build has finished (the leader then
    /// proposes [`crate::MemoryOp::FinishRebuild`]).
    pub(crate) fn rebuild_ready(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.indexer.caught_up())
    }

    /// Whether a rebuild is under way.
    pub(crate) fn rebuilding(&self) -> bool {
        self.pending.is_some()
    }

    /// The generation of the collection.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Swaps in the graph of the rebuild under way: the slots it kept, renumbered in
    /// order, then the live slots written since it began, handed to its indexer now.
    /// Tombstones made since it began stay tombstones. Does not wait: a replica whose
    /// build is behind scans exactly until it has its first copy. Returns the tombstones
    /// dropped; 0 if no rebuild is under way.
    pub(crate) fn finish_rebuild(&mut self) -> usize {
        let Some(p) = self.pending.take() else {
            return 0;
        };
        let d = self.spec.dimension;
        let mut indexer = p.indexer;
        let old_slots = std::mem::take(&mut self.slots);
        let old_vectors = std::mem::take(&mut self.vectors);
        let old_len = old_slots.len();
        let mut old_slots: Vec<Option<Slot>> = old_slots.into_iter().map(Some).collect();
        let since: Vec<u32> = (p.base..old_len as u32)
            .filter(|&s| old_slots[s as usize].as_ref().is_some_and(|s| s.live))
            .collect();
        let order: Vec<u32> = p.keep.iter().copied().chain(since).collect();
        self.traversal = Vec::new();
        self.by_id.clear();
        self.expiry.clear();
        self.tombstones = 0;
        self.generation += 1;
        self.vectors.reserve(order.len() * d);
        if self.bf16_traversal() {
            self.traversal.reserve(order.len() * d);
        }
        for (new, &old) in order.iter().enumerate() {
            let v = &old_vectors[old as usize * d..(old as usize + 1) * d];
            self.push_vector(v);
            let Some(s) = old_slots[old as usize].take() else {
                continue;
            };
            let slot = new as u32;
            if s.live {
                if let Some(e) = s.expires_at_ms {
                    self.expiry.insert((e, slot));
                }
                self.by_id.insert(s.id.clone(), slot);
            } else {
                self.tombstones += 1;
            }
            self.slots.push(s);
        }
        indexer.push(&self.vectors[p.keep.len() * d..]);
        // The old graph's thread stops when its indexer drops here.
        self.indexer = indexer;
        old_len - order.len()
    }

    /// The rebuild under way, for the snapshot.
    pub(crate) fn rebuild_record(&self) -> Option<RebuildRecord> {
        self.pending.as_ref().map(|p| RebuildRecord {
            base: p.base as u64,
            keep: p.keep.clone(),
        })
    }

    /// Starts again the rebuild a snapshot recorded (checked against the slots).
    pub(crate) fn resume_rebuild(&mut self, rec: RebuildRecord) -> Result<()> {
        let bad = |m: &str| {
            Err(MemoryError::InvalidSnapshot(format!(
                "collection `{}`: rebuild under way: {m}",
                self.name
            )))
        };
        if self.pending.is_some() {
            return bad("recorded twice");
        }
        if rec.base > self.slots.len() as u64 {
            return bad("begins past the last slot");
        }
        if rec.keep.windows(2).any(|w| w[0] >= w[1]) || rec.keep.last() >= Some(&(rec.base as u32))
        {
            return bad("kept slots out of order or out of range");
        }
        self.pending = Some(PendingRebuild {
            indexer: self.rebuild_indexer(&rec.keep),
            base: rec.base as u32,
            keep: rec.keep,
        });
        Ok(())
    }

    /// The latest graph copy this replica's indexer has taken past the one in use: the
    /// leader names it in a [`crate::MemoryOp::AdvanceIndex`].
    pub(crate) fn ready_copy(&self) -> Option<usize> {
        self.indexer.latest_ready()
    }

    /// Whether `slots` is a copy point after the copy in use (what an
    /// [`crate::MemoryOp::AdvanceIndex`] may name); the same answer on every replica.
    pub(crate) fn valid_copy(&self, slots: usize) -> bool {
        let target = self.indexer.target();
        slots > target && slots <= self.slots.len() && is_copy_point_after(target, slots)
    }

    /// Searches use the copy at `slots` from now on (see [`Collection::valid_copy`]).
    pub(crate) fn advance_index(&self, slots: usize) {
        self.indexer.advance(slots);
    }

    /// Waits until this replica's searches use the graph copy the log names, so that a
    /// write that searches (consolidation) sees what every replica sees.
    pub(crate) fn wait_for_copy(&self) {
        if !self.indexer.wait_caught_up() {
            tracing::error!(
                collection = %self.name,
                "graph copy unreachable: searching exactly (replicas may disagree)"
            );
        }
    }

    /// Points handed to the indexer and not yet in the graph.
    pub(crate) fn index_backlog(&self) -> usize {
        self.indexer.backlog()
    }

    /// Waits until every point handed to the indexer (and to a rebuild's) is inserted.
    pub(crate) fn wait_indexed(&self) {
        self.indexer.wait_indexed();
        if let Some(p) = &self.pending {
            p.indexer.wait_indexed();
        }
    }

    /// Approximate k-NN over visible points. `query` must be prepared (validated and, for
    /// cosine, normalised). Returns (slot, index distance), closest first, ties by slot.
    ///
    /// Searches the flat graph copy (filter applied during the traversal), scans the slots
    /// inserted since the copy exactly, and falls back to an exact scan if that yields
    /// fewer than `k` visible points.
    pub(crate) fn search_slots(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&MetadataFilter>,
        now_ms: u64,
    ) -> Vec<(u32, f32)> {
        let live = self.by_id.len();
        if live == 0 || k == 0 {
            return Vec::new();
        }
        let Some(flat) = self.indexer.view().copy else {
            // This replica has not taken the copy the log names yet.
            return self.exact_slots(query, k, filter, now_ms);
        };
        let ef = ef.max(k);
        let filter = filter.filter(|f| !f.all.is_empty());
        let metric = self.spec.metric.index_distance();
        let bounded =
            |q: &[f32], slot: u32, bound: f32| metric.eval_bounded(q, self.vector(slot), bound);
        // The walk compares bfloat16 copies; the beam's nodes are then ranked again by
        // their exact distances (below).
        let approx = |q: &[f32], slots: &[u32], bound: f32| {
            let mut vs: [&[u16]; BATCH] = [&[]; BATCH];
            for (v, &s) in vs.iter_mut().zip(slots) {
                *v = self.traversal_vector(s);
            }
            metric.eval_bounded_batch(q, &vs[..slots.len()], bound)
        };
        let exact = |q: &[f32], slots: &[u32], bound: f32| {
            let mut vs: [&[f32]; BATCH] = [&[]; BATCH];
            for (v, &s) in vs.iter_mut().zip(slots) {
                *v = self.vector(s);
            }
            metric.eval_bounded_batch(q, &vs[..slots.len()], bound)
        };
        // Without a filter, tombstones or anything expired, every slot is visible: the
        // search then never reads slot records (a cache miss per node otherwise).
        let all_visible = filter.is_none()
            && self.tombstones == 0
            && self.expiry.first().is_none_or(|&(e, _)| e > now_ms);
        let visible = |slot: u32| all_visible || self.visible(slot as usize, now_ms, filter);
        let prefetch = |slot: u32, components: usize| {
            let v = self.traversal_vector(slot);
            kernel::prefetch(&v[..components.min(v.len())]);
        };
        let offer = |heap: &mut BinaryHeap<Cand>, c: Cand| {
            if heap.len() < k {
                heap.push(c);
            } else if heap.peek().is_some_and(|top| c < *top) {
                heap.pop();
                heap.push(c);
            }
        };
        let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
        if self.bf16_traversal() {
            let mut beam = flat.search(query, ef, approx, visible, prefetch);
            // Exact distances for the beam, approximately closest first so that the k-th
            // best tightens early and the rest mostly stop at the first bound check. A
            // distance above the bound is never below the heap's worst, as for the tail.
            beam.sort_unstable();
            let slots: Vec<u32> = beam.iter().map(|c| c.1).collect();
            for batch in slots.chunks(BATCH) {
                let bound = if heap.len() < k {
                    f32::INFINITY
                } else {
                    heap.peek().map_or(f32::INFINITY, |top| top.0)
                };
                let ds = exact(query, batch, bound);
                for (&slot, &d) in batch.iter().zip(&ds) {
                    offer(&mut heap, Cand(d, slot));
                }
            }
        } else {
            let prefetch = |slot: u32, components: usize| {
                let v = self.vector(slot);
                kernel::prefetch(&v[..components.min(v.len())]);
            };
            // Short vectors come from cache; the one-vector kernel (same bits) is faster
            // there than the interleaved one.
            let one_by_one = |q: &[f32], slots: &[u32], bound: f32| {
                let mut out = [0f32; BATCH];
                for (o, &s) in out.iter_mut().zip(slots) {
                    *o = metric.eval_bounded(q, self.vector(s), bound);
                }
                out
            };
            for c in flat.search(query, ef, one_by_one, visible, prefetch) {
                offer(&mut heap, c);
            }
        }
        // The tail not yet in the copy: keep the k best of graph results and tail.
        for slot in flat.slots()..self.slots.len() {
            let slot = slot as u32;
            if !visible(slot) {
                continue;
            }
            // A node at exactly the bound still competes on its slot number, and the
            // bounded distance is exact up to the bound.
            let bound = if heap.len() < k {
                f32::INFINITY
            } else {
                heap.peek().map_or(f32::INFINITY, |top| top.0)
            };
            offer(&mut heap, Cand(bounded(query, slot, bound), slot));
        }
        let hits: Vec<(u32, f32)> = heap
            .into_sorted_vec()
            .into_iter()
            .map(|c| (c.1, c.0))
            .collect();
        self.or_exact(hits, query, k, live, filter, now_ms)
    }

    /// The same query through hnsw_rs' own `search`/`search_filter` on the same graph —
    /// the reference path the flat search is measured against. Same output shape.
    pub(crate) fn search_slots_hnsw_rs(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&MetadataFilter>,
        now_ms: u64,
    ) -> Vec<(u32, f32)> {
        let live = self.by_id.len();
        if live == 0 || k == 0 {
            return Vec::new();
        }
        let ef = ef.max(k);
        let filter = filter.filter(|f| !f.all.is_empty());
        // Upper bound on graph nodes that are invisible without a user filter.
        let expired = self
            .expiry
            .range(..(now_ms.saturating_add(1), 0))
            .take(MAX_OVERFETCH + 1)
            .count();
        let dead = self.tombstones.saturating_add(expired);
        let vis = VisibleFilter {
            coll: self,
            now_ms,
            filter,
        };
        let neighbours = if filter.is_none() && dead == 0 {
            self.indexer.graph().search(query, k, ef)
        } else if filter.is_none() && dead <= MAX_OVERFETCH {
            let kk = k + dead;
            self.indexer.graph().search(query, kk, ef.max(kk))
        } else {
            self.indexer.graph().search_filter(query, k, ef, Some(&vis))
        };
        let mut hits: Vec<(u32, f32)> = neighbours
            .iter()
            .filter(|n| vis.hnsw_filter(&n.d_id))
            .map(|n| (n.d_id as u32, n.distance))
            .collect();
        hits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        hits.dedup_by_key(|h| h.0);
        hits.truncate(k);
        self.or_exact(hits, query, k, live, filter, now_ms)
    }

    /// `hits` of a graph search, or the exact answer when the graph found fewer than `k`
    /// of the `live` points: either fewer than `k` match, or the search could not reach
    /// them (HNSW graphs are not guaranteed connected, and a selective filter can strand
    /// the beam). Settled by brute force.
    fn or_exact(
        &self,
        hits: Vec<(u32, f32)>,
        query: &[f32],
        k: usize,
        live: usize,
        filter: Option<&MetadataFilter>,
        now_ms: u64,
    ) -> Vec<(u32, f32)> {
        if hits.len() < k && hits.len() < live {
            let exact = self.exact_slots(query, k, filter, now_ms);
            if exact.len() > hits.len() {
                return exact;
            }
        }
        hits
    }

    /// Exact k-NN by brute force over visible points; same output shape as `search_slots`.
    pub(crate) fn exact_slots(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&MetadataFilter>,
        now_ms: u64,
    ) -> Vec<(u32, f32)> {
        if k == 0 {
            return Vec::new();
        }
        let dist = self.spec.metric.index_distance();
        let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
        for slot in 0..self.slots.len() {
            if !self.visible(slot, now_ms, filter) {
                continue;
            }
            // Exact up to the current k-th distance, which is all the heap compares.
            let bound = if heap.len() < k {
                f32::INFINITY
            } else {
                heap.peek().map_or(f32::INFINITY, |top| top.0)
            };
            let d = dist.eval_bounded(query, self.vector(slot as u32), bound);
            let c = Cand(d, slot as u32);
            if heap.len() < k {
                heap.push(c);
            } else if let Some(top) = heap.peek() {
                if c < *top {
                    heap.pop();
                    heap.push(c);
                }
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(|c| (c.1, c.0))
            .collect()
    }

    /// Turns (slot, _) results into hits with user-facing distances, ordered by distance
    /// then id.
    pub(crate) fn to_hits(&self, query: &[f32], slots: &[(u32, f32)]) -> Vec<SearchHit> {
        let mut hits: Vec<SearchHit> = slots
            .iter()
            .map(|(slot, _)| {
                let s = &self.slots[*slot as usize];
                SearchHit {
                    id: s.id.clone(),
                    distance: self.spec.metric.distance(query, self.vector(*slot)),
                    metadata: s.metadata.clone(),
                }
            })
            .collect();
        hits.sort_by(|a, b| {
            a.distance
                .total_cmp(&b.distance)
                .then_with(|| a.id.cmp(&b.id))
        });
        hits
    }

    pub(crate) fn to_record(&self) -> CollectionRecord {
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotRecord {
                id: s.id.clone(),
                vector: self.vector(i as u32).to_vec(),
                metadata: s.metadata.clone(),
                expires_at_ms: s.expires_at_ms,
                updated_ms: s.updated_ms,
                live: s.live,
            })
            .collect();
        CollectionRecord {
            name: self.name.clone(),
            spec: self.spec.clone(),
            created_ms: self.created_ms,
            generation: self.generation,
            slots,
            flat_slots: self.indexer.target() as u64,
        }
    }

    /// Rebuilds a collection from its record. Every slot (tombstones too) is handed to
    /// the indexer in order, which reproduces the graph of the replica the record was
    /// taken from and takes its copy at the same point; searches scan exactly until then.
    pub(crate) fn from_record(rec: CollectionRecord, cfg: &StoreConfig) -> Result<Collection> {
        let bad =
            |m: String| MemoryError::InvalidSnapshot(format!("collection `{}`: {m}", rec.name));
        rec.spec.validate(cfg).map_err(|e| bad(e.to_string()))?;
        let d = rec.spec.dimension;
        let mut c = Collection {
            name: rec.name.clone(),
            spec: rec.spec.clone(),
            created_ms: rec.created_ms,
            generation: rec.generation,
            slots: Vec::with_capacity(rec.slots.len()),
            vectors: Vec::with_capacity(rec.slots.len().saturating_mul(d)),
            traversal: Vec::new(),
            by_id: BTreeMap::new(),
            expiry: BTreeSet::new(),
            tombstones: 0,
            indexer: start_indexer(
                &rec.name,
                &rec.spec,
                rec.slots.len(),
                rec.flat_slots.min(rec.slots.len() as u64) as usize,
            ),
            pending: None,
        };
        if rec.slots.len() > u32::MAX as usize {
            return Err(bad("too many slots".into()));
        }
        if rec.flat_slots > rec.slots.len() as u64 {
            return Err(bad("flat graph covers more slots than exist".into()));
        }
        for (i, s) in rec.slots.into_iter().enumerate() {
            if s.vector.len() != d {
                return Err(bad(format!("slot {i} has dimension {}", s.vector.len())));
            }
            if s.vector.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("slot {i} has a non-finite component")));
            }
            let norm_sq: f64 = s.vector.iter().map(|x| (*x as f64) * (*x as f64)).sum();
            if norm_sq > MAX_NORM_SQUARED || (rec.spec.metric == Metric::Cosine && norm_sq == 0.0) {
                return Err(bad(format!("slot {i} has an invalid norm")));
            }
            let slot = i as u32;
            let parsed = if s.live {
                validate_id(&s.id, cfg.max_id_bytes).map_err(|e| bad(e.to_string()))?;
                let (canonical, parsed) =
                    metadata::canonicalize(&s.metadata, cfg.max_metadata_bytes)
                        .map_err(|e| bad(e.to_string()))?;
                if canonical != s.metadata {
                    return Err(bad(format!("slot {i} metadata is not canonical")));
                }
                if c.by_id.insert(s.id.clone(), slot).is_some() {
                    return Err(bad(format!("duplicate live id `{}`", s.id)));
                }
                if let Some(e) = s.expires_at_ms {
                    c.expiry.insert((e, slot));
                }
                Some(parsed)
            } else {
                c.tombstones += 1;
                None
            };
            c.push_vector(&s.vector);
            let live = s.live;
            c.slots.push(Slot {
                id: if live { s.id } else { String::new() },
                metadata: if live { s.metadata } else { String::new() },
                parsed,
                expires_at_ms: if live { s.expires_at_ms } else { None },
                updated_ms: s.updated_ms,
                live,
            });
        }
        c.indexer.push(&c.vectors);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_vector_rejects_bad_input() {
        assert_eq!(
            prepare_vector(&[1.0, 2.0], 3, Metric::L2)
                .unwrap_err()
                .code(),
            "dimension_mismatch"
        );
        assert_eq!(
            prepare_vector(&[f32::NAN, 0.0], 2, Metric::L2)
                .unwrap_err()
                .code(),
            "invalid_vector"
        );
        assert_eq!(
            prepare_vector(&[f32::INFINITY, 0.0], 2, Metric::Dot)
                .unwrap_err()
                .code(),
            "invalid_vector"
        );
        assert_eq!(
            prepare_vector(&[0.0, 0.0], 2, Metric::Cosine)
                .unwrap_err()
                .code(),
            "invalid_vector"
        );
        assert!(prepare_vector(&[0.0, 0.0], 2, Metric::L2).is_ok());
        assert_eq!(
            prepare_vector(&[3e38, 3e38], 2, Metric::L2)
                .unwrap_err()
                .code(),
            "invalid_vector"
        );
        let v = prepare_vector(&[1e-30, 1e-30], 2, Metric::Cosine).unwrap();
        assert!((kernel::norm_squared(&v) - 1.0).abs() < 1e-6);
    }

    /// Waits for the indexer, names its latest copy (as the leader would) and returns it.
    fn caught_up(c: &Collection) -> std::sync::Arc<FlatGraph> {
        loop {
            c.wait_indexed();
            if let Some(slots) = c.ready_copy() {
                assert!(c.valid_copy(slots));
                c.advance_index(slots);
            }
            if c.index_backlog() == 0 && c.ready_copy().is_none() {
                break;
            }
        }
        c.wait_for_copy();
        c.indexer.view().copy.expect("caught up")
    }

    /// Points `p0, p1, …` with the given vectors, no metadata, no TTL.
    fn points(vectors: &[Vec<f32>]) -> Vec<PointWrite> {
        vectors
            .iter()
            .enumerate()
            .map(|(i, v)| PointWrite {
                id: format!("p{i}"),
                vector: v.clone(),
                metadata: String::new(),
                ttl_ms: None,
            })
            .collect()
    }

    /// hnsw_rs lists a point under layers above its own (see `FlatGraph::extract`); the
    /// flat copy keeps the layering: only nodes on a layer, linked to nodes on it.
    #[test]
    fn flat_copy_keeps_nodes_on_their_layers() {
        let data = crate::synthetic::gaussian_clusters(3000, 0, 32, 10, 0.5, 5);
        let cfg = StoreConfig::default();
        let mut c = Collection::new("c".into(), CollectionSpec::new(32, Metric::L2), 0);
        let points = points(&data.base);
        let prepared = c.prepare_upsert(&points, 1, &cfg).unwrap();
        c.apply_upsert(prepared, 1);
        let flat = caught_up(&c);
        assert_eq!(flat.slots(), 2944, "the last copy point below 3000");
        let (_, top, reachable) = flat.stats();
        assert!(top >= 1, "3000 points with M = 16 reach layer 1");
        assert_eq!(reachable, 2944);
        // What hnsw_rs itself lists out of layer: the case the copy must filter.
        let misfiled = c
            .indexer
            .graph()
            .get_point_indexation()
            .into_iter()
            .filter(|p| {
                let level = p.get_point_id().0 as usize;
                p.get_neighborhood_id()
                    .iter()
                    .enumerate()
                    .any(|(layer, ns)| layer > level && !ns.is_empty())
            })
            .count();
        assert!(
            misfiled > 0,
            "hnsw_rs no longer misfiles lists; revisit extract"
        );
        assert_eq!(flat.layering_violations(c.indexer.graph()), 0);
    }

    /// The bounded L2 distance (early exit), one vector at a time or in batches, and the
    /// prefetch hints change nothing: the graph search returns the same (distance, slot)
    /// bits as with full distances, and the exact scan the same as a plain brute force.
    #[test]
    fn bounded_distances_give_identical_searches() {
        let data = crate::synthetic::gaussian_clusters(1500, 40, 200, 10, 0.5, 11);
        let cfg = StoreConfig::default();
        let mut c = Collection::new("c".into(), CollectionSpec::new(200, Metric::L2), 0);
        let points = points(&data.base);
        for chunk in points.chunks(500) {
            let prepared = c.prepare_upsert(chunk, 1, &cfg).unwrap();
            c.apply_upsert(prepared, 1);
        }
        let flat = caught_up(&c);
        let metric = c.spec.metric.index_distance();
        let early_exits = std::cell::Cell::new(0);
        for q in &data.queries {
            for ef in [10, 32] {
                // Full distances; one vector at a time with a bound; batches with a bound.
                let full = |q: &[f32], slots: &[u32], _bound: f32| {
                    let mut out = [0f32; BATCH];
                    for (o, &s) in out.iter_mut().zip(slots) {
                        *o = metric.eval_portable(q, c.vector(s));
                    }
                    out
                };
                let single = |q: &[f32], slots: &[u32], bound: f32| {
                    let mut out = [0f32; BATCH];
                    for (o, &s) in out.iter_mut().zip(slots) {
                        *o = metric.eval_bounded(q, c.vector(s), bound);
                    }
                    out
                };
                let bounded = |q: &[f32], slots: &[u32], bound: f32| {
                    let vs: Vec<&[f32]> = slots.iter().map(|&s| c.vector(s)).collect();
                    let out = metric.eval_bounded_batch(q, &vs, bound);
                    for (k, &s) in slots.iter().enumerate() {
                        let one = metric.eval_bounded(q, c.vector(s), bound);
                        assert_eq!(out[k].to_bits(), one.to_bits(), "batch = one at a time");
                        if one.to_bits() != metric.eval_portable(q, c.vector(s)).to_bits() {
                            early_exits.set(early_exits.get() + 1);
                        }
                    }
                    out
                };
                let visible = |s: u32| c.visible(s as usize, 1, None);
                let mut want = flat.search(q, ef, full, visible, |_, _| {});
                let mut one = flat.search(q, ef, single, visible, |_, _| {});
                let mut got = flat.search(q, ef, bounded, visible, |_, _| {});
                want.sort_unstable();
                one.sort_unstable();
                got.sort_unstable();
                let bits = |v: &[Cand]| v.iter().map(|c| (c.0.to_bits(), c.1)).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&want), "ef={ef}");
                assert_eq!(bits(&got), bits(&want), "ef={ef}");
            }
            let mut brute: Vec<(u32, f32)> = (0..c.slots.len() as u32)
                .map(|s| (s, metric.eval_portable(q, c.vector(s))))
                .collect();
            brute.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            brute.truncate(10);
            let exact = c.exact_slots(q, 10, None, 1);
            assert_eq!(
                exact
                    .iter()
                    .map(|h| (h.0, h.1.to_bits()))
                    .collect::<Vec<_>>(),
                brute
                    .iter()
                    .map(|h| (h.0, h.1.to_bits()))
                    .collect::<Vec<_>>()
            );
        }
        assert!(early_exits.get() > 0, "the bound was never used");
    }
}
