//! The agents a worker can run: two built-ins (`echo`, `sleep`) plus any number of
//! agents declared in an agents file, of three kinds: `exec` (a local command), `http`
//! (an HTTP endpoint) and `llm` (an OpenAI-compatible chat completions API). What each
//! kind does with an attempt is described in [`crate::executor`].
//!
//! The agents file is TOML, one table per agent under `[agents.NAME]`. A table with
//! `command` and no `kind` is an `exec` agent (`kind = "exec"` may be written too):
//!
//! ```toml
//! [agents.summarize]
//! command = "/usr/local/bin/summarize"   # required
//! args = ["--model", "small"]            # optional
//! env = ["OPENAI_API_KEY", "HTTP_PROXY"] # optional: passed on from the worker's
//!                                        # environment when set there
//! env_set = { RUST_LOG = "info" }        # optional: fixed values
//! run_as = "nobody"                      # optional: a user name, or "uid:gid"
//! cwd = "work"                           # optional; relative paths are resolved against
//!                                        # the directory holding the agents file
//! timeout_ms = 60000                     # optional cap on every task's timeout
//! max_concurrency = 4                    # optional, any kind (below)
//! ```
//!
//! An `http` agent sends each attempt's payload to a URL ([`HttpSpec`]):
//!
//! ```toml
//! [agents.fetch]
//! kind = "http"
//! url = "http://127.0.0.1:9000/run"      # required: http or https, no user:password@
//! method = "POST"                         # optional: GET, POST (default), PUT, PATCH
//!                                         # or DELETE
//! headers = { "Content-Type" = "application/json" }   # optional: fixed, non-secret
//! secret_headers = { "Authorization" = "ACME_TOKEN" } # optional: header -> the name of
//!                                         # an environment variable of the worker
//! timeout_ms = 30000                      # optional cap, as for exec
//! max_concurrency = 4
//! ```
//!
//! An `llm` agent asks an OpenAI-compatible server (`POST {base_url}/chat/completions`)
//! ([`LlmSpec`]):
//!
//! ```toml
//! [agents.writer]
//! kind = "llm"
//! base_url = "https://api.openai.com/v1" # required: http or https, no user:password@
//! model = "gpt-4o-mini"                  # required
//! api_key_env = "OPENAI_API_KEY"         # optional: sent as `Authorization: Bearer …`
//! temperature = 0.2                      # optional: finite, at least 0
//! max_tokens = 1024                      # optional: at least 1
//! system_prompt = "You are careful.\n{patterns}"  # optional template (see below)
//! stream = true                          # optional, default true
//! max_retries = 4                        # optional, default 4
//! timeout_ms = 120000
//! max_concurrency = 2
//! ```
//!
//! `system_prompt` is a template: `{patterns}` is replaced by the strategies retrieved
//! for the task (empty when there are none); a template without `{patterns}` gets them
//! appended after a blank line. Without `system_prompt`,
//! [`DEFAULT_SYSTEM_PROMPT`](crate::agent_kinds::llm::DEFAULT_SYSTEM_PROMPT) is used.
//!
//! **Keys.** Each kind takes only its own keys (`kind`, `timeout_ms` and
//! `max_concurrency` are common to all three): an unknown key is an error, and so is a
//! key of another kind (an `http` agent with `command` is refused, naming `command`), as
//! are agents named like a built-in and an unknown `kind`. `timeout_ms` must be positive.
//!
//! **`max_concurrency = N`** (N ≥ 1, any kind): the worker never runs more than N
//! attempts of this agent at once, whatever its slots. An assignment beyond it waits in
//! the worker's queue while assignments of other agents may start, and starts when one
//! of this agent's attempts ends.
//!
//! **Secrets never come from the file.** `secret_headers` and `api_key_env` name
//! environment variables of the worker, read once, when the file is loaded: a variable
//! that is unset, empty, not UTF-8 or not a valid header value is a load error naming it
//! (never showing its value). Their values are kept out of `Debug` output (header values
//! are marked sensitive, the API key is a [`Secret`]). For the same reason `url` and
//! `base_url` may not carry a `user:password@` part. `headers` may not set what the
//! worker or HTTP itself sets: `Host`, `Content-Length`, `Transfer-Encoding`,
//! `Connection` and the other hop-by-hop headers, `Idempotency-Key` and `X-Swarm-*`; a
//! header given twice (in either table, in any case) is refused.
//!
//! **Environment variable names** (`env`, `env_set`, `secret_headers`, `api_key_env`)
//! must be portable names (`[A-Za-z_][A-Za-z0-9_]*`), and names starting with `SWARM_`
//! are refused everywhere: that prefix is the worker's own configuration (`SWARM_CERTS`,
//! `SWARM_TOKEN`, …), which never reaches an agent, and the per-attempt variables the
//! worker sets itself (`SWARM_TASK_ID`, …).
//!
//! An `exec` agent does **not** inherit the worker's environment: it starts from an
//! empty one (see [`crate::executor`] for exactly what it gets). `env` names the
//! variables it may have from the worker's environment; `env_set` gives fixed values
//! (the older table form `env = { NAME = "value" }` is still read, as fixed values).
//!
//! `run_as` is resolved when the file is loaded: a name through `/etc/passwd` (users
//! known only to other name services need the `"uid:gid"` form), and the agent then runs
//! with that uid and gid and no supplementary groups. A worker that is not root can only
//! name itself (same uid and gid); anything else is refused at load.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde::Deserialize;

use crate::agent_kinds::SharedClient;

/// Name of the built-in agent whose output is its payload.
pub const ECHO: &str = "echo";
/// Name of the built-in agent that sleeps for the number of milliseconds in its payload.
pub const SLEEP: &str = "sleep";
/// Names of all built-in agents.
pub const BUILTINS: [&str; 2] = [ECHO, SLEEP];
/// The agent kinds an agents file may declare (`kind = "…"`; without it: `exec`).
pub const KINDS: [&str; 3] = ["exec", "http", "llm"];
/// The default of [`LlmSpec::max_retries`].
pub const DEFAULT_LLM_MAX_RETRIES: u32 = 4;

/// An `exec` agent: a command run once per attempt, payload on stdin, result on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program to run (looked up in the agent's `PATH` when it contains no `/`).
    pub command: String,
    /// Arguments passed to the program.
    pub args: Vec<String>,
    /// Environment variables with fixed values (agents.toml `env_set`, or the older table
    /// form of `env`). Names starting with `SWARM_` are never set from here.
    pub env: BTreeMap<String, String>,
    /// Names of variables passed on from the worker's environment when set there
    /// (agents.toml `env = [...]`). Names starting with `SWARM_` are never passed on.
    pub pass_env: Vec<String>,
    /// The user the agent runs as (agents.toml `run_as`); `None`: the worker's user.
    pub run_as: Option<RunAs>,
    /// Working directory (absolute, or already resolved against the agents file's directory).
    pub cwd: Option<PathBuf>,
    /// Upper bound on the timeout of any task run by this agent.
    pub timeout_ms: Option<u64>,
    /// At most this many attempts of the agent run at once (`None`: only the slots bound
    /// them).
    pub max_concurrency: Option<u32>,
}

