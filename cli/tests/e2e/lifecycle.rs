//! The normal life of tasks: many to success, cancel, timeout, idempotency, priorities.

use serde_json::json;

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_succeed_across_two_workers() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 8, None);
    c.start_worker("w2", 8, None);
    c.wait_workers(&["w1", "w2"]).await;

    // Half through the batch endpoint, half one by one, concurrently.
    let batch: Vec<_> = (0..500)
        .map(|i| json!({"agent": "echo", "payload": format!("task-{i}")}))
        .collect();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": batch })).await;
    assert_eq!(status, 201, "{v}");
    let mut ids: Vec<u64> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let singles = futures_join(&c, 500..1000).await;
    ids.extend(singles);
    assert_eq!(ids.len(), 1000);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 1000, "task ids are unique");

    let mut workers_used = std::collections::BTreeSet::new();
    for id in &ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        let payload = t["payload"].as_str().unwrap().to_string();
        assert_eq!(
            t["output"].as_str(),
            Some(payload.as_str()),
            "echo returns its payload"
        );
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
        workers_used.insert(t["attempts"][0]["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(workers_used.len(), 2, "both workers got work");
    let (_, s) = c.get("/v1/status").await;
    assert_eq!(s["queue"]["succeeded"], 1000, "{s}");
    assert_eq!(s["queue"]["queued"], 0);
    assert_eq!(s["queue"]["running"], 0);

    // Prometheus text reflects the work.
    let metrics = reqwest::get(format!("{}/metrics", c.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("swarm_tasks_succeeded_total"))
        .expect("counter present");
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1000.0, "{line}");
    assert!(
        metrics.contains("swarm_dispatch_latency_seconds_bucket"),
        "histogram present"
    );
}

async fn futures_join(c: &Cluster, range: std::ops::Range<u32>) -> Vec<u64> {
    let mut out = Vec::new();
    // 50 requests in flight at a time.
    let all: Vec<u32> = range.collect();
    for chunk in all.chunks(50) {
        let futs = chunk
            .iter()
            .map(|i| c.submit(json!({"agent": "echo", "payload": format!("task-{i}")})));
        for id in futures::future::join_all(futs).await {
            out.push(id);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_timeout_idempotency_and_priority() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let agents = dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        format!(
            "[agents.hang]\ncommand = \"sh\"\nargs = [\"-c\", \"echo $$ > {}; exec sleep 300\"]\n\n[agents.fail]\ncommand = \"sh\"\nargs = [\"-c\", \"echo broken >&2; exit 7\"]\n",
            pidfile.display()
        ),
    )
    .unwrap();
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, Some(&agents));
    c.wait_workers(&["w1"]).await;

    // Cancel a running task: the process is killed and the task is cancelled.
    let id = c.submit(json!({"agent": "hang", "max_attempts": 1})).await;
    let deadline = std::time::Instant::now() + crate::harness::WAIT;
    let pid: i32 = loop {
        let (_, t) = c.get(&format!("/v1/tasks/{id}")).await;
        if t["state"] == "running" {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = p.trim().parse() {
                    break p;
                }
            }
        }
        assert!(std::time::Instant::now() < deadline, "task never ran: {t}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let (status, t) = c.post(&format!("/v1/tasks/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["state"], "cancelled");
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "cancelled");
    let gone = async {
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(String::from));
            if state.is_none() || state.as_deref() == Some("Z") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(crate::harness::WAIT, gone)
        .await
        .expect("agent process killed after cancel");
    // Cancelling again is harmless and says so.
    let (status, t) = c.post(&format!("/v1/tasks/{id}/cancel"), json!({})).await;
    assert_eq!((status, t["state"].as_str()), (200, Some("cancelled")));

    // Timeout: killed, failed with a timeout error after its only attempt.
    let id = c
        .submit(json!({"agent": "hang", "timeout_ms": 300, "max_attempts": 1}))
        .await;
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().starts_with("timeout"), "{t}");

    // A failing agent is retried up to max_attempts, each attempt recorded with stderr.
    let id = c.submit(json!({"agent": "fail", "max_attempts": 2})).await;
    let t = c.wait_final(id).await;
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 2, "{t}");
    assert!(
        t["error"].as_str().unwrap().contains("broken"),
        "stderr tail in error: {t}"
    );

    // Idempotency key: one task.
    let body = json!({"agent": "echo", "payload": "once", "idempotency_key": "k-1"});
    let (s1, v1) = c.post("/v1/tasks", body.clone()).await;
    let (s2, v2) = c.post("/v1/tasks", body).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(v1["id"], v2["id"]);
    assert_eq!(v2["duplicate"], true);

    // Submit and wait in one call.
    let (status, v) = c
        .post(
            "/v1/tasks?wait=30s",
            json!({"agent": "echo", "payload": {"x": 1}}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(v["task"]["state"], "succeeded");
    assert_eq!(v["task"]["output"], r#"{"x":1}"#);

    // Listing by state.
    let (status, v) = c.get("/v1/tasks?state=cancelled").await;
    assert_eq!(status, 200);
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_status_and_exit_codes() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, None);
    c.wait_workers(&["w1"]).await;
    let swarm = |args: &[&str]| {
        std::process::Command::new(crate::harness::bin())
            .args(args)
            .env("SWARM_API", &c.api)
            .env("SWARM_TOKEN", &c.token)
            .output()
            .expect("run swarm")
    };
    let out = swarm(&[
        "submit",
        "--agent",
        "echo",
        "--payload",
        "hi there",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi there");

    let out = swarm(&["submit", "--agent", "no-such-agent", "--wait", "30s"]);
    assert_eq!(out.status.code(), Some(3), "a failed task exits 3");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown_agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = swarm(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("node 1 is leader"), "{text}");
    assert!(text.contains("1 connected"), "{text}");
    assert!(text.contains("succeeded 1"), "{text}");

    let out = swarm(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["workers"][0]["id"], "w1");

    let out = std::process::Command::new(crate::harness::bin())
        .args(["status"])
        .env("SWARM_API", &c.api)
        .env("SWARM_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unauthorized"));

    let out = swarm(&[
        "worker",
        "--coordinator",
        "x",
        "--certs",
        "/nonexistent",
        "--slots",
        "zero",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "bad flag value is a usage error"
    );
}

/// A leader killed and started again leads again only in a new term (after an
/// election), never in the term it led before: `Run`s it sent then without a `Start` on
/// record would otherwise go out again under the same execution ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_leads_in_a_new_term() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (_, before) = c.get("/v1/node").await;
    assert_eq!(before["role"], "leader", "{before}");
    let term = before["term"].as_u64().expect("term");
    c.kill_coordinator();
    c.start_coordinator();
    c.wait_ready().await;
    let (_, after) = c.get("/v1/node").await;
    assert_eq!(after["role"], "leader", "{after}");
    assert!(
        after["term"].as_u64().expect("term") > term,
        "led term {term} again after a restart: {after}"
    );
    let (status, v) = c
        .post(
            "/v1/tasks",
            serde_json::json!({"agent": "echo", "payload": "after the restart"}),
        )
        .await;
    assert_eq!(status, 201, "the new term takes writes: {v}");
}
