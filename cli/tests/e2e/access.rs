//! Scoped API tokens and certificate revocation, end to end: each scope is allowed
//! exactly its routes (over every route the API has), swarm-limited tokens see only their
//! swarms, tokens and revocations take effect on every node without a restart, and a
//! revoked worker certificate is cut off.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use swarm_coordinator::http::{Swarms, RULES};
use swarm_proto::api::Scope;

use crate::harness::{bin, Cluster, WAIT};
use crate::raft_cluster::RaftCluster;

/// `swarm <args>` against `api` with `token`: (exit code, stdout, stderr).
fn swarm(
    api: &str,
    token: &str,
    ca: Option<&std::path::Path>,
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .env("SWARM_API", api)
        .env("SWARM_TOKEN", token)
        .env_remove("SWARM_CA");
    if let Some(ca) = ca {
        cmd.env("SWARM_CA", ca);
    }
    let out = cmd.output().expect("run swarm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `swarm tokens create NAME --scope S [extra]`: the token printed.
fn create_token(api: &str, admin: &str, name: &str, scope: &str, extra: &[&str]) -> String {
    let mut args = vec!["tokens", "create", name, "--scope", scope];
    args.extend_from_slice(extra);
    let (code, out, err) = swarm(api, admin, None, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains(&format!("scope {scope}")), "{err}");
    let token = out.trim().to_string();
    assert!(token.starts_with("swt_"), "{out}");
    token
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("API request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A concrete request for a routed path: parameters that name nothing, bodies that
/// change nothing lasting (an unknown node, swarm, collection or token; an empty batch).
fn concrete(method: &str, path: &str) -> (Method, String, Option<Value>) {
    let p = path
        .replace("/v1/cluster/nodes/{id}", "/v1/cluster/nodes/99")
        .replace("{id}", "999999")
        .replace("{name}", "nosuch")
        .replace("{collection}", "nosuch")
        .replace("{token}", "nosuch");
    let body = match (method, path) {
        ("POST", "/v1/tasks") => Some(json!({"agent": "echo", "payload": "scoped"})),
        ("POST", "/v1/tasks/batch") => Some(json!({"tasks": []})),
        ("POST", "/v1/restore") => None,
        ("POST", _) | ("PUT", _) => Some(json!({})),
        _ => None,
    };
    (
        Method::from_bytes(method.as_bytes()).expect("method"),
        p,
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_scope_is_allowed_exactly_its_routes() {
    let mut c = Cluster::new(&["--metrics-auth"]);
    c.start_coordinator();
    c.wait_ready().await;
    let http = reqwest::Client::new();
    let tokens: Vec<(Scope, String)> = Scope::ALL
        .iter()
        .map(|s| {
            let t = create_token(&c.api, &c.token, &format!("t-{s}"), s.as_str(), &[]);
            (*s, t)
        })
        .collect();

    // Every route, every scope: allowed ones never answer 401/403, the others answer 403
    // naming the scope they need.
    let mut checked = 0;
    for rule in RULES {
        for (scope, token) in &tokens {
            let (method, path, body) = concrete(rule.method, rule.path);
            let (status, v) = call(&http, &c.api, token, method, &path, body).await;
            let what = format!(
                "{} {} with a {scope} token: {status} {v}",
                rule.method, rule.path
            );
            if scope.allows(rule.scope) {
                assert!(status != 401 && status != 403, "allowed, but {what}");
            } else {
                assert_eq!(status, 403, "refused, but {what}");
                assert_eq!(v["error"]["code"], "forbidden", "{what}");
                let msg = v["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    msg.contains(&format!("needs scope {}", rule.scope)),
                    "{what}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, RULES.len() * 4);

    // Tokens are listed by name and scope, never with a secret.
    let (code, out, err) = swarm(&c.api, &c.token, None, &["tokens", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).expect("token list");
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["t-admin", "t-operate", "t-read", "t-submit"]);
    for (_, t) in &tokens {
        assert!(!out.contains(t.as_str()), "a secret in the list: {out}");
    }
    // A name is taken once; a read token cannot make tokens.
    let (code, _, err) = swarm(
        &c.api,
        &c.token,
        None,
        &["tokens", "create", "t-read", "--scope", "read"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("conflict"), "{err}");
    let (code, _, err) = swarm(
        &c.api,
        &tokens[0].1,
        None,
        &["tokens", "create", "x", "--scope", "admin"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("needs scope admin"), "{err}");

    // Wrong, revoked and expired tokens are all refused with 401.
    let (status, _) = call(
        &http,
        &c.api,
        "swt_0000_nope",
        Method::GET,
        "/v1/status",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let read = &tokens[0].1;
    assert_eq!(
        call(&http, &c.api, read, Method::GET, "/v1/status", None)
            .await
            .0,
        200
    );
    let (code, _, err) = swarm(&c.api, &c.token, None, &["tokens", "revoke", "t-read"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        call(&http, &c.api, read, Method::GET, "/v1/status", None)
            .await
            .0,
        401
    );
    let short = create_token(&c.api, &c.token, "short", "read", &["--ttl", "1s"]);
    assert_eq!(
        call(&http, &c.api, &short, Method::GET, "/v1/status", None)
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        call(&http, &c.api, &short, Method::GET, "/v1/status", None)
            .await
            .0,
        401
    );
    c.assert_coordinator_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_to_swarms_sees_and_changes_only_them() {
    let mut c = Cluster::new(&[]);
    c.start_coordinator();
    c.wait_ready().await;
    c.start_worker("w1", 2, None);
    c.wait_workers(&["w1"]).await;
    let http = reqwest::Client::new();
    let (status, v) = c
        .post("/v1/swarms", json!({"name": "team-a", "topology": "star"}))
        .await;
    assert_eq!(status, 201, "{v}");
    let other = c
        .submit(json!({"agent": "echo", "payload": "default's"}))
        .await;
    let limited = create_token(
        &c.api,
        &c.token,
        "team-a-ci",
        "operate",
        &["--swarm", "team-a"],
    );
    let api = &c.api;

    // Its own swarm: submit, read, list, cancel.
    let (status, v) = call(
        &http,
        api,
        &limited,
        Method::POST,
        "/v1/tasks?wait=30s",
        Some(json!({"agent": "echo", "swarm": "team-a", "payload": "mine"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let mine = v["id"].as_u64().expect("id");
    assert_eq!(v["task"]["state"], "succeeded", "{v}");
    let (status, _) = call(
        &http,
        api,
        &limited,
        Method::GET,
        &format!("/v1/tasks/{mine}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = call(&http, api, &limited, Method::GET, "/v1/tasks", None).await;
    assert_eq!(status, 200);
    let seen: Vec<u64> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_u64())
        .collect();
    assert_eq!(seen, [mine], "{v}");
    let (status, v) = call(&http, api, &limited, Method::GET, "/v1/swarms", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["swarms"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["swarms"][0]["name"], "team-a");

    // Anything else: 403 naming the limit; nothing changes.
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/tasks".to_string(),
            Some(json!({"agent": "echo", "payload": "x"})),
        ),
        (
            Method::POST,
            "/v1/tasks/batch".to_string(),
            Some(json!({"tasks": [{"agent": "echo", "swarm": "team-a"}, {"agent": "echo"}]})),
        ),
        (Method::GET, format!("/v1/tasks/{other}"), None),
        (Method::POST, format!("/v1/tasks/{other}/cancel"), None),
        (Method::GET, "/v1/swarms/default".to_string(), None),
        (Method::GET, "/v1/workers".to_string(), None),
        (Method::GET, "/v1/memory".to_string(), None),
    ] {
        let (status, v) = call(&http, api, &limited, method.clone(), &path, body).await;
        assert_eq!(status, 403, "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("limited to swarms team-a"),
            "{method} {path}: {v}"
        );
    }
    // Cluster health views stay open to it.
    assert_eq!(
        call(&http, api, &limited, Method::GET, "/v1/status", None)
            .await
            .0,
        200
    );
    let (_, v) = c.get(&format!("/v1/tasks/{other}")).await;
    assert_ne!(v["state"], "cancelled", "{v}");
    let (_, v) = c.get("/v1/status").await;
    assert_eq!(
        v["queue"]["succeeded"].as_u64().unwrap_or(0)
            + v["queue"]["queued"].as_u64().unwrap_or(0)
            + v["queue"]["running"].as_u64().unwrap_or(0),
        2,
        "{v}"
    );
    c.assert_coordinator_alive();
}

/// Three coordinators over HTTPS: a token made on one node works on the others at once
/// (followers forward with their own certificate and the caller's principal, so a
/// limited token stays limited at the leader); revoking it refuses it everywhere; a
/// revoked worker certificate is cut off within seconds and refused on reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_revocations_reach_every_node_and_cut_off_a_worker() {
    let mut c = RaftCluster::new(3, &["--api-tls", "on"]);
    c.start_all();
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let ca = c.certs.join("ca.pem");
    let apis: std::collections::BTreeMap<u64, String> =
        c.nodes.iter().map(|(id, n)| (*id, n.api())).collect();
    let base = |id: u64| apis[&id].clone();
    let (code, out, err) = swarm(
        &base(follower),
        &c.token,
        Some(&ca),
        &[
            "tokens", "create", "ops", "--scope", "submit", "--swarm", "default",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let token = out.trim().to_string();
    // Each node answers it (a follower forwards the submit to the leader).
    for id in 1..=3u64 {
        let status = status_becomes(&c.http, &base(id), &token, 200).await;
        assert_eq!(status, 200, "node {id} does not know the token");
    }
    let (status, v) = call(
        &c.http,
        &base(follower),
        &token,
        Method::POST,
        "/v1/tasks",
        Some(json!({"agent": "echo", "payload": "via a follower"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    // Forwarded, the principal keeps its limits: not operate, not another swarm.
    let id = v["id"].as_u64().expect("id");
    let (status, v) = call(
        &c.http,
        &base(follower),
        &token,
        Method::POST,
        &format!("/v1/tasks/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = call(
        &c.http,
        &base(follower),
        &token,
        Method::POST,
        "/v1/tasks",
        Some(json!({"agent": "echo", "swarm": "elsewhere"})),
    )
    .await;
    assert_eq!(status, 403, "{v}");

    // Revoked on the leader, refused on every node.
    let (code, _, err) = swarm(
        &base(leader),
        &c.token,
        Some(&ca),
        &["tokens", "revoke", "ops"],
    );
    assert_eq!(code, 0, "{err}");
    for id in 1..=3u64 {
        let status = status_becomes(&c.http, &base(id), &token, 401).await;
        assert_eq!(status, 401, "node {id} still takes the revoked token");
    }

    // A worker with a certificate of its own, connected, then revoked.
    let wdir = c.issue("worker", "w-rev");
    c.start_worker_certs("w-rev", 1, None, &wdir);
    wait_worker(&c, leader, "w-rev", true).await;
    let (code, out, err) = swarm(
        &base(follower),
        &c.token,
        Some(&ca),
        &[
            "certs",
            "revoke",
            wdir.join("worker.pem").to_str().expect("path"),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    // Cut off, and it stays off: every reconnect is refused in the handshake.
    wait_worker(&c, leader, "w-rev", false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, v) = c.get(leader, "/v1/workers").await.expect("workers");
    assert!(
        !v["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["id"] == "w-rev"),
        "{v}"
    );
    let (code, out, _) = swarm(
        &base(leader),
        &c.token,
        Some(&ca),
        &["certs", "revoked", "--json"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("w-rev"), "{out}");
    for id in 1..=3 {
        assert!(
            c.node_status(id).await.is_some(),
            "node {id} stopped answering"
        );
    }
}

/// Each coordinator with a certificate of its own; the leader's is revoked. Its peers cut
/// their Raft connections to it and refuse it from then on, so the other two elect a
/// leader between them; the worker, sent the deny list, leaves the revoked coordinator
/// and refuses it, and runs tasks for the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_coordinator_is_cut_off_by_its_peers_and_by_workers() {
    let mut c = RaftCluster::new(3, &[]);
    for id in 1..=3u64 {
        let dir = c.issue("coordinator", &format!("coordinator-{id}"));
        c.node_certs.insert(id, dir);
    }
    c.start_all();
    let old = c.wait_leader().await;
    let wdir = c.issue("worker", "w-1");
    c.start_worker_certs("w-1", 2, None, &wdir);
    wait_worker(&c, old, "w-1", true).await;

    let cert = c.node_certs[&old].join("coordinator.pem");
    let (code, out, err) = swarm(
        &c.nodes[&old].api(),
        &c.token,
        None,
        &["certs", "revoke", cert.to_str().expect("path")],
    );
    assert_eq!(code, 0, "{out}{err}");

    // The other two agree on a leader between them.
    let others: Vec<u64> = (1..=3).filter(|n| *n != old).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    let new = loop {
        let mut seen = Vec::new();
        for id in &others {
            let s = c.node_status(*id).await;
            seen.push(s.and_then(|s| s["leader"].as_u64()));
        }
        if let [Some(a), Some(b)] = seen[..] {
            if a == b && a != old {
                break a;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader among {others:?} after revoking node {old}: {seen:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The worker follows the new leader (the revoked one is refused in its handshake).
    wait_worker(&c, new, "w-1", true).await;
    let (status, v) = call(
        &c.http,
        &c.nodes[&new].api(),
        &c.token,
        Method::POST,
        "/v1/tasks",
        Some(json!({"agent": "echo", "payload": "after the revocation"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_u64().expect("id");
    c.wait_for(new, &format!("/v1/tasks/{id}"), "the task succeeds", |t| {
        t["state"] == "succeeded"
    })
    .await;
    // The revoked node is out for good: its peers refuse every handshake it tries.
    let log = c.log_of(new);
    let peers_refuse = others
        .iter()
        .any(|id| c.log_of(*id).contains("certificate is revoked"));
    assert!(
        peers_refuse,
        "no peer logged refusing the revoked node\n{log}"
    );
    let wlog = std::fs::read_to_string(c.dir.path().join("w-1.log")).unwrap_or_default();
    assert!(
        wlog.contains("deny list") && wlog.contains("certificate is revoked"),
        "the worker never took the deny list or refused the revoked coordinator\n{wlog}"
    );
}

/// An enrolled certificate is renewed before it expires, with the same key, and the
/// worker runs on under it; a revoked one is not renewed. Without `--id` the worker
/// enrolls under its host name (a pod's, a container's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_certificate_is_renewed_until_it_is_revoked() {
    // Renewed two thirds of the way: after some 8 s.
    let (mut c, enroll_token) = enrolling(&["--enroll-prefix", "pod-", "--enroll-validity", "12s"]);
    c.start_coordinator();
    c.wait_ready().await;
    let dir = c.dir.path().join("pod-r1-certs");
    let log = c.dir.path().join("pod-r1.log");
    let mut worker = std::process::Command::new(bin())
        .arg("worker")
        .args(["--coordinator", &format!("127.0.0.1:{}", c.quic_port)])
        .args([
            "--server-name",
            "localhost",
            "--slots",
            "1",
            "--enroll-api",
            &c.api,
        ])
        .arg("--enroll-token-file")
        .arg(&enroll_token)
        .arg("--ca")
        .arg(c.certs.join("ca.pem"))
        .arg("--certs")
        .arg(&dir)
        .env("HOSTNAME", "pod-r1")
        .env("SWARM_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn worker");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut worker);
    c.wait_workers(&["pod-r1"]).await;
    let cert = dir.join("worker.pem");
    let first = swarm_transport::CertInfo::read(&cert).expect("enrolled");
    assert_eq!(first.subject.name.to_string(), "pod-r1");

    let renewed = |serial: String| {
        let cert = cert.clone();
        let log = log.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Ok(info) = swarm_transport::CertInfo::read(&cert) {
                    if info.serial != serial {
                        return info;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the certificate was not renewed in time\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let second = renewed(first.serial.clone()).await;
    assert_eq!(
        second.public_key, first.public_key,
        "renewed with the same key"
    );
    assert_eq!(second.subject, first.subject);
    assert!(second.not_after_unix > first.not_after_unix);
    let (_, v) = c
        .post(
            "/v1/tasks?wait=30s",
            json!({"agent": "echo", "payload": "renewed"}),
        )
        .await;
    assert_eq!(v["task"]["state"], "succeeded", "{v}");
    assert_eq!(v["task"]["attempts"][0]["worker"], "pod-r1", "{v}");

    // Revoked: cut off, and its next renewal is refused.
    let (code, out, err) = swarm(
        &c.api,
        &c.token,
        None,
        &["certs", "revoke", cert.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("refused to renew") {
            assert!(text.contains("revoked"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revoked worker's renewal was not refused in time\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = swarm_transport::CertInfo::read(&cert).unwrap();
    assert_eq!(
        last.serial, second.serial,
        "a revoked certificate was renewed"
    );
}

/// The enrollment token of [`enrolling`] clusters.
const ENROLL_SECRET: &str = "enroll-secret-0123456789";

/// A one-coordinator cluster (not started yet) that enrolls workers with the token in
/// the file returned ([`ENROLL_SECRET`]); `extra` are more coordinator flags.
fn enrolling(extra: &[&str]) -> (Cluster, std::path::PathBuf) {
    let mut c = Cluster::new(&[]);
    let enroll_token = c.dir.path().join("enroll-token");
    std::fs::write(&enroll_token, ENROLL_SECRET).unwrap();
    let ca_key = c.certs.join("ca-key.pem");
    c.coordinator_args.extend(
        [
            "--enroll-ca-key",
            ca_key.to_str().unwrap(),
            "--enroll-token-file",
            enroll_token.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string()),
    );
    (c, enroll_token)
}

/// Asks `base`'s `/v1/status` with `token` until the answer is `want` (bounded); the last
/// status seen.
async fn status_becomes(http: &reqwest::Client, base: &str, token: &str, want: u16) -> u16 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = call(http, base, token, Method::GET, "/v1/status", None)
            .await
            .0;
        if status == want || tokio::time::Instant::now() >= deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_worker(c: &RaftCluster, leader: u64, id: &str, present: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((200, v)) = c.get(leader, "/v1/workers").await {
            let there = v["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["id"] == id));
            if there == present {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker {id} {} in time",
            if present {
                "did not connect"
            } else {
                "was not cut off"
            }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn every_rule_names_a_route_once() {
    let mut seen = std::collections::BTreeSet::new();
    for r in RULES {
        assert!(
            seen.insert((r.method, r.path)),
            "{} {} twice",
            r.method,
            r.path
        );
        assert!(r.path.starts_with("/v1/") || r.path == "/metrics");
        // A limited token can never be more than the scope it was given.
        if r.scope == Scope::Admin {
            assert_eq!(r.swarms, Swarms::Unlimited, "{} {}", r.method, r.path);
        }
    }
}

/// A worker with no certificate enrolls: its key stays on its machine, the coordinator
/// signs a certificate for its name, and it runs tasks under that name. A name is
/// enrolled once; names without the prefix, wrong tokens and the enrollment token on any
/// other route are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_enrolls_once_with_the_enrollment_token_and_runs_under_its_name() {
    let (mut c, enroll_token) = enrolling(&["--enroll-prefix", "pod-"]);
    c.start_coordinator();
    c.wait_ready().await;
    let ca = c.certs.join("ca.pem");
    let dir = c.dir.path().join("pod-a1-certs");
    let api = c.api.clone();
    let enroll_args = |dir: Option<&std::path::Path>| -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--enroll-api".into(),
            api.clone(),
            "--enroll-token-file".into(),
            enroll_token.to_str().unwrap().into(),
            "--ca".into(),
            ca.to_str().unwrap().into(),
        ];
        if let Some(d) = dir {
            args.extend(["--certs".into(), d.to_str().unwrap().into()]);
        }
        args
    };
    let args = enroll_args(None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start_worker_as("pod-a1", "pod-a1", 1, None, &dir, &args);
    c.wait_workers(&["pod-a1"]).await;
    let info = swarm_transport::CertInfo::read(&dir.join("worker.pem")).expect("installed");
    assert_eq!(info.subject.name.to_string(), "pod-a1");
    assert_eq!(info.subject.role, swarm_transport::Role::Worker);
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.join("worker-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    assert!(!dir.join("ca-key.pem").exists());
    let (_, v) = c
        .post(
            "/v1/tasks?wait=30s",
            json!({"agent": "echo", "payload": "enrolled"}),
        )
        .await;
    assert_eq!(v["task"]["state"], "succeeded", "{v}");
    assert_eq!(v["task"]["attempts"][0]["worker"], "pod-a1", "{v}");

    // The same name again (another machine, empty directory): refused, nothing written;
    // a name without the prefix: refused. Each worker exits with the reason.
    let again = c.dir.path().join("again");
    let refused = |id: &str| {
        let out = std::process::Command::new(bin())
            .arg("worker")
            .args(enroll_args(Some(&again)))
            .args([
                "--id",
                id,
                "--coordinator",
                &format!("127.0.0.1:{}", c.quic_port),
            ])
            .output()
            .expect("run worker");
        assert!(!out.status.success(), "{id} enrolled");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("pod-a1");
    assert!(err.contains("enrolled already"), "{err}");
    assert!(!again.join("worker.pem").exists());
    let err = refused("w-other");
    assert!(err.contains("start with \"pod-\""), "{err}");

    // The enrollment token opens nothing else; a wrong one does not enroll.
    let http = reqwest::Client::new();
    let (status, _) = call(
        &http,
        &c.api,
        ENROLL_SECRET,
        Method::GET,
        "/v1/status",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (key, csr) = swarm_transport::new_key_and_request(
        swarm_transport::Role::Worker,
        &swarm_transport::CertName::parse("pod-x").unwrap(),
    )
    .unwrap();
    drop(key);
    let body = json!({"name": "pod-x", "csr": csr});
    let (status, v) = call(
        &http,
        &c.api,
        "wrong",
        Method::POST,
        "/v1/certs/enroll",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = call(
        &http,
        &c.api,
        &c.token,
        Method::POST,
        "/v1/certs/enroll",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 401, "the admin token does not enroll either: {v}");
    // Garbage for a signing request: a clear 400.
    let (status, v) = call(&http, &c.api, ENROLL_SECRET, Method::POST, "/v1/certs/enroll",
        Some(json!({"name": "pod-y", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}))).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = call(
        &http,
        &c.api,
        ENROLL_SECRET,
        Method::POST,
        "/v1/certs/enroll",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The same key asking again (a retry whose answer was lost) is answered too.
    let (status, again) = call(
        &http,
        &c.api,
        ENROLL_SECRET,
        Method::POST,
        "/v1/certs/enroll",
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert!(again["certificate"]
        .as_str()
        .is_some_and(|c| c.contains("BEGIN CERTIFICATE")));
    assert!(
        v["certificate"]
            .as_str()
            .unwrap_or_default()
            .contains("BEGIN CERTIFICATE"),
        "{v}"
    );
    let log = c.log_of("coordinator");
    assert_eq!(log.matches("worker enrolled").count(), 3, "{log}");
    assert!(c
        .log_of("pod-a1")
        .contains("enrolled: certificate installed"));
    c.assert_coordinator_alive();
}

/// A worker pod may start before the coordinators: it keeps trying to enroll until one
/// answers, then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_the_coordinators_enrolls_once_they_answer() {
    let (mut c, enroll_token) = enrolling(&[]);
    let dir = c.dir.path().join("early-certs");
    let args = [
        "--enroll-api".to_string(),
        c.api.clone(),
        "--enroll-token-file".into(),
        enroll_token.to_str().unwrap().into(),
        "--ca".into(),
        c.certs.join("ca.pem").to_str().unwrap().into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.start_worker_as("early", "early", 1, None, &dir, &args);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        c.log_of("early").contains("cannot enroll yet"),
        "{}",
        c.log_of("early")
    );
    c.start_coordinator();
    c.wait_ready().await;
    c.wait_workers(&["early"]).await;
    assert!(dir.join("worker.pem").exists());
    c.assert_coordinator_alive();
}
