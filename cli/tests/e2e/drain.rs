//! Graceful stops with real signals: a worker that gets SIGTERM drains (finishes what it
//! runs, hands back what it has not started, exits 0), its drain timeout cuts the rest
//! short, and a leader that gets SIGTERM hands leadership over before it exits. And an
//! operator's remote drain (`POST /v1/workers/{id}/drain`, `swarm workers drain`): the
//! worker takes no new work, finishes what it runs, stays, and takes work again once
//! resumed; a new leader learns of the drain from the worker.
//!
//! The agents here wait for a gate file the test creates, so an attempt is surely still
//! running when the signal comes; nothing depends on how fast anything is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{Cluster, WAIT};
use crate::raft_cluster::RaftCluster;

/// An agents file with `gate`: it records its process id, waits until `gate` exists, then
/// prints which task and attempt it was.
fn gate_agents(dir: &Path, gate: &Path) -> PathBuf {
    let agents = dir.join("agents.toml");
    let script = format!(
        "echo $$ > '{pids}'/pid-\"$SWARM_TASK_ID-$SWARM_ATTEMPT\"; \
         while [ ! -e '{gate}' ]; do sleep 0.05; done; \
         printf 'task %s attempt %s' \"$SWARM_TASK_ID\" \"$SWARM_ATTEMPT\"",
        pids = dir.display(),
        gate = gate.display()
    );
    std::fs::write(
        &agents,
        format!(
            "[agents.gate]\ncommand = \"sh\"\nargs = [\"-c\", {}]\n",
            toml_string(&script)
        ),
    )
    .expect("write agents file");
    agents
}

/// A temp dir holding the `gate` agent (and where its gate and pid files go), the gate's
/// path, the agents file, and a coordinator that is ready.
async fn gated_cluster() -> (tempfile::TempDir, PathBuf, PathBuf, Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("open");
    let agents = gate_agents(dir.path(), &gate);
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    (dir, gate, agents, c)
}

/// Wait until `ready` holds (files appearing), failing with `what` after [`WAIT`].
async fn wait_files(c: &Cluster, what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Poll `GET path` until `pred` holds on the answer; returns it.
async fn wait_until(c: &Cluster, path: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = c.get(path).await;
        if status == 200 && pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not in time; last answer {v}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn worker<'a>(workers: &'a Value, id: &str) -> Option<&'a Value> {
    workers["workers"]
        .as_array()?
        .iter()
        .find(|w| w["id"] == id)
}

fn attempts(task: &Value) -> &[Value] {
    task["attempts"].as_array().map_or(&[], |a| a.as_slice())
}

