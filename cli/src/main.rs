//! `swarm`: run coordinators and workers, submit tasks, inspect a cluster.
//!
//! Flags can also come from `SWARM_*` environment variables and from a TOML file given
//! by `--config` (see `config.rs`). Exit codes: 0 success, 1 error, 2 usage error (clap),
//! 3 a waited-for task ended in a state other than succeeded, 4 a wait timed out.

mod client;
mod config;
mod status;
mod transfer;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use swarm_coordinator::api::parse_duration;
use swarm_coordinator::memory::{
    DistillMode, EmbedderConfig, HttpEmbedderSettings, LlmDistillSettings,
};
use swarm_coordinator::raft::types::NodeAddr;
use swarm_coordinator::scheduler::SchedulerConfig;
use swarm_coordinator::{CoordinatorConfig, Limits, TaskDefaults};
use swarm_proto::api::{SubmitTask, TaskState, TaskView};

#[derive(Parser)]
#[command(
    name = "swarm",
    version,
    about = "Run fleets of agents: a Raft-replicated coordinator dispatching tasks over QUIC"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SWARM_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
    /// TOML file of flag values (keys are long flag names).
    #[arg(long, global = true, env = "SWARM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local swarm: one coordinator and N workers in this process.
    Up(UpArgs),
    /// Run a coordinator node.
    Coordinator(Box<CoordinatorArgs>),
    /// Run a worker.
    Worker(WorkerArgs),
    /// Manage cluster certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Submit a task.
    Submit(SubmitArgs),
    /// Inspect or cancel tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Show the cluster, its workers and its queue.
    Status(StatusArgs),
    /// Inspect and change the coordinator cluster's membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Check a coordinator's liveness or readiness (for container health checks).
    Probe(ProbeArgs),
    /// Vector memory: collections of embeddings with metadata, searched by similarity.
    #[command(subcommand)]
    Memory(MemoryCmd),
    /// The ReasoningBank: strategies learnt from past successes and failures.
    #[command(subcommand)]
    Patterns(PatternsCmd),
    /// Swarms: named groups of workers with a topology (star, mesh, ring).
    #[command(subcommand)]
    Swarms(SwarmsCmd),
    /// Write a consistent copy of a running cluster's tasks and memory to a file.
    Backup {
        #[command(flatten)]
        api: ApiArgs,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Seed a new, empty cluster from a `swarm backup` file.
    Restore {
        #[command(flatten)]
        api: ApiArgs,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
enum SwarmsCmd {
    /// Define a swarm.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// star, mesh or ring (hierarchical is not implemented yet).
        #[arg(long)]
        topology: String,
        /// Members: workers carrying all of these labels (k=v, repeatable or
        /// comma-separated). Default: every worker.
        #[arg(long = "labels", value_delimiter = ',')]
        labels: Vec<String>,
        /// Mesh: most peer links per worker.
        #[arg(long)]
        max_degree: Option<u32>,
        /// Hierarchical: workers per lead.
        #[arg(long)]
        fan_out: Option<u32>,
        /// Ring: the stages in order, e.g. `coder,reviewer[lang=rust],tester`.
        #[arg(long)]
        stages: Option<String>,
        /// Attempts a member may hold beyond its slots (default 0; mesh 4).
        #[arg(long)]
        queue_depth: Option<u32>,
        /// Create it even if no connected worker is a member yet.
        #[arg(long)]
        allow_empty: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List swarms.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one swarm and draw its topology.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a swarm (refused while it has unfinished tasks).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
    },
}

#[derive(Subcommand)]
enum MemoryCmd {
    /// Create a collection.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        #[arg(long)]
        dimension: usize,
        /// cosine, l2 or dot.
        #[arg(long, default_value = "cosine")]
        metric: String,
    },
    /// List collections.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one collection.
    Info {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
    },
    /// Insert or replace one point (or many with --file).
    Upsert {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        #[arg(long, required_unless_present = "file")]
        id: Option<String>,
        /// Comma-separated components.
        #[arg(long, conflicts_with = "text")]
        vector: Option<String>,
        /// Text for the built-in embedder (collections of its dimension, 256).
        #[arg(long)]
        text: Option<String>,
        /// Metadata, a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// Expire after this long (e.g. 1h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A JSON file `{"points": [{"id", "vector" | "text", "metadata", "ttl_ms"}]}`.
        #[arg(long, conflicts_with_all = ["id", "vector", "text", "metadata", "ttl"])]
        file: Option<PathBuf>,
    },
    /// Search by a vector or a text.
    Search {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        #[arg(long, conflicts_with = "text")]
        vector: Option<String>,
        #[arg(long)]
        text: Option<String>,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[arg(long)]
        ef: Option<usize>,
        /// Metadata filter, a JSON object: `{"lang": "rust"}` or `{"lang": ["rust", "go"]}`.
        #[arg(long)]
        filter: Option<String>,
        /// Exact (brute-force) search.
        #[arg(long)]
        exact: bool,
    },
    /// Delete points.
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Drop a collection and all its points.
    Drop {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
    },
}

