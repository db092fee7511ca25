//! `swarm backup` of a running cluster and `swarm restore` into a new one: every task and
//! every memory item is found again.

use serde_json::{json, Value};

use crate::harness::{bin, Cluster};

fn swarm(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .expect("run swarm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn all_tasks(c: &Cluster) -> Vec<Value> {
    let (st, v) = c.get("/v1/tasks?limit=1000").await;
    assert_eq!(st, 200, "{v}");
    v["tasks"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_bring_back_every_task_and_memory_item() {
    let mut a = Cluster::new(&[]);
    a.start_coordinator();
    a.wait_ready().await;
    a.start_worker("w1", 4, None);
    a.wait_workers(&["w1"]).await;
    for i in 0..20 {
        let id = a
            .submit(json!({"agent": "echo", "payload": {"n": i}}))
            .await;
        a.wait_final(id).await;
    }
    // One still queued: no worker carries the label it needs.
    a.submit(json!({"agent": "echo", "payload": "later", "labels": {"gpu": "yes"}}))
        .await;
    let (st, v) = a
        .request(
            reqwest::Method::PUT,
            "/v1/memory/docs",
            Some(json!({"dimension": 2, "metric": "l2"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let points: Vec<Value> = (0..30)
        .map(|i| json!({"id": format!("d{i}"), "vector": [i as f32, 1.0], "metadata": {"i": i}}))
        .collect();
    let (st, v) = a
        .post("/v1/memory/docs/points", json!({ "points": points }))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = a
        .post(
            "/v1/patterns",
            json!({"items": [{"title": "t1", "content": "c1", "outcome": "success"},
                             {"title": "t2", "content": "c2", "outcome": "failure"}]}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    // A schedule (paused, so that it adds no task meanwhile) is carried too.
    let (st, v) = a
        .post(
            "/v1/schedules",
            json!({"name": "nightly", "cron": "0 2 * * *", "catch_up": "all",
                   "max_catch_up": 3, "paused": true, "task": {"agent": "echo", "payload": "n"}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    let file = a.dir.path().join("swarm.backup");
    let file_s = file.to_str().expect("path");
    let (code, out, err) = swarm(&[
        "backup", "--api", &a.api, "--token", &a.token, "--out", file_s,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let tasks_a = all_tasks(&a).await;
    let (_, patterns_a) = a.get("/v1/patterns").await;
    let (_, search_a) = a
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [7.2, 1.0], "k": 3}),
        )
        .await;

    // A new cluster, seeded from the file.
    let mut b = Cluster::new(&[]);
    b.start_coordinator();
    b.wait_ready().await;
    let (code, out, err) = swarm(&[
        "restore", "--api", &b.api, "--token", &b.token, "--from", file_s,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let summary: Value = serde_json::from_str(&out).expect("summary JSON");
    assert_eq!(
        summary,
        json!({"tasks": 21, "collections": 1, "patterns": 2})
    );
    assert_eq!(all_tasks(&b).await, tasks_a);
    let (_, patterns_b) = b.get("/v1/patterns").await;
    assert_eq!(patterns_b, patterns_a);
    let (_, search_b) = b
        .post(
            "/v1/memory/docs/search",
            json!({"vector": [7.2, 1.0], "k": 3}),
        )
        .await;
    assert_eq!(search_b, search_a);
    assert_eq!(search_b["hits"][0]["id"], "d7");
    let (_, schedules_a) = a.get("/v1/schedules").await;
    let (_, schedules_b) = b.get("/v1/schedules").await;
    assert_eq!(
        schedules_b["schedules"][0]["name"], "nightly",
        "{schedules_b}"
    );
    assert_eq!(schedules_b, schedules_a);

    // The restored cluster carries on: new tasks run, their ids follow the old ones.
    b.start_worker("w2", 2, None);
    b.wait_workers(&["w2"]).await;
    let id = b.submit(json!({"agent": "echo", "payload": "new"})).await;
    assert_eq!(id, 22);
    assert_eq!(b.wait_final(id).await["state"], "succeeded");

    // A restore never overwrites a cluster that holds anything, and a damaged file is
    // refused before it reaches the log.
    let (code, _, err) = swarm(&[
        "restore", "--api", &b.api, "--token", &b.token, "--from", file_s,
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("conflict") && err.contains("empty cluster"),
        "{err}"
    );
    // Refused at its header, a large upload still gets the answer (the server reads the
    // rest rather than closing under the client, which would see only a broken pipe).
    let mut big = std::fs::read(&file).expect("read backup");
    big.resize(big.len() + 96 * 1024 * 1024, 0);
    let big_file = a.dir.path().join("big.backup");
    std::fs::write(&big_file, &big).expect("write");
    drop(big);
    let (code, _, err) = swarm(&[
        "restore",
        "--api",
        &b.api,
        "--token",
        &b.token,
        "--from",
        big_file.to_str().expect("path"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("conflict"), "{err}");
    let mut bytes = std::fs::read(&file).expect("read backup");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let bad = a.dir.path().join("bad.backup");
    std::fs::write(&bad, bytes).expect("write");
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    let (code, _, err) = swarm(&[
        "restore",
        "--api",
        &c.api,
        "--token",
        &c.token,
        "--from",
        bad.to_str().expect("path"),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("checksum") || err.contains("malformed"),
        "{err}"
    );
    assert!(all_tasks(&c).await.is_empty());
    // A file cut short (the stream ends after some of it was proposed): refused, and the
    // cluster is left empty, not half restored.
    let whole = std::fs::read(&file).expect("read backup");
    let cut = a.dir.path().join("cut.backup");
    std::fs::write(&cut, &whole[..whole.len() * 2 / 3]).expect("write");
    let (code, _, err) = swarm(&[
        "restore",
        "--api",
        &c.api,
        "--token",
        &c.token,
        "--from",
        cut.to_str().expect("path"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated"), "{err}");
    assert!(all_tasks(&c).await.is_empty());
    let (_, status) = c.get("/v1/status").await;
    assert_eq!(status["queue"]["queued"], 0, "{status}");
    // Both failures left it empty: the whole file restores into it.
    let (code, out, err) = swarm(&[
        "restore", "--api", &c.api, "--token", &c.token, "--from", file_s,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(all_tasks(&c).await, tasks_a);
}
