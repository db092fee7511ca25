//! A three-coordinator Raft cluster of real processes: forwarding, status, workers
//! following the leader, repeated leader kills under load checked against the recorded
//! client history, online membership changes, and a node whose disk fills up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::WAIT;
use crate::raft_cluster::RaftCluster;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_coordinators_forward_report_and_follow_the_leader() {
    let mut c = RaftCluster::new(3, &[]);
    c.start_all();
    let leader = c.wait_leader().await;
    c.start_worker("w1", 4, None);
    c.start_worker("w2", 4, None);
    // Whichever coordinator a worker tries first, it ends up on the leader.
    c.wait_for(leader, "/v1/workers", "both workers on the leader", |v| {
        v["workers"].as_array().map_or(0, |a| a.len()) == 2
    })
    .await;
    let follower = (1..=3).find(|i| *i != leader).expect("a follower");

    // A write sent to a follower is forwarded to the leader.
    let (st, v) = c
        .request(
            follower,
            Method::POST,
            "/v1/tasks?wait=30s",
            Some(json!({"agent": "echo", "payload": {"x": 1}})),
        )
        .await
        .expect("follower answers");
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["task"]["state"], "succeeded", "{v}");
    let id = v["id"].as_u64().expect("id");
    // So is a read, which the leader serves linearizably.
    let (st, t) = c
        .get(follower, &format!("/v1/tasks/{id}"))
        .await
        .expect("follower answers");
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["output"], "{\"x\":1}", "{t}");

    // Memory writes go through Raft (here via a follower); every replica answers
    // searches from its own copy, with the same result.
    let (st, v) = c
        .request(
            follower,
            Method::PUT,
            "/v1/memory/notes",
            Some(json!({"dimension": 2, "metric": "l2"})),
        )
        .await
        .expect("answers");
    assert_eq!(st, 201, "{v}");
    let points: Vec<Value> = (0..50)
        .map(|i| json!({"id": format!("p{i}"), "vector": [i as f32, (i % 7) as f32]}))
        .collect();
    let (st, v) = c
        .request(
            follower,
            Method::POST,
            "/v1/memory/notes/points",
            Some(json!({ "points": points })),
        )
        .await
        .expect("answers");
    assert_eq!(st, 200, "{v}");
    let target = c.node_status(leader).await.expect("leader")["last_log_index"]
        .as_u64()
        .expect("index");
    let mut answers = Vec::new();
    for id in 1..=3 {
        c.wait_for(id, "/v1/node", "replica applied the memory writes", |v| {
            v["applied_index"].as_u64() >= Some(target)
        })
        .await;
        let (st, v) = c
            .request(
                id,
                Method::POST,
                "/v1/memory/notes/search",
                Some(json!({"vector": [20.2, 6.0], "k": 3})),
            )
            .await
            .expect("answers");
        assert_eq!(st, 200, "{v}");
        answers.push(v["hits"].clone());
    }
    assert_eq!(answers[0][0]["id"], "p20", "{:?}", answers[0]);
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");

    // `swarm status` through a follower: three healthy nodes, both workers.
    let (code, out, err) = c.cli(&["status", "--json", "--api", &c.nodes[&follower].api()]);
    assert_eq!(code, 0, "{err}");
    let s: Value = serde_json::from_str(&out).expect("status JSON");
    let nodes = s["cluster"]["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{s}");
    for n in nodes {
        assert_eq!(n["status"]["healthy"], true, "{n}");
        assert_eq!(n["status"]["leader"], leader, "{n}");
        assert!(n["lag"].is_u64(), "{n}");
    }
    assert_eq!(s["workers"].as_array().map(|a| a.len()), Some(2), "{s}");
    let (code, out, err) = c.cli(&["cluster", "status", "--api", &c.api_list()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("ok").count(), 3, "{out}");
    assert!(out.contains(&format!("leader {leader}")), "{out}");
    // Raft gauges on /metrics (refreshed every second).
    let deadline = Instant::now() + WAIT;
    loop {
        let (st, m) = c.get(leader, "/metrics").await.expect("metrics");
        let m = m.as_str().unwrap_or_default().to_string();
        if st == 200
            && m.contains("swarm_raft_is_leader 1")
            && m.contains("swarm_raft_replication_lag{node=")
        {
            break;
        }
        assert!(Instant::now() < deadline, "raft metrics missing: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Kill the leader: the others elect a new one, the workers follow it, and the CLI
    // given every API address gets a task done.
    c.kill_node(leader);
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    c.wait_for(
        new_leader,
        "/v1/workers",
        "workers follow the new leader",
        |v| v["workers"].as_array().map_or(0, |a| a.len()) == 2,
    )
    .await;
    let (code, out, err) = c.cli(&[
        "submit",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "after failover",
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("after failover"), "{out}");
    // The old task is still there.
    let (st, t) = c
        .get(new_leader, &format!("/v1/tasks/{id}"))
        .await
        .expect("answers");
    assert_eq!((st, t["state"].clone()), (200, json!("succeeded")), "{t}");

    // The old leader comes back as a follower and catches up.
    c.start_node(leader, &[]);
    let target = c.node_status(new_leader).await.expect("leader")["last_log_index"]
        .as_u64()
        .expect("log index");
    c.wait_for(leader, "/v1/node", "old leader caught up", |v| {
        v["leader"] == new_leader && v["applied_index"].as_u64() >= Some(target)
    })
    .await;
    let (st, _) = c.get(leader, "/ready").await.expect("ready answers");
    assert_eq!(st, 200);
}

/// One client operation as recorded.
#[derive(Debug, Clone)]
struct Submit {
    key: String,
    completed: Instant,
    /// `Some(id)` when acknowledged; `None` for a refusal or an unknown outcome.
    acked: Option<u64>,
}

#[derive(Debug, Clone)]
struct Read {
    id: u64,
    invoked: Instant,
    completed: Instant,
    /// HTTP status and task state (`None` for 404).
    state: Option<String>,
}

#[derive(Default)]
struct History {
    submits: Vec<Submit>,
    reads: Vec<Read>,
    acked_ids: Vec<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_tasks_survive_repeated_leader_kills() {
    const CLIENTS: usize = 4;
    const KILLS: usize = 3;
    let mut c = RaftCluster::new(3, &[]);
    c.start_all();
    c.wait_leader().await;
    c.start_worker("w1", 8, None);
    c.start_worker("w2", 8, None);
    let leader = c.wait_leader().await;
    c.wait_for(leader, "/v1/workers", "workers", |v| {
        v["workers"].as_array().map_or(0, |a| a.len()) == 2
    })
    .await;

    let apis: Vec<String> = c.nodes.values().map(|n| n.api()).collect();
    let token = c.token.clone();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (apis, token, history, stop, http) = (
            apis.clone(),
            token.clone(),
            history.clone(),
            stop.clone(),
            http.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut attempt = client;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("c{client}-{n}");
                // Retry the same logical submit (same key) until it is acknowledged.
                loop {
                    let api = &apis[attempt % apis.len()];
                    let r = http
                        .post(format!("{api}/v1/tasks"))
                        .bearer_auth(&token)
                        .json(&json!({"agent": "echo", "payload": {"key": key}, "idempotency_key": key}))
                        .send()
                        .await;
                    let acked = match r {
                        Ok(resp) if resp.status().is_success() => resp
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["id"].as_u64()),
                        _ => None,
                    };
                    let completed = Instant::now();
                    {
                        let mut h = history.lock().expect("history");
                        h.submits.push(Submit {
                            key: key.clone(),
                            completed,
                            acked,
                        });
                        if let Some(id) = acked {
                            h.acked_ids.push(id);
                        }
                    }
                    if acked.is_some() {
                        break;
                    }
                    attempt += 1;
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n += 1;
            }
        }));
    }
    // A reader: linearizable reads of acknowledged tasks through random nodes.
    let reader = {
        let (apis, token, history, stop, http) = (
            apis.clone(),
            token.clone(),
            history.clone(),
            stop.clone(),
            http.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let id = {
                    let h = history.lock().expect("history");
                    if h.acked_ids.is_empty() {
                        None
                    } else {
                        Some(h.acked_ids[(i * 7919) % h.acked_ids.len()])
                    }
                };
                let Some(id) = id else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let api = &apis[i % apis.len()];
                let invoked = Instant::now();
                let r = http
                    .get(format!("{api}/v1/tasks/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let state = match r {
                    Ok(resp) if resp.status().as_u16() == 404 => Some(None),
                    Ok(resp) if resp.status().is_success() => resp
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["state"].as_str().map(|s| Some(s.to_string()))),
                    // Unknown: not part of the history.
                    _ => None,
                };
                if let Some(state) = state {
                    history.lock().expect("history").reads.push(Read {
                        id,
                        invoked,
                        completed: Instant::now(),
                        state,
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Kill the leader repeatedly, restarting it each time.
    let mut kills = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let leader = c.wait_leader().await;
        kills.push(wall_ms());
        c.kill_node(leader);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.start_node(leader, &[]);
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in clients {
        t.await.expect("client task");
    }
    reader.await.expect("reader task");
    let leader = c.wait_leader().await;

    let h = std::mem::take(&mut *history.lock().expect("history"));
    let acked: BTreeMap<&str, u64> = h
        .submits
        .iter()
        .filter_map(|s| s.acked.map(|id| (s.key.as_str(), id)))
        .collect();
    let submitted_keys: BTreeSet<&str> = h.submits.iter().map(|s| s.key.as_str()).collect();
    let unknown = h.submits.iter().filter(|s| s.acked.is_none()).count();
    assert!(
        acked.len() > 50,
        "too little load to say anything: {}",
        acked.len()
    );

    // Same key, same task: every acknowledgement of a key names one id.
    for s in &h.submits {
        if let Some(id) = s.acked {
            assert_eq!(
                acked[s.key.as_str()],
                id,
                "key {} acknowledged as two tasks",
                s.key
            );
        }
    }

    // Every task in the cluster, once all acknowledged ones are final.
    let deadline = Instant::now() + WAIT;
    let tasks: Vec<Value> = loop {
        let mut all = Vec::new();
        let mut after = 0u64;
        loop {
            let (st, v) = c
                .get(leader, &format!("/v1/tasks?limit=1000&after={after}"))
                .await
                .expect("leader answers");
            assert_eq!(st, 200, "{v}");
            let page = v["tasks"].as_array().cloned().unwrap_or_default();
            all.extend(page);
            match v["next_after"].as_u64() {
                Some(n) => after = n,
                None => break,
            }
        }
        if all
            .iter()
            .all(|t| !matches!(t["state"].as_str(), Some("queued" | "running")))
        {
            break all;
        }
        if Instant::now() > deadline {
            let stuck: Vec<&Value> = all
                .iter()
                .filter(|t| matches!(t["state"].as_str(), Some("queued" | "running")))
                .take(5)
                .collect();
            let (_, status) = c.get(leader, "/v1/status").await.expect("status");
            panic!(
                "tasks not final in time: {stuck:#?}\nstatus: {status:#}\n{}",
                c.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: BTreeMap<u64, &Value> = tasks
        .iter()
        .map(|t| (t["id"].as_u64().expect("id"), t))
        .collect();
    let mut keys_seen = BTreeSet::new();
    for t in &tasks {
        let key = t["idempotency_key"].as_str().expect("every task has a key");
        // A result is never recorded for a task no client submitted.
        assert!(
            submitted_keys.contains(key),
            "task for unknown key {key}: {t}"
        );
        // One task per key.
        assert!(keys_seen.insert(key.to_string()), "two tasks for key {key}");
        // At most one final result, and it is the task's state.
        let succeeded = t["attempts"].as_array().map_or(0, |a| {
            a.iter().filter(|a| a["outcome"] == "succeeded").count()
        });
        assert!(succeeded <= 1, "two results for {key}: {t}");
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(succeeded, 1, "{t}");
        let output: Value =
            serde_json::from_str(t["output"].as_str().unwrap_or_default()).unwrap_or_default();
        assert_eq!(output, json!({"key": key}), "{t}");
    }
    // Acknowledged ⇒ present and succeeded.
    for (key, id) in &acked {
        let t = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged task {id} ({key}) lost"));
        assert_eq!(t["idempotency_key"], *key);
    }
    // Linearizable reads: a read that starts after a submit was acknowledged finds the
    // task, and once a read has seen a final state every later read sees the same one.
    let ack_done: BTreeMap<u64, Instant> = h
        .submits
        .iter()
        .filter_map(|s| s.acked.map(|id| (id, s.completed)))
        .fold(BTreeMap::new(), |mut m, (id, t)| {
            let e = m.entry(id).or_insert(t);
            if t < *e {
                *e = t;
            }
            m
        });
    let mut reads_by_id: BTreeMap<u64, Vec<&Read>> = BTreeMap::new();
    for r in &h.reads {
        if let Some(done) = ack_done.get(&r.id) {
            if r.invoked > *done {
                assert!(
                    r.state.is_some(),
                    "read of task {} after its ack found nothing",
                    r.id
                );
            }
        }
        reads_by_id.entry(r.id).or_default().push(r);
    }
    for (id, reads) in &reads_by_id {
        for a in reads {
            let Some(sa) = a.state.as_deref() else {
                continue;
            };
            if matches!(sa, "queued" | "running") {
                continue;
            }
            for b in reads {
                if b.invoked > a.completed {
                    assert_eq!(
                        b.state.as_deref(),
                        Some(sa),
                        "task {id}: a read saw {sa}, a later read saw {:?}",
                        b.state
                    );
                }
            }
        }
    }
    // Failover, measured not asserted: from each kill to the first attempt any leader
    // dispatched after it.
    let starts: Vec<u64> = tasks
        .iter()
        .flat_map(|t| t["attempts"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["started_at_ms"].as_u64())
        .collect();
    let failovers: Vec<u64> = kills
        .iter()
        .filter_map(|k| starts.iter().filter(|s| **s > *k).min().map(|s| s - k))
        .collect();
    eprintln!(
        "history: {} submits ({} acknowledged, {unknown} refused or unknown), {} reads, {} tasks; \
         failover (kill -> next dispatch) ms: {failovers:?}",
        h.submits.len(),
        acked.len(),
        h.reads.len(),
        tasks.len()
    );

    // All three replicas converge on the same applied index.
    let target = c.node_status(leader).await.expect("leader")["last_log_index"]
        .as_u64()
        .expect("index");
    for id in 1..=3 {
        c.wait_for(id, "/v1/node", "replica converges", |v| {
            v["applied_index"].as_u64() >= Some(target) && v["healthy"] == true
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_online_and_a_new_node_catches_up_from_a_snapshot() {
    let mut c = RaftCluster::new(3, &["--snapshot-every", "40"]);
    c.start_all();
    let leader = c.wait_leader().await;
    c.start_worker("w1", 8, None);
    // Enough entries for several snapshots and a compacted log: one entry per submit.
    for i in 0..200 {
        let (st, v) = c
            .request(
                leader,
                Method::POST,
                "/v1/tasks",
                Some(json!({"agent": "echo", "payload": {"i": i}})),
            )
            .await
            .expect("leader answers");
        assert_eq!(st, 201, "{v}");
    }
    c.wait_for(leader, "/v1/status", "all tasks done", |v| {
        v["queue"]["succeeded"] == 200
    })
    .await;
    c.wait_for(leader, "/v1/node", "log compacted", |v| {
        v["purged_index"].as_u64().is_some_and(|p| p > 0)
    })
    .await;

    // A fourth node joins through any API: learner, snapshot, voter.
    let spec4 = c.add_spec(4);
    let join = format!("--join={}", c.api_list());
    c.start_node(4, &[&join]);
    c.wait_for(leader, "/v1/cluster", "node 4 is a voter", |v| {
        v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["id"] == 4 && n["voter"] == true))
    })
    .await;
    c.wait_for(
        4,
        "/v1/node",
        "node 4 installed a snapshot and caught up",
        |v| v["snapshot_index"].as_u64().is_some() && v["leader"] == leader && v["ready"] == true,
    )
    .await;
    assert_eq!(spec4.id, 4);

    // Bad requests get clear errors.
    let (code, _, err) = c.cli(&[
        "cluster",
        "add",
        "--api",
        &c.api_list(),
        "7",
        "--raft",
        "nohost",
        "--node-api",
        "127.0.0.1:1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("raft_addr must be host:port"), "{err}");
    let (code, _, err) = c.cli(&["cluster", "remove", "--api", &c.api_list(), "9"]);
    assert_eq!(code, 1);
    assert!(err.contains("not_found"), "{err}");

    // Remove a node that is not the leader, then stop it: the cluster carries on.
    let victim = (1..=3).find(|i| *i != leader).expect("non-leader");
    let (code, out, err) = c.cli(&[
        "cluster",
        "remove",
        "--api",
        &c.api_list(),
        &victim.to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    c.wait_for(leader, "/v1/cluster", "victim removed", |v| {
        v["nodes"]
            .as_array()
            .is_some_and(|ns| ns.len() == 3 && ns.iter().all(|n| n["id"] != victim))
    })
    .await;
    c.kill_node(victim);
    let (code, out, err) = c.cli(&[
        "submit",
        "--api",
        &c.api_list(),
        "--agent",
        "echo",
        "--payload",
        "still",
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Unmounts a tmpfs when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_disk_fills_up_reports_unhealthy_and_recovers_after_restart() {
    let mut c = RaftCluster::new(3, &[]);
    // Node 3's data dir is a small tmpfs of its own, so it alone runs out of space.
    let data3 = c.nodes[&3].data_dir.clone();
    std::fs::create_dir_all(&data3).expect("data dir");
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&data3)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "this test needs to mount a tmpfs (root or CAP_SYS_ADMIN): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mount = Mount(data3.clone());
    c.start_all();
    c.wait_leader().await;
    c.start_worker("w1", 8, None);
    let leader = c.wait_leader().await;
    let first = c
        .request(
            leader,
            Method::POST,
            "/v1/tasks?wait=30s",
            Some(json!({"agent": "echo", "payload": "before"})),
        )
        .await
        .expect("answers");
    assert_eq!(first.0, 201, "{}", first.1);

    // Fill node 3's disk.
    let filler = data3.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .output()
        .expect("run dd");

    // The majority carries on; node 3's next log write fails and it says so.
    let apis: Vec<u64> = vec![1, 2, 3];
    let mut done = 0;
    let deadline = Instant::now() + WAIT;
    while done < 50 {
        for id in &apis {
            if let Some((201, _)) = c
                .request(
                    *id,
                    Method::POST,
                    "/v1/tasks",
                    Some(json!({"agent": "echo", "payload": {"n": done}})),
                )
                .await
            {
                done += 1;
            }
        }
        assert!(Instant::now() < deadline, "cluster stopped taking tasks");
    }
    let total = done + 1;
    c.wait_for(1, "/v1/status", "tasks done", |v| {
        v["queue"]["succeeded"] == total
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let health = c.get(3, "/health").await;
        if matches!(health, Some((503, _))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never reported its full disk: {health:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, out, _) = c.cli(&["cluster", "status", "--api", &c.api_list()]);
    assert!(out.contains("UNHEALTHY") || out.contains("DOWN"), "{out}");

    // Free the space and restart node 3: it recovers its log and catches up.
    std::fs::remove_file(&filler).expect("remove filler");
    c.kill_node(3);
    c.start_node(3, &[]);
    let leader = c.wait_leader().await;
    let target = c.node_status(leader).await.expect("leader")["last_log_index"]
        .as_u64()
        .expect("index");
    c.wait_for(3, "/v1/node", "node 3 healthy and caught up", |v| {
        v["healthy"] == true && v["applied_index"].as_u64() >= Some(target)
    })
    .await;
    // Whoever leads now, every task is there.
    c.kill_node(leader);
    let survivor = (1..=3).find(|i| *i != leader).expect("survivor");
    c.wait_for(survivor, "/v1/status", "all tasks still there", |v| {
        v["queue"]["succeeded"] == total
    })
    .await;
}
