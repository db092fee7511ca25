//! State larger than anything held in one buffer: a three-node cluster takes over 300 MB
//! of task state in Raft entries at the byte budget, compacts its log into checkpoints, a
//! follower that was down catches up from a chunked snapshot of that state, every node is
//! SIGKILLed and comes back with every task readable, and a backup of over 300 MB restores
//! into a new cluster.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{bin, Cluster, WAIT};
use crate::raft_cluster::RaftCluster;

/// Payload (and, echoed, output) bytes per task.
const PAYLOAD: usize = 256 << 10;
/// Tasks: 640 × 2 × 256 KiB = 320 MiB of payloads and outputs.
const TASKS: u64 = 640;
/// Tasks per batch submit: 24 × 256 KiB = 6 MiB, under the 8 MiB entry budget.
const BATCH: u64 = 24;

/// The payload of task number `i` (distinct per task, so outputs can be checked).
fn payload(i: u64) -> String {
    let head = format!("task-{i:06}-");
    let mut s = String::with_capacity(PAYLOAD);
    while s.len() < PAYLOAD {
        s.push_str(&head);
    }
    s.truncate(PAYLOAD);
    s
}

/// Check that every task is readable through `get` with its own output.
async fn check_every_task<F, Fut>(ids: &[(u64, u64)], get: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    for &(id, i) in ids {
        let (st, v) = get(id).await;
        assert_eq!(st, 200, "task {id}: {}", v["error"]);
        assert_eq!(v["state"], "succeeded", "task {id}");
        let out = v["output"].as_str().unwrap_or_default();
        assert!(
            out.len() == PAYLOAD && out.starts_with(&format!("task-{i:06}-")),
            "task {id}: output of {} bytes, starting {:?}",
            out.len(),
            &out[..out.len().min(20)]
        );
    }
}