/// An `http` agent: every attempt is one HTTP request to `url` (see
/// [`crate::executor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpec {
    /// Where the request goes (`http` or `https`).
    pub url: Url,
    /// GET (no body), POST, PUT, PATCH or DELETE.
    pub method: Method,
    /// Headers sent with every request: the fixed `headers` and the `secret_headers`
    /// (whose values, read from the worker's environment at load, are marked sensitive,
    /// so `Debug` does not show them).
    pub headers: HeaderMap,
    /// Upper bound on the timeout of any task run by this agent.
    pub timeout_ms: Option<u64>,
    /// At most this many attempts of the agent run at once.
    pub max_concurrency: Option<u32>,
}

/// An `llm` agent: every attempt is one chat completion (retried inside the attempt on
/// 429 and 5xx) from an OpenAI-compatible server (see [`crate::executor`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LlmSpec {
    /// The API's base URL; requests go to `{base_url}/chat/completions`
    /// ([`LlmSpec::chat_completions_url`]).
    pub base_url: Url,
    /// The model asked for.
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` (agents.toml `api_key_env`: read from the
    /// worker's environment at load).
    pub api_key: Option<Secret>,
    /// Sampling temperature; `None`: the server's default. Never NaN.
    pub temperature: Option<f64>,
    /// Largest answer, in tokens; `None`: the server's default.
    pub max_tokens: Option<u32>,
    /// The system prompt template; `{patterns}` is replaced by the retrieved strategies.
    pub system_prompt: String,
    /// Whether to ask for a streamed (Server-Sent Events) answer.
    pub stream: bool,
    /// How many times a 429, a 5xx or a connection failure is retried within an attempt.
    pub max_retries: u32,
    /// Upper bound on the timeout of any task run by this agent.
    pub timeout_ms: Option<u64>,
    /// At most this many attempts of the agent run at once.
    pub max_concurrency: Option<u32>,
}

/// `temperature` is never NaN (refused at load), so equality is reflexive.
impl Eq for LlmSpec {}

/// A secret read from the worker's environment: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A user an agent runs as, resolved when the agents file is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As written in the agents file (a user name or `uid:gid`).
    pub user: String,
    /// The numeric user id.
    pub uid: u32,
    /// The numeric (primary) group id.
    pub gid: u32,
}

/// One runnable agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// Built-in: the output is the payload.
    Echo,
    /// Built-in: sleeps for the payload's number of milliseconds (`250` or `{"ms":250}`).
    Sleep,
    /// An external command.
    Exec(ExecSpec),
    /// An HTTP endpoint.
    Http(HttpSpec),
    /// An OpenAI-compatible chat completions API.
    Llm(LlmSpec),
}

impl Agent {
    /// The agent's `max_concurrency`: at most this many of its attempts run at once
    /// (`None`: no limit but the worker's slots; always `None` for the built-ins).
    pub fn max_concurrency(&self) -> Option<u32> {
        match self {
            Agent::Echo | Agent::Sleep => None,
            Agent::Exec(s) => s.max_concurrency,
            Agent::Http(s) => s.max_concurrency,
            Agent::Llm(s) => s.max_concurrency,
        }
    }
}

/// The set of agents a worker offers, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agents {
    by_name: BTreeMap<String, Agent>,
    /// The HTTP client of the `http` and `llm` agents (one connection pool), made on
    /// first use.
    client: SharedClient,
}

/// A problem with an agents file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    /// The file could not be read.
    #[error("agents file {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type, …).
    #[error("agents file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation, with line and column.
        message: String,
    },
    /// One agent's definition is invalid.
    #[error("agents file {path}: agent `{agent}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The agent's name.
        agent: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    agents: BTreeMap<String, RawAgent>,
}

/// One agent table, every kind's keys together: the file's parser refuses keys of no
/// kind (with their line and column); [`RawAgent::keys`] then tells which of the
/// known keys were given, checked against the agent's kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    kind: Option<String>,
    // exec
    command: Option<String>,
    args: Option<Vec<String>>,
    env: Option<RawEnv>,
    env_set: Option<BTreeMap<String, String>>,
    run_as: Option<String>,
    cwd: Option<PathBuf>,
    // http
    url: Option<String>,
    method: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    secret_headers: Option<BTreeMap<String, String>>,
    // llm
    base_url: Option<String>,
    model: Option<String>,
    api_key_env: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    system_prompt: Option<String>,
    stream: Option<bool>,
    max_retries: Option<u32>,
    // every kind
    timeout_ms: Option<u64>,
    max_concurrency: Option<u32>,
}

/// The keys every kind takes.
const COMMON_KEYS: [&str; 3] = ["kind", "timeout_ms", "max_concurrency"];
const EXEC_KEYS: [&str; 6] = ["command", "args", "env", "env_set", "run_as", "cwd"];
const HTTP_KEYS: [&str; 4] = ["url", "method", "headers", "secret_headers"];
const LLM_KEYS: [&str; 8] = [
    "base_url",
    "model",
    "api_key_env",
    "temperature",
    "max_tokens",
    "system_prompt",
    "stream",
    "max_retries",
];

impl RawAgent {
    /// The keys given in the file (of any kind).
    fn keys(&self) -> Vec<&'static str> {
        let given = [
            ("kind", self.kind.is_some()),
            ("command", self.command.is_some()),
            ("args", self.args.is_some()),
            ("env", self.env.is_some()),
            ("env_set", self.env_set.is_some()),
            ("run_as", self.run_as.is_some()),
            ("cwd", self.cwd.is_some()),
            ("url", self.url.is_some()),
            ("method", self.method.is_some()),
            ("headers", self.headers.is_some()),
            ("secret_headers", self.secret_headers.is_some()),
            ("base_url", self.base_url.is_some()),
            ("model", self.model.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("temperature", self.temperature.is_some()),
            ("max_tokens", self.max_tokens.is_some()),
            ("system_prompt", self.system_prompt.is_some()),
            ("stream", self.stream.is_some()),
            ("max_retries", self.max_retries.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("max_concurrency", self.max_concurrency.is_some()),
        ];
        given
            .into_iter()
            .filter_map(|(k, present)| present.then_some(k))
            .collect()
    }
}

/// `env`: a list of names passed on from the worker's environment, or (the older form)
/// a table of fixed values.
#[derive(Debug)]
enum RawEnv {
    Names(Vec<String>),
    Fixed(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for RawEnv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEnv;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a list of variable names passed on from the worker's environment \
                     (`env = [\"NAME\"]`); fixed values go in `env_set = { NAME = \"value\" }`",
                )
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawEnv, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(RawEnv::Names(names))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawEnv, A::Error> {
                let mut fixed = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    fixed.insert(k, v);
                }
                Ok(RawEnv::Fixed(fixed))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What loading needs from the host: the user database, who the worker is, and the
/// worker's environment (for `secret_headers` and `api_key_env`).
trait Host {
    /// The text of `/etc/passwd`.
    fn passwd(&self) -> std::io::Result<String>;
    /// The worker's effective uid and gid.
    fn ids(&self) -> std::io::Result<(u32, u32)>;
    /// The worker's environment variable `name`.
    fn var(&self, name: &str) -> Option<OsString>;
}

struct RealHost;

impl Host for RealHost {
    fn passwd(&self) -> std::io::Result<String> {
        std::fs::read_to_string("/etc/passwd")
    }