#[derive(Subcommand)]
enum PatternsCmd {
    /// Add a pattern.
    Add {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        title: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        content: String,
        /// success or failure: what the pattern was learnt from.
        #[arg(long)]
        outcome: String,
    },
    /// Retrieve the patterns most useful for a query.
    Retrieve {
        #[command(flatten)]
        api: ApiArgs,
        query: String,
        #[arg(long, default_value_t = 5)]
        k: usize,
    },
    /// List every pattern with its counts and confidence.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Record an outcome against patterns.
    Judge {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        outcome: String,
        #[arg(long)]
        task: Option<u64>,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Merge near-duplicates, flag contradictions, prune stale patterns.
    Consolidate {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Every coordinator: role, term, leader, log indexes, replication lag, health.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a coordinator: it joins as a learner, catches up, then becomes a voter.
    Add {
        #[command(flatten)]
        api: ApiArgs,
        /// The new node's Raft id (unique, never reused).
        id: u64,
        /// host:port of the new node's QUIC endpoint (its --advertise).
        #[arg(long)]
        raft: String,
        /// host:port of the new node's HTTP API (its --api-advertise).
        #[arg(long = "node-api")]
        node_api: String,
        /// Leave it a learner (a non-voting replica).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a coordinator from the cluster.
    Remove {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
    },
}

#[derive(Args)]
struct ProbeArgs {
    /// `live` (process and storage: GET /health) or `ready` (has a leader and is caught
    /// up: GET /ready).
    #[arg(value_parser = ["live", "ready"])]
    what: String,
    /// Base URL of the coordinator's HTTP API.
    #[arg(long, env = "SWARM_PROBE_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a cluster CA and coordinator and worker certificates.
    Init {
        /// Directory to write into.
        #[arg(long, env = "SWARM_CERTS")]
        dir: PathBuf,
        /// Extra DNS names or IPs for the certificates (localhost and loopback are always in).
        #[arg(long = "san", env = "SWARM_SAN", value_delimiter = ',')]
        sans: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Where the API is and how to authenticate.
#[derive(Args, Clone)]
struct ApiArgs {
    /// Base URL of a coordinator's HTTP API; several (comma-separated) nodes of one
    /// cluster are tried in turn when one cannot be reached.
    #[arg(long, env = "SWARM_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// API bearer token.
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API bearer token (default: ./swarm-data/api-token if present).
    #[arg(long, env = "SWARM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<client::Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => read_token(f)?,
            (None, None) => {
                let default = Path::new("swarm-data/api-token");
                if default.exists() {
                    read_token(default)?
                } else {
                    bail!(
                        "no API token: pass --token, --token-file, SWARM_TOKEN or SWARM_TOKEN_FILE"
                    );
                }
            }
        };
        client::Client::new(&self.api, token)
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("read token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(t)
}

#[derive(Args)]
struct UpArgs {
    /// Number of local workers.
    #[arg(long, env = "SWARM_WORKERS", default_value_t = 2)]
    workers: u32,
    /// Slots per local worker.
    #[arg(long, env = "SWARM_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Where certificates, the API token and the Raft data go.
    #[arg(long, env = "SWARM_DATA_DIR", default_value = "swarm-data")]
    data_dir: PathBuf,
    /// HTTP API address.
    #[arg(long, env = "SWARM_API_LISTEN", default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// QUIC address.
    #[arg(long, env = "SWARM_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Agents file for the local workers.
    #[arg(long, env = "SWARM_AGENTS")]
    agents: Option<PathBuf>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// This node's Raft id (unique, never reused).
    #[arg(long, env = "SWARM_NODE_ID", default_value_t = 1)]
    id: u64,
    /// Raft log and snapshots.
    #[arg(long, env = "SWARM_DATA_DIR")]
    data_dir: PathBuf,
    /// Certificates directory (`swarm certs init`).
    #[arg(long, env = "SWARM_CERTS")]
    certs: PathBuf,
    /// QUIC address for workers and peers.
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// host:port peers and workers use to reach --listen (a name in the certificate).
    #[arg(long, env = "SWARM_ADVERTISE", default_value = "")]
    advertise: String,
    /// HTTP API address.
    #[arg(long, env = "SWARM_API_LISTEN", default_value = "0.0.0.0:8080")]
    api_listen: SocketAddr,
    /// host:port clients use to reach the API.
    #[arg(long, env = "SWARM_API_ADVERTISE", default_value = "")]
    api_advertise: String,
    /// API bearer token.
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API bearer token.
    #[arg(long, env = "SWARM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Initialise a new cluster (this node plus --peer nodes) if the data dir is empty.
    #[arg(long, env = "SWARM_BOOTSTRAP")]
    bootstrap: bool,
    /// Another voter for --bootstrap: ID=RAFT_HOST:PORT,API_HOST:PORT (repeatable).
    #[arg(long = "peer", env = "SWARM_PEERS", value_delimiter = ';')]
    peers: Vec<String>,
    /// Join a running cluster through any of these API URLs (comma-separated): this node
    /// asks to be added, catches up as a learner, then becomes a voter.
    #[arg(
        long,
        env = "SWARM_JOIN",
        value_delimiter = ',',
        conflicts_with = "bootstrap"
    )]
    join: Vec<String>,
    /// Unfinished tasks allowed before submits get `queue_full`.
    #[arg(long, env = "SWARM_QUEUE_LIMIT", default_value_t = 1_000_000)]
    queue_limit: u64,
    /// Largest task payload in bytes.
    #[arg(long, env = "SWARM_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    max_payload_bytes: u64,
    /// Largest stored task output in bytes.
    #[arg(long, env = "SWARM_MAX_OUTPUT_BYTES", default_value_t = 1 << 20)]
    max_output_bytes: u64,
    /// Timeout of tasks that give none.
    #[arg(long, env = "SWARM_DEFAULT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    default_timeout: Duration,
    /// Attempts of tasks that give none.
    #[arg(long, env = "SWARM_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    default_max_attempts: u32,
    /// Worker heartbeat interval.
    #[arg(long, env = "SWARM_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// A worker silent this long is lost, and its tasks are retried.
    #[arg(long, env = "SWARM_LEASE", default_value = "5s", value_parser = parse_duration)]
    lease: Duration,
    /// First retry delay (doubles per attempt).
    #[arg(long, env = "SWARM_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    retry_backoff: Duration,
    /// Longest retry delay.
    #[arg(long, env = "SWARM_RETRY_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    retry_backoff_max: Duration,
    /// How finished tasks become ReasoningBank patterns: `agent` (only `memory_items` an
    /// agent returns), `rules` (plus a rule-based item per task), `llm` (plus items from
    /// --llm-url), `off`.
    #[arg(long, env = "SWARM_DISTILL", default_value = "agent", value_parser = ["agent", "rules", "llm", "off"])]
    distill: String,
    /// OpenAI-compatible base URL for `--distill llm` (POST {url}/v1/chat/completions).
    #[arg(long, env = "SWARM_LLM_URL")]
    llm_url: Option<String>,
    /// Model name for `--distill llm`.
    #[arg(long, env = "SWARM_LLM_MODEL", default_value = "gpt-4o-mini")]
    llm_model: String,
    /// Name of the environment variable holding `--llm-url`'s bearer token (the token
    /// itself never goes on the command line).
    #[arg(long, env = "SWARM_LLM_API_KEY_ENV")]
    llm_api_key_env: Option<String>,
    /// Most `--distill llm` requests in flight at once; up to 16 results per slot wait
    /// for one, results past that are not distilled by the LLM.
    #[arg(long, env = "SWARM_LLM_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    llm_concurrency: u32,
    /// Snapshot the state and compact the Raft log after this many entries...
    #[arg(long, env = "SWARM_SNAPSHOT_EVERY", default_value_t = swarm_coordinator::raft::SNAPSHOT_EVERY_LOGS)]
    snapshot_every: u64,
    /// ...or after this many bytes of log, or of changes held in memory, since the last
    /// snapshot, whichever comes first.
    #[arg(long, env = "SWARM_SNAPSHOT_BYTES", default_value_t = swarm_coordinator::raft::SNAPSHOT_EVERY_BYTES)]
    snapshot_bytes: u64,
    /// How long a finished task stays readable (and its idempotency key dedupes) before
    /// it is purged, unless the task asked for its own `retain_ms`.
    #[arg(long, env = "SWARM_RETAIN_FINISHED", default_value = "3d", value_parser = parse_duration)]
    retain_finished: Duration,
    /// What embeds pattern texts, `text` points and queries: `hash` (built-in, offline,
    /// 256 dimensions) or `http` (an OpenAI-compatible /v1/embeddings endpoint, see
    /// --embedder-url). Every node of a cluster needs the same embedder.
    #[arg(long, env = "SWARM_EMBEDDER", default_value = "hash", value_parser = ["hash", "http"])]
    embedder: String,
    /// OpenAI-compatible base URL for `--embedder http` (POST {url}/v1/embeddings).
    #[arg(long, env = "SWARM_EMBEDDER_URL")]
    embedder_url: Option<String>,
    /// Model name for `--embedder http`.
    #[arg(
        long,
        env = "SWARM_EMBEDDER_MODEL",
        default_value = "text-embedding-3-small"
    )]
    embedder_model: String,
    /// Dimension of the model's vectors, required with `--embedder http`; it becomes the
    /// ReasoningBank's pattern dimension and cannot change for an existing data dir.
    #[arg(long, env = "SWARM_EMBEDDER_DIMENSION")]
    embedder_dimension: Option<usize>,
    /// Name of the environment variable holding the embedding endpoint's bearer token
    /// (the token itself never goes on the command line).
    #[arg(long, env = "SWARM_EMBEDDER_API_KEY_ENV")]
    embedder_api_key_env: Option<String>,
    /// Timeout of one embedding request.
    #[arg(long, env = "SWARM_EMBEDDER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    embedder_timeout: Duration,
}

#[derive(Args)]
struct WorkerArgs {
    /// Coordinator QUIC addresses, HOST:PORT (comma-separated or repeated): the worker
    /// finds the Raft leader among them and follows it.
    #[arg(
        long,
        env = "SWARM_COORDINATOR",
        value_delimiter = ',',
        required = true
    )]
    coordinator: Vec<String>,
    /// Certificates directory (needs ca.pem, worker.pem, worker-key.pem).
    #[arg(long, env = "SWARM_CERTS")]
    certs: PathBuf,
    /// Tasks run at once.
    #[arg(long, env = "SWARM_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Labels, k=v (comma-separated or repeated).
    #[arg(long = "labels", env = "SWARM_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// Agents file (TOML).
    #[arg(long, env = "SWARM_AGENTS")]
    agents: Option<PathBuf>,
    /// Worker name, stable across restarts (default: hostname-pid).
    #[arg(long = "id", env = "SWARM_WORKER_ID")]
    id: Option<String>,
    /// Name to verify in the coordinators' certificates (default: each host of --coordinator).
    #[arg(long, env = "SWARM_SERVER_NAME")]
    server_name: Option<String>,
    /// Accept mesh peer links on this UDP address (e.g. 0.0.0.0:7100, or 127.0.0.1:0 for
    /// any free port). Without it the worker takes no part in mesh swarms.
    #[arg(long, env = "SWARM_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// HOST:PORT peers should dial (default: the bound --peer-listen address).
    #[arg(long, env = "SWARM_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// Name to verify in peers' certificates (default: localhost).
    #[arg(long, env = "SWARM_PEER_SERVER_NAME")]
    peer_server_name: Option<String>,
    /// On SIGTERM or Ctrl-C the worker drains: it takes no new work, hands back the
    /// attempts it has not started, and lets running ones finish for up to this long
    /// (then kills and hands back the rest). A second signal stops at once. Keep the
    /// deployment's grace period (terminationGracePeriodSeconds, stop_grace_period)
    /// a few seconds longer.
    #[arg(long, env = "SWARM_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Agent to run (omit for a ring swarm: its stages name the agents).
    #[arg(long, default_value = "")]
    agent: String,
    /// Payload: JSON if it parses as JSON, else text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload bytes from a file (`-` for stdin).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Per-attempt timeout (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Attempts before giving up.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Submitting twice with the same key yields one task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Required worker label k=v (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Hand the agent this many ReasoningBank patterns retrieved by the payload text.
    #[arg(long, default_value_t = 0)]
    patterns: u32,
    /// Run in this swarm (default: `default`, a star of every worker).
    #[arg(long)]
    swarm: Option<String>,
    /// Keep the finished task readable this long (default: the coordinator's
    /// --retain-finished); its idempotency key dedupes as long.
    #[arg(long, value_parser = parse_duration)]
    retain: Option<Duration>,
    /// Wait for the result (optionally how long, default 60s).
    #[arg(long, num_args = 0..=1, default_missing_value = "60s")]
    wait: Option<String>,
    /// Print the whole JSON response.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Show one task.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
        /// Wait until the task is final (e.g. 30s).
        #[arg(long)]
        wait: Option<String>,
    },
    /// List tasks.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only tasks in this state.
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show tasks with an id greater than this.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Cancel a task (stops it on its worker if running).
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
    },
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Refresh every N seconds until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "2")]
    watch: Option<u64>,
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parse the command line, filling unset flags from the config file first.
fn parse_cli() -> anyhow::Result<Cli> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config_path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            args.iter()
                .filter_map(|a| a.to_str())
                .find_map(|a| a.strip_prefix("--config=").map(PathBuf::from))
        })
        .or_else(|| std::env::var_os("SWARM_CONFIG").map(PathBuf::from));
    let cmd = Cli::command();
    if let Some(path) = config_path {
        config::apply_config_file(&path, &config::known_env_vars(&cmd))?;
    }
    let matches = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SWARM_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Up(a) => up(a).await,
        Cmd::Coordinator(a) => coordinator(*a).await,
        Cmd::Worker(a) => worker(a).await,
        Cmd::Certs(CertsCmd::Init { dir, sans, force }) => {
            let files = swarm_transport::init_certs(&dir, &sans, force)?;
            println!(
                "wrote cluster CA and certificates to {}",
                files.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit(a) => submit(a).await,
        Cmd::Task(t) => task(t).await,
        Cmd::Status(a) => status_cmd(a).await,
        Cmd::Cluster(c) => cluster_cmd(c).await,
        Cmd::Probe(a) => probe(a).await,
        Cmd::Memory(c) => memory_cmd(c).await,
        Cmd::Swarms(c) => swarms_cmd(c).await,
        Cmd::Patterns(c) => patterns_cmd(c).await,
        Cmd::Backup { api, out } => transfer::backup(&api.client()?, &out).await,
        Cmd::Restore { api, from } => transfer::restore(&api.client()?, &from).await,
    }
}

