//! Runs one [`TaskAssignment`] to an [`Outcome`].
//!
//! What an attempt does depends on its agent's kind (the agents file is described in
//! [`crate::agents`]):
//!
//! * `echo` and `sleep` (built-ins): the payload is the output; sleep for the payload's
//!   milliseconds.
//! * `exec`: a local command, run once per attempt (below).
//! * `http`: one HTTP request to an endpoint ([below](#http-agents)).
//! * `llm`: one chat completion from an OpenAI-compatible server
//!   ([below](#llm-agents)).
//!
//! For every kind the attempt's timeout is the smaller of the task's `timeout_ms` (0:
//! none) and the agent's `timeout_ms`, and ends the attempt with
//! [`FailureKind::Timeout`]; a cancel ends it at once with [`FailureKind::Cancelled`]; an
//! output longer than `max_output_bytes` fails with [`FailureKind::OutputTooLarge`]. How
//! many attempts of one agent run at once is bounded by its `max_concurrency` (enforced
//! where the worker starts attempts, not here).
//!
//! # Live output
//!
//! In a worker, every piece of output an agent produces goes to the attempt's output log
//! (`output.rs`) the moment it is read, tagged with its stream: an `exec` agent's
//! stdout and stderr (each read takes whatever the pipe holds: no waiting for a line or
//! for the end), an `http` agent's body pieces, an `llm` agent's token texts. The log
//! keeps the output's tail for the report and sends the pieces to the coordinator while
//! it watches the attempt. Built-ins produce none. The result is unchanged: stdout is
//! still an `exec` agent's output, and stderr's tail its failure message.
//!
//! # `exec` agents
//!
//! `exec` agents are started in their own process group (`setpgid(0, 0)`), with the
//! payload on stdin and the result on stdout. Whenever an attempt ends — timeout,
//! cancellation, oversized output, or simply the agent's main process exiting — the
//! whole group gets `SIGKILL`, so background processes the agent left behind
//! (grandchildren included) do not outlive the attempt. The direct child is always
//! reaped before [`Executor::run`] returns.
//!
//! # What an `exec` agent sees
//!
//! **Environment.** The agent does not inherit the worker's environment: its process
//! starts from an empty one (`env_clear`) and gets, in this order (a later entry replaces
//! an earlier one of the same name):
//!
//! 1. a minimal base: `PATH` (the worker's `PATH`, or [`DEFAULT_PATH`] when the worker
//!    has none — the worker's `PATH` names where programs are, not secrets, and keeps
//!    agents started by bare command names working); `HOME` and `TMPDIR`, both the
//!    attempt's private directory (below); `LANG`, `LC_ALL` and `TZ` only when set on the
//!    worker;
//! 2. the agent's `env` names ([`ExecSpec::pass_env`]), copied from the worker's
//!    environment when set there;
//! 3. the agent's `env_set` values ([`ExecSpec::env`]);
//! 4. the attempt's variables: `SWARM_TASK_ID`, `SWARM_ATTEMPT`, `SWARM_EXECUTION_ID`,
//!    `SWARM_AGENT`, `SWARM_IDEMPOTENCY_KEY` (when the task has one) and
//!    `SWARM_PATTERNS_FILE` (when it has patterns).
//!
//! Nothing else: whatever configures the worker — `SWARM_CERTS`, `SWARM_TOKEN`, any
//! other `SWARM_*` variable, the key paths they name — never reaches an agent. Names
//! starting with `SWARM_` are refused by the agents file and skipped here too, whatever
//! an embedder put in an [`ExecSpec`].
//!
//! **Private directory.** Every attempt gets a fresh directory named
//! `swarm-agent-<32 random hex digits>` (128 bits from the thread-local CSPRNG) under the
//! executor's private root ([`Executor::with_private_root`], by default
//! [`std::env::temp_dir`]). It is made by one `mkdir` with mode 0700, which fails if
//! anything — a symlink included — already has that name: a directory is never reused.
//! With `run_as` it is owned by that user. The files written for the agent (the patterns
//! file, `patterns.json`) are created inside it with `O_CREAT | O_EXCL` (`create_new`)
//! and `O_NOFOLLOW`, mode 0600, through the directory's open handle
//! (`/proc/self/fd/N/…` where `/proc` exists), so neither a planted symlink nor a
//! directory swapped in under the same name can redirect a write. (`O_EXCL` alone already
//! refuses an existing symlink; `O_NOFOLLOW` says so twice.) The directory is removed,
//! without following symlinks, when the attempt ends — success, failure, timeout, cancel,
//! or the attempt's future being dropped (how a drain's timeout and a worker stop end
//! it) — after the agent's process group has been killed.
//!
//! **Working directory.** The agent's `cwd`; without one, the worker's own working
//! directory — except that an agent with `run_as`, or one whose working directory would
//! be the shared temp directory, starts in its private directory.
//!
//! **User.** With `run_as` ([`ExecSpec::run_as`]) the agent runs with that uid and gid;
//! `std` then also clears the supplementary groups (it calls `setgroups(0)` before
//! `setuid` when the worker may, i.e. as root), so the agent keeps none of the worker's.
//! Without `run_as` the agent runs as the worker's user and can read whatever the worker
//! can on disk (its key files included): the cleared environment keeps the worker's
//! secrets out of the agent's environment, `run_as` keeps them out of its reach.
//!
//! # `http` agents
//!
//! Each attempt is one request, `method` to `url` ([`crate::agent_kinds::http`]), over
//! HTTP/1.1 (TLS with the webpki roots for `https`; the worker's proxy variables apply;
//! redirects are not followed). The agents of one [`Agents`] share one client and its
//! connection pool.
//!
//! * **Request.** The body is the payload as it is (no body for GET). The headers are the
//!   agent's `headers` and `secret_headers`, plus `X-Swarm-Task-Id`, `X-Swarm-Attempt`,
//!   `X-Swarm-Execution-Id` (`<task>.<attempt>.<term>`, as `SWARM_EXECUTION_ID`) and, when
//!   the task has one, `Idempotency-Key` (a key that cannot be a header value fails the
//!   attempt with [`FailureKind::BadPayload`], unsent). Retrieved patterns are not sent.
//! * **Success.** A 2xx response: its body is the output. The body is read as it arrives;
//!   one longer than `max_output_bytes` fails with [`FailureKind::OutputTooLarge`] as soon
//!   as that is known (from `Content-Length`, or once that many bytes came), and the rest
//!   is never read: the connection is closed.
//! * **Failures.** Any other status, 3xx included: [`FailureKind::Exit`], `HTTP 503
//!   Service Unavailable: <the last 512 bytes of the body>`. No response (connection
//!   refused, name resolution, TLS, a connect taking over 30 s, the connection closed
//!   before a response): [`FailureKind::Spawn`], `cannot reach <url>: <why>`. A body that
//!   breaks off: [`FailureKind::Exit`]. The timeout covers the whole exchange, body
//!   included. A timeout or a cancel drops the request at once, which closes its
//!   connection: the server sees the client go away. Nothing is retried within the
//!   attempt (the coordinator retries `Exit`, `Timeout` and `Spawn` failures as its
//!   policy says).
//!
//! # `llm` agents
//!
//! Each attempt is one chat completion, `POST {base_url}/chat/completions` with the
//! OpenAI request format ([`crate::agent_kinds::llm`]), through the same client as `http`
//! agents.
//!
//! * **Conversation.** The payload must be UTF-8 (else [`FailureKind::BadPayload`],
//!   nothing sent). A JSON object holding only `messages`, an array of `{role, content}`
//!   objects (`content` a string or an array of content parts; other fields pass
//!   through), is the conversation; any other payload is the text of the one user
//!   message. A malformed `messages` is a [`FailureKind::BadPayload`]. A system message
//!   is put first: the agent's `system_prompt` with `{patterns}` replaced by the
//!   strategies (below), left out if that renders empty. When the conversation already
//!   starts with a system message, none is added and the strategies are appended to
//!   that one (after a blank line, or as one more text part).
//! * **Strategies.** The patterns retrieved for the task, best first, rendered as
//!
//!   ```text
//!   Strategies retrieved from similar earlier tasks (use what fits; one learnt from a failure shows what to avoid):
//!   - <title>: <description>
//!     <content, every line indented>
//!     (learnt from a success; confidence 0.75)
//!   ```
//!
//!   (`a failure` for a pattern learnt from a failure); with no patterns, nothing at all.
//! * **Request.** `{"model", "messages", "temperature"?, "max_tokens"?, "stream"}`, plus
//!   `"stream_options": {"include_usage": true}` when streaming; `Authorization: Bearer
//!   <key>` with `api_key_env`.
//! * **Answer.** Streamed: Server-Sent Events (`data: {json}` events, `data: [DONE]`
//!   last); the `choices[0].delta.content` pieces are joined, and `usage` is taken from
//!   the chunk carrying it. Not streamed: `choices[0].message.content` and `usage`. The
//!   response's `Content-Type` (`text/event-stream` or `application/json`) decides which
//!   is read, whatever was asked. The answer text is the output; one longer than
//!   `max_output_bytes` fails with [`FailureKind::OutputTooLarge`] (while streaming, as
//!   soon as it gets there). The tokens used are logged (info, `llm usage`, with the
//!   fields `agent`, `model`, `prompt_tokens`, `completion_tokens`) when the server
//!   reports them.
//! * **Retries within the attempt.** A 429 or 5xx, no response (as for `http`), and a
//!   2xx whose body breaks off before the first byte of the answer are tried again, up to
//!   `max_retries` times: after the response's `Retry-After` (seconds, or an HTTP date)
//!   when it has one, else after an exponential backoff (500 ms, doubling up to 20 s,
//!   each jittered down by up to half). A wait that would end past the attempt's timeout,
//!   or a `Retry-After` over 10 minutes, ends the attempt at once with the last failure.
//!   When the tries run out, the last failure is the attempt's, with the number of tries:
//!   [`FailureKind::Exit`] `HTTP 429 Too Many Requests: <body tail> (5 tries)`, or
//!   [`FailureKind::Spawn`] `cannot reach <url>: …`. Any other status (4xx, 3xx) fails at
//!   once: [`FailureKind::Exit`], `HTTP 400 Bad Request: <the last 512 bytes of the
//!   body>`.
//! * **Other failures** ([`FailureKind::Exit`]): a stream that ends or breaks after part
//!   of the answer (`the stream ended before [DONE]`; not retried, the pieces already
//!   went out), an `error` object in the response or the stream, a malformed event, a
//!   JSON answer without `content`, a refusal. Timeout and cancel are as for `http`: the
//!   request is dropped at once, whichever try it is in.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use swarm_proto::worker::{FailureKind, Outcome, OutputStream, PatternHit, TaskAssignment, Usage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::agent_kinds::{run_http_agent, run_llm_agent};
use crate::agents::{reserved_env_name, Agent, Agents, ExecSpec};
use crate::cancel::CancelToken;
use crate::output::OutputTap;