    fn ids(&self) -> std::io::Result<(u32, u32)> {
        current_ids()
    }

    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

/// The worker's effective uid and gid (without `unsafe`: from `/proc/self/status`, else
/// from `id`).
pub(crate) fn current_ids() -> std::io::Result<(u32, u32)> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // "Uid:\treal\teffective\tsaved\tfs"
        let effective = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok())
        };
        if let (Some(u), Some(g)) = (effective("Uid:"), effective("Gid:")) {
            return Ok((u, g));
        }
    }
    let id = |flag: &str| -> std::io::Result<u32> {
        let out = std::process::Command::new("id").arg(flag).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("cannot parse the output of `id {flag}`")))
    };
    Ok((id("-u")?, id("-g")?))
}

/// Whether `name` is a portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` is in the `SWARM_` namespace (the worker's own configuration and the
/// per-attempt variables), which agents.toml can neither pass on nor set.
pub(crate) fn reserved_env_name(name: &str) -> bool {
    name.len() >= 6 && name.as_bytes()[..6].eq_ignore_ascii_case(b"SWARM_")
}

fn check_env_name(key: &str, name: &str) -> Result<(), String> {
    if !valid_env_name(name) {
        return Err(format!(
            "`{key}`: invalid environment variable name {name:?} (letters, digits and `_`, \
             not starting with a digit)"
        ));
    }
    if reserved_env_name(name) {
        return Err(format!(
            "`{key}`: `{name}` is refused: names starting with `SWARM_` are reserved (the \
             worker's own configuration, such as its certificates, keys and token, never \
             reaches an agent; the worker sets the agent's SWARM_* variables itself)"
        ));
    }
    Ok(())
}

/// Resolves `run_as` (`name` or `uid:gid`) against the text of `/etc/passwd`.
fn resolve_run_as(
    user: &str,
    passwd: impl FnOnce() -> std::io::Result<String>,
) -> Result<RunAs, String> {
    if let Some((u, g)) = user.split_once(':') {
        let (Ok(uid), Ok(gid)) = (u.trim().parse::<u32>(), g.trim().parse::<u32>()) else {
            return Err(format!(
                "`run_as`: {user:?} is neither a user name nor \"uid:gid\" (two numbers)"
            ));
        };
        return Ok(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        });
    }
    if user.is_empty() {
        return Err("`run_as` must not be empty".into());
    }
    let text = passwd().map_err(|e| format!("`run_as`: cannot read /etc/passwd: {e}"))?;
    for line in text.lines() {
        let mut fields = line.split(':');
        if fields.next() != Some(user) {
            continue;
        }
        let _password = fields.next();
        let (Some(Ok(uid)), Some(Ok(gid))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u32>),
        ) else {
            return Err(format!(
                "`run_as`: the /etc/passwd entry of `{user}` is malformed"
            ));
        };
        return Ok(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        });
    }
    Err(format!(
        "`run_as`: no user `{user}` in /etc/passwd (for a user known only to another name \
         service, write \"uid:gid\")"
    ))
}

/// A worker that is not root cannot switch users: it may only "run as" itself.
fn check_run_as(run_as: &RunAs, (euid, egid): (u32, u32)) -> Result<(), String> {
    if euid != 0 && (run_as.uid != euid || run_as.gid != egid) {
        return Err(format!(
            "run_as needs the worker to run as root: `run_as = {:?}` is uid {} gid {}, \
             but the worker runs as uid {euid} gid {egid}",
            run_as.user, run_as.uid, run_as.gid
        ));
    }
    Ok(())
}

impl Default for Agents {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Agents {
    /// Only the built-in agents.
    pub fn builtin() -> Self {
        let mut by_name = BTreeMap::new();
        by_name.insert(ECHO.to_owned(), Agent::Echo);
        by_name.insert(SLEEP.to_owned(), Agent::Sleep);
        Agents {
            by_name,
            client: SharedClient::default(),
        }
    }

    /// The built-ins plus the agents declared in the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AgentsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The built-ins plus the agents declared in `text`, which was read from `path`
    /// (used in error messages and to resolve relative `cwd`s). The worker's environment
    /// is read for `secret_headers` and `api_key_env`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AgentsError> {
        Self::parse_on(text, path, &RealHost)
    }

    fn parse_on(text: &str, path: &Path, host: &dyn Host) -> Result<Self, AgentsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| AgentsError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut agents = Self::builtin();
        for (name, def) in raw.agents {
            let invalid = |message: String| AgentsError::Invalid {
                path: path.to_owned(),
                agent: name.clone(),
                message,
            };
            if BUILTINS.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "the name clashes with a built-in agent (built-ins: {})",
                    BUILTINS.join(", ")
                )));
            }
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "agent names must be non-empty and contain no whitespace".into(),
                ));
            }
            let agent = parse_agent(def, base, host).map_err(invalid)?;
            agents.by_name.insert(name, agent);
        }
        Ok(agents)
    }

    /// Adds (or replaces) an `exec` agent; for embedding and tests.
    pub fn with_exec(self, name: impl Into<String>, spec: ExecSpec) -> Self {
        self.with_agent(name, Agent::Exec(spec))
    }

    /// Adds (or replaces) an agent of any kind; for embedding and tests.
    pub fn with_agent(mut self, name: impl Into<String>, agent: Agent) -> Self {
        self.by_name.insert(name.into(), agent);
        self
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.by_name.get(name)
    }

    /// All agent names, sorted, built-ins included.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// The HTTP client the `http` and `llm` agents share.
    pub(crate) fn client(&self) -> &SharedClient {
        &self.client
    }
}