/// `swarm restore --from file` into `cluster`.
fn restore(cluster: &Cluster, file: &std::path::Path) -> std::process::Output {
    std::process::Command::new(bin())
        .args([
            "restore",
            "--api",
            &cluster.api,
            "--token",
            &cluster.token,
            "--from",
        ])
        .arg(file)
        .output()
        .expect("run swarm restore")
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib >> 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_mb_of_state_survives_kills_catch_up_and_backup() {
    // Checkpoints every 4 MiB of log, so the log is compacted many times over.
    let mut c = RaftCluster::new(3, &["--snapshot-bytes", "4194304"]);
    c.start_all();
    let leader = c.wait_leader().await;
    c.start_worker("w1", 8, None);
    // A follower goes down before the load and misses all of it.
    let down = (1..=3).find(|id| *id != leader).expect("a follower");
    c.kill_node(down);
    let leader = c.wait_leader().await;
    let before = c.node_status(leader).await.expect("leader report")["last_log_index"]
        .as_u64()
        .unwrap_or(0);

    // One batch over the entry budget is refused whole, with the limit in the message.
    let too_big: Vec<Value> = (0..40)
        .map(|i| json!({"agent": "echo", "payload": payload(i)}))
        .collect();
    let (st, v) = c
        .request(
            leader,
            reqwest::Method::POST,
            "/v1/tasks/batch",
            Some(json!({ "tasks": too_big })),
        )
        .await
        .expect("answer");
    assert_eq!(st, 413, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("split it") && msg.contains("8388608"), "{msg}");

    let started = Instant::now();
    let mut ids = Vec::new();
    let mut leader = leader;
    for b in 0..TASKS / BATCH + 1 {
        let range: Vec<u64> = (b * BATCH..((b + 1) * BATCH).min(TASKS)).collect();
        if range.is_empty() {
            break;
        }
        // Keyed, so a batch sent again after a leader change is not taken twice.
        let tasks: Vec<Value> = range
            .iter()
            .map(|&i| json!({"agent": "echo", "payload": payload(i), "idempotency_key": format!("scale-{i}")}))
            .collect();
        let mut tries = 0;
        let v = loop {
            let (st, v) = c
                .request(
                    leader,
                    reqwest::Method::POST,
                    "/v1/tasks/batch",
                    Some(json!({ "tasks": tasks })),
                )
                .await
                .expect("answer");
            if st == 201 {
                break v;
            }
            // As any client would: a leader change answers 503, and the batch is sent again.
            tries += 1;
            assert!(st == 503 && tries < 5, "batch {b}: {st} {v}");
            eprintln!("batch {b}: {st} {v}; sending it again");
            leader = c.wait_leader().await;
        };
        for (t, &i) in v["tasks"].as_array().expect("tasks").iter().zip(&range) {
            ids.push((t["id"].as_u64().expect("id"), i));
        }
    }
    c.wait_for(leader, "/v1/status", "every task finished", |v| {
        v["queue"]["succeeded"].as_u64() == Some(TASKS)
            && v["queue"]["queued"] == 0
            && v["queue"]["running"] == 0
    })
    .await;
    eprintln!(
        "{TASKS} tasks of 2 x {PAYLOAD} bytes done in {:.1?}",
        started.elapsed()
    );
    // The log was compacted past where the down node stopped.
    c.wait_for(leader, "/v1/node", "log compacted", |v| {
        v["purged_index"].as_u64().unwrap_or(0) > before
    })
    .await;

    // The follower comes back and can only catch up from a snapshot.
    c.start_node(down, &[]);
    let target = c.node_status(leader).await.expect("leader report")["applied_index"]
        .as_u64()
        .expect("applied");
    let deadline = Instant::now() + WAIT * 3;
    loop {
        let applied = c
            .node_status(down)
            .await
            .and_then(|s| s["applied_index"].as_u64())
            .unwrap_or(0);
        if applied >= target {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {down} did not catch up: {applied} < {target}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log =
        std::fs::read_to_string(c.dir.path().join(format!("node-{down}.log"))).unwrap_or_default();
    assert!(
        log.contains("snapshot installed"),
        "node {down} caught up without installing a snapshot"
    );

    // SIGKILL every node; all come back with every task readable.
    for id in 1..=3 {
        if let Some(pid) = c.pid(id) {
            eprintln!("node {id}: RSS {} MiB before the kill", rss_mib(pid));
        }
        c.kill_node(id);
    }
    c.start_all();
    let leader = c.wait_leader().await;
    check_every_task(&ids, |id| {
        let c = &c;
        async move {
            c.request(
                leader,
                reqwest::Method::GET,
                &format!("/v1/tasks/{id}"),
                None,
            )
            .await
            .expect("answer")
        }
    })
    .await;

    // A backup of over 300 MB, restored into a new cluster.
    let file = c.dir.path().join("big.backup");
    let (code, out, err) = c.cli(&[
        "backup",
        "--api",
        &c.api_list(),
        "--out",
        file.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let size = std::fs::metadata(&file).expect("backup file").len();
    assert!(size > 300_000_000, "backup of {size} bytes");
    assert!(err.contains("backup:"), "progress is shown: {err}");

    let mut fresh = Cluster::new(&[]);
    fresh.start_coordinator();
    fresh.wait_ready().await;
    let out = restore(&fresh, &file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restore failed: {stderr}");
    assert!(
        stderr.contains("100%"),
        "progress reaches the end: {stderr}"
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    assert_eq!(summary["tasks"].as_u64(), Some(TASKS), "{summary}");
    check_every_task(&ids, |id| {
        let fresh = &fresh;
        async move { fresh.get(&format!("/v1/tasks/{id}")).await }
    })
    .await;
    // A second restore into the now full cluster is refused and changes nothing.
    let out = restore(&fresh, &file);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("conflict"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, status) = fresh.get("/v1/status").await;
    assert_eq!(status["queue"]["succeeded"].as_u64(), Some(TASKS));
}