/// The agent's `PATH` when the worker has none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables copied from the worker's environment into every agent's, when set.
const LOCALE_VARS: [&str; 3] = ["LANG", "LC_ALL", "TZ"];

/// How the name of every per-attempt private directory starts (32 random hex digits
/// follow).
pub const PRIVATE_DIR_PREFIX: &str = "swarm-agent-";

/// The name of the patterns file in the private directory.
pub const PATTERNS_FILE_NAME: &str = "patterns.json";

/// How much of an agent's stderr is kept for the failure message.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// After the agent's main process exits (and its group is killed), how long to wait for
/// stdout to reach end-of-file. Only a process that left the group (e.g. via `setsid`)
/// while keeping stdout open can make this wait expire.
const EXIT_DRAIN_GRACE: Duration = Duration::from_secs(2);

/// After killing a group, how long to wait for the rest of its stderr.
const KILL_DRAIN_GRACE: Duration = Duration::from_millis(500);

const READ_CHUNK: usize = 64 * 1024;

/// Runs attempts with a fixed set of agents. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Executor {
    agents: Arc<Agents>,
    private_root: Option<Arc<PathBuf>>,
}

impl Executor {
    /// An executor offering `agents`, making the attempts' private directories in
    /// [`std::env::temp_dir`].
    pub fn new(agents: Agents) -> Self {
        Executor {
            agents: Arc::new(agents),
            private_root: None,
        }
    }

