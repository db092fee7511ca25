//! An `exec` agent's private directory and patterns file, against real processes: fresh,
//! private, never written through a symlink, gone however the attempt ends; `run_as`; the
//! agents file's refusals.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use swarm_proto::worker::{AttemptRef, FailureKind, Outcome, PatternHit, TaskAssignment};
use swarm_worker::executor::{PATTERNS_FILE_NAME, PRIVATE_DIR_PREFIX};
use swarm_worker::{cancel_pair, Agents, CancelToken, ExecSpec, Executor};

const MAX: u64 = 1 << 20;

fn task(agent: &str, timeout_ms: u64) -> TaskAssignment {
    TaskAssignment {
        attempt: AttemptRef {
            task_id: 42,
            attempt: 3,
        },
        agent: agent.into(),
        payload: Vec::new(),
        timeout_ms,
        idempotency_key: None,
        patterns: 1,
        swarm: "default".into(),
        term: 1,
    }
}

fn patterns() -> Vec<PatternHit> {
    vec![PatternHit {
        id: "pat-000000000001".into(),
        title: "Pin the toolchain".into(),
        description: "CI broke on a new lint".into(),
        content: "Use rust-toolchain.toml".into(),
        outcome: "success".into(),
        confidence: 0.75,
        score: 0.9,
    }]
}

fn sh(script: &str) -> ExecSpec {
    ExecSpec::new("sh", ["-c", script])
}

