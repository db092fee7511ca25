//! Task graphs against a real coordinator and worker: a diamond whose join receives both
//! branches' outputs, a failing branch that cancels the join, a wide fan-out and fan-in,
//! `depends_on` on existing tasks, refusals, and the CLI.

use serde_json::{json, Value};

use crate::harness::Cluster;

fn output_json(t: &Value) -> Value {
    serde_json::from_str(t["output"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("output is not JSON ({e}): {t}"))
}

/// When the task's first attempt started, and when its last ended.
fn span(t: &Value) -> (u64, u64) {
    let a = t["attempts"].as_array().unwrap();
    (
        a.first().unwrap()["started_at_ms"].as_u64().unwrap(),
        a.last().unwrap()["finished_at_ms"].as_u64().unwrap(),
    )
}

async fn cluster() -> Cluster {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    // `slow` sleeps a little and echoes its input, so a join that ran too early would
    // show; `broken` always fails.
    let agents = c.dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        "[agents.slow]\ncommand = \"sh\"\nargs = [\"-c\", \"sleep 0.3; cat\"]\n\
         [agents.broken]\ncommand = \"sh\"\nargs = [\"-c\", \"echo broken >&2; exit 3\"]\n",
    )
    .unwrap();
    c.start_worker_with("w1", 8, Some(&agents), &[]);
    c.wait_workers(&["w1"]).await;
    c
}