    /// Makes the attempts' private directories (see the [module docs](self)) in `root`
    /// instead of [`std::env::temp_dir`]. `root` must exist, and agents with `run_as`
    /// need to be able to traverse it.
    pub fn with_private_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.private_root = Some(Arc::new(root.into()));
        self
    }

    /// Where the attempts' private directories are made.
    pub fn private_root(&self) -> PathBuf {
        match &self.private_root {
            Some(r) => r.as_ref().clone(),
            None => std::env::temp_dir(),
        }
    }

    /// The agents this executor offers.
    pub fn agents(&self) -> &Agents {
        &self.agents
    }

    /// Runs one attempt to completion.
    ///
    /// * `max_output_bytes`: a result longer than this fails with
    ///   [`FailureKind::OutputTooLarge`].
    /// * The attempt's timeout is the smaller of `task.timeout_ms` and the agent's
    ///   `timeout_ms` cap; a `task.timeout_ms` of 0 means "no task timeout".
    /// * `cancel` ends the attempt early with [`FailureKind::Cancelled`].
    ///
    /// Never panics and never returns an error: every failure is an [`Outcome::Failed`].
    pub async fn run(
        &self,
        task: TaskAssignment,
        max_output_bytes: u64,
        cancel: CancelToken,
    ) -> Outcome {
        self.run_with_patterns(task, &[], max_output_bytes, cancel)
            .await
    }

    /// [`Executor::run`], handing `patterns` (ReasoningBank items retrieved for the task)
    /// to `exec` agents as a JSON file named by `SWARM_PATTERNS_FILE`, in the attempt's
    /// private directory, and to `llm` agents as strategies in the system prompt.
    /// Built-ins and `http` agents ignore them.
    pub async fn run_with_patterns(
        &self,
        task: TaskAssignment,
        patterns: &[PatternHit],
        max_output_bytes: u64,
        cancel: CancelToken,
    ) -> Outcome {
        self.run_attempt(
            task,
            patterns,
            max_output_bytes,
            cancel,
            OutputTap::default(),
        )
        .await
        .0
    }

    /// [`Executor::run_with_patterns`], passing every piece of output to `tap` as the
    /// agent produces it (see [Live output](self#live-output)), and returning the tokens
    /// an `llm` agent used.
    pub(crate) async fn run_attempt(
        &self,
        task: TaskAssignment,
        patterns: &[PatternHit],
        max_output_bytes: u64,
        cancel: CancelToken,
        tap: OutputTap,
    ) -> (Outcome, Option<Usage>) {
        let Some(agent) = self.agents.get(&task.agent) else {
            let outcome = failed(
                FailureKind::UnknownAgent,
                format!(
                    "unknown agent `{}`; this worker runs: {}",
                    task.agent,
                    self.agents.names().join(", ")
                ),
            );
            return (outcome, None);
        };
        let cap = match agent {
            Agent::Exec(spec) => spec.timeout_ms,
            Agent::Http(spec) => spec.timeout_ms,
            Agent::Llm(spec) => spec.timeout_ms,
            Agent::Echo | Agent::Sleep => None,
        };
        let timeout = effective_timeout(task.timeout_ms, cap);
        let outcome = match agent {
            Agent::Echo => {
                if task.payload.len() as u64 > max_output_bytes {
                    too_large(max_output_bytes)
                } else {
                    Outcome::Succeeded {
                        output: task.payload,
                    }
                }
            }
            Agent::Sleep => run_sleep(&task.payload, timeout, cancel).await,
            Agent::Exec(spec) => {
                run_exec(
                    spec,
                    task,
                    patterns,
                    &self.private_root(),
                    max_output_bytes,
                    timeout,
                    cancel,
                    tap,
                )
                .await
            }
            Agent::Http(spec) => {
                run_http_agent(
                    &self.agents,
                    spec,
                    task,
                    max_output_bytes,
                    timeout,
                    cancel,
                    &tap,
                )
                .await
            }
            Agent::Llm(spec) => {
                return run_llm_agent(
                    &self.agents,
                    spec,
                    task,
                    patterns,
                    max_output_bytes,
                    timeout,
                    cancel,
                    &tap,
                )
                .await
            }
        };
        (outcome, None)
    }
}