fn output(o: Outcome) -> String {
    match o {
        Outcome::Succeeded { output } => String::from_utf8(output).unwrap(),
        other => panic!("expected success, got {other:?}"),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

/// Waits (up to 10 s) for `file` to hold a line, and returns it.
async fn wait_for_line(file: &Path) -> String {
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Some(line) = text.lines().next().filter(|_| text.ends_with('\n')) {
                return line.to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never written", file.display());
}

#[tokio::test]
async fn patterns_file_is_private_and_planted_symlinks_are_never_followed() {
    // The old, predictable name of the patterns file, planted as a symlink to a file the
    // agent (or anyone) would like the worker to overwrite: never used any more.
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let legacy =
        std::env::temp_dir().join(format!("swarm-patterns-42-3-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&legacy);
    std::os::unix::fs::symlink(&victim, &legacy).unwrap();

    // Default private root: the shared temp dir.
    let ex = Executor::new(Agents::builtin().with_exec(
        "p",
        sh(r#"echo "$SWARM_PATTERNS_FILE"; cat "$SWARM_PATTERNS_FILE" >/dev/null && echo read"#),
    ));
    let mut seen = Vec::new();
    for _ in 0..2 {
        let out = output(
            ex.run_with_patterns(task("p", 10_000), &patterns(), MAX, CancelToken::never())
                .await,
        );
        let mut lines = out.lines();
        let file = PathBuf::from(lines.next().unwrap());
        assert_eq!(lines.next(), Some("read"));
        assert_eq!(file.file_name().unwrap(), PATTERNS_FILE_NAME);
        let dir = file.parent().unwrap().to_owned();
        assert_eq!(dir.parent(), Some(std::env::temp_dir().as_path()));
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with(PRIVATE_DIR_PREFIX), "{name}");
        assert!(!dir.exists(), "private dir left behind");
        seen.push(name);
    }
    assert_ne!(seen[0], seen[1], "a private dir name was reused");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&legacy).unwrap().is_symlink());
    std::fs::remove_file(&legacy).unwrap();
}

#[tokio::test]
async fn patterns_file_is_0600_in_a_0700_dir_and_the_agent_cannot_redirect_a_write() {
    let root = tempfile::tempdir().unwrap();
    let victim_dir = tempfile::tempdir().unwrap();
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The agent plants symlinks wherever it can (its own dir, the private root) hoping a
    // later attempt writes through one; it also reports what it sees.
    let script = format!(
        r#"stat -c '%a' "$HOME" "$SWARM_PATTERNS_FILE"
        ln -s {victim} "$HOME/{PATTERNS_FILE_NAME}.next"
        for i in 0 1 2 3 4 5 6 7 8 9; do ln -s {victim} "$(dirname "$HOME")/{PRIVATE_DIR_PREFIX}guess$i" 2>/dev/null; done
        echo planted"#,
        victim = victim.display(),
    );
    let ex =
        Executor::new(Agents::builtin().with_exec("p", sh(&script))).with_private_root(root.path());
    for _ in 0..3 {
        let out = output(
            ex.run_with_patterns(task("p", 10_000), &patterns(), MAX, CancelToken::never())
                .await,
        );
        assert_eq!(out, "700\n600\nplanted\n");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // Only the agent's symlinks are left in the root: every private dir is gone.
    for e in std::fs::read_dir(root.path()).unwrap() {
        let e = e.unwrap();
        assert!(
            e.file_type().unwrap().is_symlink(),
            "{:?} left behind",
            e.path()
        );
    }
}

/// How an attempt of the `slow` agent is ended.
#[derive(Debug, Clone, Copy)]
enum End {
    Success,
    Failure,
    Timeout,
    Cancel,
    /// The attempt's future is dropped (how a drain's timeout and a worker stop end it:
    /// `JoinSet::shutdown`).
    Dropped,
}

#[tokio::test]
async fn private_dir_is_gone_however_the_attempt_ends() {
    let root = tempfile::tempdir().unwrap();
    let reports = tempfile::tempdir().unwrap();
    for end in [
        End::Success,
        End::Failure,
        End::Timeout,
        End::Cancel,
        End::Dropped,
    ] {
        let report = reports.path().join(format!("{end:?}"));
        let tail = match end {
            End::Success => "exit 0",
            End::Failure => "exit 1",
            _ => "sleep 30",
        };
        // Fills its private dir (a subdirectory, a background writer), reports it, ends.
        let script = format!(
            r#"mkdir -p "$HOME/sub/deeper" && echo x > "$HOME/sub/deeper/f" && echo y > "$TMPDIR/t"
            ( while :; do echo z >> "$HOME/bg"; sleep 0.05; done ) &
            stat -c '%a' "$HOME" > /dev/null && echo "$HOME" > {report}
            sleep 0.2; {tail}"#,
            report = report.display(),
        );
        let ex = Executor::new(Agents::builtin().with_exec("slow", sh(&script)))
            .with_private_root(root.path());
        let timeout_ms = if matches!(end, End::Timeout) {
            700
        } else {
            20_000
        };
        let t = task("slow", timeout_ms);
        let (cancel, token) = cancel_pair();
        let hits = patterns();
        let run = ex.run_with_patterns(t, &hits, MAX, token);
        let outcome = match end {
            End::Success | End::Failure | End::Timeout => Some(run.await),
            End::Cancel => {
                let (outcome, _) = tokio::join!(run, async {
                    wait_for_line(&report).await;
                    cancel.cancel();
                });
                Some(outcome)
            }
            End::Dropped => {
                tokio::pin!(run);
                tokio::select! {
                    o = &mut run => panic!("ended on its own: {o:?}"),
                    _ = wait_for_line(&report) => {}
                }
                None // `run` is dropped here, mid-attempt.
            }
        };
        match (end, &outcome) {
            (End::Success, Some(Outcome::Succeeded { .. })) => {}
            (
                End::Failure,
                Some(Outcome::Failed {
                    kind: FailureKind::Exit,
                    ..
                }),
            )
            | (
                End::Timeout,
                Some(Outcome::Failed {
                    kind: FailureKind::Timeout,
                    ..
                }),
            )
            | (
                End::Cancel,
                Some(Outcome::Failed {
                    kind: FailureKind::Cancelled,
                    ..
                }),
            )
            | (End::Dropped, None) => {}
            other => panic!("unexpected {other:?}"),
        }
        let home = PathBuf::from(wait_for_line(&report).await);
        assert_eq!(home.parent(), Some(root.path()), "{end:?}");
        assert!(!home.exists(), "{end:?}: {} left behind", home.display());
        // And the killed background writer does not bring it back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!home.exists(), "{end:?}: {} came back", home.display());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "{end:?}: something left in the private root"
        );
    }
}

#[tokio::test]
async fn a_private_root_that_cannot_take_a_directory_fails_the_attempt() {
    let ex = Executor::new(Agents::builtin().with_exec("p", sh("echo hi")))
        .with_private_root("/nonexistent/private-root");
    match ex.run(task("p", 10_000), MAX, CancelToken::never()).await {
        Outcome::Failed {
            kind: FailureKind::Spawn,
            message,
        } => assert!(
            message.contains("private directory") && message.contains("/nonexistent"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn run_as_runs_the_agent_as_that_user_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.toml");
    if !is_root() {
        // A worker that is not root cannot switch users.
        std::fs::write(&file, "[agents.x]\ncommand = \"id\"\nrun_as = \"0:0\"\n").unwrap();
        let err = Agents::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("run_as needs the worker to run as root") && err.contains("agent `x`"),
            "{err}"
        );
        return;
    }
    let Some(line) = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(str::to_owned)
    else {
        eprintln!("no user `nobody` here: skipping the run_as run");
        return;
    };
    let ids: Vec<u32> = line
        .split(':')
        .skip(2)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    std::fs::write(
        &file,
        r#"
        [agents.x]
        command = "sh"
        args = ["-c", '''
            id -u; id -g; id -G; pwd
            stat -c '%a %u' "$HOME" "$SWARM_PATTERNS_FILE"
            cat "$SWARM_PATTERNS_FILE" > /dev/null && echo read
            echo note > "$HOME/note" && echo wrote
            cat /proc/$PPID/environ > /dev/null 2>&1 && echo leaked || echo no-worker-environ
        ''']
        run_as = "nobody"
        "#,
    )
    .unwrap();
    let agents = Agents::load(&file).unwrap();
    // Default private root (the shared temp dir, which `nobody` can traverse).
    let ex = Executor::new(agents);
    let out = output(
        ex.run_with_patterns(task("x", 10_000), &patterns(), MAX, CancelToken::never())
            .await,
    );
    let lines: Vec<&str> = out.lines().collect();
    let (uid, gid) = (ids[0], ids[1]);
    assert_eq!(lines[0], uid.to_string(), "{out}");
    assert_eq!(lines[1], gid.to_string(), "{out}");
    // No supplementary groups (root's included): only the primary group.
    assert_eq!(lines[2], gid.to_string(), "{out}");
    let private = PathBuf::from(lines[3]);
    assert!(
        private
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(PRIVATE_DIR_PREFIX),
        "cwd {out}"
    );
    assert_eq!(lines[4], format!("700 {uid}"), "{out}");
    assert_eq!(lines[5], format!("600 {uid}"), "{out}");
    // It can read and write its own files, and cannot read the worker's environment.
    assert_eq!(&lines[6..], ["read", "wrote", "no-worker-environ"], "{out}");
    assert!(!private.exists(), "private dir left behind");
}

#[test]
fn agents_file_refuses_bad_and_reserved_env_names() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agents.toml");
    for (extra, needles) in [
        (
            "env = [\"OPENAI-API-KEY\"]",
            &["invalid environment variable name \"OPENAI-API-KEY\""][..],
        ),
        (
            "env = [\"SWARM_CERTS\"]",
            &["`SWARM_CERTS` is refused", "reserved"][..],
        ),
        ("env = [\"SWARM_TOKEN\"]", &["`SWARM_TOKEN` is refused"][..]),
        (
            "env_set = { SWARM_CERTS = \"/etc/swarm/certs\" }",
            &["`env_set`", "`SWARM_CERTS` is refused"][..],
        ),
        (
            "environment = [\"A\"]",
            &["unknown field `environment`"][..],
        ),
    ] {
        std::fs::write(&file, format!("[agents.x]\ncommand = \"env\"\n{extra}\n")).unwrap();
        let err = Agents::load(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(
            err.contains("agent `x`") || err.contains("unknown field"),
            "{err}"
        );
        for n in needles {
            assert!(err.contains(n), "{extra}: {err:?} lacks {n:?}");
        }
    }
}