fn step(name: &str, after: &[&str], agent: &str, payload: Value) -> Value {
    json!({"name": name, "after": after, "task": {"agent": agent, "payload": payload, "max_attempts": 1}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diamond_joins_both_outputs_and_a_failed_branch_cancels_the_join() {
    let c = cluster().await;

    // A → B, C → D, submitted at once.
    let (status, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [
                step("d", &["b", "c"], "echo", json!("join")),
                step("b", &["a"], "slow", json!("b")),
                step("c", &["a"], "echo", json!("c")),
                step("a", &[], "slow", json!({"n": 1})),
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = |name: &str| v["steps"][name].as_u64().unwrap();
    let (a, b, cc, d) = (id("a"), id("b"), id("c"), id("d"));
    // Steps are numbered in an order where each follows its parents.
    assert!(a < b && a < cc && b < d && cc < d, "{v}");
    let (_, early) = c.get(&format!("/v1/tasks/{d}")).await;
    assert!(
        matches!(early["state"].as_str(), Some("waiting")),
        "the join waits: {early}"
    );
    assert_eq!(early["parents"], json!([b, cc]), "{early}");
    assert_eq!(early["step"], "d");

    let td = c.wait_final(d).await;
    assert_eq!(td["state"], "succeeded", "{td}");
    // D's agent (echo) answered with its input: its payload and both parents' outputs,
    // each of which holds A's.
    let out = output_json(&td);
    assert_eq!(out["payload"], "join", "{out}");
    assert_eq!(out["parents"]["b"]["payload"], "b", "{out}");
    assert_eq!(out["parents"]["c"]["payload"], "c", "{out}");
    assert_eq!(
        out["parents"]["b"]["parents"]["a"],
        json!({"n": 1}),
        "{out}"
    );
    // D started only after B and C had ended (same machine, one clock).
    let (tb, tc) = (c.wait_final(b).await, c.wait_final(cc).await);
    let d_start = span(&td).0;
    assert!(
        d_start >= span(&tb).1 && d_start >= span(&tc).1,
        "{td} {tb} {tc}"
    );
    let (_, ta) = c.get(&format!("/v1/tasks/{a}")).await;
    assert_eq!(ta["children"], json!([b, cc]), "{ta}");

    // A failing B cancels D (`dependency_failed`); C runs anyway.
    let (status, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [
                step("a", &[], "echo", json!("a")),
                step("b", &["a"], "broken", json!("b")),
                step("c", &["a"], "slow", json!("c")),
                step("d", &["b", "c"], "echo", json!("d")),
                step("e", &["d"], "echo", json!("e")),
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = |name: &str| v["steps"][name].as_u64().unwrap();
    assert_eq!(c.wait_final(id("b")).await["state"], "failed");
    for join in [id("d"), id("e")] {
        let t = c.wait_final(join).await;
        assert_eq!(t["state"], "cancelled", "{t}");
        assert!(
            t["error"]
                .as_str()
                .unwrap()
                .starts_with("dependency_failed"),
            "{t}"
        );
        assert_eq!(t["attempts"], json!([]), "{t}");
    }
    assert_eq!(c.wait_final(id("c")).await["state"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_graph_fans_out_and_in_and_dependants_of_existing_tasks_run() {
    let c = cluster().await;

    // One root, 400 middle steps, one join over 100 of them (the parent limit) and a
    // final step after the join: 403 tasks in one entry.
    let mut steps = vec![step("root", &[], "echo", json!("r"))];
    for i in 0..400 {
        steps.push(step(&format!("m{i}"), &["root"], "echo", json!(i)));
    }
    let joined: Vec<String> = (0..100).map(|i| format!("m{}", i * 4)).collect();
    let joined_refs: Vec<&str> = joined.iter().map(String::as_str).collect();
    steps.push(step("join", &joined_refs, "echo", json!("j")));
    steps.push(step("last", &["join"], "echo", json!("z")));
    let (status, v) = c.post("/v1/graphs", json!({ "steps": steps })).await;
    assert_eq!(status, 201, "{v}");
    let steps = v["steps"].as_object().unwrap();
    assert_eq!(steps.len(), 403);
    let last = c.wait_final(steps["last"].as_u64().unwrap()).await;
    assert_eq!(last["state"], "succeeded", "{last}");
    let join = c.wait_final(steps["join"].as_u64().unwrap()).await;
    let out = output_json(&join);
    let parents = out["parents"].as_object().unwrap();
    assert_eq!(parents.len(), 100, "{out}");
    for i in 0..100 {
        let m = &parents[&format!("m{}", i * 4)];
        assert_eq!(m["payload"], json!(i * 4), "{out}");
        assert_eq!(m["parents"]["root"], "r", "{out}");
    }
    for (name, id) in steps {
        let t = c.wait_final(id.as_u64().unwrap()).await;
        assert_eq!(t["state"], "succeeded", "step {name}: {t}");
    }
    let (_, root) = c.get(&format!("/v1/tasks/{}", steps["root"])).await;
    assert_eq!(root["children"].as_array().unwrap().len(), 400);

    // `depends_on` an existing task: a finished one counts at once, keyed by its id.
    let first = c.submit(json!({"agent": "echo", "payload": "first"})).await;
    assert_eq!(c.wait_final(first).await["state"], "succeeded");
    let (status, v) = c
        .post(
            "/v1/tasks?wait=30s",
            json!({"agent": "echo", "payload": "then", "depends_on": [first]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let out = output_json(&v["task"]);
    assert_eq!(out["parents"][first.to_string()], "first", "{out}");
    // Repeated submits of dependants of one parent, while it runs.
    let parent = c.submit(json!({"agent": "slow", "payload": "p"})).await;
    let tasks: Vec<Value> = (0..200)
        .map(|i| json!({"agent": "echo", "payload": i, "depends_on": [parent]}))
        .collect();
    let (status, v) = c.post("/v1/tasks/batch", json!({ "tasks": tasks })).await;
    assert_eq!(status, 201, "{v}");
    for t in v["tasks"].as_array().unwrap() {
        let t = c.wait_final(t["id"].as_u64().unwrap()).await;
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(output_json(&t)["parents"][parent.to_string()], "p");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_graphs_are_refused_with_clear_errors_and_the_cli_submits_them() {
    let c = cluster().await;
    let refused = |status: u16, v: &Value, want: u16, code: &str, words: &str| {
        assert_eq!(status, want, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(words),
            "{v}"
        );
    };
    let (s, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [step("a", &["c"], "echo", json!(1)), step("b", &["a"], "echo", json!(1)), step("c", &["b"], "echo", json!(1))]}),
        )
        .await;
    refused(
        s,
        &v,
        400,
        "bad_request",
        "the graph has a cycle: b -> c -> a -> b",
    );
    let (s, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [step("a", &["nope"], "echo", json!(1))]}),
        )
        .await;
    refused(s, &v, 400, "bad_request", "not a step of the graph");
    let (s, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [step("a b", &[], "echo", json!(1))]}),
        )
        .await;
    refused(s, &v, 400, "bad_request", "step name");
    let (s, v) = c.post("/v1/graphs", json!({"steps": []})).await;
    refused(s, &v, 400, "bad_request", "1 to");
    let (s, v) = c
        .post(
            "/v1/graphs",
            json!({"steps": [{"name": "a", "task": {"agent": "echo"}, "extra": 1}]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = c
        .post(
            "/v1/tasks",
            json!({"agent": "echo", "depends_on": [987654]}),
        )
        .await;
    refused(s, &v, 404, "unknown_parent", "987654");
    let bad = c
        .submit(json!({"agent": "broken", "payload": "x", "max_attempts": 1}))
        .await;
    assert_eq!(c.wait_final(bad).await["state"], "failed");
    let (s, v) = c
        .post("/v1/tasks", json!({"agent": "echo", "depends_on": [bad]}))
        .await;
    refused(s, &v, 409, "dependency_failed", "failed");
    // Nothing of the refused graphs was submitted.
    let (_, list) = c.get("/v1/tasks?limit=1000").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");

    // The CLI: a graph from a file, then a task that depends on one of its steps.
    let file = c.dir.path().join("graph.json");
    std::fs::write(
        &file,
        json!({"steps": [step("fetch", &[], "echo", json!("page")), step("summarise", &["fetch"], "echo", json!("s"))]})
            .to_string(),
    )
    .unwrap();
    let (code, out, err) = c.cli(&["task", "graph", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let ids: std::collections::BTreeMap<&str, u64> = out
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap(), w.next().unwrap().parse().unwrap())
        })
        .collect();
    let summarise = ids["summarise"];
    let (code, out, err) = c.cli(&[
        "submit",
        "--agent",
        "echo",
        "--payload",
        "after",
        "--depends-on",
        &summarise.to_string(),
        "--wait",
        "30s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    // A parent that is a graph step goes under its step name.
    assert_eq!(
        out["parents"]["summarise"]["parents"]["fetch"], "page",
        "{out}"
    );
    let (code, got, err) = c.cli(&["task", "get", &summarise.to_string()]);
    assert_eq!(code, 0, "{err}");
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["parents"], json!([ids["fetch"]]), "{got}");
    assert_eq!(got["children"].as_array().unwrap().len(), 1, "{got}");
}
