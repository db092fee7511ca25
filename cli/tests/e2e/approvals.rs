//! Approvals against a real coordinator and worker, through the CLI: an approved task
//! runs, a rejected one is cancelled with the comment, a deadline expires a third, a
//! graph step holds its dependant until approved; refusals (409, 404, 403).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::Cluster;

/// A new API token of `scope` (printed once by `swarm tokens create`).
fn make_token(c: &Cluster, name: &str, scope: &str) -> String {
    let (code, out, err) = c.cli_as(&c.token, &["tokens", "create", name, "--scope", scope]);
    assert_eq!(code, 0, "{out}{err}");
    out.trim().to_string()
}

/// `swarm submit …` printing the new task's id.
fn submit(c: &Cluster, args: &[&str]) -> u64 {
    let mut all = vec!["submit", "--agent", "echo"];
    all.extend_from_slice(args);
    let (code, out, err) = c.cli(&all);
    assert_eq!(code, 0, "{out}{err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no id in {out:?}"))
}

/// `swarm task get ID` as JSON.
fn task_get(c: &Cluster, id: u64) -> Value {
    let (code, out, err) = c.cli(&["task", "get", &id.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Poll until task `id` is in `state` (the test fails after a minute).
async fn wait_state(c: &Cluster, id: u64, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = c.get(&format!("/v1/tasks/{id}")).await;
        assert_eq!(status, 200, "{v}");
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "task {id} never {state}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_reject_expire_and_a_gated_graph_step() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 4, None);
    c.wait_workers(&["w1"]).await;
    let alice = make_token(&c, "alice", "operate");
    let submitter = make_token(&c, "sub", "submit");

    // Approved: awaiting until then, then it runs; who, when and why are recorded.
    let a = submit(&c, &["--payload", "\"one\"", "--requires-approval"]);
    let t = task_get(&c, a);
    assert_eq!(t["state"], "awaiting_approval", "{t}");
    assert!(t["approval"]["decision"].is_null(), "{t}");
    let (code, out, err) = c.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("awaiting approval 1"), "{out}");
    // A submit-scope token may not decide.
    let (code, out, err) = c.cli_as(&submitter, &["task", "approve", &a.to_string()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("operate"), "{err}");
    assert_eq!(task_get(&c, a)["state"], "awaiting_approval");
    let (code, out, err) = c.cli_as(
        &alice,
        &["task", "approve", &a.to_string(), "--comment", "ship it"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let done = c.wait_final(a).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["output"], "one", "{done}");
    let d = &done["approval"]["decision"];
    assert_eq!(
        (d["approved"].clone(), d["by"].clone(), d["comment"].clone()),
        (json!(true), json!("alice"), json!("ship it")),
        "{done}"
    );
    assert!(d["at_ms"].as_u64().unwrap() >= done["created_at_ms"].as_u64().unwrap());
    // Approving it again: a clear 409; an unknown task: 404.
    let (code, out, err) = c.cli_as(&alice, &["task", "approve", &a.to_string()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("not awaiting approval"), "{err}");
    assert!(err.contains("already approved by alice"), "{err}");
    let (status, v) = c
        .post(&format!("/v1/tasks/{a}/reject"), json!({"comment": "late"}))
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "not_awaiting_approval", "{v}");
    let (status, v) = c.post("/v1/tasks/999999/approve", json!({})).await;
    assert_eq!(status, 404, "{v}");

    // Rejected: cancelled, the error naming who rejected it and why.
    let b = submit(&c, &["--payload", "\"two\"", "--requires-approval"]);
    let (code, out, err) = c.cli_as(
        &alice,
        &["task", "reject", &b.to_string(), "--comment", "too risky"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let t = c.wait_final(b).await;
    assert_eq!(t["state"], "cancelled", "{t}");
    assert_eq!(t["error"], "rejected by alice: too risky", "{t}");
    assert_eq!(t["approval"]["decision"]["approved"], false, "{t}");
    assert!(t["attempts"].as_array().unwrap().is_empty(), "{t}");

    // A deadline: nobody decides, and the task fails with `approval_timeout`.
    let e = submit(&c, &["--payload", "\"three\"", "--approval-timeout", "2s"]);
    let t = task_get(&c, e);
    assert_eq!(t["approval"]["timeout_ms"], 2000, "{t}");
    assert!(t["approval"]["deadline_ms"].as_u64().is_some(), "{t}");
    let t = c.wait_final(e).await;
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["error"].as_str().unwrap().starts_with("approval_timeout"),
        "{t}"
    );
    assert!(t["attempts"].as_array().unwrap().is_empty(), "{t}");

    // Cancel works while awaiting approval.
    let x = submit(&c, &["--requires-approval"]);
    let (code, out, err) = c.cli(&["task", "cancel", &x.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(c.wait_final(x).await["state"], "cancelled");

    // A graph step with approval: awaits it once its parent succeeded, and holds its
    // dependant until approved; the dependant then gets the gate's output.
    let graph = c.dir.path().join("graph.json");
    std::fs::write(
        &graph,
        json!({"steps": [
            {"name": "a", "task": {"agent": "echo", "payload": "from a"}},
            {"name": "gate", "after": ["a"],
             "task": {"agent": "echo", "payload": "gate", "requires_approval": true}},
            {"name": "d", "after": ["gate"], "task": {"agent": "echo", "payload": "d"}},
        ]})
        .to_string(),
    )
    .unwrap();
    let (code, out, err) = c.cli(&["task", "graph", graph.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let ids: Value = serde_json::from_str(&out).unwrap();
    let id = |name: &str| ids["steps"][name].as_u64().unwrap();
    assert_eq!(c.wait_final(id("a")).await["state"], "succeeded");
    let gate = wait_state(&c, id("gate"), "awaiting_approval").await;
    assert!(gate["attempts"].as_array().unwrap().is_empty(), "{gate}");
    let held = task_get(&c, id("d"));
    assert_eq!(held["state"], "waiting", "{held}");
    assert!(held["attempts"].as_array().unwrap().is_empty(), "{held}");
    let (code, out, err) = c.cli_as(&alice, &["task", "approve", &id("gate").to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let t = c.wait_final(id("d")).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    let out: Value = serde_json::from_str(t["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["parents"]["gate"]["parents"]["a"], "from a", "{out}");
    c.assert_coordinator_alive();
}