/// One agent table to an [`Agent`], or what is wrong with it.
fn parse_agent(def: RawAgent, base: &Path, host: &dyn Host) -> Result<Agent, String> {
    let kind = def.kind.clone().unwrap_or_else(|| "exec".to_owned());
    let own: &[&str] = match kind.as_str() {
        "exec" => &EXEC_KEYS,
        "http" => &HTTP_KEYS,
        "llm" => &LLM_KEYS,
        other => {
            return Err(format!(
                "unknown `kind` {other:?} (kinds: {})",
                KINDS.join(", ")
            ))
        }
    };
    if let Some(key) = def
        .keys()
        .into_iter()
        .find(|k| !COMMON_KEYS.contains(k) && !own.contains(k))
    {
        let hint = if def.kind.is_none() {
            " (an agent without `kind` is an `exec` agent; set `kind = \"http\"` or \
             `kind = \"llm\"` for the others)"
        } else {
            ""
        };
        let takes: Vec<&str> = COMMON_KEYS.iter().chain(own).copied().collect();
        return Err(format!(
            "unknown key `{key}` for `{kind}` agents (they take: {}){hint}",
            takes.join(", ")
        ));
    }
    if def.timeout_ms == Some(0) {
        return Err("`timeout_ms` must be positive".into());
    }
    if def.max_concurrency == Some(0) {
        return Err("`max_concurrency` must be at least 1".into());
    }
    match kind.as_str() {
        "http" => parse_http(def, host).map(Agent::Http),
        "llm" => parse_llm(def, host).map(Agent::Llm),
        _ => parse_exec(def, base, host).map(Agent::Exec),
    }
}

fn parse_exec(def: RawAgent, base: &Path, host: &dyn Host) -> Result<ExecSpec, String> {
    let command = match def.command {
        None => return Err("missing required key `command`".into()),
        Some(c) if c.trim().is_empty() => return Err("`command` must not be empty".into()),
        Some(c) => c,
    };
    let (pass_env, mut fixed) = match def.env {
        None => (Vec::new(), BTreeMap::new()),
        Some(RawEnv::Names(names)) => (names, BTreeMap::new()),
        Some(RawEnv::Fixed(fixed)) => (Vec::new(), fixed),
    };
    for n in &pass_env {
        check_env_name("env", n)?;
    }
    for (i, n) in pass_env.iter().enumerate() {
        if pass_env[..i].contains(n) {
            return Err(format!("`env`: `{n}` is listed twice"));
        }
    }
    for n in fixed.keys() {
        check_env_name("env", n)?;
    }
    for (n, v) in def.env_set.unwrap_or_default() {
        check_env_name("env_set", &n)?;
        if fixed.contains_key(&n) {
            return Err(format!(
                "`{n}` is given both in the table form of `env` and in `env_set`"
            ));
        }
        fixed.insert(n, v);
    }
    if let Some(n) = pass_env.iter().find(|n| fixed.contains_key(*n)) {
        return Err(format!(
            "`{n}` is both passed on (`env`) and given a fixed value (`env_set`)"
        ));
    }
    if let Some(bad) = fixed.iter().find(|(_, v)| v.contains('\0')) {
        return Err(format!(
            "the value of environment variable `{}` contains a NUL byte",
            bad.0
        ));
    }
    let run_as = match def.run_as {
        None => None,
        Some(user) => {
            let run_as = resolve_run_as(user.trim(), || host.passwd())?;
            let ids = host
                .ids()
                .map_err(|e| format!("`run_as`: cannot tell which user the worker is: {e}"))?;
            check_run_as(&run_as, ids)?;
            Some(run_as)
        }
    };
    let cwd = def
        .cwd
        .map(|c| if c.is_relative() { base.join(c) } else { c });
    Ok(ExecSpec {
        command,
        args: def.args.unwrap_or_default(),
        env: fixed,
        pass_env,
        run_as,
        cwd,
        timeout_ms: def.timeout_ms,
        max_concurrency: def.max_concurrency,
    })
}

/// Headers an agents file may not set: HTTP's own framing and hop-by-hop headers, and
/// the ones the worker sets on every request (`X-Swarm-*` is refused as a prefix).
const RESERVED_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "idempotency-key",
    "x-swarm-",
];

fn parse_http(def: RawAgent, host: &dyn Host) -> Result<HttpSpec, String> {
    let url = match def.url {
        None => return Err("missing required key `url`".into()),
        Some(u) => parse_url("url", &u)?,
    };
    let method = match def.method {
        None => Method::POST,
        Some(m) => match m.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            _ => {
                return Err(format!(
                    "`method`: {m:?} is not one of GET, POST, PUT, PATCH, DELETE"
                ))
            }
        },
    };
    let mut headers = HeaderMap::new();
    for (name, value) in def.headers.unwrap_or_default() {
        let header = header_name("headers", &name)?;
        let value = HeaderValue::from_str(&value).map_err(|_| {
            format!(
                "`headers`: the value of `{name}` is not a valid header value (visible \
                 ASCII, spaces and tabs)"
            )
        })?;
        insert_header(&mut headers, "headers", &name, header, value)?;
    }
    for (name, var) in def.secret_headers.unwrap_or_default() {
        let header = header_name("secret_headers", &name)?;
        let what = format!("`secret_headers` (header `{name}`)");
        let secret = secret_from_env("secret_headers", Some(&name), &var, host)?;
        let mut value = HeaderValue::from_str(&secret).map_err(|_| {
            format!(
                "{what}: the value of environment variable `{var}` is not a valid header \
                 value (visible ASCII, spaces and tabs)"
            )
        })?;
        value.set_sensitive(true);
        insert_header(&mut headers, "secret_headers", &name, header, value)?;
    }
    Ok(HttpSpec {
        url,
        method,
        headers,
        timeout_ms: def.timeout_ms,
        max_concurrency: def.max_concurrency,
    })
}

