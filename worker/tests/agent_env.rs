//! What a real `exec` agent finds in its environment: only what it is given, nothing of
//! the worker's.
//!
//! This binary holds a single test on purpose: it sets variables in its own process
//! environment (the "worker's" environment, as an agent could inherit it) before starting
//! any other thread, so no other test can race the change.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use swarm_proto::worker::{AttemptRef, Outcome, PatternHit, TaskAssignment};
use swarm_worker::executor::{PATTERNS_FILE_NAME, PRIVATE_DIR_PREFIX};
use swarm_worker::{Agents, CancelToken, Executor};

/// Set on the "worker" (this process); none of them may reach an agent.
const WORKER_SECRETS: [(&str, &str); 7] = [
    ("SWARM_TEST_SECRET", "sentinel-secret-7f3a"),
    ("SWARM_CERTS", "/sentinel/certs"),
    ("SWARM_TOKEN", "sentinel-token"),
    ("SWARM_TOKEN_FILE", "/sentinel/token-file"),
    ("SWARM_AGENTS", "/sentinel/agents.toml"),
    ("SWARM_TASK_ID", "sentinel-task-id"),
    ("AGENT_ENV_NOT_LISTED", "sentinel-not-listed"),
];

fn task(agent: &str) -> TaskAssignment {
    TaskAssignment {
        attempt: AttemptRef {
            task_id: 42,
            attempt: 3,
        },
        agent: agent.into(),
        payload: Vec::new(),
        timeout_ms: 20_000,
        idempotency_key: Some("idem-1".into()),
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

fn output(o: Outcome) -> String {
    match o {
        Outcome::Succeeded { output } => String::from_utf8(output).unwrap(),
        other => panic!("expected success, got {other:?}"),
    }
}

/// `env`'s output as a map.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("odd line {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Checks that `dir` is a private directory made under `root`, and returns it.
fn check_private_dir(root: &Path, dir: &str) -> PathBuf {
    let dir = PathBuf::from(dir);
    assert_eq!(dir.parent(), Some(root), "{}", dir.display());
    let name = dir.file_name().unwrap().to_str().unwrap();
    let random = name.strip_prefix(PRIVATE_DIR_PREFIX).unwrap();
    assert_eq!(random.len(), 32, "{name}");
    assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
    dir
}

#[test]
fn agents_see_only_what_they_are_given() {
    // The only test of this binary, and no other thread exists yet.
    for (k, v) in WORKER_SECRETS {
        std::env::set_var(k, v);
    }
    std::env::set_var("AGENT_ENV_ALLOWED", "passed-through");
    std::env::set_var("LANG", "C.UTF-8");
    std::env::set_var("TZ", "UTC");
    std::env::remove_var("LC_ALL");
    std::env::remove_var("AGENT_ENV_UNSET");
    let worker_path = std::env::var("PATH").expect("the test needs a PATH");

    let root = tempfile::tempdir().unwrap();
    let agents = Agents::parse(
        r#"
        [agents.env]
        command = "env"
        env = ["AGENT_ENV_ALLOWED", "AGENT_ENV_UNSET"]
        env_set = { FIXED = "fixed value", TZ = "Europe/Paris" }

        [agents.home]
        command = "sh"
        args = ["-c", '''
            echo "$HOME"; echo "$TMPDIR"; echo "$SWARM_PATTERNS_FILE"
            stat -c '%a %u' "$HOME"; stat -c '%a %u' "$SWARM_PATTERNS_FILE"
            echo note > "$HOME/note" && echo wrote-home
            mkdir "$TMPDIR/scratch" && echo wrote-tmp
        ''']
        "#,
        Path::new("/etc/swarm/agents.toml"),
    )
    .unwrap();
    let ex = Executor::new(agents).with_private_root(root.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The whole environment, exactly.
    let out = output(rt.block_on(ex.run_with_patterns(
        task("env"),
        &patterns(),
        1 << 20,
        CancelToken::never(),
    )));
    for (k, v) in WORKER_SECRETS {
        assert!(
            !out.contains(v),
            "the worker's {k} leaked into the agent:\n{out}"
        );
    }
    let env = parse_env(&out);
    let home = check_private_dir(root.path(), &env["HOME"]);
    let t = task("env");
    let want: BTreeMap<String, String> = [
        ("PATH", worker_path.as_str()),
        ("HOME", env["HOME"].as_str()),
        ("TMPDIR", env["HOME"].as_str()),
        ("LANG", "C.UTF-8"),
        ("TZ", "Europe/Paris"), // env_set wins over the worker's
        ("AGENT_ENV_ALLOWED", "passed-through"),
        ("FIXED", "fixed value"),
        ("SWARM_TASK_ID", "42"),
        ("SWARM_ATTEMPT", "3"),
        ("SWARM_EXECUTION_ID", &t.execution().to_string()),
        ("SWARM_AGENT", "env"),
        ("SWARM_IDEMPOTENCY_KEY", "idem-1"),
        (
            "SWARM_PATTERNS_FILE",
            &home.join(PATTERNS_FILE_NAME).display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(env, want);
    assert!(!home.exists(), "private dir left behind");

    // HOME and TMPDIR: the private directory, 0700, holding the 0600 patterns file.
    let uid = std::fs::metadata(root.path()).unwrap().uid();
    let out = output(rt.block_on(ex.run_with_patterns(
        task("home"),
        &patterns(),
        1 << 20,
        CancelToken::never(),
    )));
    let lines: Vec<&str> = out.lines().collect();
    let home = check_private_dir(root.path(), lines[0]);
    assert_eq!(lines[1], lines[0], "TMPDIR");
    assert_eq!(
        Path::new(lines[2]),
        home.join(PATTERNS_FILE_NAME),
        "patterns file"
    );
    assert_eq!(lines[3], format!("700 {uid}"), "private dir mode");
    assert_eq!(lines[4], format!("600 {uid}"), "patterns file mode");
    assert_eq!(&lines[5..], ["wrote-home", "wrote-tmp"]);
    assert!(!home.exists(), "private dir left behind");
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "nothing may stay in the private root"
    );
}