/// The timeout that applies: the smaller of the task's (0 = none) and the agent's cap.
fn effective_timeout(task_ms: u64, cap_ms: Option<u64>) -> Option<Duration> {
    let task = (task_ms > 0).then_some(task_ms);
    match (task, cap_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .map(Duration::from_millis)
}

pub(crate) fn failed(kind: FailureKind, message: String) -> Outcome {
    Outcome::Failed { kind, message }
}

pub(crate) fn too_large(max: u64) -> Outcome {
    failed(
        FailureKind::OutputTooLarge,
        format!("output exceeds the limit of {max} bytes"),
    )
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Parses the `sleep` built-in's payload: `250` or `{"ms":250}`.
pub(crate) fn parse_sleep_payload(payload: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8".to_owned())?;
    let trimmed = text.trim();
    if let Ok(ms) = trimmed.parse::<u64>() {
        return Ok(ms);
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ms {
        ms: u64,
    }
    serde_json::from_str::<Ms>(trimmed).map(|m| m.ms).map_err(|e| {
        let shown: String = trimmed.chars().take(64).collect();
        format!("expected a number of milliseconds (`250`) or JSON `{{\"ms\":250}}`, got {shown:?} ({e})")
    })
}

async fn run_sleep(payload: &[u8], timeout: Option<Duration>, mut cancel: CancelToken) -> Outcome {
    let ms = match parse_sleep_payload(payload) {
        Ok(ms) => ms,
        Err(e) => return failed(FailureKind::BadPayload, format!("sleep: {e}")),
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => failed(FailureKind::Cancelled, "cancelled".into()),
        _ = sleep_opt(timeout) => failed(
            FailureKind::Timeout,
            format!("timed out after {} ms", timeout.map_or(0, |d| d.as_millis())),
        ),
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {
            Outcome::Succeeded { output: format!("slept {ms} ms").into_bytes() }
        }
    }
}

/// Kills the process group when dropped, unless disarmed: covers the attempt's future
/// being dropped mid-flight (e.g. on runtime shutdown).
struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            match killpg(pgid, Signal::SIGKILL) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pgid = pgid.as_raw(), "killpg failed: {e}"),
            }
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads to end-of-file, or returns `None` as soon as more than `max` bytes arrived.
/// Never reads more than `max + 1` bytes. Each read goes to `tap` too, as `stdout`.
async fn read_limited(
    mut r: impl AsyncRead + Unpin,
    max: u64,
    tap: OutputTap,
) -> std::io::Result<Option<Vec<u8>>> {
    let limit = max.saturating_add(1);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let room = limit - buf.len() as u64;
        let want = usize::try_from(room).unwrap_or(usize::MAX).min(READ_CHUNK);
        let n = r.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(Some(buf));
        }
        tap.append(OutputStream::Stdout, &chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() as u64 > max {
            return Ok(None);
        }
    }
}

/// Reads to end-of-file, keeping only the last `keep` bytes. Returns them and whether
/// anything was dropped. Each read goes to `tap` too, as `stderr`.
async fn read_tail(mut r: impl AsyncRead + Unpin, keep: usize, tap: OutputTap) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tap.append(OutputStream::Stderr, &chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * keep.max(READ_CHUNK) {
                    buf.drain(..buf.len() - keep);
                    truncated = true;
                }
            }
        }
    }
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
        truncated = true;
    }
    (buf, truncated)
}

fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {} ({sig})", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        format!("ended with {status}")
    }
}

fn with_stderr(mut msg: String, (tail, truncated): &(Vec<u8>, bool)) -> String {
    let text = String::from_utf8_lossy(tail);
    let text = text.trim_end();
    if !text.is_empty() {
        if *truncated {
            msg.push_str(&format!("; stderr (last {} bytes):\n{text}", tail.len()));
        } else {
            msg.push_str(&format!("; stderr:\n{text}"));
        }
    }
    msg
}

enum End {
    Exited(ExitStatus, Vec<u8>),
    ExitedStdoutOpen(ExitStatus),
    TooLarge,
    ReadError(std::io::Error),
    Timeout,
    Cancelled,
}

/// The patterns file's content: `{"patterns": [{"id", "title", …}]}`.
fn patterns_json(patterns: &[PatternHit]) -> std::io::Result<Vec<u8>> {
    let items: Vec<serde_json::Value> = patterns
        .iter()
        .map(|p| {
            serde_json::json!({
                "id": p.id, "title": p.title, "description": p.description,
                "content": p.content, "outcome": p.outcome,
                "confidence": p.confidence, "score": p.score,
            })
        })
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({ "patterns": items }))
        .map_err(std::io::Error::other)
}

