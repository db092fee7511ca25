//! Vector memory and the ReasoningBank inside the coordinator.
//!
//! The [`swarm_memory::MemoryStore`] is the second state machine of every replica (next
//! to the task table): writes are [`Op::Memory`] entries in the Raft log, so they are
//! durable, replicated and in every snapshot; reads (search, retrieve, list) are served
//! from the local replica without a Raft round trip.
//!
//! * Clients (`/v1/memory/*`, `/v1/patterns/*`, served by `http/memory.rs`): request
//!   bodies become memory ops, reads come from the local replica; refusals are
//!   [`MemError`]s.
//! * Workers: a task submitted with `patterns: k` makes its worker send `Retrieve` over
//!   its QUIC session before running the agent; [`retrieve_for_worker`] embeds the task's
//!   payload text with the configured embedder and answers from the local replica.
//! * After a task's result commits, [`after_result`] judges the patterns the agent was
//!   given against the outcome ([`MemoryOp::PatternJudge`]) and, when enabled, distils the
//!   task into new patterns ([`MemoryOp::PatternAdd`]).
//!
//! Embedding ([`EmbedderConfig`]): the built-in hashing embedder (default) or an
//! OpenAI-compatible endpoint. Texts are always embedded *before* an op is proposed, so
//! a failed embedding writes nothing (`embedder_unavailable`). The pattern
//! bank's dimension is [`StoreConfig::pattern_dimension`], part of the replicated state:
//! a new replica is created with the embedder's dimension, the data dir records it
//! ([`pin_pattern_dimension`]) so a restart with another embedder fails at startup, and
//! every pattern embedding checks the replica's dimension first
//! (`embedder_dimension_mismatch`), which covers state that arrives later (a snapshot
//! from the leader, a restore).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;
use swarm_memory::{
    embed_items, CollectionInfo, CollectionSpec, ConsolidateParams, Distiller, Embedder,
    HashEmbedder, HttpEmbedder, HttpEmbedderConfig, MemoryOp, MetadataFilter, Metric, NewPattern,
    OpOutcome, Outcome as PatternOutcome, PointWrite, RetrieveParams, RetrievedItem, SearchHit,
    SearchRequest, StoreConfig, TaskSummary,
};
use swarm_proto::worker::PatternHit;
use tracing::{debug, warn};

use crate::commit::CommitError;
use crate::node::{now_ms, Node};
use crate::state::{MemoryFault, Op, OpResult};

/// How finished tasks become patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DistillMode {
    /// Only `memory_items` an agent returns in its JSON result.
    #[default]
    AgentItems,
    /// Agent items, plus one rule-based item per finished task.
    Rules,
    /// Agent items, plus items an OpenAI-compatible chat endpoint writes.
    Llm(LlmDistillSettings),
    /// Nothing is distilled.
    Off,
}

/// Settings of [`DistillMode::Llm`].
#[derive(Clone, PartialEq, Eq)]
pub struct LlmDistillSettings {
    /// Base URL (`/v1/chat/completions` is appended as needed).
    pub base_url: String,
    /// Model name sent with every request.
    pub model: String,
    /// Bearer token, if the endpoint wants one (never printed by `Debug`).
    pub api_key: Option<String>,
    /// Most distillation requests in flight at once; the results beyond that wait in
    /// the replicated outbox (see [`distill_loop`]).
    pub concurrency: usize,
}

impl fmt::Debug for LlmDistillSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmDistillSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// What turns texts into vectors: pattern texts, `text` points, search and retrieval
/// queries. Every node of a cluster must use the same embedder (at least the same
/// dimension: it is the pattern bank's, which is replicated state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EmbedderConfig {
    /// The built-in deterministic hashing embedder (offline, 256 dimensions).
    #[default]
    Hash,
    /// An OpenAI-compatible `POST {base_url}/v1/embeddings` endpoint.
    Http(HttpEmbedderSettings),
}

