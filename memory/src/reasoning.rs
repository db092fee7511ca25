//! ReasoningBank: a store of distilled strategy items ("patterns") with retrieval that
//! blends similarity, recency and confidence, MMR diversification, outcome judging and
//! consolidation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::collection::{
    prepare_vector, Collection, CollectionRecord, CollectionSpec, Metric, PreparedPoint,
};
use crate::error::{MemoryError, Result};
use crate::kernel;
use crate::metadata::{MetaMap, MetadataFilter, Scalar};
use crate::store::StoreConfig;

/// Name of the internal collection that indexes pattern embeddings.
pub const PATTERN_COLLECTION: &str = "_patterns";

/// Outcome of a task, and the polarity of an item distilled from one.
///
/// In JSON it is `"success"` or `"failure"`, as everywhere else in the API and in the
/// patterns file agents read; `"Success"` and `"Failure"` (what the API wrote before) are
/// still read. Binary encodings (postcard) name variants by index and are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The task succeeded ("what worked").
    #[serde(alias = "Success")]
    Success,
    /// The task failed ("what to avoid").
    #[serde(alias = "Failure")]
    Failure,
}

impl Outcome {
    /// `success` or `failure`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }

    /// Parses `success`/`failure` (also `ok`/`succeeded`, `failed`/`error`), case-insensitive.
    pub fn parse(s: &str) -> Option<Outcome> {
        match s.trim().to_ascii_lowercase().as_str() {
            "success" | "succeeded" | "ok" | "worked" => Some(Outcome::Success),
            "failure" | "failed" | "fail" | "error" => Some(Outcome::Failure),
            _ => None,
        }
    }

    fn opposite(self) -> Outcome {
        match self {
            Outcome::Success => Outcome::Failure,
            Outcome::Failure => Outcome::Success,
        }
    }
}

/// A pattern to add: a distilled item plus its embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewPattern {
    /// Short title.
    pub title: String,
    /// One-line description (newlines and other control characters become spaces).
    pub description: String,
    /// The strategy text itself.
    pub content: String,
    /// Embedding of the item (pattern-bank dimension); normalised on the way in.
    pub embedding: Vec<f32>,
    /// The task it was distilled from.
    pub source_task: Option<u64>,
    /// Whether it came from a success ("what worked") or a failure ("what to avoid").
    pub outcome: Outcome,
}

/// A stored pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryItem {
    /// Id assigned at insertion (`pat-` + a 12-digit sequence number).
    pub id: String,
    /// Short title.
    pub title: String,
    /// One-line description.
    pub description: String,
    /// The strategy text.
    pub content: String,
    /// The task it was distilled from.
    pub source_task: Option<u64>,
    /// Polarity.
    pub outcome: Outcome,
    /// Posterior mean of the Beta(prior_alpha + successes, prior_beta + failures).
    pub confidence: f64,
    /// Number of judged tasks that used it.
    pub use_count: u64,
    /// How many of those succeeded.
    pub success_count: u64,
    /// How many of those failed.
    pub failure_count: u64,
    /// `now_ms` of the op that added it (the earliest, after merges).
    pub created_ms: u64,
    /// `now_ms` of the last judge that used it.
    pub last_used_ms: Option<u64>,
    /// Ids of similar items with the opposite outcome, sorted.
    pub contradicts: Vec<String>,
    /// Number of near-duplicates merged into this one.
    pub merged_count: u64,
}

impl MemoryItem {
    fn evidence(&self) -> u64 {
        self.success_count + self.failure_count
    }
}

/// Beta posterior mean with a prior.
pub fn beta_confidence(successes: u64, failures: u64, prior_alpha: f64, prior_beta: f64) -> f64 {
    (prior_alpha + successes as f64)
        / (prior_alpha + prior_beta + successes as f64 + failures as f64)
}