fn parse_labels(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("label {item:?} must be key=value");
        };
        if k.is_empty() {
            bail!("label {item:?} has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn parse_peer(s: &str) -> anyhow::Result<(u64, NodeAddr)> {
    let err = || format!("--peer {s:?} must be ID=RAFT_HOST:PORT,API_HOST:PORT");
    let (id, addrs) = s.split_once('=').with_context(err)?;
    let (raft, api) = addrs.split_once(',').with_context(err)?;
    let id: u64 = id.trim().parse().with_context(err)?;
    Ok((
        id,
        NodeAddr {
            raft_addr: raft.trim().into(),
            api_addr: api.trim().into(),
        },
    ))
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Generate a random API token file if missing; return the token.
fn ensure_token(path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        return read_token(path);
    }
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, token.as_bytes())?;
    Ok(token)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// SIGTERM and Ctrl-C (SIGINT), counted from the moment [`StopSignals::listen`] is
/// called: the first asks for a graceful stop (a worker drains, a leading coordinator
/// hands leadership over), the second for an immediate one.
struct StopSignals {
    count: tokio::sync::watch::Receiver<u32>,
}

impl StopSignals {
    fn listen() -> StopSignals {
        let (tx, count) = tokio::sync::watch::channel(0u32);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            Some(()) = term.recv() => {}
                            Some(()) = int.recv() => {}
                            else => return,
                        }
                        tx.send_modify(|n| *n += 1);
                    }
                });
                return StopSignals { count };
            }
        }
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                tx.send_modify(|n| *n += 1);
            }
        });
        StopSignals { count }
    }

    /// Completes once `n` signals have arrived.
    async fn nth(&self, n: u32) {
        let mut count = self.count.clone();
        if count.wait_for(|c| *c >= n).await.is_err() {
            // No more signals can come.
            std::future::pending::<()>().await;
        }
    }
}

async fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    if a.workers == 0 || a.slots == 0 {
        bail!("--workers and --slots must be at least 1");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("create {}", a.data_dir.display()))?;
    let certs = a.data_dir.join("certs");
    if !certs.join("ca.pem").exists() {
        swarm_transport::init_certs(&certs, &[], false)?;
    }
    let token_file = a.data_dir.join("api-token");
    let token = ensure_token(&token_file)?;
    let cfg = CoordinatorConfig::single_node(
        a.data_dir.join("coordinator"),
        certs.clone(),
        a.listen,
        a.api_listen,
        token,
    );
    let coord = swarm_coordinator::start(cfg).await?;
    let quic = coord.quic_addr;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for i in 1..=a.workers {
        let wcfg = swarm_worker::WorkerConfig {
            coordinators: vec![format!("127.0.0.1:{}", quic.port())],
            server_name: Some("localhost".into()),
            certs_dir: certs.clone(),
            worker_id: format!("local-{i}"),
            slots: a.slots,
            labels: BTreeMap::new(),
            agents_file: a.agents.clone(),
            peer_listen: None,
            peer_advertise: None,
            peer_server_name: None,
            drain_timeout: Duration::ZERO,
        };
        let mut rx = stop_rx.clone();
        workers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            // The coordinator stops with the workers: nothing to drain towards.
            if let Err(e) = swarm_worker::run_worker(wcfg, std::future::pending(), stop).await {
                eprintln!("worker local-{i}: {e:#}");
            }
        }));
    }
    let api = format!("http://{}", coord.api_addr);
    println!(
        "swarm is up: 1 coordinator, {} workers with {} slots each",
        a.workers, a.slots
    );
    println!("  API      {api}   (token in {})", token_file.display());
    println!("  QUIC     {quic}");
    println!("  metrics  {api}/metrics");
    println!();
    println!("try, from this directory:");
    println!("  swarm status");
    println!("  swarm submit --agent echo --payload '{{\"hello\":\"swarm\"}}' --wait");
    println!(
        "  curl -H \"Authorization: Bearer $(cat {})\" {api}/v1/status",
        token_file.display()
    );
    println!("stop with Ctrl-C");
    StopSignals::listen().nth(1).await;
    println!("stopping");
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    coord.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let embedder = embedder_config(&a)?;
    let token = match (a.token, &a.token_file) {
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(f)) => read_token(f)?,
        _ => bail!("the coordinator needs an API token: --token, --token-file, SWARM_TOKEN or SWARM_TOKEN_FILE"),
    };
    let peers = a
        .peers
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if peers.iter().any(|(id, _)| *id == a.id) {
        bail!("--peer lists this node's own id {}", a.id);
    }
    if a.default_max_attempts == 0 {
        bail!("--default-max-attempts must be at least 1");
    }
    if a.heartbeat_interval.is_zero() || a.lease <= a.heartbeat_interval {
        bail!("--lease must be longer than --heartbeat-interval (and both non-zero)");
    }
    // A payload or an output travels in one op, which must fit one Raft entry.
    let max_op = swarm_coordinator::limits::MAX_OP_BYTES as u64 - (64 << 10);
    for (flag, v) in [
        ("--max-payload-bytes", a.max_payload_bytes),
        ("--max-output-bytes", a.max_output_bytes),
    ] {
        if v > max_op {
            bail!(
                "{flag} is at most {max_op} (one Raft entry holds {} bytes), got {v}",
                swarm_coordinator::limits::ENTRY_BUDGET
            );
        }
    }
    if a.snapshot_bytes < 1 << 20 {
        bail!(
            "--snapshot-bytes must be at least 1 MiB, got {}",
            a.snapshot_bytes
        );
    }
    let cfg = CoordinatorConfig {
        node_id: a.id,
        data_dir: a.data_dir,
        certs_dir: a.certs,
        listen: a.listen,
        advertise: a.advertise,
        api_listen: a.api_listen,
        api_advertise: a.api_advertise,
        api_token: token,
        bootstrap: a.bootstrap,
        peers,
        limits: Limits {
            queue_limit: a.queue_limit,
            max_payload_bytes: a.max_payload_bytes,
            max_output_bytes: a.max_output_bytes,
            ..Limits::default()
        },
        defaults: TaskDefaults {
            timeout_ms: ms(a.default_timeout),
            max_attempts: a.default_max_attempts,
        },
        heartbeat_interval_ms: ms(a.heartbeat_interval),
        scheduler: SchedulerConfig {
            lease_ms: ms(a.lease),
            heartbeat_ms: ms(a.heartbeat_interval),
            backoff_base_ms: ms(a.retry_backoff),
            backoff_max_ms: ms(a.retry_backoff_max),
            ..SchedulerConfig::default()
        },
        snapshot_every: a.snapshot_every.max(1),
        snapshot_bytes: a.snapshot_bytes,
        retain_finished: a.retain_finished,
        distill: match a.distill.as_str() {
            "rules" => DistillMode::Rules,
            "off" => DistillMode::Off,
            "llm" => DistillMode::Llm(LlmDistillSettings {
                base_url: a.llm_url.clone().context("--distill llm needs --llm-url")?,
                model: a.llm_model.clone(),
                api_key: api_key_from_env("--llm-api-key-env", a.llm_api_key_env.as_deref())?,
                concurrency: a.llm_concurrency as usize,
            }),
            _ => DistillMode::AgentItems,
        },
        embedder,
    };
    let join: Vec<String> = a.join.into_iter().filter(|j| !j.is_empty()).collect();
    let signals = StopSignals::listen();
    let handle = swarm_coordinator::start(cfg).await?;
    println!(
        "coordinator {} serving API on {} and QUIC on {}",
        a.id, handle.api_addr, handle.quic_addr
    );
    let (stop_join, stop_join_rx) = tokio::sync::watch::channel(false);
    let mut joining = None;
    if !join.is_empty() && !handle.node().raft().is_initialized().await? {
        let cfg = handle.node().config();
        let add = swarm_proto::api::AddNode {
            id: cfg.node_id,
            raft_addr: cfg.advertise.clone(),
            api_addr: cfg.api_advertise.clone(),
            voter: true,
            pattern_dimension: Some(cfg.embedder.dimension()),
        };
        joining = Some(tokio::spawn(swarm_coordinator::cluster::join(
            reqwest::Client::new(),
            join,
            cfg.api_token.clone(),
            add,
            stop_join_rx,
        )));
    }
    // A join the cluster refuses for good (another embedder) ends the process.
    let refused = async {
        match joining {
            Some(task) => match task.await {
                Ok(Err(why)) => why,
                _ => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = signals.nth(1) => None,
        why = refused => Some(why),
    };
    let _ = stop_join.send(true);
    if outcome.is_none() {
        // A leader hands leadership to a caught-up voter first, so the cluster does not
        // wait out an election timeout; a second signal skips that.
        tokio::select! {
            _ = handle.hand_off_leadership() => {}
            () = signals.nth(2) => tracing::info!("second stop signal: leaving without a leadership hand-off"),
        }
    }
    handle.shutdown().await;
    if let Some(why) = outcome {
        eprintln!("swarm coordinator: {why}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The embedder the `--embedder*` flags describe; bad combinations are errors.
fn embedder_config(a: &CoordinatorArgs) -> anyhow::Result<EmbedderConfig> {
    if a.embedder != "http" {
        for (given, flag) in [
            (a.embedder_url.is_some(), "--embedder-url"),
            (a.embedder_dimension.is_some(), "--embedder-dimension"),
            (a.embedder_api_key_env.is_some(), "--embedder-api-key-env"),
        ] {
            if given {
                bail!(
                    "{flag} is only used with --embedder http (the embedder is `{}`)",
                    a.embedder
                );
            }
        }
        return Ok(EmbedderConfig::Hash);
    }
    let base_url = match a.embedder_url.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => bail!("--embedder http needs --embedder-url (or SWARM_EMBEDDER_URL): the base URL of an OpenAI-compatible embeddings endpoint"),
    };
    if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
        bail!("--embedder-url must be an http:// or https:// URL, got {base_url:?}");
    }
    let dimension = match a.embedder_dimension {
        Some(d) if d > 0 => d,
        Some(_) => bail!("--embedder-dimension must be greater than 0"),
        None => bail!("--embedder http needs --embedder-dimension (or SWARM_EMBEDDER_DIMENSION): the dimension of the model's vectors"),
    };
    if a.embedder_model.trim().is_empty() {
        bail!("--embedder-model must not be empty");
    }
    if a.embedder_timeout.is_zero() {
        bail!("--embedder-timeout must be greater than 0");
    }
    let api_key = api_key_from_env("--embedder-api-key-env", a.embedder_api_key_env.as_deref())?;
    Ok(EmbedderConfig::Http(HttpEmbedderSettings {
        base_url,
        model: a.embedder_model.clone(),
        api_key,
        dimension,
        timeout: a.embedder_timeout,
    }))
}

/// The bearer token in the environment variable `var` names (given by `flag`), if any.
fn api_key_from_env(flag: &str, var: Option<&str>) -> anyhow::Result<Option<String>> {
    let Some(var) = var.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
        Ok(_) => bail!("{flag} names {var}, which is empty"),
        Err(std::env::VarError::NotPresent) => bail!("{flag} names {var}, which is not set"),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{flag} names {var}, which is not valid UTF-8")
        }
    }
}