/// Settings of [`EmbedderConfig::Http`].
#[derive(Clone, PartialEq, Eq)]
pub struct HttpEmbedderSettings {
    /// Base URL (`/v1/embeddings` is appended as needed).
    pub base_url: String,
    /// Model name sent with every request.
    pub model: String,
    /// Bearer token, if the endpoint wants one (never printed by `Debug`).
    pub api_key: Option<String>,
    /// Dimension of the model's vectors; answers of another dimension are refused.
    pub dimension: usize,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl fmt::Debug for HttpEmbedderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEmbedderSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("dimension", &self.dimension)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EmbedderConfig {
    /// Dimension of every vector the embedder returns.
    pub fn dimension(&self) -> usize {
        match self {
            EmbedderConfig::Hash => HashEmbedder::default().dimension(),
            EmbedderConfig::Http(h) => h.dimension,
        }
    }

    /// For log lines and error messages.
    pub fn describe(&self) -> String {
        match self {
            EmbedderConfig::Hash => format!("the hash embedder ({} dimensions)", self.dimension()),
            EmbedderConfig::Http(h) => format!(
                "the http embedder `{}` at {} ({} dimensions)",
                h.model, h.base_url, h.dimension
            ),
        }
    }

    fn build(&self) -> anyhow::Result<Arc<dyn Embedder>> {
        Ok(match self {
            EmbedderConfig::Hash => Arc::new(HashEmbedder::default()),
            EmbedderConfig::Http(h) => {
                let mut cfg =
                    HttpEmbedderConfig::new(h.base_url.clone(), h.model.clone(), h.dimension);
                cfg.api_key = h.api_key.clone();
                cfg.timeout = h.timeout;
                Arc::new(HttpEmbedder::new(cfg).map_err(|e| anyhow::anyhow!("{e}"))?)
            }
        })
    }
}

/// File in the Raft directory recording the pattern dimension this replica was created
/// with.
const PATTERN_DIMENSION_FILE: &str = "pattern-dimension";

/// The memory store config of a new replica in `raft_dir`: the default one with the
/// embedder's pattern dimension. Fails if the replica in `raft_dir` was created with
/// another pattern dimension (recorded in a file next to the Raft log; a Raft directory
/// from before that file existed was created with the hash embedder's 256). Call before
/// the Raft log is opened (which creates the directory).
pub(crate) fn pin_pattern_dimension(
    raft_dir: &Path,
    embedder: &EmbedderConfig,
) -> anyhow::Result<StoreConfig> {
    let dimension = embedder.dimension();
    let store = StoreConfig {
        pattern_dimension: dimension,
        ..StoreConfig::default()
    };
    store
        .validate()
        .map_err(|e| anyhow::anyhow!("embedder dimension {dimension}: {e}"))?;
    let path = raft_dir.join(PATTERN_DIMENSION_FILE);
    let recorded =
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text.trim().parse::<usize>().with_context(|| {
                format!("{} does not hold a dimension: {text:?}", path.display())
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let has_state = std::fs::read_dir(raft_dir)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                has_state.then_some(StoreConfig::default().pattern_dimension)
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
    match recorded {
        Some(r) if r != dimension => bail!(
            "this node's ReasoningBank holds {r}-dimensional pattern embeddings, but it was \
             started with {}; start it with an embedder of dimension {r} \
             (--embedder/--embedder-dimension), or give it a new --data-dir",
            embedder.describe()
        ),
        Some(_) if path.exists() => {}
        _ => {
            std::fs::create_dir_all(raft_dir)
                .with_context(|| format!("create {}", raft_dir.display()))?;
            let tmp = raft_dir.join(format!("{PATTERN_DIMENSION_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, format!("{dimension}\n").as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(raft_dir)?.sync_all()
            };
            write().with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(store)
}

/// Fails if the replica's pattern dimension (from a snapshot) is not the embedder's.
pub(crate) fn check_replica_dimension(
    replica: &StoreConfig,
    embedder: &EmbedderConfig,
) -> anyhow::Result<()> {
    let p = replica.pattern_dimension;
    if p != embedder.dimension() {
        bail!(
            "the replicated ReasoningBank has pattern dimension {p}, but this node was started \
             with {}; every node of a cluster needs an embedder of dimension {p}",
            embedder.describe()
        );
    }
    Ok(())
}

/// What the coordinator uses to embed and distil.
pub(crate) struct MemoryService {
    embedder: Arc<dyn Embedder>,
    /// [`EmbedderConfig::describe`], for errors.
    embedder_name: String,
    distillers: Vec<Box<dyn Distiller>>,
    /// Bounds the remote (LLM) distiller's requests in flight.
    remote: Option<tokio::sync::Semaphore>,
}

impl MemoryService {
    pub(crate) fn new(
        mode: &DistillMode,
        embedder: &EmbedderConfig,
    ) -> anyhow::Result<MemoryService> {
        let mut distillers: Vec<Box<dyn Distiller>> = Vec::new();
        if *mode != DistillMode::Off {
            distillers.push(Box::new(swarm_memory::AgentItemsDistiller));
        }
        let mut remote = None;
        match mode {
            DistillMode::Rules => distillers.push(Box::new(swarm_memory::RuleDistiller)),
            DistillMode::Llm(llm) => {
                anyhow::ensure!(
                    llm.concurrency > 0,
                    "LLM distiller: concurrency must be positive"
                );
                let mut cfg =
                    swarm_memory::LlmDistillerConfig::new(llm.base_url.clone(), llm.model.clone());
                cfg.api_key = llm.api_key.clone();
                distillers.push(Box::new(
                    swarm_memory::LlmDistiller::new(cfg)
                        .map_err(|e| anyhow::anyhow!("LLM distiller: {e}"))?,
                ));
                remote = Some(tokio::sync::Semaphore::new(llm.concurrency));
            }
            _ => {}
        }
        Ok(MemoryService {
            embedder: embedder.build().context("embedder")?,
            embedder_name: embedder.describe(),
            distillers,
            remote,
        })
    }
}

/// Why texts could not be embedded.
#[derive(Debug)]
pub enum EmbedError {
    /// The embedder failed or answered something unusable.
    Unavailable(String),
    /// The embedder's dimension is not the replica's pattern dimension.
    DimensionMismatch(String),
}

impl EmbedError {
    /// The stable code: `embedder_unavailable` or `embedder_dimension_mismatch`.
    pub fn code(&self) -> &'static str {
        match self {
            EmbedError::Unavailable(_) => "embedder_unavailable",
            EmbedError::DimensionMismatch(_) => "embedder_dimension_mismatch",
        }
    }

    /// What went wrong, without the code.
    pub fn message(&self) -> &str {
        match self {
            EmbedError::Unavailable(m) | EmbedError::DimensionMismatch(m) => m,
        }
    }
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for EmbedError {}

/// Embeds `texts` with the configured embedder: one vector of its dimension per text.
async fn embed_texts(node: &Node, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    let service = node.memory_service();
    let dimension = service.embedder.dimension();
    let vectors = service
        .embedder
        .embed(texts)
        .await
        .map_err(|e| EmbedError::Unavailable(format!("{}: {e}", service.embedder_name)))?;
    if vectors.len() != texts.len() {
        return Err(EmbedError::Unavailable(format!(
            "{} returned {} vectors for {} texts",
            service.embedder_name,
            vectors.len(),
            texts.len()
        )));
    }
    if let Some(v) = vectors.iter().find(|v| v.len() != dimension) {
        return Err(EmbedError::Unavailable(format!(
            "{} returned a vector of dimension {}, expected {dimension}",
            service.embedder_name,
            v.len()
        )));
    }
    Ok(vectors)
}

/// Fails unless the embedder's vectors fit this replica's pattern bank.
fn check_pattern_dimension(node: &Node) -> Result<(), EmbedError> {
    let service = node.memory_service();
    let bank = node.table.memory(|m| m.config().pattern_dimension);
    if bank != service.embedder.dimension() {
        return Err(EmbedError::DimensionMismatch(format!(
            "the ReasoningBank's patterns have dimension {bank}, but this node embeds with {}; \
             restart it with an embedder of dimension {bank}",
            service.embedder_name
        )));
    }
    Ok(())
}

/// [`embed_texts`] for the pattern bank: checks the dimension first.
async fn embed_for_patterns(node: &Node, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
    check_pattern_dimension(node)?;
    embed_texts(node, texts).await
}

/// Why a memory or ReasoningBank request was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The store refused it, with its code (`unknown_collection`, `collection_exists`,
    /// `metadata_too_large`, ...).
    #[error("{}", .0.message)]
    Fault(MemoryFault),
    /// The texts could not be embedded; nothing was written.
    #[error("{}", .0.message())]
    Embed(#[from] EmbedError),
    /// Not now: the collection's indexer is behind; nothing was written.
    #[error("{0}")]
    Unavailable(String),
    /// Not committed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A result this code does not expect.
    #[error("{0}")]
    Internal(String),
}

impl From<swarm_memory::MemoryError> for MemError {
    fn from(e: swarm_memory::MemoryError) -> Self {
        MemError::Fault(MemoryFault::from(e))
    }
}

/// Commit one memory op of a client request and return what it did.
async fn write(node: &Node, op: MemoryOp) -> Result<OpOutcome, MemError> {
    write_op(node, op, true).await
}

/// Commit one memory op the coordinator proposes itself (sweeps, index advances).
async fn write_own(node: &Node, op: MemoryOp) -> Result<OpOutcome, MemError> {
    write_op(node, op, false).await
}

async fn write_op(node: &Node, op: MemoryOp, client: bool) -> Result<OpOutcome, MemError> {
    // Refuse what would be refused anyway before it takes a log entry.
    node.table.memory(|m| m.validate(&op))?;
    let ops = vec![Op::Memory(op)];
    let r = if client {
        node.propose_client(ops).await
    } else {
        node.propose(ops).await
    }
    .map_err(|e| CommitError::from_propose(node, e))?;
    match r.into_iter().next() {
        Some(OpResult::Memory(Ok(o))) => Ok(o),
        Some(OpResult::Memory(Err(f))) => Err(MemError::Fault(f)),
        other => Err(MemError::Internal(format!(
            "unexpected memory result {other:?}"
        ))),
    }
}

fn parse_metric(s: &str) -> Result<Metric, MemError> {
    match s.to_ascii_lowercase().as_str() {
        "cosine" => Ok(Metric::Cosine),
        "l2" | "euclidean" => Ok(Metric::L2),
        "dot" | "ip" => Ok(Metric::Dot),
        other => Err(MemError::Invalid(format!(
            "unknown metric {other:?}: one of cosine, l2, dot"
        ))),
    }
}

fn parse_outcome(s: &str) -> Result<PatternOutcome, MemError> {
    PatternOutcome::parse(s).ok_or_else(|| {
        MemError::Invalid(format!("outcome must be `success` or `failure`, got {s:?}"))
    })
}

/// `PUT /v1/memory/{collection}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCollection {
    dimension: usize,
    #[serde(default = "default_metric")]
    metric: String,
    m: Option<usize>,
    ef_construction: Option<usize>,
    ef_search: Option<usize>,
}

fn default_metric() -> String {
    "cosine".into()
}

/// Create collection `name`; returns its description.
pub(crate) async fn create_collection(
    node: &Node,
    name: String,
    c: CreateCollection,
) -> Result<CollectionInfo, MemError> {
    let mut spec = CollectionSpec::new(c.dimension, parse_metric(&c.metric)?);
    if let Some(m) = c.m {
        spec.m = m;
    }
    if let Some(e) = c.ef_construction {
        spec.ef_construction = e;
    }
    if let Some(e) = c.ef_search {
        spec.ef_search = e;
    }
    write(
        node,
        MemoryOp::CreateCollection {
            name: name.clone(),
            spec,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(node.table.memory(|m| m.collection_info(&name))?)
}

/// Every collection of this replica.
pub(crate) fn list_collections(node: &Node) -> Vec<CollectionInfo> {
    node.table.memory(|m| m.list_collections())
}

/// Collection `name` on this replica.
pub(crate) fn get_collection(node: &Node, name: &str) -> Result<CollectionInfo, MemError> {
    Ok(node.table.memory(|m| m.collection_info(name))?)
}

/// Drop collection `name`.
pub(crate) async fn drop_collection(node: &Node, name: String) -> Result<OpOutcome, MemError> {
    write(
        node,
        MemoryOp::DropCollection {
            name,
            now_ms: now_ms(),
        },
    )
    .await
}

/// One point of an upsert: a vector, or a text the configured embedder turns into one
/// (only for collections of its dimension).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PointIn {
    id: String,
    vector: Option<Vec<f32>>,
    text: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    ttl_ms: Option<u64>,
}

/// `POST /v1/memory/{collection}/points` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpsertBody {
    points: Vec<PointIn>,
}

/// A given vector, or the text to embed into one.
enum VectorIn {
    Given(Vec<f32>),
    Text(String),
}

fn vector_in(vector: Option<Vec<f32>>, text: Option<String>) -> Result<VectorIn, MemError> {
    match (vector, text) {
        (Some(v), None) => Ok(VectorIn::Given(v)),
        (None, Some(t)) => Ok(VectorIn::Text(t)),
        _ => Err(MemError::Invalid(
            "give either `vector` or `text` (embedded by the configured embedder)".into(),
        )),
    }
}

/// Write points into collection `name`, embedding the texts first (a failed embedding
/// writes nothing).
pub(crate) async fn upsert(
    node: &Node,
    name: String,
    b: UpsertBody,
) -> Result<OpOutcome, MemError> {
    let mut points = Vec::with_capacity(b.points.len());
    // Texts to embed, and the points they belong to: embedded in one call, after every
    // point passed the checks here and before anything is proposed.
    let mut texts = Vec::new();
    let mut text_points = Vec::new();
    for (i, p) in b.points.into_iter().enumerate() {
        let vector = match vector_in(p.vector, p.text)
            .map_err(|e| MemError::Invalid(format!("points[{i}]: {e}")))?
        {
            VectorIn::Given(v) => v,
            VectorIn::Text(t) => {
                texts.push(t);
                text_points.push(i);
                Vec::new()
            }
        };
        let metadata = match p.metadata {
            None | Some(Value::Null) => "{}".to_string(),
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(_) => {
                return Err(MemError::Invalid(format!(
                    "points[{i}]: metadata must be a JSON object"
                )))
            }
        };
        points.push(PointWrite {
            id: p.id,
            vector,
            metadata,
            ttl_ms: p.ttl_ms,
        });
    }
    let vectors = embed_texts(node, &texts).await?;
    for (i, v) in text_points.into_iter().zip(vectors) {
        points[i].vector = v;
    }
    wait_for_indexer(node, &name).await?;
    write(
        node,
        MemoryOp::Upsert {
            collection: name,
            points,
            now_ms: now_ms(),
        },
    )
    .await
}

/// Most points of a collection written but not yet inserted into its graph on this node
/// before upserts to it are held: every search scans that tail exactly, so the tail bounds
/// a search's cost (50,000 × 384 dimensions: about 10 ms on one core here), and the
/// indexer holds a copy of those vectors.
const MAX_INDEX_BACKLOG: usize = 50_000;
/// Longest an upsert is held for the indexer before it is refused.
const INDEX_WAIT: Duration = Duration::from_secs(10);

/// Holds an upsert while the collection's index backlog exceeds [`MAX_INDEX_BACKLOG`]
/// (writes arrive faster than one core inserts them into the graph); refused
/// ([`MemError::Unavailable`]) after [`INDEX_WAIT`], nothing committed. An unknown
/// collection passes (the write reports it).
async fn wait_for_indexer(node: &Node, collection: &str) -> Result<(), MemError> {
    let backlog = || {
        node.table
            .memory(|m| m.index_backlog(collection))
            .unwrap_or(0)
    };
    if backlog() <= MAX_INDEX_BACKLOG {
        return Ok(());
    }
    metrics::counter!("swarm_memory_upserts_held_total").increment(1);
    let deadline = tokio::time::Instant::now() + INDEX_WAIT;
    loop {
        let n = backlog();
        if n <= MAX_INDEX_BACKLOG {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(MemError::Unavailable(format!(
                "collection `{collection}` has {n} points not yet indexed (limit \
                 {MAX_INDEX_BACKLOG}); retry later"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /v1/memory/{collection}/delete` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteBody {
    ids: Vec<String>,
}

/// Delete points of collection `name`.
pub(crate) async fn delete_points(
    node: &Node,
    name: String,
    b: DeleteBody,
) -> Result<OpOutcome, MemError> {
    write(
        node,
        MemoryOp::Delete {
            collection: name,
            ids: b.ids,
            now_ms: now_ms(),
        },
    )
    .await
}

/// `POST /v1/memory/{collection}/search` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchBody {
    vector: Option<Vec<f32>>,
    text: Option<String>,
    #[serde(default = "default_k")]
    k: usize,
    ef: Option<usize>,
    /// `{"field": value}` (all must equal) or `{"field": [v1, v2]}` (one of).
    filter: Option<Value>,
    /// Exact brute-force search instead of HNSW (for checking recall).
    #[serde(default)]
    exact: bool,
}

fn default_k() -> usize {
    10
}

/// Search collection `name` on this replica (a text query is embedded first).
pub(crate) async fn search(
    node: &Node,
    name: &str,
    b: SearchBody,
) -> Result<Vec<SearchHit>, MemError> {
    let vector = vector_in(b.vector, b.text)?;
    let filter = match &b.filter {
        None | Some(Value::Null) => None,
        Some(v) => Some(MetadataFilter::from_json(v)?),
    };
    let vector = match vector {
        VectorIn::Given(v) => v,
        VectorIn::Text(t) => embed_texts(node, &[t])
            .await?
            .pop()
            .ok_or_else(|| MemError::Internal("no vector for the query".into()))?,
    };
    let req = SearchRequest {
        vector,
        k: b.k,
        ef: b.ef,
        filter,
        now_ms: now_ms(),
    };
    Ok(node.table.memory(|m| {
        if b.exact {
            m.search_exact(name, &req)
        } else {
            m.search(name, &req)
        }
    })?)
}

/// `POST /v1/patterns` body: patterns to add (embedded by the configured embedder).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddPatterns {
    items: Vec<PatternIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatternIn {
    title: String,
    #[serde(default)]
    description: String,
    content: String,
    outcome: String,
    source_task: Option<u64>,
}

/// Add patterns to the ReasoningBank, embedded first (a failed embedding writes nothing).
pub(crate) async fn add_patterns(node: &Node, b: AddPatterns) -> Result<OpOutcome, MemError> {
    let outcomes = b
        .items
        .iter()
        .map(|p| parse_outcome(&p.outcome))
        .collect::<Result<Vec<_>, _>>()?;
    let texts: Vec<String> = b
        .items
        .iter()
        .map(|p| format!("{}\n{}\n{}", p.title, p.description, p.content))
        .collect();
    let embeddings = embed_for_patterns(node, &texts).await?;
    let mut items = Vec::with_capacity(b.items.len());
    for ((p, outcome), embedding) in b.items.into_iter().zip(outcomes).zip(embeddings) {
        items.push(NewPattern {
            embedding,
            title: p.title,
            description: p.description,
            content: p.content,
            source_task: p.source_task,
            outcome,
        });
    }
    write(
        node,
        MemoryOp::PatternAdd {
            items,
            now_ms: now_ms(),
        },
    )
    .await
}

/// The patterns of this replica's ReasoningBank as JSON, and how many there are in all:
/// every one, or with `limit` the `limit` most trusted (highest confidence, then most
/// used, then id), so a dashboard reads a page of a large bank instead of all of it.
pub(crate) fn list_patterns(node: &Node, limit: Option<usize>) -> (Vec<Value>, usize) {
    node.table.memory(|m| {
        let total = m.pattern_count();
        let mut items: Vec<&swarm_memory::MemoryItem> = m.patterns().collect();
        if let Some(limit) = limit {
            let by_trust = |a: &&swarm_memory::MemoryItem, b: &&swarm_memory::MemoryItem| {
                b.confidence
                    .total_cmp(&a.confidence)
                    .then(b.use_count.cmp(&a.use_count))
                    .then_with(|| a.id.cmp(&b.id))
            };
            if limit < items.len() {
                items.select_nth_unstable_by(limit, by_trust);
                items.truncate(limit);
            }
            items.sort_by(by_trust);
        }
        let json = items
            .into_iter()
            .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
            .collect();
        (json, total)
    })
}

/// `POST /v1/patterns/retrieve` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetrieveBody {
    query: String,
    #[serde(default = "default_retrieve_k")]
    k: usize,
    /// Only patterns learnt from this outcome.
    outcome: Option<String>,
    mmr_lambda: Option<f64>,
    min_similarity: Option<f64>,
}

fn default_retrieve_k() -> usize {
    5
}

/// The patterns of this replica that fit a query (embedded first).
pub(crate) async fn retrieve(node: &Node, b: RetrieveBody) -> Result<Vec<RetrievedItem>, MemError> {
    let mut params = RetrieveParams::default();
    if let Some(o) = &b.outcome {
        params.outcome = Some(parse_outcome(o)?);
    }
    if let Some(l) = b.mmr_lambda {
        params.mmr_lambda = l;
    }
    if let Some(s) = b.min_similarity {
        params.min_similarity = s;
    }
    let started = Instant::now();
    let q = embed_for_patterns(node, std::slice::from_ref(&b.query))
        .await?
        .pop()
        .ok_or_else(|| MemError::Internal("no vector for the query".into()))?;
    let items = node
        .table
        .memory(|m| m.retrieve(&q, b.k, now_ms(), &params))?;
    metrics::histogram!("swarm_memory_retrieve_seconds", "via" => "http")
        .record(started.elapsed().as_secs_f64());
    Ok(items)
}

/// `POST /v1/patterns/judge` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JudgeBody {
    item_ids: Vec<String>,
    outcome: String,
    task_id: Option<u64>,
}

/// Judge patterns against an outcome.
pub(crate) async fn judge(node: &Node, b: JudgeBody) -> Result<OpOutcome, MemError> {
    write(
        node,
        MemoryOp::PatternJudge {
            task_id: b.task_id,
            item_ids: b.item_ids,
            outcome: parse_outcome(&b.outcome)?,
            now_ms: now_ms(),
        },
    )
    .await
}

/// `POST /v1/patterns/consolidate` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsolidateBody {
    duplicate_similarity: Option<f32>,
    contradiction_similarity: Option<f32>,
    prune_idle_ms: Option<u64>,
    prune_max_uses: Option<u64>,
    prune_max_confidence: Option<f64>,
}

/// Merge duplicates, settle contradictions and prune idle patterns.
pub(crate) async fn consolidate(node: &Node, b: ConsolidateBody) -> Result<OpOutcome, MemError> {
    let mut params = ConsolidateParams::default();
    if let Some(v) = b.duplicate_similarity {
        params.duplicate_similarity = v;
    }
    if let Some(v) = b.contradiction_similarity {
        params.contradiction_similarity = v;
    }
    if let Some(v) = b.prune_idle_ms {
        params.prune_idle_ms = v;
    }
    if let Some(v) = b.prune_max_uses {
        params.prune_max_uses = v;
    }
    if let Some(v) = b.prune_max_confidence {
        params.prune_max_confidence = v;
    }
    write(
        node,
        MemoryOp::Consolidate {
            params,
            now_ms: now_ms(),
        },
    )
    .await
}

/// Answer a worker's `Retrieve`: embed the query, read the local replica. Every failure
/// (the embedder's included) is an error answer `"{code}: {message}"`.
pub(crate) async fn retrieve_for_worker(
    node: &Node,
    query: &str,
    k: u32,
) -> Result<Vec<PatternHit>, String> {
    let started = Instant::now();
    let q = embed_for_patterns(node, &[query.to_string()])
        .await
        .map_err(|e| e.to_string())?
        .pop()
        .ok_or_else(|| "internal: no vector for the query".to_string())?;
    let items = node
        .table
        .memory(|m| m.retrieve(&q, k as usize, now_ms(), &RetrieveParams::default()))
        .map_err(|e| format!("{}: {e}", e.code()))?;
    metrics::histogram!("swarm_memory_retrieve_seconds", "via" => "worker")
        .record(started.elapsed().as_secs_f64());
    Ok(items
        .into_iter()
        .map(|r| PatternHit {
            id: r.item.id,
            title: r.item.title,
            description: r.item.description,
            content: r.item.content,
            outcome: r.item.outcome.as_str().to_string(),
            confidence: r.item.confidence,
            score: r.score,
        })
        .collect())
}

/// What a committed result means for the ReasoningBank.
struct ResultForMemory {
    task_id: u64,
    agent: String,
    payload: Vec<u8>,
    succeeded: bool,
    output: Option<Vec<u8>>,
    error: Option<String>,
}

/// Queues a recorded result for distillation: proposed with the report's `Finish` in one
/// request, and applied only if that `Finish` is recorded (`state::apply_memory_command`),
/// so each recorded result enters the outbox once.
pub(crate) fn distill_queue_op(task_id: u64, attempt: u32, now_ms: u64) -> Op {
    Op::Memory(MemoryOp::DistillQueue {
        task_id,
        attempt,
        now_ms,
    })
}

/// Whether a result with this outcome has anything to teach this node's distillers, so
/// goes into the outbox: every result for the rules and LLM distillers; with only the
/// agent's own items (`--distill agent`, the default), only a success whose output names
/// `memory_items` — the common result costs no outbox entry and no second proposal.
pub(crate) fn distills(node: &Node, outcome: &swarm_proto::worker::Outcome) -> bool {
    let distillers = &node.memory_service().distillers;
    distillers.iter().any(|d| d.name() != "agent_items")
        || (!distillers.is_empty()
            && matches!(outcome, swarm_proto::worker::Outcome::Succeeded { output }
                if carries_memory_items(output)))
}

/// Whether an output can carry `memory_items` (a byte scan; outputs may be large and
/// are parsed only when they can).
fn carries_memory_items(output: &[u8]) -> bool {
    output.windows(12).any(|w| w == b"memory_items")
}

/// The judgement of the patterns an agent used, proposed with the report's `Finish` in
/// one request: it applies only if that `Finish` is recorded
/// (`state::apply_memory_command`), so each recorded result judges its patterns exactly
/// once, whatever happens to the leader afterwards.
pub(crate) fn judge_op(
    task_id: u64,
    patterns_used: Vec<String>,
    succeeded: bool,
    now_ms: u64,
) -> Op {
    Op::Memory(MemoryOp::PatternJudge {
        task_id: Some(task_id),
        item_ids: patterns_used,
        outcome: if succeeded {
            PatternOutcome::Success
        } else {
            PatternOutcome::Failure
        },
        now_ms,
    })
}

/// How often the leader checks the vector memory for points whose TTL passed.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// On the leader: if a point of any collection has expired, propose the sweep that
/// tombstones every expired point (searches skip them already; the sweep frees them,
/// and the rebuilds it triggers drop them from the graphs).
pub(crate) async fn sweep_expired_points(node: &Node) {
    let now = now_ms();
    if node
        .table
        .memory(|m| m.next_point_expiry())
        .is_none_or(|at| at > now)
    {
        return;
    }
    match write_own(node, MemoryOp::ExpireSweep { now_ms: now }).await {
        Ok(outcome) => debug!(?outcome, "expired memory points swept"),
        Err(e) => debug!(error = %e, "memory sweep not committed"),
    }
}

/// On the leader: swap in every graph whose background rebuild has finished here (the
/// followers swap at the same op, waiting for their own build if it is behind).
pub(crate) async fn finish_rebuilds(node: &Node) {
    let ready = node.table.memory(|m| m.ready_rebuilds());
    for (collection, generation) in ready {
        let op = MemoryOp::FinishRebuild {
            collection: collection.clone(),
            generation,
            now_ms: now_ms(),
        };
        match write_own(node, op).await {
            Ok(outcome) => debug!(?collection, ?outcome, "rebuilt graph swapped in"),
            Err(e) => debug!(?collection, error = %e, "graph swap not committed"),
        }
    }
}

/// On the leader: name every graph copy its indexers have taken past the one in use, so
/// searches on every replica move to it at the same op.
pub(crate) async fn advance_indexes(node: &Node) {
    let ready = node.table.memory(|m| m.index_advances());
    for (collection, generation, slots) in ready {
        let op = MemoryOp::AdvanceIndex {
            collection: collection.clone(),
            generation,
            slots,
            now_ms: now_ms(),
        };
        match write_own(node, op).await {
            Ok(outcome) => debug!(?collection, slots, ?outcome, "graph copy named"),
            Err(e) => debug!(?collection, error = %e, "graph copy not committed"),
        }
    }
}

/// Results the leader distils at once (the LLM distiller's requests are bounded by its
/// own concurrency within these).
const DISTILL_PARALLEL: usize = 16;
/// How often the leader looks at the outbox.
const DISTILL_EVERY: Duration = Duration::from_millis(100);

/// On the leader: distil the results waiting in the replicated outbox and propose each
/// one's patterns with its removal ([`MemoryOp::DistillDone`]), which adds them only if
/// the result was still waiting. A leader change or a crash before that leaves the result
/// in the outbox for the next leader, so every recorded result is distilled, and its
/// patterns added exactly once, whatever happens to the leader. (The next leader may run
/// a distiller a second time for a result whose first run never committed.)
pub(crate) async fn distill_loop(
    node: Arc<Node>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut running: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let mut in_flight: std::collections::HashMap<tokio::task::Id, u64> = Default::default();
    let mut term = None;
    let mut tick = tokio::time::interval(DISTILL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                in_flight.remove(&id);
                continue;
            }
            _ = shutdown.changed() => return,
        }
        let led = node.raft_term_led();
        if led != term {
            // A new term (or none): what ran for the old one is not this leader's work.
            running.abort_all();
            in_flight.clear();
            term = led;
        }
        if led.is_none() || node.handing_off() {
            continue;
        }
        let room = DISTILL_PARALLEL.saturating_sub(running.len());
        if room == 0 {
            continue;
        }
        let busy: std::collections::HashSet<u64> = in_flight.values().copied().collect();
        let waiting = node.table.memory(|m| m.distill_outbox(busy.len() + room));
        metrics::gauge!("swarm_distill_outbox")
            .set(node.table.memory(|m| m.distill_waiting()) as f64);
        for (task, entry) in waiting
            .into_iter()
            .filter(|(t, _)| !busy.contains(t))
            .take(room)
        {
            let node = node.clone();
            let handle =
                running.spawn(async move { distill_one(&node, task, entry.attempt).await });
            in_flight.insert(handle.id(), task);
        }
    }
}

/// The result of attempt `attempt` of task `task_id` as the ReasoningBank sees it: the
/// agent and input of the stage it ran (a ring task has moved on since), and its output
/// or error. `None` if the task is gone (purged) or has no such attempt.
fn result_for_memory(node: &Node, task_id: u64, attempt: u32) -> Option<ResultForMemory> {
    // Wherever the task is now: a checkpoint may have moved it to disk.
    let t = match node.table.lookup(task_id) {
        Ok(crate::state::Lookup::Found(t)) => t,
        _ => return None,
    };
    let rec = t.attempts.iter().find(|a| a.number == attempt)?;
    let stage = rec.stage;
    let input = match (stage as usize).checked_sub(1) {
        Some(prev) => t.stage_outputs.get(prev)?.clone(),
        None => t.spec.payload.clone(),
    };
    let (succeeded, output, error) = match rec.outcome() {
        Some(crate::state::AttemptEnd::Succeeded) => (
            true,
            t.stage_outputs
                .get(stage as usize)
                .or(t.output.as_ref())
                .cloned(),
            None,
        ),
        Some(crate::state::AttemptEnd::Failed { kind, message }) => {
            (false, None, Some(format!("{}: {message}", kind.as_str())))
        }
        Some(crate::state::AttemptEnd::Cancelled) => (false, None, Some("cancelled".to_string())),
        // Not an outcome of the agent's work: nothing to learn.
        _ => return None,
    };
    Some(ResultForMemory {
        task_id,
        agent: t.spec.agent_of(stage).to_string(),
        payload: input,
        succeeded,
        output,
        error,
    })
}

/// Distil one result from the outbox and propose its removal with what it taught.
/// Returns without proposing if this node stops leading or the proposal fails: the
/// result stays in the outbox and is tried again.
async fn distill_one(node: &Arc<Node>, task_id: u64, attempt: u32) {
    let items = match result_for_memory(node, task_id, attempt) {
        Some(r) => distill_result(node, &r).await,
        None => Vec::new(),
    };
    let op = Op::Memory(MemoryOp::DistillDone {
        task_id,
        items,
        now_ms: now_ms(),
    });
    match node.propose(vec![op]).await {
        Ok(results) => match results.into_iter().next() {
            Some(OpResult::Memory(Ok(OpOutcome::Distilled {
                found,
                ids,
                refused,
            }))) => {
                if !ids.is_empty() {
                    metrics::counter!("swarm_distilled_patterns_total").increment(ids.len() as u64);
                }
                if let Some(why) = refused {
                    warn!(task = task_id, reason = %why, "distilled patterns refused");
                }
                if !found {
                    debug!(
                        task = task_id,
                        "result already distilled by an earlier leader"
                    );
                }
            }
            other => debug!(task = task_id, result = ?other, "distillation outcome"),
        },
        Err(e) => {
            debug!(task = task_id, error = %e, "distillation not committed; left in the outbox")
        }
    }
}

/// The patterns every distiller draws from `r`, embedded. A distiller or the embedder
/// failing loses its items (logged), not the others'.
async fn distill_result(node: &Node, r: &ResultForMemory) -> Vec<swarm_memory::NewPattern> {
    let outcome = if r.succeeded {
        PatternOutcome::Success
    } else {
        PatternOutcome::Failure
    };
    let service = node.memory_service();
    // Parse the output only when it can carry `memory_items`: outputs may be large.
    let result = r
        .output
        .as_deref()
        .filter(|o| carries_memory_items(o))
        .and_then(|o| serde_json::from_slice::<Value>(o).ok());
    let summary = TaskSummary {
        task_id: r.task_id,
        agent: r.agent.clone(),
        payload_summary: String::from_utf8_lossy(&r.payload)
            .chars()
            .take(200)
            .collect(),
        outcome,
        error: r.error.clone(),
        result,
    };
    let mut items = Vec::new();
    for d in &service.distillers {
        // The remote distiller runs within its slots.
        let _slot = match (&service.remote, d.name()) {
            (Some(limit), "llm") => limit.acquire().await.ok(),
            _ => None,
        };
        match d.distill(&summary).await {
            Ok(mut v) => items.append(&mut v),
            Err(e) => {
                metrics::counter!("swarm_distill_failures_total", "distiller" => d.name())
                    .increment(1);
                warn!(task = r.task_id, distiller = d.name(), error = %e, "distillation failed")
            }
        }
    }
    if items.is_empty() {
        return Vec::new();
    }
    let embedded = match check_pattern_dimension(node) {
        Ok(()) => embed_items(service.embedder.as_ref(), &items)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match embedded {
        Ok(patterns) => patterns,
        Err(e) => {
            warn!(task = r.task_id, error = %e, "embedding distilled items failed");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(dimension: usize) -> EmbedderConfig {
        EmbedderConfig::Http(HttpEmbedderSettings {
            base_url: "http://127.0.0.1:9".into(),
            model: "m".into(),
            api_key: Some("sk-secret".into()),
            dimension,
            timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn pattern_dimension_is_pinned_to_the_raft_dir() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        let cfg = pin_pattern_dimension(&raft, &http(16)).unwrap();
        assert_eq!(cfg.pattern_dimension, 16);
        assert_eq!(
            StoreConfig {
                pattern_dimension: StoreConfig::default().pattern_dimension,
                ..cfg
            },
            StoreConfig::default(),
            "only the pattern dimension differs from the default"
        );
        // Same embedder again: fine. Another dimension: refused, naming both.
        assert_eq!(
            pin_pattern_dimension(&raft, &http(16))
                .unwrap()
                .pattern_dimension,
            16
        );
        let err = pin_pattern_dimension(&raft, &EmbedderConfig::Hash)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("16-dimensional") && err.contains("256 dimensions"),
            "{err}"
        );
        assert!(pin_pattern_dimension(&raft, &http(32)).is_err());
    }

    #[test]
    fn raft_dirs_from_before_the_record_are_the_hash_embedders() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        std::fs::create_dir_all(&raft).unwrap();
        std::fs::write(raft.join("log.redb"), b"x").unwrap();
        assert!(pin_pattern_dimension(&raft, &http(16)).is_err());
        let cfg = pin_pattern_dimension(&raft, &EmbedderConfig::Hash).unwrap();
        assert_eq!(
            cfg,
            StoreConfig::default(),
            "the hash embedder's store is unchanged"
        );
        assert_eq!(
            std::fs::read_to_string(raft.join(PATTERN_DIMENSION_FILE)).unwrap(),
            "256\n"
        );
    }

    #[test]
    fn unusable_dimensions_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let raft = dir.path().join("raft");
        assert!(pin_pattern_dimension(&raft, &http(1_000_000)).is_err());
        assert!(!raft.exists());
    }

    #[test]
    fn replica_dimension_check_and_redacted_key() {
        let replica = StoreConfig::default();
        assert!(check_replica_dimension(&replica, &EmbedderConfig::Hash).is_ok());
        let err = check_replica_dimension(&replica, &http(16))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pattern dimension 256"), "{err}");
        let debug = format!("{:?}", http(16));
        assert!(
            !debug.contains("sk-secret") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn hash_embedder_through_the_trait_is_the_hash_embedder() {
        let e = EmbedderConfig::Hash.build().unwrap();
        let texts = vec!["retry the flaky download".to_string(), String::new()];
        let got = e.embed(&texts).await.unwrap();
        let direct = HashEmbedder::default();
        assert_eq!(
            got,
            vec![direct.embed_one(&texts[0]), direct.embed_one(&texts[1])]
        );
        assert_eq!(e.dimension(), StoreConfig::default().pattern_dimension);
    }
}
