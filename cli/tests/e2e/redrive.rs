//! Redrive: failed tasks run again on request (`POST /v1/tasks/{id}/retry`, the bulk
//! `POST /v1/tasks/retry`, `swarm task retry`), with their history kept, against a real
//! coordinator and worker.

use serde_json::{json, Value};

use crate::harness::Cluster;

fn outcomes(t: &Value) -> Vec<String> {
    t["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("running").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tasks_are_retried_one_by_one_and_in_bulk_with_their_history() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    // `flaky` fails until the marker file exists, then echoes its input.
    let marker = c.dir.path().join("fixed");
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        format!(
            "[agents.flaky]\ncommand = \"sh\"\nargs = [\"-c\", \"test -f '{}' && cat || {{ echo not yet >&2; exit 3; }}\"]\n",
            marker.display()
        ),
    )
    .unwrap();
    c.start_worker_with("w1", 8, Some(&agents), &[]);
    c.wait_workers(&["w1"]).await;

    // 300 tasks that fail at once (one attempt each), and one that succeeds.
    let n = 300;
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"agent": "flaky", "payload": format!("job {i}"), "max_attempts": 1}))
        .collect();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(status, 201, "{v}");
    let ids: Vec<u64> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    for id in &ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "failed", "{t}");
    }
    let good = c.submit(json!({"agent": "echo", "payload": "fine"})).await;
    assert_eq!(c.wait_final(good).await["state"], "succeeded");

    // Refusals: a succeeded task (409), an unknown one (404), bad bulk requests (400).
    let (status, v) = c.post(&format!("/v1/tasks/{good}/retry"), json!({})).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("succeeded")),
        "{v}"
    );
    let (status, _) = c.post("/v1/tasks/99999/retry", json!({})).await;
    assert_eq!(status, 404);
    for bad in [
        json!({"state": "succeeded"}),
        json!({"state": "failed", "limit": 1001}),
        json!({"state": "failed", "label": "oops"}),
        json!({"state": "failed", "colour": "red"}),
    ] {
        let (status, v) = c.post("/v1/tasks/retry", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }

    // Fixed: one retried by id through the CLI; it succeeds on its second attempt.
    std::fs::write(&marker, b"").unwrap();
    let first = ids[0].to_string();
    let (code, out, err) = c.cli(&["task", "retry", &first]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued again"), "{out}");
    let t = c.wait_final(ids[0]).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(outcomes(&t), ["failed", "succeeded"], "history kept: {t}");
    assert_eq!(t["output"], "job 0");

    // The rest in bulk, a page of 200 then the remainder, by filter.
    let (status, v) = c
        .post(
            "/v1/tasks/retry",
            json!({"state": "failed", "agent": "flaky", "limit": 200}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let retried: Vec<u64> = v["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(retried, ids[1..201].to_vec(), "oldest first");
    let after = v["next_after"].as_u64().expect("more to retry").to_string();
    let (code, out, err) = c.cli(&[
        "task", "retry", "--state", "failed", "--agent", "flaky", "--after", &after, "--limit",
        "1000",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!("{} tasks queued again", n - 201)),
        "{out}"
    );
    for id in &ids {
        let t = c.wait_final(*id).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(outcomes(&t), ["failed", "succeeded"], "{t}");
    }
    let (_, v) = c.get("/v1/status").await;
    assert_eq!(v["queue"]["failed"], 0, "{v}");
    assert_eq!(v["queue"]["succeeded"], n + 1, "{v}");
    // Nothing left: a bulk retry finds nothing and says so.
    let (code, out, _) = c.cli(&["task", "retry", "--state", "failed"]);
    assert_eq!((code, out.trim()), (0, "0 tasks queued again"));
    // Neither an id nor a filter, or both: a clear refusal.
    let (code, _, err) = c.cli(&["task", "retry"]);
    assert_eq!(code, 1);
    assert!(err.contains("name a task"), "{err}");
}
