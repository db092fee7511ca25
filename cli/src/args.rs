//! The command line: `Cli` and the arguments of every command. The commands
//! themselves are in `cmd/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use swarm_coordinator::tasks::parse_duration;

#[derive(Parser)]
#[command(
    name = "swarm",
    version,
    about = "Run fleets of agents: a Raft-replicated coordinator dispatching tasks over QUIC"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "SWARM_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// TOML file of flag values (keys are long flag names).
    #[arg(long, global = true, env = "SWARM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// The connected workers: list them, drain one (it takes no new work and stays),
    /// resume it.
    #[command(subcommand)]
    Workers(WorkersCmd),
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
    /// Schedules: a task submitted on every tick of an interval or a cron expression,
    /// exactly once per tick across leader changes.
    #[command(subcommand)]
    Schedules(SchedulesCmd),
    /// Limits: concurrency limits for concurrency keys (`--concurrency 2` caps each
    /// `tenant:…` key of limit `tenant`) and rate limits tasks draw from (`--rate
    /// 60/min`).
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// API tokens: scoped credentials for people and programs (`read`, `submit`,
    /// `operate`, `admin`), optionally limited to swarms.
    #[command(subcommand)]
    Tokens(TokensCmd),
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

#[derive(Args)]
pub struct UpArgs {
    /// Number of local workers.
    #[arg(long, env = "SWARM_WORKERS", default_value_t = 2)]
    pub workers: u32,
    /// Slots per local worker.
    #[arg(long, env = "SWARM_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Where certificates, the API token and the Raft data go.
    #[arg(long, env = "SWARM_DATA_DIR", default_value = "swarm-data")]
    pub data_dir: PathBuf,
    /// HTTP API address.
    #[arg(long, env = "SWARM_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub api_listen: SocketAddr,
    /// QUIC address.
    #[arg(long, env = "SWARM_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Agents file for the local workers.
    #[arg(long, env = "SWARM_AGENTS")]
    pub agents: Option<PathBuf>,
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// This node's Raft id (unique, never reused).
    #[arg(long, env = "SWARM_NODE_ID", default_value_t = 1)]
    pub id: u64,
    /// Raft log and snapshots.
    #[arg(long, env = "SWARM_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Certificates directory (`swarm certs init`).
    #[arg(long, env = "SWARM_CERTS")]
    pub certs: PathBuf,
    /// QUIC address for workers and peers.
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// host:port peers and workers use to reach --listen (a name in the certificate).
    #[arg(long, env = "SWARM_ADVERTISE", default_value = "")]
    pub advertise: String,
    /// HTTP API address.
    #[arg(long, env = "SWARM_API_LISTEN", default_value = "0.0.0.0:8080")]
    pub api_listen: SocketAddr,
    /// host:port clients use to reach the API.
    #[arg(long, env = "SWARM_API_ADVERTISE", default_value = "")]
    pub api_advertise: String,
    /// Serve the API over HTTPS with this node's certificate: `auto` does when the API
    /// listens beyond loopback. Clients verify it with the cluster CA (`--ca`).
    #[arg(long, env = "SWARM_API_TLS", default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub api_tls: String,
    /// Most API connections open at once; more are closed at once.
    #[arg(long, env = "SWARM_API_MAX_CONNECTIONS", default_value_t = 4096)]
    pub api_max_connections: usize,
    /// Time an API client has for its TLS handshake and for each request's headers.
    #[arg(long, env = "SWARM_API_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_header_timeout: Duration,
    /// Require the API token on `/metrics` too (Prometheus then sends it as a bearer
    /// token).
    #[arg(long, env = "SWARM_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// API bearer token.
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API bearer token.
    #[arg(long, env = "SWARM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Enroll new workers (`swarm worker --enroll-api`): the cluster CA's key, to sign
    /// their certificates with. Needs --enroll-token-file.
    #[arg(long, env = "SWARM_ENROLL_CA_KEY")]
    pub enroll_ca_key: Option<PathBuf>,
    /// File holding the token new workers enroll with (it opens no other route).
    #[arg(long, env = "SWARM_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// File holding the secret task callbacks are signed with (HMAC-SHA256, the same
    /// file on every coordinator). Without it, tasks with a callback_url are refused.
    #[arg(long, env = "SWARM_CALLBACK_SECRET_FILE")]
    pub callback_secret_file: Option<PathBuf>,
    /// Hosts task callbacks may call: names (`hooks.example.com`), name suffixes
    /// (`*.example.com`), IP addresses and networks (`10.1.0.0/16`). Empty: any.
    #[arg(long, env = "SWARM_CALLBACK_ALLOW", value_delimiter = ',')]
    pub callback_allow: Vec<String>,
    /// Names of enrolled workers must start with this.
    #[arg(long, env = "SWARM_ENROLL_PREFIX", default_value = "")]
    pub enroll_prefix: String,
    /// How long an enrolled worker's certificate is valid.
    #[arg(long, env = "SWARM_ENROLL_VALIDITY", default_value = "365d", value_parser = parse_duration)]
    pub enroll_validity: Duration,
    /// Initialise a new cluster (this node plus --peer nodes) if the data dir is empty.
    #[arg(long, env = "SWARM_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Another voter for --bootstrap: ID=RAFT_HOST:PORT,API_HOST:PORT (repeatable).
    #[arg(long = "peer", env = "SWARM_PEERS", value_delimiter = ';')]
    pub peers: Vec<String>,
    /// Join a running cluster through any of these API URLs (comma-separated): this node
    /// asks to be added, catches up as a learner, then becomes a voter.
    #[arg(
        long,
        env = "SWARM_JOIN",
        value_delimiter = ',',
        conflicts_with = "bootstrap"
    )]
    pub join: Vec<String>,
    /// Unfinished tasks allowed before submits get `queue_full`.
    #[arg(long, env = "SWARM_QUEUE_LIMIT", default_value_t = 1_000_000)]
    pub queue_limit: u64,
    /// Largest task payload in bytes.
    #[arg(long, env = "SWARM_MAX_PAYLOAD_BYTES", default_value_t = 1 << 20)]
    pub max_payload_bytes: u64,
    /// Largest stored task output in bytes.
    #[arg(long, env = "SWARM_MAX_OUTPUT_BYTES", default_value_t = 1 << 20)]
    pub max_output_bytes: u64,
    /// Most bytes of an attempt's log tail stored with it (a worker's longer tail is cut
    /// to its last bytes); 0 stores none.
    #[arg(long, env = "SWARM_MAX_LOG_TAIL_BYTES", default_value_t = swarm_coordinator::node::DEFAULT_MAX_LOG_TAIL)]
    pub max_log_tail_bytes: u64,
    /// Timeout of tasks that give none.
    #[arg(long, env = "SWARM_DEFAULT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub default_timeout: Duration,
    /// Attempts of tasks that give none.
    #[arg(long, env = "SWARM_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    pub default_max_attempts: u32,
    /// Worker heartbeat interval.
    #[arg(long, env = "SWARM_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// A worker silent this long is lost, and its tasks are retried.
    #[arg(long, env = "SWARM_LEASE", default_value = "5s", value_parser = parse_duration)]
    pub lease: Duration,
    /// First retry delay (doubles per attempt).
    #[arg(long, env = "SWARM_RETRY_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Longest retry delay.
    #[arg(long, env = "SWARM_RETRY_BACKOFF_MAX", default_value = "30s", value_parser = parse_duration)]
    pub retry_backoff_max: Duration,
    /// How finished tasks become ReasoningBank patterns: `agent` (only `memory_items` an
    /// agent returns), `rules` (plus a rule-based item per task), `llm` (plus items from
    /// --llm-url), `off`.
    #[arg(long, env = "SWARM_DISTILL", default_value = "agent", value_parser = ["agent", "rules", "llm", "off"])]
    pub distill: String,
    /// OpenAI-compatible base URL for `--distill llm` (POST {url}/v1/chat/completions).
    #[arg(long, env = "SWARM_LLM_URL")]
    pub llm_url: Option<String>,
    /// Model name for `--distill llm`.
    #[arg(long, env = "SWARM_LLM_MODEL", default_value = "gpt-4o-mini")]
    pub llm_model: String,
    /// Name of the environment variable holding `--llm-url`'s bearer token (the token
    /// itself never goes on the command line).
    #[arg(long, env = "SWARM_LLM_API_KEY_ENV")]
    pub llm_api_key_env: Option<String>,
    /// Most `--distill llm` requests in flight at once; up to 16 results per slot wait
    /// for one, results past that are not distilled by the LLM.
    #[arg(long, env = "SWARM_LLM_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub llm_concurrency: u32,
    /// Snapshot the state and compact the Raft log after this many entries...
    #[arg(long, env = "SWARM_SNAPSHOT_EVERY", default_value_t = swarm_coordinator::raft::SNAPSHOT_EVERY_LOGS)]
    pub snapshot_every: u64,
    /// ...or after this many bytes of log, or of changes held in memory, since the last
    /// snapshot, whichever comes first.
    #[arg(long, env = "SWARM_SNAPSHOT_BYTES", default_value_t = swarm_coordinator::raft::SNAPSHOT_EVERY_BYTES)]
    pub snapshot_bytes: u64,
    /// How long a finished task stays readable (and its idempotency key dedupes) before
    /// it is purged, unless the task asked for its own `retain_ms`.
    #[arg(long, env = "SWARM_RETAIN_FINISHED", default_value = "3d", value_parser = parse_duration)]
    pub retain_finished: Duration,
    /// What embeds pattern texts, `text` points and queries: `hash` (built-in, offline,
    /// 256 dimensions) or `http` (an OpenAI-compatible /v1/embeddings endpoint, see
    /// --embedder-url). Every node of a cluster needs the same embedder.
    #[arg(long, env = "SWARM_EMBEDDER", default_value = "hash", value_parser = ["hash", "http"])]
    pub embedder: String,
    /// OpenAI-compatible base URL for `--embedder http` (POST {url}/v1/embeddings).
    #[arg(long, env = "SWARM_EMBEDDER_URL")]
    pub embedder_url: Option<String>,
    /// Model name for `--embedder http`.
    #[arg(
        long,
        env = "SWARM_EMBEDDER_MODEL",
        default_value = "text-embedding-3-small"
    )]
    pub embedder_model: String,
    /// Dimension of the model's vectors, required with `--embedder http`; it becomes the
    /// ReasoningBank's pattern dimension and cannot change for an existing data dir.
    #[arg(long, env = "SWARM_EMBEDDER_DIMENSION")]
    pub embedder_dimension: Option<usize>,
    /// Name of the environment variable holding the embedding endpoint's bearer token
    /// (the token itself never goes on the command line).
    #[arg(long, env = "SWARM_EMBEDDER_API_KEY_ENV")]
    pub embedder_api_key_env: Option<String>,
    /// Timeout of one embedding request.
    #[arg(long, env = "SWARM_EMBEDDER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub embedder_timeout: Duration,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Coordinator QUIC addresses, HOST:PORT (comma-separated or repeated): the worker
    /// finds the Raft leader among them and follows it.
    #[arg(
        long,
        env = "SWARM_COORDINATOR",
        value_delimiter = ',',
        required = true
    )]
    pub coordinator: Vec<String>,
    /// Certificates directory (needs ca.pem, worker.pem, worker-key.pem).
    #[arg(long, env = "SWARM_CERTS")]
    pub certs: PathBuf,
    /// Tasks run at once.
    #[arg(long, env = "SWARM_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Labels, k=v (comma-separated or repeated).
    #[arg(long = "labels", env = "SWARM_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Agents file (TOML).
    #[arg(long, env = "SWARM_AGENTS")]
    pub agents: Option<PathBuf>,
    /// Worker name, stable across restarts (default: the name its certificate gives; with
    /// a pool certificate, the pool's prefix and hostname-pid).
    #[arg(long = "id", env = "SWARM_WORKER_ID")]
    pub id: Option<String>,
    /// Enroll first if --certs holds no worker certificate yet: send a new key's signing
    /// request to this coordinator API (comma-separated URLs of one cluster) and install
    /// the certificate it signs for --id (default: the host name, e.g. a pod's or a
    /// container's). Needs --enroll-token-file and --ca.
    #[arg(long, env = "SWARM_ENROLL_API", value_delimiter = ',')]
    pub enroll_api: Vec<String>,
    /// File holding the cluster's enrollment token.
    #[arg(long, env = "SWARM_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,
    /// The cluster CA certificate: verifies the enrollment API and becomes the
    /// certificates directory's `ca.pem`.
    #[arg(long, env = "SWARM_CA")]
    pub ca: Option<PathBuf>,
    /// Name to verify in the coordinators' certificates (default: each host of --coordinator).
    #[arg(long, env = "SWARM_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Accept mesh peer links on this UDP address (e.g. 0.0.0.0:7100, or 127.0.0.1:0 for
    /// any free port). Without it the worker takes no part in mesh swarms.
    #[arg(long, env = "SWARM_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// HOST:PORT peers should dial (default: the bound --peer-listen address).
    #[arg(long, env = "SWARM_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Name to verify in peers' certificates (default: localhost).
    #[arg(long, env = "SWARM_PEER_SERVER_NAME")]
    pub peer_server_name: Option<String>,
    /// On SIGTERM or Ctrl-C the worker drains: it takes no new work, hands back the
    /// attempts it has not started, and lets running ones finish for up to this long
    /// (then kills and hands back the rest). A second signal stops at once. Keep the
    /// deployment's grace period (terminationGracePeriodSeconds, stop_grace_period)
    /// a few seconds longer.
    #[arg(long, env = "SWARM_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Bytes of each attempt's output kept (its last bytes, all streams) and reported
    /// with its end, where `swarm task logs` reads them; 0 keeps none. Coordinators store
    /// at most their --max-log-tail-bytes of it.
    #[arg(long, env = "SWARM_LOG_TAIL_BYTES", default_value_t = swarm_worker::DEFAULT_LOG_TAIL_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(0..=swarm_worker::MAX_LOG_TAIL_BYTES as u64))]
    pub log_tail_bytes: u64,
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Issue a certificate for one node (a coordinator or a worker), signed by the CA.
    Issue {
        /// The CA's directory (`ca.pem` and `ca-key.pem`).
        #[arg(long, env = "SWARM_CA_DIR")]
        ca_dir: PathBuf,
        /// The node's certificates directory to write (`ca.pem`, `<role>.pem`,
        /// `<role>-key.pem`).
        #[arg(long)]
        out: PathBuf,
        /// `coordinator` or `worker`.
        #[arg(long, value_parser = ["coordinator", "worker"])]
        role: String,
        /// The node's name: a worker's id is the name its certificate gives. `PREFIX*`
        /// issues a pool certificate for every worker id starting with PREFIX.
        #[arg(long)]
        name: String,
        /// Extra DNS names or IPs (localhost, loopback and a DNS-valid name are always in).
        #[arg(long = "san", value_delimiter = ',')]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Renew a node's certificate: a new key and the same name and addresses. Running
    /// nodes present it from their next handshake, without a restart.
    Renew {
        /// The CA's directory (`ca.pem` and `ca-key.pem`).
        #[arg(long, env = "SWARM_CA_DIR")]
        ca_dir: PathBuf,
        /// The node's certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// `coordinator` or `worker`.
        #[arg(long, value_parser = ["coordinator", "worker"])]
        role: String,
        /// Days the renewed certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a certificate: every coordinator refuses it from the next handshake and
    /// cuts the sessions that use it.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// The certificate file to revoke (its serial, name and expiry are read from it).
        #[arg(conflicts_with = "serial")]
        path: Option<PathBuf>,
        /// The serial to revoke (hex, as `swarm certs show` prints it), when the file is
        /// gone.
        #[arg(long)]
        serial: Option<String>,
    },
    /// List the revoked certificates.
    Revoked {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show who a certificate names, its serial, expiry and addresses.
    Show {
        /// A certificate file (`coordinator.pem`, `worker.pem`, ...).
        path: PathBuf,
    },
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

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Agent to run (omit for a ring swarm: its stages name the agents).
    #[arg(long, default_value = "")]
    pub agent: String,
    /// Payload: JSON if it parses as JSON, else text.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload bytes from a file (`-` for stdin).
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Per-attempt timeout (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Attempts before giving up.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Submitting twice with the same key yields one task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Required worker label k=v (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Hand the agent this many ReasoningBank patterns retrieved by the payload text.
    #[arg(long, default_value_t = 0)]
    pub patterns: u32,
    /// Run in this swarm (default: `default`, a star of every worker).
    #[arg(long)]
    pub swarm: Option<String>,
    /// Keep the finished task readable this long (default: the coordinator's
    /// --retain-finished); its idempotency key dedupes as long.
    #[arg(long, value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Run after these tasks (repeatable, or comma-separated): the task waits until all
    /// have succeeded, and its agent receives `{"payload": …, "parents": {"<id>": …}}`;
    /// a parent that ends otherwise cancels it (`dependency_failed`).
    #[arg(long = "depends-on", value_delimiter = ',')]
    pub depends_on: Vec<u64>,
    /// Tasks with the same key share the key's limit on running tasks.
    #[arg(long)]
    pub concurrency_key: Option<String>,
    /// The named rate limit each start of the task draws from.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Hold the task in `awaiting_approval` (after its parents, with --depends-on) until
    /// `swarm task approve` queues it or `swarm task reject` cancels it.
    #[arg(long)]
    pub requires_approval: bool,
    /// Fail the task (`approval_timeout`) if it is not approved this long after it began
    /// awaiting approval (e.g. 1h; at most 30d). Implies --requires-approval.
    #[arg(long, value_parser = parse_duration)]
    pub approval_timeout: Option<Duration>,
    /// POST the finished task's view to this http(s) URL, signed with the cluster's
    /// callback secret and retried until it answers 2xx.
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Wait for the result (optionally how long, default 60s).
    #[arg(long, num_args = 0..=1, default_missing_value = "60s", conflicts_with = "follow")]
    pub wait: Option<String>,
    /// Show the task's output live (stdout and stderr as the agent writes them, an
    /// `llm` agent's tokens) until it ends; exits like `--wait`.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the whole JSON response.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum TaskCmd {
    /// Submit a task graph from a JSON file (`-` for stdin): `{"steps": [{"name": "a",
    /// "after": [], "task": {"agent": "echo", "payload": …}}, …]}`. Every step commits,
    /// or none; prints each step's task id.
    Graph {
        #[command(flatten)]
        api: ApiArgs,
        file: PathBuf,
        /// Print the whole JSON response.
        #[arg(long)]
        json: bool,
    },
    /// Show one task.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
        /// Wait until the task is final (e.g. 30s).
        #[arg(long)]
        wait: Option<String>,
    },
    /// List tasks by id, oldest first (newest first with --desc), one page at a time.
    /// With filters, one request examines a bounded number of tasks: a page may then be
    /// short, or empty, and still say where the next one starts.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Only tasks in this state.
        #[arg(long)]
        state: Option<String>,
        /// Most tasks to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this task id, the last of the previous page (with --desc: show
        /// ids below it).
        #[arg(long)]
        after: Option<u64>,
        /// Newest first.
        #[arg(long)]
        desc: bool,
        #[command(flatten)]
        filter: TaskFilterArgs,
    },
    /// Run a failed or dead-lettered task again (new attempts, its history kept): one by
    /// id, or a page of them by filter (`--state failed|dead_lettered`, oldest first).
    Retry {
        #[command(flatten)]
        api: ApiArgs,
        /// The task to run again.
        id: Option<u64>,
        /// Retry by filter instead: tasks in this state (failed or dead_lettered), narrowed
        /// by the filters below.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        filter: TaskFilterArgs,
        /// With --state: continue after this task id (the previous run's last).
        #[arg(long)]
        after: Option<u64>,
        /// With --state: most tasks to retry (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Approve a task awaiting approval: it is queued. Your token's name is recorded.
    Approve {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
        /// Recorded with the decision.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a task awaiting approval: it is cancelled (and its graph dependants with
    /// it), the error naming the rejection and the comment.
    Reject {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
        /// Recorded with the decision (and in the task's error).
        #[arg(long)]
        comment: Option<String>,
    },
    /// Cancel a task (stops it on its worker if running).
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
    },
    /// Show a task's output: what its attempts logged (the tail kept with each), or
    /// with `-f` live as it is written, until the task ends.
    Logs {
        #[command(flatten)]
        api: ApiArgs,
        id: u64,
        /// Follow: stream output as it comes, until the task is final.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// Which tasks a listing (or a bulk retry) selects, besides their state.
#[derive(Debug, Clone, clap::Args)]
pub struct TaskFilterArgs {
    /// Only tasks of this agent (for a ring task: any of its stages' agents).
    #[arg(long)]
    pub agent: Option<String>,
    /// Only tasks of this swarm.
    #[arg(long)]
    pub swarm: Option<String>,
    /// Only tasks carrying label k=v (repeatable: all of them).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Only tasks whose payload holds this text (ASCII case-insensitive, UTF-8 payloads
    /// only, at most 256 bytes).
    #[arg(long)]
    pub text: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Redraw whenever the cluster changes (from its event stream, `GET /v1/events`),
    /// at most once every N seconds (default 1), until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "1")]
    pub watch: Option<u64>,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
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

#[derive(Subcommand)]
pub enum WorkersCmd {
    /// The connected workers: slots, attempts running, whether draining and why.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain a worker without stopping it: it takes no new work (from the coordinator or
    /// mesh peers), hands back what waits, finishes what it runs and stays connected,
    /// until resumed. A restarted worker starts undrained. Needs scope `operate` and a
    /// worker of protocol 7.
    Drain {
        #[command(flatten)]
        api: ApiArgs,
        /// The worker's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a drained worker: it takes work again (not one being stopped).
    Resume {
        #[command(flatten)]
        api: ApiArgs,
        /// The worker's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct ProbeArgs {
    /// `live` (process and storage: GET /health) or `ready` (has a leader and is caught
    /// up: GET /ready).
    #[arg(value_parser = ["live", "ready"])]
    pub what: String,
    /// Base URL of the coordinator's HTTP API.
    #[arg(long, env = "SWARM_PROBE_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// The cluster CA certificate (`ca.pem`) an `https://` API is verified against.
    #[arg(long, env = "SWARM_CA")]
    pub ca: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Subcommand)]
pub enum MemoryCmd {
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
pub enum PatternsCmd {
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
pub enum SwarmsCmd {
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
    /// Set or clear a swarm's token budget: once its agents have spent this many tokens
    /// in all, its token-using (`llm`) agents get no new attempt until it is raised.
    Budget {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// The most tokens (prompt and completion) the swarm's agents may spend.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        tokens: Option<u64>,
        /// Remove the budget.
        #[arg(long)]
        clear: bool,
    },
    /// Tokens LLM agents spent, by swarm, agent and model, with each swarm's budget.
    Usage {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `swarm schedules create`.
#[derive(Args)]
pub struct ScheduleCreateArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// 1 to 63 characters from a-z, 0-9, `-` and `_`.
    pub name: String,
    /// Agent to run (omit for a ring swarm: its stages name the agents).
    #[arg(long, default_value = "")]
    pub agent: String,
    /// Payload: JSON if it parses as JSON, else text.
    #[arg(long)]
    pub payload: Option<String>,
    /// Tick every this long (at least 1s), from the creation on.
    #[arg(long, value_parser = parse_duration, required_unless_present = "cron", conflicts_with = "cron")]
    pub every: Option<Duration>,
    /// Tick on this cron expression (UTC): five fields, or six with seconds first.
    #[arg(long)]
    pub cron: Option<String>,
    /// Ticks missed during an outage: `skip` fires only the latest, `all` fires each
    /// (up to --max-catch-up).
    #[arg(long, value_parser = ["skip", "all"], default_value = "skip")]
    pub catch_up: String,
    /// With `--catch-up all`: most missed ticks fired (default 10).
    #[arg(long)]
    pub max_catch_up: Option<u32>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Per-attempt timeout (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Attempts before giving up.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Required worker label k=v (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Run in this swarm (default: `default`).
    #[arg(long)]
    pub swarm: Option<String>,
    /// Keep each finished task readable this long (default: --retain-finished).
    #[arg(long, value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum SchedulesCmd {
    /// Define a schedule: its task is submitted on every tick (`--every 2s` or `--cron
    /// '*/5 * * * *'`, in UTC), with the idempotency key `schedule:<name>:<tick_ms>`.
    Create(Box<ScheduleCreateArgs>),
    /// List schedules: cadence, next tick, ticks fired, skipped and refused.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a schedule (the tasks it submitted stay).
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
    },
    /// Stop a schedule's ticks until it is resumed.
    Pause {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused schedule from its next tick after now (ticks missed while paused
    /// are not fired).
    Resume {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum LimitsCmd {
    /// Create or replace a limit: `--concurrency N` (most running tasks per key named
    /// NAME or NAME:…), `--rate N/s|N/min|N/h` with `--burst` (starts of tasks whose
    /// `rate_limit` is NAME), or both.
    Set {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
        #[arg(long)]
        concurrency: Option<u32>,
        #[arg(long)]
        rate: Option<String>,
        /// Most starts at once after a quiet spell (default 1: evenly spaced).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List limits with the keys running under them and the tasks waiting on them.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a limit: tasks naming it run unlimited from then on.
    Delete {
        #[command(flatten)]
        api: ApiArgs,
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TokensCmd {
    /// Make a token; it is printed this once (the cluster keeps only its hash).
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// A unique name for it (letters, digits, `.`, `_`, `-`).
        name: String,
        /// `read`, `submit`, `operate` or `admin`; each includes the ones before it.
        #[arg(long, value_parser = ["read", "submit", "operate", "admin"])]
        scope: String,
        /// Limit it to these swarms (comma-separated or repeated); default: all.
        #[arg(long = "swarm", value_delimiter = ',')]
        swarms: Vec<String>,
        /// How long it is valid (`30d`, `12h`); default: until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never their secrets).
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name or id; every node refuses it once the change applies.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// Its name or id.
        #[arg(value_name = "TOKEN")]
        which: String,
    },
}

/// Where the API is and how to authenticate.
#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Base URL of a coordinator's HTTP API; several (comma-separated) nodes of one
    /// cluster are tried in turn when one cannot be reached.
    #[arg(long, env = "SWARM_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// API bearer token.
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API bearer token (default: ./swarm-data/api-token if present).
    #[arg(long, env = "SWARM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The cluster CA certificate (`ca.pem`) an `https://` API is verified against.
    #[arg(long, env = "SWARM_CA")]
    pub ca: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own consistency checks over every command (unique names, valid
    /// requirements), which otherwise run only when a command is used.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
