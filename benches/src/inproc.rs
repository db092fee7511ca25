//! A cluster in this process, on loopback, with real certificates, QUIC and the HTTP API,
//! and the client-side measurements the in-process benchmarks (`throughput`,
//! `live_output`) share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use swarm_coordinator::{CoordinatorConfig, CoordinatorHandle};
use tokio::sync::Semaphore;

use crate::processes::free_port;

/// Start `n` coordinators forming one cluster; returns them and the leader's index.
pub async fn start_cluster(
    n: u64,
    dir: &std::path::Path,
    certs: &std::path::Path,
    token: &str,
) -> anyhow::Result<(Vec<CoordinatorHandle>, usize)> {
    use swarm_coordinator::raft::NodeAddr;
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free_port(true)?, free_port(false)?)))
        .collect::<anyhow::Result<_>>()?;
    let addr = |i: usize| NodeAddr {
        raft_addr: format!("127.0.0.1:{}", ports[i].0),
        api_addr: format!("127.0.0.1:{}", ports[i].1),
    };
    let mut handles = Vec::new();
    for (i, (quic, api)) in ports.iter().enumerate() {
        let mut cfg = CoordinatorConfig::single_node(
            dir.join(format!("coordinator-{}", i + 1)),
            certs.to_path_buf(),
            format!("127.0.0.1:{quic}").parse()?,
            format!("127.0.0.1:{api}").parse()?,
            token.to_string(),
        );
        cfg.node_id = i as u64 + 1;
        cfg.bootstrap = i == 0;
        cfg.api_advertise = addr(i).api_addr;
        if i == 0 {
            cfg.peers = (1..n as usize).map(|j| (j as u64 + 1, addr(j))).collect();
        }
        handles.push(swarm_coordinator::start(cfg).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = handles.iter().position(|h| h.node().is_leader()) {
            return Ok((handles, i));
        }
        if Instant::now() > deadline {
            bail!("no leader elected");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The configuration of bench worker `bench-{i}`: `slots` slots, connected to
/// `coordinators` with the certificates in `certs`, no agents file, no peer links, no
/// drain; callers change what their run needs.
pub fn worker_config(
    coordinators: &[String],
    certs: &std::path::Path,
    i: u32,
    slots: u32,
) -> swarm_worker::WorkerConfig {
    swarm_worker::WorkerConfig {
        coordinators: coordinators.to_vec(),
        server_name: Some("localhost".into()),
        certs_dir: certs.to_path_buf(),
        worker_id: format!("bench-{i}"),
        slots,
        labels: Default::default(),
        agents_file: None,
        peer_listen: None,
        peer_advertise: None,
        peer_server_name: None,
        drain_timeout: Duration::ZERO,
        log_tail_bytes: swarm_worker::DEFAULT_LOG_TAIL_BYTES,
    }
}

/// Run a worker in this process until `stop` changes.
pub fn spawn_worker(cfg: swarm_worker::WorkerConfig, stop: tokio::sync::watch::Receiver<bool>) {
    let mut rx = stop;
    tokio::spawn(async move {
        let stop = async move {
            let _ = rx.changed().await;
        };
        let _ = swarm_worker::run_worker(cfg, std::future::pending(), stop).await;
    });
}

/// Wait (up to 30 s) until the coordinator at `api` lists `n` workers.
pub async fn wait_for_workers(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = http
            .get(format!("{api}/v1/workers"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if v["workers"].as_array().map_or(0, |a| a.len()) == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("workers did not connect: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One throughput run of [`run_throughput`].
#[derive(Debug, Clone, Copy)]
pub struct ThroughputRun {
    /// Echo tasks submitted.
    pub tasks: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// Tasks per request (1: one task per `POST /v1/tasks`; more: `POST /v1/tasks/batch`).
    pub batch: usize,
    /// The swarm the tasks name.
    pub swarm: &'static str,
    /// Task `i` carries concurrency key `k:{i % keys}` (0: no key).
    pub keys: usize,
}

impl ThroughputRun {
    /// Task `i`'s submit body.
    pub fn task(&self, i: usize) -> serde_json::Value {
        let mut t =
            serde_json::json!({"agent": "echo", "swarm": self.swarm, "payload": i.to_string()});
        if self.keys > 0 {
            t["concurrency_key"] = format!("k:{}", i % self.keys).into();
        }
        t
    }
}

/// Submit `run.tasks` echo tasks, then wait for all; returns the wall time of both and
/// the number of tasks.
pub async fn run_throughput(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    run: &ThroughputRun,
) -> anyhow::Result<(Duration, usize)> {
    let sem = Arc::new(Semaphore::new(run.concurrency));
    let start = Instant::now();
    let mut handles = Vec::new();
    let per = run.batch.max(1);
    for chunk_start in (0..run.tasks).step_by(per) {
        let n = per.min(run.tasks - chunk_start);
        let permit = sem.clone().acquire_owned().await?;
        let http = http.clone();
        let (api, token) = (api.to_string(), token.to_string());
        let run = *run;
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let ids: Vec<u64> = if n == 1 {
                let v: serde_json::Value = http
                    .post(format!("{api}/v1/tasks"))
                    .bearer_auth(&token)
                    .json(&run.task(chunk_start))
                    .send()
                    .await?
                    .json()
                    .await?;
                vec![v["id"]
                    .as_u64()
                    .with_context(|| format!("submit failed: {v}"))?]
            } else {
                let tasks: Vec<_> = (0..n).map(|i| run.task(chunk_start + i)).collect();
                let v: serde_json::Value = http
                    .post(format!("{api}/v1/tasks/batch"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "tasks": tasks }))
                    .send()
                    .await?
                    .json()
                    .await?;
                v["tasks"]
                    .as_array()
                    .with_context(|| format!("batch failed: {v}"))?
                    .iter()
                    .map(|t| t["id"].as_u64().context("id"))
                    .collect::<anyhow::Result<_>>()?
            };
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(run.tasks);
    for h in handles {
        ids.extend(h.await??);
    }
    // Await every result.
    let mut waits = Vec::new();
    for &id in &ids {
        let permit = sem.clone().acquire_owned().await?;
        let http = http.clone();
        let (api, token) = (api.to_string(), token.to_string());
        waits.push(tokio::spawn(async move {
            let _permit = permit;
            let v: serde_json::Value = http
                .get(format!("{api}/v1/tasks/{id}?wait=60s"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            if v["state"] != "succeeded" {
                bail!("task {id} ended {}", v["state"]);
            }
            anyhow::Ok(())
        }));
    }
    for w in waits {
        w.await??;
    }
    Ok((start.elapsed(), ids.len()))
}