/// An attempt's private directory (see the module docs); removed, with everything in it,
/// when dropped.
struct PrivateDir {
    path: PathBuf,
    /// Open on the directory itself: files are created through it.
    handle: File,
}

impl PrivateDir {
    /// A new directory with a random name under `root`.
    fn create(root: &Path) -> std::io::Result<Self> {
        let mut last = None;
        // A clash of 128 random bits means someone planted the name: never reuse it.
        for _ in 0..4 {
            let name = format!("{PRIVATE_DIR_PREFIX}{:032x}", rand::random::<u128>());
            match Self::create_named(root, &name) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
    }

    /// `root/name`, which must not exist yet (not even as a symlink).
    fn create_named(root: &Path, name: &str) -> std::io::Result<Self> {
        let path = root.join(name);
        // mkdir(2) fails with EEXIST on any existing entry, symlinks included.
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        let opened = (|| {
            let handle = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
                .open(&path)?;
            // Exactly 0700, whatever the umask.
            handle.set_permissions(Permissions::from_mode(0o700))?;
            Ok(handle)
        })();
        match opened {
            Ok(handle) => Ok(PrivateDir { path, handle }),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the directory to `uid:gid` (the agent's `run_as` user), once the files for
    /// the agent are written: so even a root worker without `CAP_DAC_OVERRIDE` can
    /// write them.
    fn hand_over(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::fchown(&self.handle, Some(uid), Some(gid))
    }

    /// Writes a new file `name` (mode 0600, owned by `owner` if given) holding `body`, and
    /// returns its path. Fails if anything is already called `name`.
    fn write_file(
        &self,
        name: &str,
        body: &[u8],
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<PathBuf> {
        let proc_fd = Path::new("/proc/self/fd");
        let target = if proc_fd.is_dir() {
            // Through the directory's handle: the very directory made above, even if
            // something else now has its name.
            proc_fd.join(self.handle.as_raw_fd().to_string()).join(name)
        } else {
            self.path.join(name)
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&target)?;
        file.set_permissions(Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(body)?;
        Ok(self.path.join(name))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(dir = %self.path.display(), "cannot remove an agent's private directory: {e}");
        }
    }
}

/// Removes `path` and everything under it without following symlinks; if the agent took
/// away permissions inside it (same user, no `run_as`), gives them back and tries again.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    if gone(std::fs::remove_dir_all(path)).is_ok() {
        return Ok(());
    }
    restore_dir_permissions(path, 0);
    gone(std::fs::remove_dir_all(path))
}

/// Sets mode 0700 on `dir` and the directories under it (real directories only, never
/// through a symlink; at most 256 levels deep).
fn restore_dir_permissions(dir: &Path, depth: usize) {
    if depth > 256 {
        return;
    }
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {}
        _ => return,
    }
    let _ = std::fs::set_permissions(dir, Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                restore_dir_permissions(&entry.path(), depth + 1);
            }
        }
    }
}

