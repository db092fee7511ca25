//! ReasoningBank retrieval as a worker sees it: a `Retrieve` frame over its mutual-TLS
//! QUIC session to the coordinator, answered from the coordinator's replica, timed from
//! send to answer.
//!
//! Starts one coordinator in this process, fills the bank with `--items` patterns through
//! the HTTP API (each one a Raft-committed op, embedded by the built-in embedder), then
//! opens a worker session exactly like `swarm worker` does and sends `--rounds`
//! sequential retrievals of `--k` patterns for varied queries.
//!
//! Run: `cargo run --release -p swarm-benches --bin retrieve_quic [-- --items 100000]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use swarm_coordinator::CoordinatorConfig;
use swarm_proto::worker::{CoordinatorMsg, Hello, WorkerMsg};
use swarm_proto::{ALPN_WORKER, PROTOCOL_VERSION};
use swarm_transport::{client_config, client_endpoint, dial, open_session, Identity, Role};

#[derive(Parser)]
struct Args {
    /// Patterns in the bank.
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Patterns per retrieval.
    #[arg(long, default_value_t = 5)]
    k: u32,
    /// Sequential retrievals measured.
    #[arg(long, default_value_t = 5_000)]
    rounds: usize,
}

const TOPICS: &[&str] = &[
    "cargo build cache",
    "flaky network download",
    "database migration lock",
    "kubernetes rollout stuck",
    "memory leak in worker",
    "slow json parsing",
    "tls certificate expired",
    "raft leader election",
    "quic handshake timeout",
    "python dependency conflict",
    "docker image too large",
    "unit test flaky timing",
];
const VERBS: &[&str] = &[
    "fix", "avoid", "speed up", "debug", "retry", "cache", "pin", "split",
];

fn text(i: usize) -> (String, String) {
    let topic = TOPICS[i % TOPICS.len()];
    let verb = VERBS[(i / TOPICS.len()) % VERBS.len()];
    (
        format!("{verb} {topic} #{i}"),
        format!(
            "when {topic} happens, {verb} it: step {} of {} with variant {}",
            i % 7,
            i % 11,
            i % 13
        ),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir().context("tempdir")?;
    let certs = dir.path().join("certs");
    swarm_transport::init_certs(&certs, &[], false)?;
    let token = "bench-token".to_string();
    let cfg = CoordinatorConfig::single_node(
        dir.path().join("coordinator"),
        certs.clone(),
        "127.0.0.1:0".parse()?,
        "127.0.0.1:0".parse()?,
        token.clone(),
    );
    let coord = swarm_coordinator::start(cfg).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !coord.node().is_leader() {
        if Instant::now() > deadline {
            bail!("the coordinator did not become leader");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let api = format!("http://{}", coord.api_addr);
    let http = reqwest::Client::new();

    let t0 = Instant::now();
    let mut added = 0;
    while added < args.items {
        let n = (args.items - added).min(1000);
        let items: Vec<serde_json::Value> = (added..added + n)
            .map(|i| {
                let (title, content) = text(i);
                serde_json::json!({
                    "title": title, "content": content,
                    "outcome": if i % 5 == 0 { "failure" } else { "success" },
                })
            })
            .collect();
        let r = http
            .post(format!("{api}/v1/patterns"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "items": items }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("adding patterns: {} {}", r.status(), r.text().await?);
        }
        added += n;
    }
    println!(
        "# ReasoningBank retrieval over QUIC: {} patterns (added in {:.1} s), k = {}",
        args.items,
        t0.elapsed().as_secs_f64(),
        args.k
    );

    let identity = Identity::load(&certs, Role::Worker)?;
    let client = client_config(&identity, ALPN_WORKER, swarm_transport::Role::Coordinator)?;
    let endpoint = client_endpoint("127.0.0.1:0".parse()?)?;
    let hello = WorkerMsg::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        worker_id: "bench-retriever".into(),
        slots: 1,
        labels: BTreeMap::new(),
        agents: vec![],
        running: vec![],
        peer_addr: None,
    });
    let dialed = dial(&endpoint, &client, coord.quic_addr, "localhost").await?;
    let mut session = open_session(dialed, &hello).await?;
    match session.reader.recv::<CoordinatorMsg>().await? {
        Some(CoordinatorMsg::Welcome { .. }) => {}
        other => bail!("expected Welcome, got {other:?}"),
    }

    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut returned = 0usize;
    let mut last_beat = Instant::now();
    for i in 0..(args.rounds + 200) {
        if last_beat.elapsed() > Duration::from_millis(500) {
            session
                .writer
                .send(&WorkerMsg::Heartbeat { running: vec![] })
                .await?;
            last_beat = Instant::now();
        }
        let (query, _) = text(i * 7919 + 3);
        let started = Instant::now();
        session
            .writer
            .send(&WorkerMsg::Retrieve {
                request_id: i as u64,
                query,
                k: args.k,
            })
            .await?;
        let hits = loop {
            match session.reader.recv::<CoordinatorMsg>().await? {
                Some(CoordinatorMsg::Retrieved { request_id, result })
                    if request_id == i as u64 =>
                {
                    break result.map_err(|e| anyhow::anyhow!("retrieval failed: {e}"))?;
                }
                Some(_) => continue,
                None => bail!("session closed"),
            }
        };
        // The first rounds warm up connections, caches and code paths.
        if i >= 200 {
            hist.record(started.elapsed().as_micros() as u64)?;
            returned += hits.len();
        }
    }
    println!(
        "worker -> coordinator -> worker, {} sequential retrievals: p50 {} us, p90 {} us, p99 {} us, max {} us ({:.1} patterns per answer)",
        args.rounds,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.max(),
        returned as f64 / args.rounds as f64
    );
    coord.shutdown().await;
    Ok(())
}