async fn worker(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let id = a.id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "worker".to_string()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    });
    if a.slots == 0 {
        bail!("--slots must be at least 1");
    }
    let cfg = swarm_worker::WorkerConfig {
        coordinators: a
            .coordinator
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect(),
        server_name: a.server_name,
        certs_dir: a.certs,
        worker_id: id,
        slots: a.slots,
        labels: parse_labels(&a.labels)?,
        agents_file: a.agents,
        peer_listen: a.peer_listen,
        peer_advertise: a.peer_advertise,
        peer_server_name: a.peer_server_name,
        drain_timeout: a.drain_timeout,
    };
    let signals = StopSignals::listen();
    swarm_worker::run_worker(cfg, signals.nth(1), signals.nth(2)).await?;
    Ok(ExitCode::SUCCESS)
}

async fn submit(a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    let mut task = SubmitTask {
        agent: a.agent,
        priority: a.priority,
        timeout_ms: a.timeout.map(ms),
        max_attempts: a.max_attempts,
        idempotency_key: a.idempotency_key,
        labels: parse_labels(&a.labels)?,
        patterns: a.patterns,
        swarm: a.swarm,
        retain_ms: a.retain.map(ms),
        ..Default::default()
    };
    if let Some(p) = a.payload {
        task.payload = Some(serde_json::from_str(&p).unwrap_or(serde_json::Value::String(p)));
    } else if let Some(f) = a.payload_file {
        use base64::Engine as _;
        let bytes = if f.as_os_str() == "-" {
            use std::io::Read;
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("read payload from stdin")?;
            b
        } else {
            std::fs::read(&f).with_context(|| format!("read payload file {}", f.display()))?
        };
        task.payload_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    let resp = client.submit(&task, a.wait.as_deref()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    }
    let Some(view) = resp.task else {
        if !a.json {
            println!(
                "{}{}",
                resp.id,
                if resp.duplicate {
                    " (existing task with this idempotency key)"
                } else {
                    ""
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    if !a.json {
        print_result(&view);
    }
    Ok(exit_for(&view))
}

fn print_result(t: &TaskView) {
    match t.state {
        TaskState::Succeeded => {
            if let Some(o) = &t.output {
                match o.as_text() {
                    Some(text) => println!("{text}"),
                    None => println!("({} bytes of binary output; use --json)", o.bytes.len()),
                }
            }
        }
        st if st.is_final() => {
            eprintln!(
                "task {} {}: {}",
                t.id,
                st.as_str(),
                t.error.as_deref().unwrap_or("no error recorded")
            );
        }
        st => eprintln!("task {} still {} when the wait ended", t.id, st.as_str()),
    }
}

fn exit_for(t: &TaskView) -> ExitCode {
    match t.state {
        TaskState::Succeeded => ExitCode::SUCCESS,
        st if st.is_final() => ExitCode::from(3),
        _ => ExitCode::from(4),
    }
}

async fn task(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCmd::Get { api, id, wait } => {
            let t = api.client()?.task(id, wait.as_deref()).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
            Ok(if wait.is_some() {
                exit_for(&t)
            } else {
                ExitCode::SUCCESS
            })
        }
        TaskCmd::List {
            api,
            state,
            limit,
            after,
        } => {
            let list = api.client()?.list(state.as_deref(), after, limit).await?;
            println!(
                "{:<10} {:<14} {:<16} {:>8}  ERROR",
                "ID", "STATE", "AGENT", "ATTEMPTS"
            );
            for t in &list.tasks {
                println!(
                    "{:<10} {:<14} {:<16} {:>8}  {}",
                    t.id,
                    t.state.as_str(),
                    t.agent,
                    t.attempts.len(),
                    t.error.as_deref().unwrap_or("")
                );
            }
            if let Some(next) = list.next_after {
                println!("(more: --after {next})");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Cancel { api, id } => {
            let t = api.client()?.cancel(id).await?;
            println!("task {} is {}", t.id, t.state.as_str());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn swarms_cmd(c: SwarmsCmd) -> anyhow::Result<ExitCode> {
    match c {
        SwarmsCmd::Create {
            api,
            name,
            topology,
            labels,
            max_degree,
            fan_out,
            stages,
            queue_depth,
            allow_empty,
            json,
        } => {
            let req = swarm_proto::api::CreateSwarm {
                name,
                topology,
                labels: parse_labels(&labels)?,
                fan_out,
                max_degree,
                stages: stages.into_iter().collect(),
                queue_depth,
                allow_empty,
            };
            let v = api.client()?.create_swarm(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", status::render_swarm(&v));
            }
        }
        SwarmsCmd::List { api, json } => {
            let l = api.client()?.swarms().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", status::render_swarm_list(&l.swarms));
            }
        }
        SwarmsCmd::Show { api, name, json } => {
            let v = api.client()?.swarm(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", status::render_swarm(&v));
            }
        }
        SwarmsCmd::Delete { api, name } => {
            api.client()?.delete_swarm(&name).await?;
            println!("deleted swarm {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cluster_cmd(c: ClusterCmd) -> anyhow::Result<ExitCode> {
    let (view, json) = match c {
        ClusterCmd::Status { api, json } => (api.client()?.cluster().await?, json),
        ClusterCmd::Add {
            api,
            id,
            raft,
            node_api,
            learner,
        } => {
            let add = swarm_proto::api::AddNode {
                id,
                raft_addr: raft,
                api_addr: node_api,
                voter: !learner,
                pattern_dimension: None,
            };
            (api.client()?.add_node(&add).await?, false)
        }
        ClusterCmd::Remove { api, id } => (api.client()?.remove_node(id).await?, false),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", status::render_cluster(&view));
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_vector(s: &str) -> anyhow::Result<Vec<f32>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .with_context(|| format!("vector component {x:?} is not a number"))
        })
        .collect()
}

fn parse_json_arg(what: &str, s: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(s).with_context(|| format!("{what} is not valid JSON"))
}

fn query_body(
    vector: Option<String>,
    text: Option<String>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    match (vector, text) {
        (Some(v), None) => {
            m.insert("vector".into(), serde_json::json!(parse_vector(&v)?));
        }
        (None, Some(t)) => {
            m.insert("text".into(), serde_json::Value::String(t));
        }
        _ => bail!("give --vector or --text"),
    }
    Ok(m)
}

async fn memory_cmd(c: MemoryCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    use serde_json::json;
    let seg = client::seg;
    let (api, method, path, body) = match c {
        MemoryCmd::Create {
            api,
            name,
            dimension,
            metric,
        } => (
            api,
            Method::PUT,
            format!("/v1/memory/{}", seg(&name)),
            Some(json!({"dimension": dimension, "metric": metric})),
        ),
        MemoryCmd::List { api } => (api, Method::GET, "/v1/memory".to_string(), None),
        MemoryCmd::Info { api, name } => {
            (api, Method::GET, format!("/v1/memory/{}", seg(&name)), None)
        }
        MemoryCmd::Upsert {
            api,
            name,
            id,
            vector,
            text,
            metadata,
            ttl,
            file,
        } => {
            let body = match file {
                Some(f) => parse_json_arg(
                    "the points file",
                    &std::fs::read_to_string(&f)
                        .with_context(|| format!("read {}", f.display()))?,
                )?,
                None => {
                    let mut p = query_body(vector, text)?;
                    p.insert("id".into(), json!(id));
                    if let Some(m) = metadata {
                        p.insert("metadata".into(), parse_json_arg("--metadata", &m)?);
                    }
                    if let Some(t) = ttl {
                        p.insert("ttl_ms".into(), json!(ms(t)));
                    }
                    json!({"points": [p]})
                }
            };
            (
                api,
                Method::POST,
                format!("/v1/memory/{}/points", seg(&name)),
                Some(body),
            )
        }
        MemoryCmd::Search {
            api,
            name,
            vector,
            text,
            k,
            ef,
            filter,
            exact,
        } => {
            let mut q = query_body(vector, text)?;
            q.insert("k".into(), json!(k));
            q.insert("exact".into(), json!(exact));
            if let Some(ef) = ef {
                q.insert("ef".into(), json!(ef));
            }
            if let Some(f) = filter {
                q.insert("filter".into(), parse_json_arg("--filter", &f)?);
            }
            (
                api,
                Method::POST,
                format!("/v1/memory/{}/search", seg(&name)),
                Some(serde_json::Value::Object(q)),
            )
        }
        MemoryCmd::Delete { api, name, ids } => (
            api,
            Method::POST,
            format!("/v1/memory/{}/delete", seg(&name)),
            Some(json!({ "ids": ids })),
        ),
        MemoryCmd::Drop { api, name } => (
            api,
            Method::DELETE,
            format!("/v1/memory/{}", seg(&name)),
            None,
        ),
    };
    let v = api.client()?.json(method, &path, body.as_ref()).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

async fn patterns_cmd(c: PatternsCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    use serde_json::json;
    let (api, method, path, body) = match c {
        PatternsCmd::Add {
            api,
            title,
            description,
            content,
            outcome,
        } => (
            api,
            Method::POST,
            "/v1/patterns",
            Some(
                json!({"items": [{"title": title, "description": description, "content": content, "outcome": outcome}]}),
            ),
        ),
        PatternsCmd::Retrieve { api, query, k } => (
            api,
            Method::POST,
            "/v1/patterns/retrieve",
            Some(json!({"query": query, "k": k})),
        ),
        PatternsCmd::List { api } => (api, Method::GET, "/v1/patterns", None),
        PatternsCmd::Judge {
            api,
            outcome,
            task,
            ids,
        } => (
            api,
            Method::POST,
            "/v1/patterns/judge",
            Some(json!({"item_ids": ids, "outcome": outcome, "task_id": task})),
        ),
        PatternsCmd::Consolidate { api } => (
            api,
            Method::POST,
            "/v1/patterns/consolidate",
            Some(json!({})),
        ),
    };
    let v = api.client()?.json(method, path, body.as_ref()).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

async fn probe(a: ProbeArgs) -> anyhow::Result<ExitCode> {
    let path = if a.what == "live" {
        "/health"
    } else {
        "/ready"
    };
    let url = format!("{}{path}", a.api.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(a.timeout)
        .build()
        .context("build HTTP client")?;
    match http.get(&url).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            println!("{status} {}", body.trim());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => {
            println!("cannot reach {url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn status_cmd(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    loop {
        let s = client.status().await?;
        let text = if a.json {
            serde_json::to_string_pretty(&s)?
        } else {
            status::render(&s)
        };
        match a.watch {
            None => {
                println!("{text}");
                return Ok(ExitCode::SUCCESS);
            }
            Some(secs) => {
                // Clear the screen and home the cursor, then redraw.
                print!("\x1b[2J\x1b[H{text}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
    }
}