/// The agent's whole environment (see the module docs). `worker_env` reads the worker's.
fn agent_env(
    spec: &ExecSpec,
    task: &TaskAssignment,
    private_dir: &Path,
    patterns_file: Option<&Path>,
    worker_env: &dyn Fn(&str) -> Option<OsString>,
) -> BTreeMap<String, OsString> {
    let mut env = BTreeMap::new();
    let path = worker_env("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    env.insert("PATH".to_owned(), path);
    env.insert("HOME".to_owned(), private_dir.into());
    env.insert("TMPDIR".to_owned(), private_dir.into());
    for name in LOCALE_VARS {
        if let Some(v) = worker_env(name) {
            env.insert(name.to_owned(), v);
        }
    }
    for name in &spec.pass_env {
        if reserved_env_name(name) {
            tracing::warn!(agent = %task.agent, "not passing `{name}` to the agent: SWARM_* variables are reserved");
            continue;
        }
        if let Some(v) = worker_env(name) {
            env.insert(name.clone(), v);
        }
    }
    for (name, value) in &spec.env {
        if reserved_env_name(name) {
            tracing::warn!(agent = %task.agent, "not setting `{name}` for the agent: SWARM_* variables are reserved");
            continue;
        }
        env.insert(name.clone(), value.into());
    }
    let swarm = [
        ("SWARM_TASK_ID", task.attempt.task_id.to_string()),
        ("SWARM_ATTEMPT", task.attempt.attempt.to_string()),
        ("SWARM_EXECUTION_ID", task.execution().to_string()),
        ("SWARM_AGENT", task.agent.clone()),
    ];
    for (name, value) in swarm {
        env.insert(name.to_owned(), value.into());
    }
    if let Some(k) = &task.idempotency_key {
        env.insert("SWARM_IDEMPOTENCY_KEY".to_owned(), k.into());
    }
    if let Some(p) = patterns_file {
        env.insert("SWARM_PATTERNS_FILE".to_owned(), p.into());
    }
    env
}

/// Whether `dir` is the shared temp directory.
fn is_shared_temp_dir(dir: &Path) -> bool {
    let tmp = std::env::temp_dir();
    dir == tmp || matches!((dir.canonicalize(), tmp.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The agent's working directory (see the module docs); `None`: the worker's.
fn agent_cwd(spec: &ExecSpec, private_dir: &Path) -> Option<PathBuf> {
    match &spec.cwd {
        Some(c) if is_shared_temp_dir(c) => Some(private_dir.to_owned()),
        Some(c) => Some(c.clone()),
        None if spec.run_as.is_some() => Some(private_dir.to_owned()),
        None => match std::env::current_dir() {
            Ok(d) if is_shared_temp_dir(&d) => Some(private_dir.to_owned()),
            _ => None,
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_exec(
    spec: &ExecSpec,
    task: TaskAssignment,
    patterns: &[PatternHit],
    private_root: &Path,
    max_output_bytes: u64,
    timeout: Option<Duration>,
    mut cancel: CancelToken,
    tap: OutputTap,
) -> Outcome {
    let owner = spec.run_as.as_ref().map(|r| (r.uid, r.gid));
    // Declared first, so dropped last: after the process group is killed (GroupGuard),
    // whether the attempt ends or its future is dropped.
    let private = match PrivateDir::create(private_root) {
        Ok(d) => d,
        Err(e) => {
            return failed(
                FailureKind::Spawn,
                format!(
                    "cannot create the agent's private directory in {}: {e}",
                    private_root.display()
                ),
            )
        }
    };
    let patterns_file = if patterns.is_empty() {
        None
    } else {
        match patterns_json(patterns)
            .and_then(|body| private.write_file(PATTERNS_FILE_NAME, &body, owner))
        {
            Ok(p) => Some(p),
            Err(e) => {
                return failed(
                    FailureKind::Spawn,
                    format!("cannot write the patterns file: {e}"),
                )
            }
        }
    };
    if let Some((uid, gid)) = owner {
        if let Err(e) = private.hand_over(uid, gid) {
            return failed(
                FailureKind::Spawn,
                format!("cannot give the agent's private directory to {uid}:{gid}: {e}"),
            );
        }
    }
    let env = agent_env(
        spec,
        &task,
        private.path(),
        patterns_file.as_deref(),
        &|name| std::env::var_os(name),
    );
    let cwd = agent_cwd(spec, private.path());
    let mut cmd = tokio::process::Command::new(&spec.command);
    cmd.args(&spec.args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(r) = &spec.run_as {
        // std clears the supplementary groups too when it sets the uid.
        cmd.uid(r.uid).gid(r.gid);
    }
    if let Some(cwd) = &cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let cwd = cwd
                .as_ref()
                .map(|c| format!(" in {}", c.display()))
                .unwrap_or_default();
            let user = spec
                .run_as
                .as_ref()
                .map(|r| format!(" as {}", r.user))
                .unwrap_or_default();
            return failed(
                FailureKind::Spawn,
                format!("cannot start `{}`{cwd}{user}: {e}", spec.command),
            );
        }
    };
    // With process_group(0) the child's pid is its process group id.
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let mut guard = GroupGuard { pgid };
    tracing::debug!(attempt = ?task.attempt, pid = ?pgid, command = %spec.command, "agent started");

    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        // Cannot happen: all three were configured as pipes.
        guard.kill();
        let _ = child.wait().await;
        guard.disarm();
        return failed(FailureKind::Spawn, "child stdio pipes missing".into());
    };

    let payload = task.payload;
    let stdin_task = tokio::spawn(async move {
        let mut stdin = stdin;
        if let Err(e) = stdin.write_all(&payload).await {
            // The agent may legitimately exit without reading its input.
            tracing::debug!("writing payload to agent stdin: {e}");
        }
        drop(stdin);
    });
    // Both read whatever is there as soon as it is there, so a watched attempt's output
    // goes out as the agent writes it.
    let mut stdout_task = tokio::spawn(read_limited(stdout, max_output_bytes, tap.clone()));
    let mut stderr_task = tokio::spawn(read_tail(stderr, STDERR_TAIL_BYTES, tap));

    let deadline = sleep_opt(timeout);
    tokio::pin!(deadline);
    let mut status: Option<ExitStatus> = None;
    let mut stdout_buf: Option<Vec<u8>> = None;
    let mut drain_until: Option<Instant> = None;

    let end = loop {
        if let (Some(st), Some(_)) = (status, &stdout_buf) {
            break End::Exited(st, stdout_buf.take().unwrap_or_default());
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break End::Cancelled,
            _ = &mut deadline => break End::Timeout,
            r = &mut stdout_task, if stdout_buf.is_none() => match r {
                Ok(Ok(Some(buf))) => stdout_buf = Some(buf),
                Ok(Ok(None)) => break End::TooLarge,
                Ok(Err(e)) => break End::ReadError(e),
                Err(e) => break End::ReadError(std::io::Error::other(e)),
            },
            st = child.wait(), if status.is_none() => match st {
                Ok(st) => {
                    status = Some(st);
                    // The attempt is over: kill whatever the agent left in its group, so
                    // that stdout reaches end-of-file and nothing outlives the attempt.
                    guard.kill();
                    guard.disarm();
                    drain_until = Some(Instant::now() + EXIT_DRAIN_GRACE);
                }
                Err(e) => break End::ReadError(e),
            },
            Some(st) = async {
                match (drain_until, status) {
                    (Some(at), Some(st)) => {
                        tokio::time::sleep_until(at).await;
                        Some(st)
                    }
                    _ => None,
                }
            }, if drain_until.is_some() => break End::ExitedStdoutOpen(st),
        }
    };

    // Make sure the group is dead and the child reaped, whatever happened.
    if status.is_none() {
        guard.kill();
        if let Err(e) = child.wait().await {
            tracing::warn!(pid = ?pgid, "waiting for killed agent: {e}");
        }
    }
    guard.disarm();
    stdin_task.abort();
    stdout_task.abort();
    let stderr_tail = match tokio::time::timeout(KILL_DRAIN_GRACE, &mut stderr_task).await {
        Ok(Ok(tail)) => tail,
        _ => {
            stderr_task.abort();
            (Vec::new(), false)
        }
    };

    let outcome = match end {
        End::Exited(st, output) if st.success() => Outcome::Succeeded { output },
        End::Exited(st, _) => failed(FailureKind::Exit, with_stderr(describe_status(st), &stderr_tail)),
        End::ExitedStdoutOpen(st) => failed(
            FailureKind::Exit,
            with_stderr(
                format!(
                    "{}, but its stdout stayed open (a process that left the agent's process group still holds it)",
                    describe_status(st)
                ),
                &stderr_tail,
            ),
        ),
        End::TooLarge => too_large(max_output_bytes),
        End::ReadError(e) => failed(
            FailureKind::Exit,
            with_stderr(format!("I/O error talking to the agent: {e}"), &stderr_tail),
        ),
        End::Timeout => failed(
            FailureKind::Timeout,
            with_stderr(
                format!(
                    "timed out after {} ms; process group killed",
                    timeout.map_or(0, |d| d.as_millis())
                ),
                &stderr_tail,
            ),
        ),
        End::Cancelled => failed(FailureKind::Cancelled, "cancelled; process group killed".into()),
    };
    tracing::debug!(attempt = ?task.attempt, pid = ?pgid, ok = matches!(outcome, Outcome::Succeeded { .. }), "agent ended");
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;
    use swarm_proto::worker::AttemptRef;

    fn task(agent: &str) -> TaskAssignment {
        TaskAssignment {
            attempt: AttemptRef {
                task_id: 42,
                attempt: 3,
            },
            agent: agent.into(),
            payload: Vec::new(),
            timeout_ms: 0,
            idempotency_key: None,
            patterns: 0,
            swarm: "default".into(),
            term: 1,
        }
    }

    fn worker_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let vars: BTreeMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn strings(env: BTreeMap<String, OsString>) -> BTreeMap<String, String> {
        env.into_iter()
            .map(|(k, v)| (k, v.into_string().unwrap()))
            .collect()
    }

    #[test]
    fn agent_env_is_the_base_the_allowlist_the_fixed_values_and_the_attempt() {
        let worker = worker_env(&[
            ("PATH", "/opt/worker/bin:/usr/bin"),
            ("LANG", "C.UTF-8"),
            ("TZ", "UTC"),
            ("SWARM_CERTS", "/etc/swarm/certs"),
            ("SWARM_TOKEN", "secret-token"),
            ("SWARM_TASK_ID", "999"),
            ("HOME", "/root"),
            ("OPENAI_API_KEY", "sk-1"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("MODEL", "from-worker"),
        ]);
        let mut spec = ExecSpec::new("x", Vec::<String>::new());
        spec.pass_env = vec![
            "OPENAI_API_KEY".into(),
            "HTTP_PROXY".into(), // unset on the worker: absent
            "MODEL".into(),
            "SWARM_CERTS".into(), // only an embedder can put this here: skipped
        ];
        spec.env.insert("MODEL".into(), "small".into());
        spec.env.insert("SWARM_TOKEN".into(), "x".into()); // skipped too
        let mut t = task("a");
        t.idempotency_key = Some("k-1".into());
        let env = strings(agent_env(
            &spec,
            &t,
            Path::new("/tmp/swarm-agent-0"),
            Some(Path::new("/tmp/swarm-agent-0/patterns.json")),
            &worker,
        ));
        let want: BTreeMap<String, String> = [
            ("PATH", "/opt/worker/bin:/usr/bin"),
            ("HOME", "/tmp/swarm-agent-0"),
            ("TMPDIR", "/tmp/swarm-agent-0"),
            ("LANG", "C.UTF-8"),
            ("TZ", "UTC"),
            ("OPENAI_API_KEY", "sk-1"),
            ("MODEL", "small"),
            ("SWARM_TASK_ID", "42"),
            ("SWARM_ATTEMPT", "3"),
            ("SWARM_EXECUTION_ID", &t.execution().to_string()),
            ("SWARM_AGENT", "a"),
            ("SWARM_IDEMPOTENCY_KEY", "k-1"),
            ("SWARM_PATTERNS_FILE", "/tmp/swarm-agent-0/patterns.json"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);

        // No PATH on the worker: the default one. Nothing optional.
        let env = strings(agent_env(
            &ExecSpec::new("x", Vec::<String>::new()),
            &task("b"),
            Path::new("/p"),
            None,
            &worker_env(&[("SWARM_CERTS", "/c")]),
        ));
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "HOME",
                "PATH",
                "SWARM_AGENT",
                "SWARM_ATTEMPT",
                "SWARM_EXECUTION_ID",
                "SWARM_TASK_ID",
                "TMPDIR"
            ]
        );
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn private_dirs_are_fresh_0700_and_never_reused() {
        let root = tempfile::tempdir().unwrap();
        let a = PrivateDir::create(root.path()).unwrap();
        let b = PrivateDir::create(root.path()).unwrap();
        assert_ne!(a.path(), b.path());
        for d in [&a, &b] {
            let name = d.path().file_name().unwrap().to_str().unwrap();
            let hex = name.strip_prefix(PRIVATE_DIR_PREFIX).unwrap();
            assert_eq!(hex.len(), 32, "{name}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
            let meta = std::fs::symlink_metadata(d.path()).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.mode() & 0o7777, 0o700);
        }

        // Whatever already has the name, a symlink to a directory included, is refused.
        let target = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(target.path(), root.path().join("planted")).unwrap();
        std::fs::create_dir(root.path().join("existing")).unwrap();
        for name in ["planted", "existing"] {
            let err = PrivateDir::create_named(root.path(), name)
                .err()
                .unwrap_or_else(|| panic!("{name} reused"));
            assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{name}");
        }
        assert!(root.path().join("existing").is_dir(), "not removed either");

        let (pa, pb) = (a.path().to_owned(), b.path().to_owned());
        drop(a);
        drop(b);
        assert!(!pa.exists() && !pb.exists());
    }

    #[test]
    fn private_files_are_0600_and_never_written_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let dir = PrivateDir::create(root.path()).unwrap();
        let p = dir.write_file("patterns.json", b"{}", None).unwrap();
        assert_eq!(p, dir.path().join("patterns.json"));
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        // Not twice.
        assert_eq!(
            dir.write_file("patterns.json", b"again", None)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");

        // A symlink planted in the directory, dangling or not, is never followed.
        let victim_dir = tempfile::tempdir().unwrap();
        let victim = victim_dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("x.json")).unwrap();
        std::os::unix::fs::symlink(victim_dir.path().join("new"), dir.path().join("y.json"))
            .unwrap();
        for name in ["x.json", "y.json"] {
            assert!(dir.write_file(name, b"evil", None).is_err(), "{name}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!victim_dir.path().join("new").exists());

        // Removal does not follow the symlinks either.
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn private_dirs_are_removed_even_when_the_agent_locked_them() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = PrivateDir::create(root.path()).unwrap();
        let locked = dir.path().join("a/b");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("f"), b"x").unwrap();
        std::fs::set_permissions(&locked, Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(dir.path().join("a"), Permissions::from_mode(0o500)).unwrap();
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn cwd_rules() {
        let private = Path::new("/tmp/swarm-agent-1");
        let mut spec = ExecSpec::new("x", Vec::<String>::new());
        spec.cwd = Some("/srv/agents".into());
        assert_eq!(
            agent_cwd(&spec, private).as_deref(),
            Some(Path::new("/srv/agents"))
        );
        spec.cwd = Some(std::env::temp_dir());
        assert_eq!(agent_cwd(&spec, private).as_deref(), Some(private));
        spec.cwd = None;
        spec.run_as = Some(crate::agents::RunAs {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
        });
        assert_eq!(agent_cwd(&spec, private).as_deref(), Some(private));
    }

    #[test]
    fn timeouts() {
        assert_eq!(effective_timeout(0, None), None);
        assert_eq!(
            effective_timeout(100, None),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            effective_timeout(0, Some(50)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            effective_timeout(100, Some(50)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            effective_timeout(30, Some(50)),
            Some(Duration::from_millis(30))
        );
    }

    #[test]
    fn sleep_payloads() {
        assert_eq!(parse_sleep_payload(b"250"), Ok(250));
        assert_eq!(parse_sleep_payload(b" 7\n"), Ok(7));
        assert_eq!(parse_sleep_payload(br#"{"ms":250}"#), Ok(250));
        assert_eq!(parse_sleep_payload(br#" { "ms" : 3 } "#), Ok(3));
        for bad in [&b""[..], b"abc", b"-5", br#"{"s":1}"#, b"\xff", b"1.5"] {
            assert!(parse_sleep_payload(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn read_limited_stops_after_limit_plus_one() {
        let data = vec![7u8; 1000];
        assert_eq!(
            read_limited(&data[..], 1000, OutputTap::default())
                .await
                .unwrap(),
            Some(data.clone())
        );
        assert_eq!(
            read_limited(&data[..], 999, OutputTap::default())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            read_limited(&data[..], 0, OutputTap::default())
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            read_limited(&b""[..], 0, OutputTap::default())
                .await
                .unwrap(),
            Some(vec![])
        );
        // u64::MAX must not overflow.
        assert_eq!(
            read_limited(&data[..], u64::MAX, OutputTap::default())
                .await
                .unwrap(),
            Some(data)
        );
    }

    #[tokio::test]
    async fn read_tail_keeps_the_end() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (tail, truncated) = read_tail(&data[..], 4096, OutputTap::default()).await;
        assert!(truncated);
        assert_eq!(tail, data[data.len() - 4096..]);
        let (tail, truncated) = read_tail(&b"short"[..], 4096, OutputTap::default()).await;
        assert!(!truncated);
        assert_eq!(tail, b"short");
    }
}
