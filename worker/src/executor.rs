//! Runs one [`TaskAssignment`] to an [`Outcome`].
//!
//! `exec` agents are started in their own process group (`setpgid(0, 0)`), with the
//! payload on stdin and the result on stdout. Whenever an attempt ends — timeout,
//! cancellation, oversized output, or simply the agent's main process exiting — the
//! whole group gets `SIGKILL`, so background processes the agent left behind
//! (grandchildren included) do not outlive the attempt. The direct child is always
//! reaped before [`Executor::run`] returns.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use swarm_proto::worker::{FailureKind, Outcome, PatternHit, TaskAssignment};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::agents::{Agent, Agents, ExecSpec};
use crate::cancel::CancelToken;

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
}

impl Executor {
    /// An executor offering `agents`.
    pub fn new(agents: Agents) -> Self {
        Executor {
            agents: Arc::new(agents),
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
    /// to `exec` agents as a JSON file named by `SWARM_PATTERNS_FILE`. Built-ins ignore
    /// them.
    pub async fn run_with_patterns(
        &self,
        task: TaskAssignment,
        patterns: &[PatternHit],
        max_output_bytes: u64,
        cancel: CancelToken,
    ) -> Outcome {
        let Some(agent) = self.agents.get(&task.agent) else {
            return failed(
                FailureKind::UnknownAgent,
                format!(
                    "unknown agent `{}`; this worker runs: {}",
                    task.agent,
                    self.agents.names().join(", ")
                ),
            );
        };
        let cap = match agent {
            Agent::Exec(spec) => spec.timeout_ms,
            Agent::Echo | Agent::Sleep => None,
        };
        let timeout = effective_timeout(task.timeout_ms, cap);
        match agent {
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
                let file = match PatternsFile::write(&task, patterns) {
                    Ok(f) => f,
                    Err(e) => {
                        return failed(
                            FailureKind::Spawn,
                            format!("cannot write the patterns file: {e}"),
                        )
                    }
                };
                run_exec(
                    spec,
                    task,
                    file.as_ref().map(|f| f.path.as_path()),
                    max_output_bytes,
                    timeout,
                    cancel,
                )
                .await
            }
        }
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

fn failed(kind: FailureKind, message: String) -> Outcome {
    Outcome::Failed { kind, message }
}

fn too_large(max: u64) -> Outcome {
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
/// Never reads more than `max + 1` bytes.
async fn read_limited(mut r: impl AsyncRead + Unpin, max: u64) -> std::io::Result<Option<Vec<u8>>> {
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
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() as u64 > max {
            return Ok(None);
        }
    }
}

/// Reads to end-of-file, keeping only the last `keep` bytes. Returns them and whether
/// anything was dropped.
async fn read_tail(mut r: impl AsyncRead + Unpin, keep: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut truncated = false;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
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

/// The JSON file an `exec` agent finds its patterns in; removed when dropped.
struct PatternsFile {
    path: std::path::PathBuf,
}

impl PatternsFile {
    /// `None` when there are no patterns to hand over.
    fn write(task: &TaskAssignment, patterns: &[PatternHit]) -> std::io::Result<Option<Self>> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let path = std::env::temp_dir().join(format!(
            "swarm-patterns-{}-{}-{}.json",
            task.attempt.task_id,
            task.attempt.attempt,
            std::process::id()
        ));
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
        let body = serde_json::to_vec_pretty(&serde_json::json!({ "patterns": items }))
            .map_err(std::io::Error::other)?;
        std::fs::write(&path, body)?;
        Ok(Some(PatternsFile { path }))
    }
}

impl Drop for PatternsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn run_exec(
    spec: &ExecSpec,
    task: TaskAssignment,
    patterns_file: Option<&std::path::Path>,
    max_output_bytes: u64,
    timeout: Option<Duration>,
    mut cancel: CancelToken,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(&spec.command);
    cmd.args(&spec.args)
        .envs(&spec.env)
        .env("SWARM_TASK_ID", task.attempt.task_id.to_string())
        .env("SWARM_ATTEMPT", task.attempt.attempt.to_string())
        .env("SWARM_EXECUTION_ID", task.execution().to_string())
        .env("SWARM_AGENT", &task.agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    match &task.idempotency_key {
        Some(k) => cmd.env("SWARM_IDEMPOTENCY_KEY", k),
        None => cmd.env_remove("SWARM_IDEMPOTENCY_KEY"),
    };
    match patterns_file {
        Some(p) => cmd.env("SWARM_PATTERNS_FILE", p),
        None => cmd.env_remove("SWARM_PATTERNS_FILE"),
    };
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let cwd = spec
                .cwd
                .as_ref()
                .map(|c| format!(" in {}", c.display()))
                .unwrap_or_default();
            return failed(
                FailureKind::Spawn,
                format!("cannot start `{}`{cwd}: {e}", spec.command),
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
    let mut stdout_task = tokio::spawn(read_limited(stdout, max_output_bytes));
    let mut stderr_task = tokio::spawn(read_tail(stderr, STDERR_TAIL_BYTES));

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
            read_limited(&data[..], 1000).await.unwrap(),
            Some(data.clone())
        );
        assert_eq!(read_limited(&data[..], 999).await.unwrap(), None);
        assert_eq!(read_limited(&data[..], 0).await.unwrap(), None);
        assert_eq!(read_limited(&b""[..], 0).await.unwrap(), Some(vec![]));
        // u64::MAX must not overflow.
        assert_eq!(read_limited(&data[..], u64::MAX).await.unwrap(), Some(data));
    }

    #[tokio::test]
    async fn read_tail_keeps_the_end() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (tail, truncated) = read_tail(&data[..], 4096).await;
        assert!(truncated);
        assert_eq!(tail, data[data.len() - 4096..]);
        let (tail, truncated) = read_tail(&b"short"[..], 4096).await;
        assert!(!truncated);
        assert_eq!(tail, b"short");
    }
}