/// Tunables of [`crate::MemoryStore::retrieve`]. The defaults favour relevance:
/// similarity dominates, recency and confidence break near-ties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieveParams {
    /// Number of HNSW candidates to score (default `max(4k, 16)`).
    pub candidates: Option<usize>,
    /// HNSW ef (default `max(candidates, pattern ef_search)`).
    pub ef: Option<usize>,
    /// Weight of cosine similarity.
    pub w_similarity: f64,
    /// Weight of recency `0.5^(age / half_life)`, age since last use (or creation).
    pub w_recency: f64,
    /// Weight of confidence.
    pub w_confidence: f64,
    /// Recency half-life in ms (> 0).
    pub recency_half_life_ms: u64,
    /// MMR trade-off in [0, 1]: 1 = pure score ranking, lower = more diversity.
    pub mmr_lambda: f64,
    /// Candidates less similar than this are dropped.
    pub min_similarity: f64,
    /// Candidates scoring below this are dropped.
    pub min_score: f64,
    /// Only items of this outcome (applied during the graph search).
    pub outcome: Option<Outcome>,
}

impl Default for RetrieveParams {
    fn default() -> Self {
        RetrieveParams {
            candidates: None,
            ef: None,
            w_similarity: 0.75,
            w_recency: 0.10,
            w_confidence: 0.15,
            recency_half_life_ms: 14 * 24 * 3600 * 1000,
            mmr_lambda: 0.7,
            min_similarity: 0.0,
            min_score: 0.0,
            outcome: None,
        }
    }
}

impl RetrieveParams {
    fn validate(&self, cfg: &StoreConfig) -> Result<()> {
        let bad = |m: &str| Err(MemoryError::InvalidParams(m.to_string()));
        for (name, w) in [
            ("w_similarity", self.w_similarity),
            ("w_recency", self.w_recency),
            ("w_confidence", self.w_confidence),
        ] {
            if !w.is_finite() || w < 0.0 {
                return bad(&format!("{name} must be finite and >= 0"));
            }
        }
        if self.recency_half_life_ms == 0 {
            return bad("recency_half_life_ms must be > 0");
        }
        if !(0.0..=1.0).contains(&self.mmr_lambda) {
            return bad("mmr_lambda must be in [0, 1]");
        }
        if !self.min_similarity.is_finite() || !self.min_score.is_finite() {
            return bad("min_similarity and min_score must be finite");
        }
        if let Some(c) = self.candidates {
            let max = cfg.max_k.saturating_mul(4);
            if c == 0 || c > max {
                return bad(&format!("candidates must be between 1 and {max}"));
            }
        }
        if let Some(ef) = self.ef {
            if ef == 0 || ef > cfg.max_ef {
                return Err(MemoryError::InvalidEf {
                    ef,
                    max: cfg.max_ef,
                });
            }
        }
        Ok(())
    }
}

/// One retrieval result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievedItem {
    /// The item.
    pub item: MemoryItem,
    /// Cosine similarity to the query.
    pub similarity: f64,
    /// Recency factor in (0, 1].
    pub recency: f64,
    /// Weighted relevance score.
    pub score: f64,
    /// MMR objective when it was selected (`λ·score − (1−λ)·max sim to earlier picks`).
    pub mmr_score: f64,
}

/// Tunables of consolidation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsolidateParams {
    /// Same-outcome items at least this similar are merged (cosine, in (0, 1]).
    pub duplicate_similarity: f32,
    /// Opposite-outcome items at least this similar are flagged as contradicting.
    pub contradiction_similarity: f32,
    /// Neighbours examined per item (1..=256).
    pub neighbours: usize,
    /// Items idle (since last use, or creation) at least this long may be pruned...
    pub prune_idle_ms: u64,
    /// ...if used at most this many times...
    pub prune_max_uses: u64,
    /// ...and their confidence is at most this.
    pub prune_max_confidence: f64,
}

impl Default for ConsolidateParams {
    fn default() -> Self {
        ConsolidateParams {
            duplicate_similarity: 0.95,
            contradiction_similarity: 0.85,
            neighbours: 10,
            prune_idle_ms: 30 * 24 * 3600 * 1000,
            prune_max_uses: 2,
            prune_max_confidence: 0.5,
        }
    }
}