/// The value of `swarm_attempts_drained_total` on the coordinator (0 before any).
async fn drained_counter(c: &Cluster) -> f64 {
    let text = reqwest::get(format!("{}/metrics", c.api))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find(|l| l.starts_with("swarm_attempts_drained_total"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |n| n.parse().expect("counter value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_sigterm_finishes_its_attempts_hands_back_the_queued_ones_and_exits_0() {
    let (dir, gate, agents, mut c) = gated_cluster().await;
    // Slots, and attempts queued beyond them on the worker.
    const SLOTS: usize = 2;
    const QUEUED: usize = 100;
    c.start_worker_with(
        "w1",
        SLOTS as u32,
        Some(&agents),
        &["--labels", "pool=drain"],
    );
    c.wait_workers(&["w1"]).await;
    // A star swarm whose members hold QUEUED attempts beyond their slots, queued locally:
    // w1 takes every task, SLOTS running and the rest waiting for a slot.
    let (status, v) = c
        .post(
            "/v1/swarms",
            json!({"name": "q", "topology": "star", "labels": {"pool": "drain"}, "queue_depth": QUEUED}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let task = json!({"agent": "gate", "swarm": "q", "max_attempts": 1, "timeout_ms": 600_000});
    let (status, v) = c
        .post(
            "/v1/tasks/batch",
            json!({ "tasks": vec![task; SLOTS + QUEUED] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let ids: Vec<u64> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_u64().expect("id"))
        .collect();
    for id in &ids {
        wait_until(&c, &format!("/v1/tasks/{id}"), "task on w1", |t| {
            t["state"] == "running" && attempts(t).first().is_some_and(|a| a["worker"] == "w1")
        })
        .await;
    }
    let pid_files = |attempt: u32| {
        ids.iter()
            .filter(|id| dir.path().join(format!("pid-{id}-{attempt}")).exists())
            .count()
    };
    wait_files(&c, "the first attempts never started", || {
        pid_files(1) >= SLOTS
    })
    .await;
    assert_eq!(pid_files(1), SLOTS, "the others wait for a slot");
    // Somewhere for the handed-back attempts to go.
    c.start_worker_with(
        "w2",
        SLOTS as u32,
        Some(&agents),
        &["--labels", "pool=drain"],
    );
    c.wait_workers(&["w1", "w2"]).await;

    c.term_worker("w1");
    // The API shows it draining, and so does `swarm status`.
    let workers = wait_until(&c, "/v1/workers", "w1 draining", |v| {
        worker(v, "w1").is_some_and(|w| w["draining"] == true)
    })
    .await;
    assert_eq!(
        worker(&workers, "w2").map(|w| w["draining"].clone()),
        Some(json!(false))
    );
    let out = std::process::Command::new(crate::harness::bin())
        .args(["status"])
        .env("SWARM_API", &c.api)
        .env("SWARM_TOKEN", &c.token)
        .output()
        .expect("run swarm status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("w1 (draining)"), "{text}");
    assert!(text.contains("(1 draining)"), "{text}");
    // The queued attempts are handed back and run on w2 (they wait at the gate too).
    wait_files(&c, "handed-back attempts never ran again", || {
        pid_files(2) >= SLOTS
    })
    .await;
    assert!(
        worker(&c.get("/v1/workers").await.1, "w1").is_some(),
        "w1 stays while its attempts run"
    );

    std::fs::write(&gate, "").unwrap();
    let status = c.wait_worker_exit("w1").await;
    assert!(status.success(), "w1 exited with {status}\n{}", c.logs());

    let mut released = 0;
    for id in &ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        let a = attempts(&t);
        assert!(a.iter().all(|a| a["outcome"] != "lost"), "{t}");
        match a {
            // Running when the signal came: finished on w1.
            [only] => {
                assert_eq!(only["worker"], "w1", "{t}");
                assert_eq!(only["outcome"], "succeeded", "{t}");
            }
            // Queued on w1: handed back unstarted, then run on w2, although the task
            // allows one attempt only.
            [first, second] => {
                assert_eq!(first["worker"], "w1", "{t}");
                assert_eq!(first["outcome"], "released", "{t}");
                assert!(
                    first["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("unstarted")),
                    "{t}"
                );
                assert_eq!(second["worker"], "w2", "{t}");
                assert_eq!(second["outcome"], "succeeded", "{t}");
                assert!(
                    !dir.path()
                        .join(format!("pid-{id}-{}", first["attempt"]))
                        .exists(),
                    "a handed-back attempt never started: {t}"
                );
                released += 1;
            }
            _ => panic!("unexpected attempts: {t}"),
        }
        assert_eq!(t["output"], format!("task {id} attempt {}", a.len()), "{t}");
    }
    assert_eq!(released, QUEUED, "every queued attempt was handed back");
    assert_eq!(drained_counter(&c).await, QUEUED as f64);
    let log = c.log_of("w1");
    assert!(log.contains("worker draining"), "{log}");
    assert!(!log.contains("killing running attempts"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_cuts_an_attempt_short_and_it_succeeds_elsewhere() {
    let (dir, gate, agents, mut c) = gated_cluster().await;
    c.start_worker_with("w1", 1, Some(&agents), &["--drain-timeout", "1s"]);
    c.wait_workers(&["w1"]).await;
    let id = c
        .submit(json!({"agent": "gate", "max_attempts": 1, "timeout_ms": 600_000}))
        .await;
    let first_pid = dir.path().join(format!("pid-{id}-1"));
    wait_files(&c, "the attempt never started", || first_pid.exists()).await;
    c.start_worker_with("w2", 1, Some(&agents), &[]);
    c.wait_workers(&["w1", "w2"]).await;

    // The gate stays shut: the attempt outlasts the drain timeout, is killed and handed
    // back, and w1 leaves.
    c.term_worker("w1");
    let status = c.wait_worker_exit("w1").await;
    assert!(status.success(), "w1 exited with {status}\n{}", c.logs());
    let pid: i32 = std::fs::read_to_string(&first_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next().map(String::from));
    assert!(
        state.is_none() || state.as_deref() == Some("Z"),
        "the cut-short agent process was killed: {stat}"
    );
    let log = c.log_of("w1");
    assert!(log.contains("drain timeout"), "{log}");

    // It runs again on w2 without counting against its single attempt.
    wait_until(
        &c,
        &format!("/v1/tasks/{id}"),
        "second attempt on w2",
        |t| attempts(t).get(1).is_some_and(|a| a["worker"] == "w2"),
    )
    .await;
    std::fs::write(&gate, "").unwrap();
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let a = attempts(&t);
    assert_eq!(a.len(), 2, "{t}");
    assert_eq!(a[0]["worker"], "w1", "{t}");
    assert_eq!(a[0]["outcome"], "released", "{t}");
    assert!(
        a[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cut short")),
        "{t}"
    );
    assert_eq!(a[1]["outcome"], "succeeded", "{t}");
    assert_eq!(t["output"], format!("task {id} attempt 2"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_given_sigterm_hands_leadership_over_and_the_cluster_keeps_committing() {
    let mut c = RaftCluster::new(3, &[]);
    c.start_all();
    let old = c.wait_leader().await;
    c.start_worker("w1", 2, None);
    let (code, out, err) = c.cli(&[
        "submit",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "before",
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}");

    c.term_node(old);
    let status = c.wait_node_exit(old).await;
    assert!(
        status.success(),
        "node {old} exited with {status}\n{}",
        c.logs()
    );
    let new = c.wait_leader().await;
    assert_ne!(new, old);
    // The old leader handed over to a caught-up voter, which is the new leader.
    let log = c.log_of(old);
    let done = log
        .lines()
        .find(|l| l.contains("leadership hand-off: done"))
        .unwrap_or_else(|| panic!("no completed hand-off in node {old}'s log:\n{}", c.logs()));
    assert!(done.contains(&format!("to={new}")), "{done}");
    assert!(log.contains("sending TimeoutNow"), "{log}");
    let target_log = c.log_of(new);
    assert!(
        target_log.contains("starting an election now"),
        "node {new} acted on TimeoutNow:\n{target_log}"
    );

    // The cluster keeps committing, and the worker follows the new leader.
    let (code, out, err) = c.cli(&[
        "submit",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "after",
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", c.logs());
    assert!(out.contains("after"), "{out}");
}

/// A new API token of `scope` (printed once by `swarm tokens create`).
fn make_token(c: &Cluster, name: &str, scope: &str) -> String {
    let (code, out, err) = c.cli_as(&c.token, &["tokens", "create", name, "--scope", scope]);
    assert_eq!(code, 0, "{out}{err}");
    out.trim().to_string()
}

/// `POST path` with `token` and no body: (status, JSON answer).
async fn post_as(c: &Cluster, token: &str, path: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}{path}", c.api))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("API request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drains_a_worker_which_finishes_its_attempt_stays_and_is_resumed() {
    let (dir, gate, agents, mut c) = gated_cluster().await;
    c.start_worker_with("w1", 1, Some(&agents), &["--labels", "node=a"]);
    c.wait_workers(&["w1"]).await;
    // An attempt running on w1 (it waits at the gate) when the drain comes.
    let running = c
        .submit(json!({"agent": "gate", "max_attempts": 1, "timeout_ms": 600_000}))
        .await;
    let pid = dir.path().join(format!("pid-{running}-1"));
    wait_files(&c, "the attempt never started on w1", || pid.exists()).await;
    c.start_worker_with("w2", 2, Some(&agents), &["--labels", "node=b"]);
    c.wait_workers(&["w1", "w2"]).await;

    // An unknown worker is not found; read and submit tokens may not drain or resume.
    let (status, v) = post_as(&c, &c.token, "/v1/workers/nosuch/drain").await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    for scope in ["read", "submit"] {
        let token = make_token(&c, &format!("t-{scope}"), scope);
        for action in ["drain", "resume"] {
            let (status, v) = post_as(&c, &token, &format!("/v1/workers/w1/{action}")).await;
            assert_eq!(status, 403, "{action} with a {scope} token: {v}");
            assert_eq!(v["error"]["code"], "forbidden", "{v}");
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains("needs scope operate"), "{v}");
        }
        let (code, _, err) = c.cli_as(&token, &["workers", "drain", "w1"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("forbidden"), "{err}");
    }
    let (code, _, err) = c.cli_as(&c.token, &["workers", "resume", "nosuch"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not_found"), "{err}");
    let (_, workers) = c.get("/v1/workers").await;
    assert_eq!(
        worker(&workers, "w1").map(|w| w["draining"].clone()),
        Some(json!(false)),
        "refused requests changed nothing: {workers}"
    );

    // An operator token drains w1.
    let operate = make_token(&c, "ops", "operate");
    let (status, v) = post_as(&c, &operate, "/v1/workers/w1/drain").await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["id"], "w1", "{v}");
    assert_eq!(v["draining"], true, "{v}");
    assert_eq!(v["drain"], "operator", "{v}");
    wait_files(&c, "w1 never heard of its drain", || {
        c.log_of("w1").contains("drained by the operator")
    })
    .await;

    // Everything submitted now runs on w2; a task only w1 can run waits.
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            c.submit(json!({"agent": "echo", "payload": format!("after drain {i}")}))
                .await,
        );
    }
    let pinned = c
        .submit(json!({"agent": "echo", "payload": "pinned", "labels": {"node": "a"}}))
        .await;
    for id in &ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert!(
            attempts(&t).iter().all(|a| a["worker"] == "w2"),
            "submitted after the drain, run on w2 only: {t}"
        );
    }

    // The attempt w1 was running goes on to succeed there, once.
    std::fs::write(&gate, "").unwrap();
    let t = c.wait_final(running).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let a = attempts(&t);
    assert_eq!(a.len(), 1, "{t}");
    assert_eq!(a[0]["worker"], "w1", "{t}");
    assert_eq!(t["output"], format!("task {running} attempt 1"), "{t}");

    // w1 has nothing left to run, and stays: alive, connected, drained.
    wait_until(&c, "/v1/workers", "w1 idle, still drained", |v| {
        worker(v, "w1")
            .is_some_and(|w| w["draining"] == true && w["drain"] == "operator" && w["running"] == 0)
    })
    .await;
    let (_, t) = c.get(&format!("/v1/tasks/{pinned}")).await;
    assert_eq!(t["state"], "queued", "only w1 may run it: {t}");
    assert!(attempts(&t).is_empty(), "{t}");
    assert!(c.worker_alive("w1"), "w1 stays\n{}", c.logs());
    let log = c.log_of("w1");
    assert!(!log.contains("drain timeout"), "{log}");
    assert!(!log.contains("shutting down"), "{log}");
    let (code, out, err) = c.cli_as(&c.token, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("w1 (drained by operator)"), "{out}");
    assert!(out.contains("(1 draining)"), "{out}");
    let (code, out, err) = c.cli_as(&c.token, &["workers", "list"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("w1 "))
        .unwrap_or_default();
    assert!(line.contains("drained (operator)"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("w2 "))
        .unwrap_or_default();
    assert!(line.contains("ready"), "{out}");

    // Resumed with the CLI: w1 takes work again, starting with the task only it can run.
    let (code, out, err) = c.cli_as(&operate, &["workers", "resume", "w1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("w1 resumed"), "{out}");
    let t = c.wait_final(pinned).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(attempts(&t)[0]["worker"], "w1", "{t}");
    let workers = wait_until(&c, "/v1/workers", "w1 resumed", |v| {
        worker(v, "w1").is_some_and(|w| w["draining"] == false)
    })
    .await;
    assert!(
        worker(&workers, "w1").is_some_and(|w| w.get("drain").is_none()),
        "{workers}"
    );

    // Drained again with the CLI (JSON), resumed again with the API.
    let (code, out, err) = c.cli_as(&c.token, &["workers", "drain", "w1", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("worker JSON");
    assert_eq!((&v["id"], &v["drain"]), (&json!("w1"), &json!("operator")));
    let (status, v) = post_as(&c, &operate, "/v1/workers/w1/resume").await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["draining"], false, "{v}");
    let again = c
        .submit(json!({"agent": "echo", "payload": "again", "labels": {"node": "a"}}))
        .await;
    let t = c.wait_final(again).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(attempts(&t)[0]["worker"], "w1", "{t}");
    assert!(c.worker_alive("w1"), "{}", c.logs());
}

/// A worker states its remote drain on every new session, so the leader elected after the
/// one that drained it knows it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_learns_of_a_remote_drain_from_the_worker() {
    let mut c = RaftCluster::new(3, &[]);
    c.start_all();
    let old = c.wait_leader().await;
    c.start_worker("w1", 1, None);
    c.wait_for(old, "/v1/workers", "w1 connected", |v| {
        worker(v, "w1").is_some()
    })
    .await;
    let (status, v) = c
        .request(old, reqwest::Method::POST, "/v1/workers/w1/drain", None)
        .await
        .expect("the leader answers");
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["drain"], "operator", "{v}");
    // The worker took it (and says so again to whichever leader comes next).
    let log = c.dir.path().join("w1.log");
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("drained by the operator")
    {
        assert!(Instant::now() < deadline, "w1 never drained\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c.kill_node(old);
    let new = c.wait_leader().await;
    assert_ne!(new, old);
    c.wait_for(new, "/v1/workers", "w1 drained on the new leader", |v| {
        worker(v, "w1").is_some_and(|w| w["draining"] == true && w["drain"] == "operator")
    })
    .await;
    // And resumed there.
    let (status, v) = c
        .request(new, reqwest::Method::POST, "/v1/workers/w1/resume", None)
        .await
        .expect("the new leader answers");
    assert_eq!(status, 202, "{v}");
    let (code, out, err) = c.cli(&[
        "submit",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "resumed",
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", c.logs());
    assert!(out.contains("resumed"), "{out}");
}