fn header_name(key: &str, name: &str) -> Result<HeaderName, String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{key}`: {name:?} is not a valid header name"))?;
    let lower = header.as_str();
    if RESERVED_HEADERS
        .iter()
        .any(|r| lower == *r || (r.ends_with('-') && lower.starts_with(r)))
    {
        return Err(format!(
            "`{key}`: the header `{name}` is set by the worker or by HTTP itself and cannot \
             be configured (refused: Host, Content-Length, Transfer-Encoding, Connection and \
             the other hop-by-hop headers, Idempotency-Key, X-Swarm-*)"
        ));
    }
    Ok(header)
}

fn insert_header(
    headers: &mut HeaderMap,
    key: &str,
    name: &str,
    header: HeaderName,
    value: HeaderValue,
) -> Result<(), String> {
    if headers.contains_key(&header) {
        return Err(format!(
            "`{key}`: the header `{name}` is given twice (header names are case-insensitive; \
             `headers` and `secret_headers` together)"
        ));
    }
    headers.insert(header, value);
    Ok(())
}

fn parse_llm(def: RawAgent, host: &dyn Host) -> Result<LlmSpec, String> {
    let base_url = match def.base_url {
        None => return Err("missing required key `base_url`".into()),
        Some(u) => parse_url("base_url", &u)?,
    };
    let model = match def.model {
        None => return Err("missing required key `model`".into()),
        Some(m) if m.trim().is_empty() => return Err("`model` must not be empty".into()),
        Some(m) => m,
    };
    let api_key = match def.api_key_env {
        None => None,
        Some(var) => {
            let key = secret_from_env("api_key_env", None, &var, host)?;
            if HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
                return Err(format!(
                    "`api_key_env`: the value of environment variable `{var}` cannot be sent \
                     in an HTTP header (visible ASCII only)"
                ));
            }
            Some(Secret(key))
        }
    };
    if let Some(t) = def.temperature {
        if !t.is_finite() || t < 0.0 {
            return Err(format!(
                "`temperature` must be a finite number, at least 0 (got {t})"
            ));
        }
    }
    if def.max_tokens == Some(0) {
        return Err("`max_tokens` must be at least 1".into());
    }
    Ok(LlmSpec {
        base_url,
        model,
        api_key,
        temperature: def.temperature,
        max_tokens: def.max_tokens,
        system_prompt: def
            .system_prompt
            .unwrap_or_else(|| crate::agent_kinds::llm::DEFAULT_SYSTEM_PROMPT.to_owned()),
        stream: def.stream.unwrap_or(true),
        max_retries: def.max_retries.unwrap_or(DEFAULT_LLM_MAX_RETRIES),
        timeout_ms: def.timeout_ms,
        max_concurrency: def.max_concurrency,
    })
}

/// An `http` or `https` URL with a host and no credentials.
fn parse_url(key: &str, text: &str) -> Result<Url, String> {
    let url =
        Url::parse(text.trim()).map_err(|e| format!("`{key}`: {text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "`{key}`: the scheme must be http or https, not `{}`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{key}`: {text:?} names no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{key}`: credentials in the URL are refused (secrets never come from the agents \
             file: use `secret_headers` or `api_key_env`)"
        ));
    }
    Ok(url)
}

/// The value of the worker's environment variable `var`, named by `key` of the agents
/// file (for `header`, if given). Error messages name the variable, never its value.
fn secret_from_env(
    key: &str,
    header: Option<&str>,
    var: &str,
    host: &dyn Host,
) -> Result<String, String> {
    check_env_name(key, var)?;
    let what = match header {
        Some(h) => format!("`{key}` (header `{h}`)"),
        None => format!("`{key}`"),
    };
    let Some(value) = host.var(var) else {
        return Err(format!(
            "{what}: environment variable `{var}` is not set on the worker"
        ));
    };
    let value = value
        .into_string()
        .map_err(|_| format!("{what}: environment variable `{var}` is not valid UTF-8"))?;
    if value.is_empty() {
        return Err(format!("{what}: environment variable `{var}` is empty"));
    }
    Ok(value)
}

impl ExecSpec {
    /// A spec running `command args…` with no extra environment, no `run_as`, no cwd, no
    /// timeout cap and no concurrency limit.
    pub fn new(
        command: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ExecSpec {
            command: command.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            run_as: None,
            cwd: None,
            timeout_ms: None,
            max_concurrency: None,
        }
    }
}

impl HttpSpec {
    /// A spec POSTing to `url` with no headers, no timeout cap and no concurrency limit.
    pub fn new(url: Url) -> Self {
        HttpSpec {
            url,
            method: Method::POST,
            headers: HeaderMap::new(),
            timeout_ms: None,
            max_concurrency: None,
        }
    }
}

impl LlmSpec {
    /// A spec asking `model` at `base_url`, with the defaults of the agents file: no API
    /// key, the server's temperature and token limit, the default system prompt,
    /// streaming, [`DEFAULT_LLM_MAX_RETRIES`] retries, no timeout cap and no concurrency
    /// limit.
    pub fn new(base_url: Url, model: impl Into<String>) -> Self {
        LlmSpec {
            base_url,
            model: model.into(),
            api_key: None,
            temperature: None,
            max_tokens: None,
            system_prompt: crate::agent_kinds::llm::DEFAULT_SYSTEM_PROMPT.to_owned(),
            stream: true,
            max_retries: DEFAULT_LLM_MAX_RETRIES,
            timeout_ms: None,
            max_concurrency: None,
        }
    }

    /// Where requests go: `{base_url}/chat/completions` (a trailing `/` of the base
    /// URL's path is not doubled; its query, if any, is kept).
    pub fn chat_completions_url(&self) -> Url {
        let mut url = self.base_url.clone();
        let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Agents, AgentsError> {
        Agents::parse(text, Path::new("/etc/swarm/agents.toml"))
    }

    #[test]
    fn empty_file_has_builtins() {
        let a = parse("").unwrap();
        assert_eq!(a.names(), vec!["echo", "sleep"]);
        assert_eq!(a.get("echo"), Some(&Agent::Echo));
        assert_eq!(a.get("sleep"), Some(&Agent::Sleep));
    }

    #[test]
    fn full_agent() {
        let a = parse(
            r#"
            [agents.sum]
            command = "python3"
            args = ["-c", "print(1)"]
            env = { A = "1", B = "two" }
            cwd = "work"
            timeout_ms = 500

            [agents.abs]
            command = "/bin/true"
            cwd = "/tmp"
            "#,
        )
        .unwrap();
        assert_eq!(a.names(), vec!["abs", "echo", "sleep", "sum"]);
        let Some(Agent::Exec(spec)) = a.get("sum") else {
            panic!("not exec")
        };
        assert_eq!(spec.command, "python3");
        assert_eq!(spec.args, vec!["-c", "print(1)"]);
        assert_eq!(spec.env.get("B").map(String::as_str), Some("two"));
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/etc/swarm/work")));
        assert_eq!(spec.timeout_ms, Some(500));
        let Some(Agent::Exec(spec)) = a.get("abs") else {
            panic!("not exec")
        };
        assert_eq!(spec.cwd.as_deref(), Some(Path::new("/tmp")));
        assert!(spec.args.is_empty() && spec.env.is_empty() && spec.timeout_ms.is_none());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let cases: &[(&str, &[&str])] = &[
            (
                "[agents.x\ncommand = 1",
                &["/etc/swarm/agents.toml", "line"],
            ),
            (
                "[agents.x]\nargs = []",
                &["agent `x`", "missing required key `command`"],
            ),
            (
                "[agents.x]\ncommand = \"\"",
                &["agent `x`", "must not be empty"],
            ),
            (
                "[agents.x]\ncommand = \"a\"\ncomand = \"b\"",
                &["unknown field `comand`"],
            ),
            ("[agent.x]\ncommand = \"a\"", &["unknown field `agent`"]),
            (
                "[agents.echo]\ncommand = \"a\"",
                &["agent `echo`", "built-in"],
            ),
            (
                "[agents.sleep]\ncommand = \"a\"",
                &["agent `sleep`", "built-in"],
            ),
            ("[agents.x]\ncommand = \"a\"\nargs = \"b\"", &["args"]),
            (
                "[agents.x]\ncommand = \"a\"\ntimeout_ms = 0",
                &["timeout_ms", "positive"],
            ),
            (
                "[agents.x]\ncommand = \"a\"\nenv = { \"A=B\" = \"c\" }",
                &["environment"],
            ),
        ];
        for (text, needles) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains("/etc/swarm/agents.toml"), "{err}");
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn env_names_and_fixed_values() {
        let a = parse(
            r#"
            [agents.a]
            command = "x"
            env = ["OPENAI_API_KEY", "HTTP_PROXY", "_x1"]
            env_set = { MODEL = "small", PATH = "/opt/bin" }

            [agents.legacy]
            command = "x"
            env = { RUST_LOG = "info" }
            env_set = { B = "2" }
            "#,
        )
        .unwrap();
        let Some(Agent::Exec(spec)) = a.get("a") else {
            panic!("not exec")
        };
        assert_eq!(spec.pass_env, vec!["OPENAI_API_KEY", "HTTP_PROXY", "_x1"]);
        assert_eq!(spec.env.len(), 2);
        assert_eq!(spec.env.get("MODEL").map(String::as_str), Some("small"));
        assert_eq!(spec.run_as, None);
        let Some(Agent::Exec(spec)) = a.get("legacy") else {
            panic!("not exec")
        };
        assert!(spec.pass_env.is_empty());
        assert_eq!(spec.env.get("RUST_LOG").map(String::as_str), Some("info"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("2"));
    }

    #[test]
    fn env_errors() {
        let cases: &[(&str, &[&str])] = &[
            (
                "env = [\"1A\"]",
                &["`env`", "invalid environment variable name \"1A\""],
            ),
            ("env = [\"A-B\"]", &["invalid environment variable name"]),
            ("env = [\"\"]", &["invalid environment variable name \"\""]),
            ("env = [\"A=B\"]", &["invalid environment variable name"]),
            ("env = [\"É\"]", &["invalid environment variable name"]),
            ("env_set = { \"A B\" = \"1\" }", &["`env_set`", "invalid"]),
            (
                "env = [\"SWARM_CERTS\"]",
                &[
                    "`env`",
                    "`SWARM_CERTS` is refused",
                    "reserved",
                    "certificates",
                ],
            ),
            ("env = [\"SWARM_TOKEN\"]", &["`SWARM_TOKEN` is refused"]),
            (
                "env = [\"swarm_token_file\"]",
                &["`swarm_token_file` is refused"],
            ),
            ("env = [\"SWARM_\"]", &["`SWARM_` is refused"]),
            (
                "env_set = { SWARM_TASK_ID = \"1\" }",
                &["`env_set`", "`SWARM_TASK_ID` is refused"],
            ),
            (
                "env = { SWARM_AGENTS = \"x\" }",
                &["`SWARM_AGENTS` is refused"],
            ),
            ("env = [\"A\", \"A\"]", &["listed twice"]),
            (
                "env = [\"A\"]\nenv_set = { A = \"1\" }",
                &["`A` is both passed on"],
            ),
            (
                "env = { A = \"1\" }\nenv_set = { A = \"2\" }",
                &["`A` is given both"],
            ),
            ("env = \"A\"", &["list of variable names", "env_set"]),
            ("env = [1]", &["env"]),
            ("env_set = [\"A\"]", &["env_set"]),
            ("env_set = { A = \"a\\u0000b\" }", &["NUL"]),
            ("envs = [\"A\"]", &["unknown field `envs`"]),
        ];
        for (extra, needles) in cases {
            let text = format!("[agents.x]\ncommand = \"a\"\n{extra}\n");
            let err = parse(&text).expect_err(&text).to_string();
            assert!(err.contains("/etc/swarm/agents.toml"), "{err}");
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn reserved_names() {
        for n in ["SWARM_CERTS", "swarm_x", "Swarm_Token", "SWARM_"] {
            assert!(reserved_env_name(n), "{n}");
        }
        for n in ["SWARM", "SWARMX", "MY_SWARM_CERTS", "", "É", "SWARMÉ_"] {
            assert!(!reserved_env_name(n), "{n}");
        }
    }

    struct FakeHost {
        ids: (u32, u32),
        env: BTreeMap<String, OsString>,
    }

    impl Host for FakeHost {
        fn passwd(&self) -> std::io::Result<String> {
            Ok("# comment\n\
                root:x:0:0:root:/root:/bin/bash\n\
                nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                svc:x:1000:1001::/home/svc:/bin/sh\n\
                broken:x:abc:1::/:/bin/sh\n"
                .into())
        }

        fn ids(&self) -> std::io::Result<(u32, u32)> {
            Ok(self.ids)
        }

        fn var(&self, name: &str) -> Option<OsString> {
            self.env.get(name).cloned()
        }
    }

    fn parse_as(ids: (u32, u32), run_as: &str) -> Result<Option<RunAs>, String> {
        let text = format!("[agents.x]\ncommand = \"a\"\nrun_as = {run_as:?}\n");
        let agents = Agents::parse_on(
            &text,
            Path::new("/etc/swarm/agents.toml"),
            &FakeHost {
                ids,
                env: BTreeMap::new(),
            },
        )
        .map_err(|e| e.to_string())?;
        match agents.get("x") {
            Some(Agent::Exec(spec)) => Ok(spec.run_as.clone()),
            _ => panic!("not exec"),
        }
    }

    #[test]
    fn run_as_resolution() {
        let root = (0, 0);
        let nobody = parse_as(root, "nobody").unwrap().unwrap();
        assert_eq!(
            (nobody.uid, nobody.gid, nobody.user.as_str()),
            (65534, 65534, "nobody")
        );
        let svc = parse_as(root, "svc").unwrap().unwrap();
        assert_eq!((svc.uid, svc.gid), (1000, 1001));
        let num = parse_as(root, "123:456").unwrap().unwrap();
        assert_eq!((num.uid, num.gid), (123, 456));
        for (value, needle) in [
            ("ghost", "no user `ghost` in /etc/passwd"),
            ("1:x", "neither a user name nor"),
            (":5", "neither a user name nor"),
            ("", "must not be empty"),
            ("broken", "malformed"),
        ] {
            let err = parse_as(root, value).unwrap_err();
            assert!(
                err.contains("agent `x`") && err.contains(needle),
                "{value:?}: {err}"
            );
        }
    }

    #[test]
    fn run_as_needs_root_to_switch_users() {
        // A worker running as svc (1000:1001) may only run agents as itself.
        let svc = (1000, 1001);
        assert_eq!(parse_as(svc, "svc").unwrap().unwrap().uid, 1000);
        assert!(parse_as(svc, "1000:1001").is_ok());
        for other in ["nobody", "root", "1000:0", "0:1001"] {
            let err = parse_as(svc, other).unwrap_err();
            assert!(
                err.contains("run_as needs the worker to run as root")
                    && err.contains("uid 1000 gid 1001")
                    && err.contains("/etc/swarm/agents.toml"),
                "{other}: {err}"
            );
        }
    }

    #[test]
    fn current_ids_match_the_process() {
        let (uid, _gid) = current_ids().unwrap();
        let meta = std::fs::metadata("/proc/self").ok();
        if let Some(meta) = meta {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(uid, meta.uid());
        }
    }

    #[test]
    fn missing_file() {
        let err = Agents::load(Path::new("/nonexistent/agents.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/agents.toml") && err.contains("cannot read"),
            "{err}"
        );
    }

    /// Parses `text` on a host whose environment holds `env`.
    fn parse_with_env(text: &str, env: &[(&str, &str)]) -> Result<Agents, String> {
        let host = FakeHost {
            ids: (0, 0),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
                .collect(),
        };
        Agents::parse_on(text, Path::new("/etc/swarm/agents.toml"), &host)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn http_agents() {
        let a = parse_with_env(
            r#"
            [agents.fetch]
            kind = "http"
            url = "http://127.0.0.1:9000/run?x=1"
            method = "put"
            headers = { "Content-Type" = "application/json", "X-Plain" = "a b" }
            secret_headers = { "Authorization" = "ACME_TOKEN" }
            timeout_ms = 30000
            max_concurrency = 4

            [agents.minimal]
            kind = "http"
            url = "https://example.com"
            "#,
            &[("ACME_TOKEN", "Bearer tok-1234")],
        )
        .unwrap();
        let Some(Agent::Http(spec)) = a.get("fetch") else {
            panic!("not http")
        };
        assert_eq!(spec.url.as_str(), "http://127.0.0.1:9000/run?x=1");
        assert_eq!(spec.method, Method::PUT);
        assert_eq!(spec.headers.len(), 3);
        assert_eq!(spec.headers["content-type"], "application/json");
        assert_eq!(spec.headers["x-plain"], "a b");
        assert_eq!(spec.headers["authorization"], "Bearer tok-1234");
        assert!(spec.headers["authorization"].is_sensitive());
        assert!(!spec.headers["content-type"].is_sensitive());
        assert_eq!(spec.timeout_ms, Some(30000));
        assert_eq!(a.get("fetch").unwrap().max_concurrency(), Some(4));
        // The secret never shows in Debug output.
        assert!(!format!("{a:?}").contains("tok-1234"), "{a:?}");
        let Some(Agent::Http(spec)) = a.get("minimal") else {
            panic!("not http")
        };
        assert_eq!(
            spec,
            &HttpSpec::new("https://example.com/".parse().unwrap())
        );
        assert_eq!(spec.method, Method::POST);
    }

    #[test]
    fn llm_agents() {
        let a = parse_with_env(
            r#"
            [agents.writer]
            kind = "llm"
            base_url = "https://api.openai.com/v1"
            model = "gpt-4o-mini"
            api_key_env = "OPENAI_API_KEY"
            temperature = 0.2
            max_tokens = 1024
            system_prompt = "Be careful.\n{patterns}"
            stream = false
            max_retries = 2
            timeout_ms = 120000
            max_concurrency = 2

            [agents.local]
            kind = "llm"
            base_url = "http://127.0.0.1:8080/v1/"
            model = "llama"
            temperature = 1
            "#,
            &[("OPENAI_API_KEY", "sk-secret-42")],
        )
        .unwrap();
        let Some(Agent::Llm(spec)) = a.get("writer") else {
            panic!("not llm")
        };
        assert_eq!(
            spec.chat_completions_url().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(spec.model, "gpt-4o-mini");
        assert_eq!(
            spec.api_key.as_ref().map(Secret::expose),
            Some("sk-secret-42")
        );
        assert_eq!(spec.temperature, Some(0.2));
        assert_eq!(spec.max_tokens, Some(1024));
        assert_eq!(spec.system_prompt, "Be careful.\n{patterns}");
        assert!(!spec.stream);
        assert_eq!(spec.max_retries, 2);
        assert_eq!(spec.timeout_ms, Some(120000));
        assert_eq!(spec.max_concurrency, Some(2));
        assert!(!format!("{a:?}").contains("sk-secret-42"));
        let Some(Agent::Llm(spec)) = a.get("local") else {
            panic!("not llm")
        };
        assert_eq!(
            spec.chat_completions_url().as_str(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(spec.temperature, Some(1.0));
        let mut want = LlmSpec::new(spec.base_url.clone(), "llama");
        want.temperature = Some(1.0);
        assert_eq!(spec, &want, "defaults");
        assert!(spec.stream && spec.max_retries == DEFAULT_LLM_MAX_RETRIES);
        assert_eq!(
            spec.system_prompt,
            crate::agent_kinds::llm::DEFAULT_SYSTEM_PROMPT
        );
    }

    #[test]
    fn chat_completions_urls() {
        for (base, want) in [
            ("http://h/v1", "http://h/v1/chat/completions"),
            ("http://h/v1/", "http://h/v1/chat/completions"),
            ("http://h", "http://h/chat/completions"),
            (
                "https://h/openai/deployments/x?api-version=1",
                "https://h/openai/deployments/x/chat/completions?api-version=1",
            ),
        ] {
            let spec = LlmSpec::new(base.parse().unwrap(), "m");
            assert_eq!(spec.chat_completions_url().as_str(), want, "{base}");
        }
    }

    #[test]
    fn exec_agents_take_max_concurrency_and_an_explicit_kind() {
        let a =
            parse("[agents.x]\nkind = \"exec\"\ncommand = \"a\"\nmax_concurrency = 3\n").unwrap();
        let Some(Agent::Exec(spec)) = a.get("x") else {
            panic!("not exec")
        };
        assert_eq!(spec.max_concurrency, Some(3));
        assert_eq!(a.get("x").unwrap().max_concurrency(), Some(3));
        assert_eq!(a.get("echo").unwrap().max_concurrency(), None);
    }

    #[test]
    fn kind_errors() {
        let env = [("TOKEN", "t"), ("EMPTY", ""), ("BAD_VALUE", "a\nb")];
        let http = "kind = \"http\"\nurl = \"http://h/\"\n";
        let llm = "kind = \"llm\"\nbase_url = \"http://h/v1\"\nmodel = \"m\"\n";
        let cases: Vec<(String, &[&str])> = vec![
            ("kind = \"ftp\"".into(), &["unknown `kind` \"ftp\"", "exec, http, llm"]),
            ("kind = \"http\"".into(), &["missing required key `url`"]),
            ("kind = \"llm\"\nmodel = \"m\"".into(), &["missing required key `base_url`"]),
            ("kind = \"llm\"\nbase_url = \"http://h\"".into(), &["missing required key `model`"]),
            (format!("{llm}model2 = 1"), &["unknown field `model2`"]),
            (
                format!("{http}command = \"x\""),
                &["unknown key `command` for `http` agents", "url, method"],
            ),
            (format!("{http}model = \"x\""), &["unknown key `model` for `http` agents"]),
            (format!("{llm}args = []"), &["unknown key `args` for `llm` agents"]),
            (format!("{llm}headers = {{}}"), &["unknown key `headers` for `llm` agents"]),
            (
                "command = \"a\"\nurl = \"http://h\"".into(),
                &["unknown key `url` for `exec` agents", "without `kind`"],
            ),
            (
                "url = \"http://h\"".into(),
                &["unknown key `url` for `exec` agents"],
            ),
            (format!("{http}method = \"HEAD\""), &["`method`", "\"HEAD\""]),
            ("kind = \"http\"\nurl = \"ftp://h/\"".into(), &["`url`", "http or https"]),
            ("kind = \"http\"\nurl = \"not a url\"".into(), &["`url`", "not a URL"]),
            (
                "kind = \"http\"\nurl = \"http://u:p@h/\"".into(),
                &["`url`", "credentials"],
            ),
            (
                "kind = \"llm\"\nbase_url = \"https://k@h/v1\"\nmodel = \"m\"".into(),
                &["`base_url`", "credentials"],
            ),
            (format!("{llm}model = \"\""), &["duplicate key"]),
            ("kind = \"llm\"\nbase_url = \"http://h\"\nmodel = \" \"".into(), &["`model` must not be empty"]),
            (format!("{http}max_concurrency = 0"), &["`max_concurrency` must be at least 1"]),
            (format!("{llm}max_concurrency = 0"), &["`max_concurrency` must be at least 1"]),
            ("command = \"a\"\nmax_concurrency = 0".into(), &["`max_concurrency` must be at least 1"]),
            ("command = \"a\"\nmax_concurrency = -1".into(), &["max_concurrency"]),
            (format!("{http}timeout_ms = 0"), &["`timeout_ms` must be positive"]),
            (format!("{llm}temperature = -0.5"), &["`temperature`"]),
            (format!("{llm}temperature = nan"), &["`temperature`"]),
            (format!("{llm}temperature = inf"), &["`temperature`"]),
            (format!("{llm}max_tokens = 0"), &["`max_tokens` must be at least 1"]),
            (format!("{llm}stream = \"yes\""), &["stream"]),
            (
                format!("{http}headers = {{ Host = \"x\" }}"),
                &["`headers`", "`Host`", "cannot be configured"],
            ),
            (
                format!("{http}headers = {{ \"X-Swarm-Task-Id\" = \"1\" }}"),
                &["`X-Swarm-Task-Id`", "cannot be configured"],
            ),
            (
                format!("{http}secret_headers = {{ \"Idempotency-Key\" = \"TOKEN\" }}"),
                &["`secret_headers`", "cannot be configured"],
            ),
            (
                format!("{http}headers = {{ \"Bad Name\" = \"1\" }}"),
                &["`headers`", "not a valid header name"],
            ),
            (
                format!("{http}headers = {{ \"X-A\" = \"a\\nb\" }}"),
                &["`headers`", "`X-A`", "not a valid header value"],
            ),
            (
                format!("{http}headers = {{ \"x-a\" = \"1\", \"X-A\" = \"2\" }}"),
                &["given twice"],
            ),
            (
                format!("{http}headers = {{ Authorization = \"1\" }}\nsecret_headers = {{ authorization = \"TOKEN\" }}"),
                &["`secret_headers`", "given twice"],
            ),
            (
                format!("{http}secret_headers = {{ Authorization = \"ACME_UNSET\" }}"),
                &["`secret_headers` (header `Authorization`)", "`ACME_UNSET` is not set"],
            ),
            (
                format!("{http}secret_headers = {{ Authorization = \"EMPTY\" }}"),
                &["`EMPTY` is empty"],
            ),
            (
                format!("{http}secret_headers = {{ Authorization = \"BAD_VALUE\" }}"),
                &["`BAD_VALUE`", "not a valid header value"],
            ),
            (
                format!("{http}secret_headers = {{ Authorization = \"SWARM_TOKEN\" }}"),
                &["`secret_headers`", "`SWARM_TOKEN` is refused", "reserved"],
            ),
            (
                format!("{http}secret_headers = {{ Authorization = \"1X\" }}"),
                &["`secret_headers`", "invalid environment variable name"],
            ),
            (
                format!("{llm}api_key_env = \"OPENAI_KEY_UNSET\""),
                &["`api_key_env`", "`OPENAI_KEY_UNSET` is not set on the worker"],
            ),
            (
                format!("{llm}api_key_env = \"swarm_token\""),
                &["`api_key_env`", "`swarm_token` is refused"],
            ),
            (
                format!("{llm}api_key_env = \"BAD_VALUE\""),
                &["`api_key_env`", "`BAD_VALUE` cannot be sent"],
            ),
        ];
        for (extra, needles) in &cases {
            let text = format!("[agents.x]\n{extra}\n");
            let err = parse_with_env(&text, &env).expect_err(&text);
            assert!(err.contains("/etc/swarm/agents.toml"), "{err}");
            for n in *needles {
                assert!(err.contains(n), "{text:?}: {err:?} lacks {n:?}");
            }
            // No secret value ever shows in an error.
            assert!(!err.contains("a\nb"), "{err}");
        }
    }

    #[test]
    fn env_values_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStringExt as _;
        let host = FakeHost {
            ids: (0, 0),
            env: [("TOKEN".to_owned(), OsString::from_vec(vec![0xff, 0xfe]))].into(),
        };
        let err = Agents::parse_on(
            "[agents.x]\nkind = \"llm\"\nbase_url = \"http://h\"\nmodel = \"m\"\napi_key_env = \"TOKEN\"\n",
            Path::new("/etc/swarm/agents.toml"),
            &host,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`TOKEN` is not valid UTF-8"), "{err}");
    }
}