impl ConsolidateParams {
    pub(crate) fn validate(&self) -> Result<()> {
        let ok = |x: f32| x.is_finite() && x > 0.0 && x <= 1.0;
        if !ok(self.duplicate_similarity) || !ok(self.contradiction_similarity) {
            return Err(MemoryError::InvalidParams(
                "similarity thresholds must be in (0, 1]".into(),
            ));
        }
        if self.neighbours == 0 || self.neighbours > 256 {
            return Err(MemoryError::InvalidParams(
                "neighbours must be between 1 and 256".into(),
            ));
        }
        if !self.prune_max_confidence.is_finite() {
            return Err(MemoryError::InvalidParams(
                "prune_max_confidence must be finite".into(),
            ));
        }
        Ok(())
    }
}

/// One merge performed by consolidation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// The surviving item.
    pub kept: String,
    /// The item merged into it and removed.
    pub removed: String,
    /// Their cosine similarity.
    pub similarity: f32,
}

/// What consolidation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsolidationReport {
    /// Merges, in the order performed.
    pub merged: Vec<MergeRecord>,
    /// Newly flagged contradicting pairs `(a, b)` with `a < b`.
    pub contradictions: Vec<(String, String)>,
    /// Pruned ids, in id order.
    pub pruned: Vec<String>,
}

/// Serialized form of the bank (part of the snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BankRecord {
    pub index: CollectionRecord,
    pub items: Vec<MemoryItem>,
    pub next_seq: u64,
}

/// Validated pattern ready to apply.
#[derive(Debug, Clone)]
pub(crate) struct PreparedPattern {
    title: String,
    description: String,
    content: String,
    vector: Vec<f32>,
    source_task: Option<u64>,
    outcome: Outcome,
}

pub(crate) struct ReasoningBank {
    index: Collection,
    items: BTreeMap<String, MemoryItem>,
    next_seq: u64,
}

