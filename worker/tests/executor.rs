//! Executor behaviour against real processes (`sh`, `cat`, `sleep`, …).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::task;
use swarm_proto::worker::{FailureKind, Outcome};
use swarm_worker::{cancel_pair, Agents, CancelToken, ExecSpec, Executor};

const MAX: u64 = 16 * 1024 * 1024;

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new("sh", ["-c", script])
}

fn exec_with(name: &str, spec: ExecSpec) -> Executor {
    Executor::new(Agents::builtin().with_exec(name, spec))
}

async fn run_sh(script: &str, payload: impl Into<Vec<u8>>, timeout_ms: u64) -> Outcome {
    exec_with("x", sh(script))
        .run(task("x", payload, timeout_ms), MAX, CancelToken::never())
        .await
}

fn output(o: Outcome) -> Vec<u8> {
    match o {
        Outcome::Succeeded { output } => output,
        other => panic!("expected success, got {other:?}"),
    }
}

fn failure(o: Outcome, want: FailureKind) -> String {
    match o {
        Outcome::Failed { kind, message } if kind == want => message,
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

/// Whether `pid` is a live (non-zombie) process. PID 1 of a container may not reap
/// orphans, so a killed grandchild can linger as a zombie: that counts as dead.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // Format: "pid (comm) S ..."; comm may contain spaces, so split after ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Dead-or-reaped, allowing the kernel a moment to deliver SIGKILL.
async fn wait_dead(pid: u32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

async fn wait_for_file(path: &Path) -> String {
    for _ in 0..1000 {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never written", path.display());
}

fn read_pid(path: &PathBuf) -> u32 {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.trim().parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

#[tokio::test]
async fn echo_returns_payload() {
    let ex = Executor::new(Agents::builtin());
    let out = ex
        .run(
            task("echo", b"hi there".to_vec(), 0),
            MAX,
            CancelToken::never(),
        )
        .await;
    assert_eq!(output(out), b"hi there");
    let out = ex
        .run(task("echo", vec![1u8; 11], 0), 10, CancelToken::never())
        .await;
    failure(out, FailureKind::OutputTooLarge);
}

#[tokio::test]
async fn sleep_builtin() {
    let ex = Executor::new(Agents::builtin());
    let out = ex
        .run(task("sleep", "5", 0), MAX, CancelToken::never())
        .await;
    assert_eq!(output(out), b"slept 5 ms");
    let out = ex
        .run(
            task("sleep", r#"{"ms":3}"#, 10_000),
            MAX,
            CancelToken::never(),
        )
        .await;
    assert_eq!(output(out), b"slept 3 ms");

    let msg = failure(
        ex.run(task("sleep", "soon", 0), MAX, CancelToken::never())
            .await,
        FailureKind::BadPayload,
    );
    assert!(
        msg.contains("sleep") && msg.contains("soon") && msg.contains("milliseconds"),
        "{msg}"
    );

    let msg = failure(
        ex.run(task("sleep", "600000", 50), MAX, CancelToken::never())
            .await,
        FailureKind::Timeout,
    );
    assert!(msg.contains("50 ms"), "{msg}");

    let (handle, token) = cancel_pair();
    let run = tokio::spawn({
        let ex = ex.clone();
        async move { ex.run(task("sleep", "600000", 0), MAX, token).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    handle.cancel();
    failure(run.await.unwrap(), FailureKind::Cancelled);
}

#[tokio::test]
async fn unknown_agent_lists_known_ones() {
    let ex = exec_with("mine", sh("true"));
    let msg = failure(
        ex.run(task("nope", "", 0), MAX, CancelToken::never()).await,
        FailureKind::UnknownAgent,
    );
    assert!(
        msg.contains("`nope`") && msg.contains("echo, mine, sleep"),
        "{msg}"
    );
}

#[tokio::test]
async fn stdout_is_the_result() {
    assert_eq!(
        output(run_sh("echo hello; printf world", "", 0).await),
        b"hello\nworld"
    );
}

#[tokio::test]
async fn stdin_round_trip_small_and_large() {
    assert_eq!(output(run_sh("cat", "payload", 0).await), b"payload");
    // 1 MiB, larger than any pipe buffer: needs concurrent write and read.
    let big: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_eq!(output(run_sh("cat", big.clone(), 0).await), big);
    // Reversed order: the agent reads everything before writing anything.
    let out = output(run_sh("wc -c", big, 0).await);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1048576");
}

#[tokio::test]
async fn agent_ignoring_stdin_is_fine() {
    assert_eq!(
        output(run_sh("echo ok", vec![b'x'; 1024 * 1024], 0).await),
        b"ok\n"
    );
}

#[tokio::test]
async fn environment_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh(
        r#"echo "$SWARM_TASK_ID $SWARM_ATTEMPT $SWARM_AGENT [$SWARM_IDEMPOTENCY_KEY] $FOO"; pwd"#,
    );
    spec.env.insert("FOO".into(), "bar".into());
    spec.cwd = Some(dir.path().to_owned());
    let ex = exec_with("envy", spec);
    let mut t = task("envy", "", 0);
    let out = output(ex.run(t.clone(), MAX, CancelToken::never()).await);
    let canon = dir.path().canonicalize().unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("42 3 envy [] bar\n{}\n", canon.display())
    );
    t.idempotency_key = Some("k-1".into());
    let out = output(ex.run(t, MAX, CancelToken::never()).await);
    assert!(String::from_utf8(out)
        .unwrap()
        .starts_with("42 3 envy [k-1] bar\n"));
}

#[tokio::test]
async fn nonzero_exit_carries_code_and_stderr_tail() {
    let msg = failure(
        run_sh("echo partial; echo 'it broke' >&2; exit 3", "", 0).await,
        FailureKind::Exit,
    );
    assert!(msg.contains("exited with code 3"), "{msg}");
    assert!(msg.contains("it broke"), "{msg}");

    // Long stderr: only the tail is kept.
    let msg = failure(
        run_sh(
            "i=0; while [ $i -lt 2000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 1",
            "",
            0,
        )
        .await,
        FailureKind::Exit,
    );
    assert!(msg.contains("line 1999"), "{msg}");
    assert!(
        !msg.contains("line 0\n"),
        "head of stderr should be dropped"
    );
    assert!(msg.len() < 4096 + 200, "message too long: {}", msg.len());
}

#[tokio::test]
async fn death_by_signal() {
    let msg = failure(run_sh("kill -TERM $$", "", 0).await, FailureKind::Exit);
    assert!(msg.contains("SIGTERM"), "{msg}");
}

#[tokio::test]
async fn spawn_failures() {
    let ex = exec_with(
        "ghost",
        ExecSpec::new("/nonexistent/agent-binary", Vec::<String>::new()),
    );
    let msg = failure(
        ex.run(task("ghost", "", 0), MAX, CancelToken::never())
            .await,
        FailureKind::Spawn,
    );
    assert!(msg.contains("/nonexistent/agent-binary"), "{msg}");
    assert!(msg.to_lowercase().contains("no such file"), "{msg}");

    let mut spec = sh("true");
    spec.cwd = Some("/nonexistent/dir".into());
    let ex = exec_with("nowhere", spec);
    let msg = failure(
        ex.run(task("nowhere", "", 0), MAX, CancelToken::never())
            .await,
        FailureKind::Spawn,
    );
    assert!(msg.contains("/nonexistent/dir"), "{msg}");
}

#[tokio::test]
async fn output_too_large_kills_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec yes", pidfile.display());
    let ex = exec_with("loud", sh(&script));
    let msg = failure(
        ex.run(task("loud", "", 0), 1000, CancelToken::never())
            .await,
        FailureKind::OutputTooLarge,
    );
    assert!(msg.contains("1000"), "{msg}");
    assert!(wait_dead(read_pid(&pidfile)).await);

    // Exactly at the limit is fine.
    let ex = exec_with("exact", sh("head -c 1000 /dev/zero"));
    assert_eq!(
        output(
            ex.run(task("exact", "", 0), 1000, CancelToken::never())
                .await
        )
        .len(),
        1000
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let (gc, me) = (dir.path().join("gc"), dir.path().join("me"));
    let script = format!(
        "sleep 100 & echo $! > {gc}; sh -c 'sleep 100' & echo $$ > {me}; wait",
        gc = gc.display(),
        me = me.display()
    );
    let msg = failure(run_sh(&script, "", 1500).await, FailureKind::Timeout);
    assert!(msg.contains("1500 ms"), "{msg}");
    let (gc_pid, me_pid) = (read_pid(&gc), read_pid(&me));
    assert!(
        wait_dead(gc_pid).await,
        "grandchild {gc_pid} survived the timeout"
    );
    // Our direct child must be reaped: not a zombie (nor alive).
    assert!(
        !alive(me_pid) && !is_zombie(me_pid),
        "agent {me_pid} not reaped"
    );
}

#[tokio::test]
async fn agent_timeout_cap_applies() {
    let mut spec = sh("sleep 100");
    spec.timeout_ms = Some(100);
    let ex = exec_with("capped", spec);
    let msg = failure(
        ex.run(task("capped", "", 600_000), MAX, CancelToken::never())
            .await,
        FailureKind::Timeout,
    );
    assert!(msg.contains("100 ms"), "{msg}");
}

#[tokio::test]
async fn leftover_background_processes_die_when_the_agent_exits() {
    let dir = tempfile::tempdir().unwrap();
    let gc = dir.path().join("gc");
    let script = format!("sleep 100 & echo $! > {}; echo done", gc.display());
    // Returns promptly (the background sleep holds stdout open until it is killed).
    assert_eq!(output(run_sh(&script, "", 0).await), b"done\n");
    let pid = read_pid(&gc);
    assert!(
        wait_dead(pid).await,
        "background process {pid} outlived the attempt"
    );
}

#[tokio::test]
async fn cancel_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let gc = dir.path().join("gc");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", gc.display());
    let ex = exec_with("slow", sh(&script));
    let (handle, token) = cancel_pair();
    let run = tokio::spawn(async move { ex.run(task("slow", "", 0), MAX, token).await });
    let pid: u32 = wait_for_file(&gc).await.trim().parse().unwrap();
    assert!(alive(pid));
    handle.cancel();
    failure(run.await.unwrap(), FailureKind::Cancelled);
    assert!(wait_dead(pid).await, "grandchild {pid} survived cancel");
}

#[tokio::test]
async fn dropping_the_run_future_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let gc = dir.path().join("gc");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", gc.display());
    let ex = exec_with("slow", sh(&script));
    let run =
        tokio::spawn(async move { ex.run(task("slow", "", 0), MAX, CancelToken::never()).await });
    let pid: u32 = wait_for_file(&gc).await.trim().parse().unwrap();
    run.abort();
    let _ = run.await;
    assert!(wait_dead(pid).await, "grandchild {pid} survived abort");
}

#[test]
fn agents_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agents.toml");
    let cases = [
        (
            "[agents.a]\ncommand = \"x\"\nunknown = 1\n",
            "unknown field `unknown`",
        ),
        (
            "[agents.a]\nargs = [\"x\"]\n",
            "missing required key `command`",
        ),
        ("[agents.echo]\ncommand = \"x\"\n", "built-in"),
        ("[agents.a\n", "TOML parse error"),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let err = Agents::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    std::fs::write(&path, "[agents.cat]\ncommand = \"cat\"\ncwd = \"sub\"\n").unwrap();
    let agents = Agents::load(&path).unwrap();
    assert_eq!(agents.names(), vec!["cat", "echo", "sleep"]);
    let Some(swarm_worker::Agent::Exec(spec)) = agents.get("cat") else {
        panic!()
    };
    assert_eq!(spec.cwd.as_deref(), Some(dir.path().join("sub").as_path()));
}

#[tokio::test]
async fn exec_agents_find_their_patterns_in_a_file_that_is_removed_afterwards() {
    let ex = exec_with(
        "p",
        sh(
            r#"test -n "$SWARM_PATTERNS_FILE" && cat "$SWARM_PATTERNS_FILE" && echo "$SWARM_PATTERNS_FILE" >&2"#,
        ),
    );
    let patterns = vec![swarm_proto::worker::PatternHit {
        id: "pat-000000000001".into(),
        title: "Pin the toolchain".into(),
        description: "CI broke on a new lint".into(),
        content: "Use rust-toolchain.toml".into(),
        outcome: "success".into(),
        confidence: 0.75,
        score: 0.9,
    }];
    let out = ex
        .run_with_patterns(
            task("p", "", 10_000),
            &patterns,
            1 << 20,
            CancelToken::never(),
        )
        .await;
    let Outcome::Succeeded { output } = out else {
        panic!("agent failed: {out:?}");
    };
    let v: serde_json::Value = serde_json::from_slice(&output).expect("patterns JSON");
    assert_eq!(v["patterns"][0]["id"], "pat-000000000001");
    assert_eq!(v["patterns"][0]["content"], "Use rust-toolchain.toml");
    let leftover: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("swarm-patterns-42-3-{}", std::process::id()))
        })
        .collect();
    assert!(leftover.is_empty(), "patterns file left behind");

    // Without patterns, no file and no variable.
    let ex = exec_with("q", sh(r#"test -z "$SWARM_PATTERNS_FILE" && printf none"#));
    let out = ex
        .run(task("q", "", 10_000), 1 << 20, CancelToken::never())
        .await;
    assert_eq!(
        out,
        Outcome::Succeeded {
            output: b"none".to_vec()
        }
    );
}