impl std::fmt::Debug for ReasoningBank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReasoningBank")
            .field("items", &self.items.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

fn outcome_meta(o: Outcome) -> (String, MetaMap) {
    let mut m = MetaMap::new();
    m.insert(
        "outcome".into(),
        serde_json::Value::String(o.as_str().into()),
    );
    (format!("{{\"outcome\":\"{}\"}}", o.as_str()), m)
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

pub(crate) fn pattern_spec(cfg: &StoreConfig) -> CollectionSpec {
    CollectionSpec {
        dimension: cfg.pattern_dimension,
        metric: Metric::Cosine,
        m: cfg.pattern_m,
        ef_construction: cfg.pattern_ef_construction,
        ef_search: cfg.pattern_ef_search,
    }
}

impl ReasoningBank {
    pub(crate) fn new(cfg: &StoreConfig) -> Self {
        ReasoningBank {
            index: Collection::new(PATTERN_COLLECTION.to_string(), pattern_spec(cfg), 0),
            items: BTreeMap::new(),
            next_seq: 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn get(&self, id: &str) -> Option<&MemoryItem> {
        self.items.get(id)
    }

    pub(crate) fn items(&self) -> impl Iterator<Item = &MemoryItem> {
        self.items.values()
    }

    pub(crate) fn embedding(&self, id: &str) -> Option<&[f32]> {
        self.index.slot_of(id).map(|s| self.index.vector(s))
    }

    /// The pattern index.
    pub(crate) fn index(&self) -> &Collection {
        &self.index
    }

    /// The pattern index, to finish a background rebuild of it.
    pub(crate) fn index_mut(&mut self) -> &mut Collection {
        &mut self.index
    }

    pub(crate) fn index_info(&self) -> crate::collection::CollectionInfo {
        self.index.info()
    }

    pub(crate) fn prepare_add(
        &self,
        items: &[NewPattern],
        cfg: &StoreConfig,
    ) -> Result<Vec<PreparedPattern>> {
        if items.len() > cfg.max_batch {
            return Err(MemoryError::BatchTooLarge {
                size: items.len(),
                limit: cfg.max_batch,
            });
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, p) in items.iter().enumerate() {
            let title = one_line(&p.title);
            let description = one_line(&p.description);
            let bad = |m: String| Err(MemoryError::InvalidPattern(format!("item {i}: {m}")));
            if title.is_empty() {
                return bad("empty title".into());
            }
            if p.content.trim().is_empty() {
                return bad("empty content".into());
            }
            if title.len() > cfg.max_pattern_title_bytes {
                return bad(format!(
                    "title longer than {} bytes",
                    cfg.max_pattern_title_bytes
                ));
            }
            if description.len() > cfg.max_pattern_title_bytes * 4 {
                return bad(format!(
                    "description longer than {} bytes",
                    cfg.max_pattern_title_bytes * 4
                ));
            }
            if p.content.len() > cfg.max_pattern_content_bytes {
                return bad(format!(
                    "content longer than {} bytes",
                    cfg.max_pattern_content_bytes
                ));
            }
            let vector = prepare_vector(&p.embedding, cfg.pattern_dimension, Metric::Cosine)?;
            out.push(PreparedPattern {
                title,
                description,
                content: p.content.clone(),
                vector,
                source_task: p.source_task,
                outcome: p.outcome,
            });
        }
        Ok(out)
    }

    pub(crate) fn apply_add(
        &mut self,
        items: Vec<PreparedPattern>,
        now_ms: u64,
        cfg: &StoreConfig,
    ) -> Vec<String> {
        let mut ids = Vec::with_capacity(items.len());
        let mut points = Vec::with_capacity(items.len());
        for p in items {
            let id = format!("pat-{:012}", self.next_seq);
            self.next_seq += 1;
            let (metadata, parsed) = outcome_meta(p.outcome);
            points.push(PreparedPoint {
                id: id.clone(),
                vector: p.vector,
                metadata,
                parsed,
                expires_at_ms: None,
            });
            self.items.insert(
                id.clone(),
                MemoryItem {
                    id: id.clone(),
                    title: p.title,
                    description: p.description,
                    content: p.content,
                    source_task: p.source_task,
                    outcome: p.outcome,
                    confidence: beta_confidence(0, 0, cfg.prior_alpha, cfg.prior_beta),
                    use_count: 0,
                    success_count: 0,
                    failure_count: 0,
                    created_ms: now_ms,
                    last_used_ms: None,
                    contradicts: Vec::new(),
                    merged_count: 0,
                },
            );
            ids.push(id);
        }
        self.index.apply_upsert(points, now_ms);
        if self.items.len() > cfg.max_patterns {
            self.evict(cfg);
        }
        ids
    }

    /// Bring the bank down to nine tenths of `max_patterns` (so eviction, which sorts
    /// the bank, runs once per tenth of it added): the items unused the longest go first,
    /// then the least confident, then the oldest ids. Deterministic.
    fn evict(&mut self, cfg: &StoreConfig) {
        let keep = cfg.max_patterns - cfg.max_patterns / 10;
        let mut order: Vec<(u64, f64, &String)> = self
            .items
            .values()
            .map(|i| (i.last_used_ms.unwrap_or(i.created_ms), i.confidence, &i.id))
            .collect();
        order.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then_with(|| a.2.cmp(b.2))
        });
        let evict: Vec<String> = order
            .iter()
            .take(self.items.len().saturating_sub(keep))
            .map(|(_, _, id)| (*id).clone())
            .collect();
        self.delete(&evict, cfg);
    }

    /// Records a task outcome against the items it used. Returns (updated, missing).
    pub(crate) fn judge(
        &mut self,
        item_ids: &[String],
        outcome: Outcome,
        now_ms: u64,
        cfg: &StoreConfig,
    ) -> (Vec<String>, Vec<String>) {
        let unique: BTreeSet<&String> = item_ids.iter().collect();
        let mut updated = Vec::new();
        let mut missing = Vec::new();
        for id in unique {
            match self.items.get_mut(id) {
                Some(item) => {
                    item.use_count += 1;
                    match outcome {
                        Outcome::Success => item.success_count += 1,
                        Outcome::Failure => item.failure_count += 1,
                    }
                    item.confidence = beta_confidence(
                        item.success_count,
                        item.failure_count,
                        cfg.prior_alpha,
                        cfg.prior_beta,
                    );
                    item.last_used_ms = Some(item.last_used_ms.map_or(now_ms, |t| t.max(now_ms)));
                    updated.push(id.clone());
                }
                None => missing.push(id.clone()),
            }
        }
        (updated, missing)
    }

    pub(crate) fn delete(&mut self, ids: &[String], cfg: &StoreConfig) -> (u32, Vec<String>) {
        let mut present = Vec::new();
        let mut missing = Vec::new();
        for id in ids {
            if self.items.remove(id).is_some() {
                present.push(id.clone());
            } else {
                missing.push(id.clone());
            }
        }
        let (deleted, _) = self.index.delete(&present);
        self.clean_contradicts();
        self.index.maybe_rebuild(cfg);
        (deleted, missing)
    }

    fn clean_contradicts(&mut self) {
        let live: BTreeSet<String> = self.items.keys().cloned().collect();
        for item in self.items.values_mut() {
            item.contradicts.retain(|c| live.contains(c));
        }
    }

    pub(crate) fn retrieve(
        &self,
        query: &[f32],
        k: usize,
        now_ms: u64,
        params: &RetrieveParams,
        cfg: &StoreConfig,
    ) -> Result<Vec<RetrievedItem>> {
        if k == 0 || k > cfg.max_k {
            return Err(MemoryError::InvalidK { k, max: cfg.max_k });
        }
        params.validate(cfg)?;
        let q = prepare_vector(query, cfg.pattern_dimension, Metric::Cosine)?;
        let n_cand = params.candidates.unwrap_or((4 * k).max(16)).max(k);
        let ef = params.ef.unwrap_or(n_cand.max(cfg.pattern_ef_search));
        let filter = params
            .outcome
            .map(|o| MetadataFilter::eq("outcome", Scalar::Str(o.as_str().into())));
        let slots = self
            .index
            .search_slots(&q, n_cand, ef, filter.as_ref(), now_ms);

        struct Cand<'a> {
            item: &'a MemoryItem,
            slot: u32,
            similarity: f64,
            recency: f64,
            score: f64,
        }
        let mut cands: Vec<Cand> = Vec::with_capacity(slots.len());
        for (slot, _) in slots {
            let Some(item) = self.items.get(self.index.slot_id(slot)) else {
                continue;
            };
            let similarity = (kernel::dot(&q, self.index.vector(slot)) as f64).clamp(-1.0, 1.0);
            if similarity < params.min_similarity {
                continue;
            }
            let last = item
                .last_used_ms
                .unwrap_or(item.created_ms)
                .max(item.created_ms);
            let age = now_ms.saturating_sub(last) as f64;
            let recency = 0.5f64.powf(age / params.recency_half_life_ms as f64);
            let score = params.w_similarity * similarity
                + params.w_recency * recency
                + params.w_confidence * item.confidence;
            if score < params.min_score {
                continue;
            }
            cands.push(Cand {
                item,
                slot,
                similarity,
                recency,
                score,
            });
        }
        cands.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.item.id.cmp(&b.item.id))
        });

        // MMR: greedily pick argmax λ·score − (1−λ)·max_sim_to_picked.
        let lambda = params.mmr_lambda;
        let mut max_sim = vec![f64::NEG_INFINITY; cands.len()];
        let mut taken = vec![false; cands.len()];
        let mut out = Vec::with_capacity(k.min(cands.len()));
        while out.len() < k {
            let mut best: Option<(usize, f64)> = None;
            for (i, c) in cands.iter().enumerate() {
                if taken[i] {
                    continue;
                }
                let penalty = if max_sim[i].is_finite() {
                    max_sim[i]
                } else {
                    0.0
                };
                let mmr = lambda * c.score - (1.0 - lambda) * penalty;
                // Candidates are in (score desc, id) order, so strict > keeps ties stable.
                if best.is_none_or(|(_, b)| mmr > b) {
                    best = Some((i, mmr));
                }
            }
            let Some((pick, mmr)) = best else { break };
            taken[pick] = true;
            let pv = self.index.vector(cands[pick].slot);
            for (i, c) in cands.iter().enumerate() {
                if !taken[i] {
                    let s = kernel::dot(pv, self.index.vector(c.slot)) as f64;
                    if s > max_sim[i] {
                        max_sim[i] = s;
                    }
                }
            }
            let c = &cands[pick];
            out.push(RetrievedItem {
                item: c.item.clone(),
                similarity: c.similarity,
                recency: c.recency,
                score: c.score,
                mmr_score: mmr,
            });
        }
        Ok(out)
    }

    /// Whether `a` is better evidenced than `b` (the one kept on merge).
    fn better(a: &MemoryItem, b: &MemoryItem) -> bool {
        a.evidence()
            .cmp(&b.evidence())
            .then(a.confidence.total_cmp(&b.confidence))
            .then(a.use_count.cmp(&b.use_count))
            .then(b.created_ms.cmp(&a.created_ms))
            .then(b.id.cmp(&a.id))
            .is_gt()
    }

    pub(crate) fn consolidate(
        &mut self,
        params: &ConsolidateParams,
        now_ms: u64,
        cfg: &StoreConfig,
    ) -> ConsolidationReport {
        let mut report = ConsolidationReport::default();
        let threshold = params
            .duplicate_similarity
            .min(params.contradiction_similarity);
        // 1. Candidate pairs (a < b) from each item's graph neighbours, similarity exact.
        let mut pairs: BTreeMap<(String, String), f32> = BTreeMap::new();
        let kk = params.neighbours + 1;
        let ef = (2 * kk).max(cfg.pattern_ef_search);
        // The searches below decide what this write does: they must run on the graph copy
        // every replica uses, not on how far this replica's indexer has got.
        self.index.wait_for_copy();
        for (id, slot) in self.index.ids() {
            let v = self.index.vector(slot);
            for (other, _) in self.index.search_slots(v, kk, ef, None, now_ms) {
                if other == slot {
                    continue;
                }
                let sim = kernel::dot(v, self.index.vector(other));
                if sim < threshold {
                    continue;
                }
                let oid = self.index.slot_id(other);
                let key = if id < oid {
                    (id.to_string(), oid.to_string())
                } else {
                    (oid.to_string(), id.to_string())
                };
                pairs.insert(key, sim);
            }
        }
        // 2. Merge same-outcome near-duplicates, most similar pairs first.
        let mut dups: Vec<(&(String, String), f32)> = pairs
            .iter()
            .filter(|(_, s)| **s >= params.duplicate_similarity)
            .map(|(k, s)| (k, *s))
            .collect();
        dups.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(y.0)));
        let mut removed: BTreeSet<String> = BTreeSet::new();
        for ((a, b), sim) in dups {
            if removed.contains(a) || removed.contains(b) {
                continue;
            }
            let (Some(ia), Some(ib)) = (self.items.get(a), self.items.get(b)) else {
                continue;
            };
            if ia.outcome != ib.outcome {
                continue;
            }
            let (keep, drop) = if Self::better(ia, ib) { (a, b) } else { (b, a) };
            let Some(gone) = self.items.get(drop).cloned() else {
                continue;
            };
            if let Some(k) = self.items.get_mut(keep) {
                k.success_count += gone.success_count;
                k.failure_count += gone.failure_count;
                k.use_count += gone.use_count;
                k.merged_count += 1 + gone.merged_count;
                k.created_ms = k.created_ms.min(gone.created_ms);
                k.last_used_ms = match (k.last_used_ms, gone.last_used_ms) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    (x, y) => x.or(y),
                };
                k.confidence = beta_confidence(
                    k.success_count,
                    k.failure_count,
                    cfg.prior_alpha,
                    cfg.prior_beta,
                );
                let mut c: BTreeSet<String> = k.contradicts.iter().cloned().collect();
                c.extend(gone.contradicts.iter().cloned());
                c.remove(keep);
                k.contradicts = c.into_iter().collect();
            }
            removed.insert(drop.clone());
            report.merged.push(MergeRecord {
                kept: keep.clone(),
                removed: drop.clone(),
                similarity: sim,
            });
        }
        for id in &removed {
            self.items.remove(id);
        }
        // 3. Prune old, little-used, low-confidence items.
        for item in self.items.values() {
            let last = item
                .last_used_ms
                .unwrap_or(item.created_ms)
                .max(item.created_ms);
            if now_ms.saturating_sub(last) >= params.prune_idle_ms
                && item.use_count <= params.prune_max_uses
                && item.confidence <= params.prune_max_confidence
            {
                report.pruned.push(item.id.clone());
            }
        }
        for id in &report.pruned {
            self.items.remove(id);
            removed.insert(id.clone());
        }
        // 4. Flag contradictions among survivors.
        for ((a, b), sim) in &pairs {
            if *sim < params.contradiction_similarity {
                continue;
            }
            let (Some(oa), Some(ob)) = (
                self.items.get(a).map(|i| i.outcome),
                self.items.get(b).map(|i| i.outcome),
            ) else {
                continue;
            };
            if oa.opposite() != ob {
                continue;
            }
            let mut newly = false;
            for (x, y) in [(a, b), (b, a)] {
                if let Some(item) = self.items.get_mut(x) {
                    if let Err(pos) = item.contradicts.binary_search(y) {
                        item.contradicts.insert(pos, y.clone());
                        newly = true;
                    }
                }
            }
            if newly {
                report.contradictions.push((a.clone(), b.clone()));
            }
        }
        self.clean_contradicts();
        let removed: Vec<String> = removed.into_iter().collect();
        self.index.delete(&removed);
        self.index.maybe_rebuild(cfg);
        report
    }

    pub(crate) fn to_record(&self) -> BankRecord {
        BankRecord {
            index: self.index.to_record(),
            items: self.items.values().cloned().collect(),
            next_seq: self.next_seq,
        }
    }

    pub(crate) fn from_record(rec: BankRecord, cfg: &StoreConfig) -> Result<Self> {
        let bad = |m: String| MemoryError::InvalidSnapshot(format!("pattern bank: {m}"));
        if rec.index.spec != pattern_spec(cfg) {
            return Err(bad("index spec does not match the store config".into()));
        }
        if rec.index.name != PATTERN_COLLECTION {
            return Err(bad(format!(
                "its index is named {:?}, not {PATTERN_COLLECTION:?}",
                rec.index.name
            )));
        }
        let index = Collection::from_record(rec.index, cfg)?;
        let mut items = BTreeMap::new();
        for item in rec.items {
            if index.slot_of(&item.id).is_none() {
                return Err(bad(format!("item `{}` has no embedding", item.id)));
            }
            if !item.confidence.is_finite() {
                return Err(bad(format!(
                    "item `{}` has a non-finite confidence",
                    item.id
                )));
            }
            let id = item.id.clone();
            if items.insert(id.clone(), item).is_some() {
                return Err(bad(format!("duplicate item `{id}`")));
            }
        }
        if items.len() != index.live_len() {
            return Err(bad("embeddings without items".into()));
        }
        Ok(ReasoningBank {
            index,
            items,
            next_seq: rec.next_seq,
        })
    }
}

#[cfg(test)]
mod outcome_json {
    use super::Outcome;

    #[test]
    fn outcomes_are_lower_case_in_json_and_the_old_names_still_read() {
        assert_eq!(
            serde_json::to_string(&Outcome::Success).unwrap(),
            r#""success""#
        );
        assert_eq!(
            serde_json::to_string(&Outcome::Failure).unwrap(),
            r#""failure""#
        );
        for (text, want) in [
            (r#""success""#, Outcome::Success),
            (r#""Success""#, Outcome::Success),
            (r#""failure""#, Outcome::Failure),
            (r#""Failure""#, Outcome::Failure),
        ] {
            assert_eq!(serde_json::from_str::<Outcome>(text).unwrap(), want);
        }
        assert!(serde_json::from_str::<Outcome>(r#""SUCCESS""#).is_err());
    }
}
