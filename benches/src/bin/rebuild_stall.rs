//! How a vector-memory graph rebuild affects task dispatch: one coordinator and one
//! worker as real processes (the `swarm` binary, default settings, a temp data dir), a
//! collection of `--points` random vectors (`--dimension`, cosine, seeded), and a probe
//! that submits one echo task at a time (`POST /v1/tasks?wait=…`, then
//! `GET /v1/tasks/{id}?wait=…` until it is final) and records submit → finished latency.
//!
//! Phases, in order (a probe that overlaps the rebuild window counts as "rebuild", any
//! other as the phase it finished in):
//!
//! * load: the points are upserted in batches of the memory store's `max_batch`, capped so
//!   one upsert fits a Raft entry (`limits::MAX_OP_BYTES`), one request at a time; an
//!   upsert answered 503 (the coordinator holds upserts while too many points wait for
//!   the indexer, and refuses them after a while) is sent again after 1 s;
//! * indexing: from the last upsert's answer until the collection's info shows no point
//!   waiting for the graph (`unindexed` 0; a coordinator without that field counts as
//!   done at once);
//! * baseline: `--baseline-secs` of probing with the memory idle;
//! * deletes: the points a rebuild needs are deleted (random ids, seeded) in batches, all
//!   but the last below the threshold (`StoreConfig`: tombstones ≥
//!   `rebuild_min_tombstones` and > `rebuild_tombstone_ratio` × live);
//! * rebuild: from the start of the last delete, which crosses the threshold, until the
//!   collection's info (`GET /v1/memory/{collection}`, polled every 200 ms) shows a new
//!   `generation` and no tombstones (bounded by `--timeout-secs`);
//! * after: `--after-secs` more probing;
//! * restart: the coordinator is SIGKILLed and started again: time to `/ready`, the
//!   latency of a search right then, and the time until the collection's info shows no
//!   point waiting for the graph.
//!
//! Prints one table (probes, p50, p99, max per phase), the load time, each delete
//! request's latency, the rebuild window and the load average at start and end. Both
//! processes are killed at the end, also on error. Run in release, on an otherwise idle
//! machine:
//!
//! `cargo build --release -p swarm-cli -p swarm-benches &&
//!  target/release/rebuild_stall --swarm target/release/swarm`

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm_benches::processes::Processes;
use swarm_memory::StoreConfig;

#[derive(Parser)]
struct Args {
    /// The `swarm` binary.
    #[arg(long, default_value = "target/release/swarm")]
    swarm: PathBuf,
    /// Points loaded into the collection.
    #[arg(long, default_value_t = 100_000)]
    points: usize,
    /// Vector dimension.
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Seed of the vectors and of the ids deleted.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Points in the last delete request, the one that crosses the rebuild threshold.
    #[arg(long, default_value_t = 1000)]
    tip_batch: usize,
    /// Seconds of probing before the deletes.
    #[arg(long, default_value_t = 10.0)]
    baseline_secs: f64,
    /// Seconds of probing after the rebuild.
    #[arg(long, default_value_t = 5.0)]
    after_secs: f64,
    /// Bound of the load, of the rebuild wait and of any one request, seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Worker slots (default: the worker's own default).
    #[arg(long)]
    slots: Option<u32>,
    /// Keep the data and logs here (default: a temp dir, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const COLLECTION: &str = "rebuild-bench";

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Bound of any one request.
    timeout: Duration,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Wait until `/ready` answers 200.
    async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = self
                .http
                .get(self.url("/ready"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send a JSON body (as text), expect a 2xx answer, return its JSON.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
    ) -> anyhow::Result<serde_json::Value> {
        match self.try_send(method.clone(), path, body).await? {
            Ok(v) => Ok(v),
            Err((status, text)) => bail!("{method} {path} answered {status}: {text}"),
        }
    }

    /// Send a JSON body (as text): a 2xx answer's JSON, or the status and text of any
    /// other answer.
    async fn try_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
    ) -> anyhow::Result<Result<serde_json::Value, (reqwest::StatusCode, String)>> {
        let r = self
            .http
            .request(method.clone(), self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            return Ok(Err((status, text)));
        }
        Ok(Ok(serde_json::from_str(&text)?))
    }

    async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .timeout(self.timeout)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    /// Points of the collection not yet in its graph (0 if the info has no such field).
    async fn unindexed(&self) -> anyhow::Result<u64> {
        let i = self.get_json(&format!("/v1/memory/{COLLECTION}")).await?;
        Ok(i["unindexed"].as_u64().unwrap_or(0))
    }

    /// The collection's (generation, tombstones, live).
    async fn info(&self) -> anyhow::Result<(u64, u64, u64)> {
        let i = self.get_json(&format!("/v1/memory/{COLLECTION}")).await?;
        let field = |name: &str| {
            i[name]
                .as_u64()
                .with_context(|| format!("collection info without `{name}`: {i}"))
        };
        Ok((field("generation")?, field("tombstones")?, field("live")?))
    }

    /// Submit one echo task and wait until it is final; fails unless it succeeded.
    async fn probe(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        let body = serde_json::json!({"agent": "echo", "payload": format!("probe {n}")});
        let submitted = self
            .send(
                reqwest::Method::POST,
                "/v1/tasks?wait=60s",
                body.to_string(),
            )
            .await?;
        let id = submitted["id"]
            .as_u64()
            .with_context(|| format!("submit answered {submitted}"))?;
        let mut state = submitted["task"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        loop {
            match state.as_str() {
                "succeeded" => return Ok(()),
                "failed" | "cancelled" | "dead_lettered" => bail!("probe task {id} {state}"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("probe task {id} not finished within {:?}", self.timeout);
            }
            let t = self.get_json(&format!("/v1/tasks/{id}?wait=60s")).await?;
            state = t["state"].as_str().unwrap_or("").to_string();
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One probe: when it was submitted and how long until its task was final.
struct Probe {
    start: Instant,
    end: Instant,
}

/// Probe until `stop`, one task at a time.
async fn probe_loop(api: Arc<Api>, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Probe>> {
    let mut probes = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        api.probe(n).await?;
        probes.push(Probe {
            start,
            end: Instant::now(),
        });
        n += 1;
    }
    Ok(probes)
}

/// The smallest number of tombstones in a collection of `n` points that triggers a rebuild
/// (`Collection::maybe_rebuild`).
fn tombstones_to_rebuild(n: usize, cfg: &StoreConfig) -> anyhow::Result<usize> {
    (cfg.rebuild_min_tombstones.max(1)..=n)
        .find(|&t| t as f64 > cfg.rebuild_tombstone_ratio * (n - t) as f64)
        .with_context(|| format!("no number of deletes out of {n} points triggers a rebuild"))
}

/// An upsert body: points `ids` with vectors from `rng`.
fn upsert_body(ids: std::ops::Range<usize>, dimension: usize, rng: &mut StdRng) -> String {
    let mut s = String::with_capacity(ids.len() * (dimension * 10 + 32));
    s.push_str("{\"points\":[");
    for (k, i) in ids.enumerate() {
        if k > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"id\":\"p{i}\",\"vector\":[");
        for d in 0..dimension {
            if d > 0 {
                s.push(',');
            }
            let _ = write!(s, "{:.6}", rng.gen_range(-1.0f32..1.0));
        }
        s.push_str("]}");
    }
    s.push_str("]}");
    s
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_start = loadavg();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    swarm_transport::init_certs(&dir.join("certs"), &[], false)?;
    let token = format!("rebuild-{}", rand::thread_rng().gen::<u64>());
    std::fs::write(dir.join("token"), &token)?;
    let mut cluster = Processes::new(&args.swarm, &dir, Vec::new())?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let api = Arc::new(Api {
        http: reqwest::Client::builder().build()?,
        base: format!("http://127.0.0.1:{}", cluster.api),
        token,
        timeout,
    });
    cluster.start_coordinator()?;
    api.wait_ready(Duration::from_secs(30)).await?;
    cluster.start_worker("rebuild-w1", args.slots)?;

    let cfg = StoreConfig::default();
    let n = args.points;
    let dim = args.dimension;
    // One upsert is one memory op, which must fit one Raft entry: 4 bytes a component
    // plus the id and framing (an upper estimate).
    let per_point = 4 * dim + 48;
    let upsert_batch = cfg
        .max_batch
        .min((swarm_coordinator::limits::MAX_OP_BYTES - 4096) / per_point)
        .max(1);
    let deletes = tombstones_to_rebuild(n, &cfg)?;
    let tip = args.tip_batch.clamp(1, deletes.min(cfg.max_batch));

    println!(
        "# rebuild_stall: 1 coordinator + 1 worker as processes (default settings), collection {dim}-d cosine of {n} random points (seed {}), probe: one echo task at a time, submit → finished",
        args.seed
    );

    // Load.
    api.send(
        reqwest::Method::PUT,
        &format!("/v1/memory/{COLLECTION}"),
        serde_json::json!({"dimension": dim, "metric": "cosine"}).to_string(),
    )
    .await
    .context("creating the collection")?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn(probe_loop(api.clone(), stop.clone()));
    let check_prober = |prober: &tokio::task::JoinHandle<anyhow::Result<Vec<Probe>>>| {
        if prober.is_finished() {
            bail!("the probe loop stopped early");
        }
        Ok(())
    };
    let t0 = Instant::now();
    let mut upserts = 0;
    let mut refused = 0;
    let mut next_report = Instant::now() + Duration::from_secs(30);
    for from in (0..n).step_by(upsert_batch) {
        if t0.elapsed() > timeout {
            bail!("loading took longer than {timeout:?} ({from} of {n} points)");
        }
        let body = upsert_body(from..(from + upsert_batch).min(n), dim, &mut rng);
        // An upsert held past the coordinator's wait while the indexer is far behind is
        // answered 503: back off and send it again, as a client should.
        loop {
            let sent = api
                .try_send(
                    reqwest::Method::POST,
                    &format!("/v1/memory/{COLLECTION}/points"),
                    body.clone(),
                )
                .await
                .context("upserting points")?;
            match sent {
                Ok(_) => break,
                Err((reqwest::StatusCode::SERVICE_UNAVAILABLE, _)) if t0.elapsed() < timeout => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err((status, text)) => bail!("upserting points answered {status}: {text}"),
            }
        }
        upserts += 1;
        check_prober(&prober)?;
        if Instant::now() > next_report {
            next_report += Duration::from_secs(30);
            eprintln!(
                "  loaded {} points in {:.0} s",
                (from + upsert_batch).min(n),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let loaded_at = Instant::now();
    let load_s = (loaded_at - t0).as_secs_f64();
    let (gen0, tomb0, live0) = api.info().await?;
    if live0 != n as u64 || tomb0 != 0 {
        bail!("after the load the collection has {live0} live points and {tomb0} tombstones");
    }
    eprintln!("  loaded in {load_s:.1} s; waiting for the indexer");
    let indexed_at = loop {
        let left = api.unindexed().await?;
        if left == 0 {
            break Instant::now();
        }
        if t0.elapsed() > timeout {
            bail!("{left} points still not indexed after {timeout:?}");
        }
        check_prober(&prober)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let indexing_s = (indexed_at - loaded_at).as_secs_f64();
    eprintln!("  indexed {indexing_s:.1} s after the last upsert; baseline probing");

    // Probe: baseline.
    let baseline_start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.baseline_secs)).await;
    check_prober(&prober)?;

    // Deletes: all but the last below the threshold; the last crosses it.
    let mut ids: Vec<usize> = rand::seq::index::sample(&mut rng, n, deletes).into_vec();
    let tip_ids = ids.split_off(deletes - tip);
    let mut batches: Vec<Vec<usize>> = ids.chunks(cfg.max_batch).map(<[_]>::to_vec).collect();
    batches.push(tip_ids);
    let deletes_start = Instant::now();
    let mut delete_report = Vec::new();
    let mut rebuild_start = None;
    let mut early = None;
    for (k, batch) in batches.iter().enumerate() {
        let last = k + 1 == batches.len();
        if last {
            let (g, t, _) = api.info().await?;
            if g != gen0 {
                early = Some(format!(
                    "the generation changed before the last delete ({gen0} → {g}, {t} tombstones)"
                ));
            }
            rebuild_start = Some(Instant::now());
        }
        let body = serde_json::json!({
            "ids": batch.iter().map(|i| format!("p{i}")).collect::<Vec<_>>()
        });
        let t = Instant::now();
        let r = api
            .send(
                reqwest::Method::POST,
                &format!("/v1/memory/{COLLECTION}/delete"),
                body.to_string(),
            )
            .await
            .context("deleting points")?;
        let took = t.elapsed();
        let rebuilt = r["Deleted"]["rebuilt"].as_bool();
        delete_report.push((batch.len(), took, rebuilt));
        eprintln!(
            "  delete {} points: {:.3} s, rebuild began in its apply: {rebuilt:?}",
            batch.len(),
            took.as_secs_f64()
        );
    }
    let rebuild_start = rebuild_start.unwrap_or(deletes_start);
    // Rebuild: until the info shows a new generation and no tombstones.
    let (rebuilt_at, gen1, live1) = loop {
        let (g, t, l) = api.info().await?;
        if g > gen0 && t == 0 {
            break (Instant::now(), g, l);
        }
        if rebuild_start.elapsed() > timeout {
            bail!(
                "no rebuild within {timeout:?}: generation {g} (was {gen0}), {t} tombstones, {l} live"
            );
        }
        check_prober(&prober)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let window = rebuilt_at - rebuild_start;
    eprintln!(
        "  rebuilt: window {:.1} s; probing after",
        window.as_secs_f64()
    );

    // After.
    tokio::time::sleep(Duration::from_secs_f64(args.after_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let probes = tokio::time::timeout(timeout, prober)
        .await
        .context("the probe loop did not stop")???;

    // Restart: SIGKILL, start again; time to /ready, to a search's answer, and until the
    // indexer has every point in the graph again.
    let mut query_rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let query: Vec<f32> = (0..dim)
        .map(|_| query_rng.gen_range(-1.0f32..1.0))
        .collect();
    let search_body = serde_json::json!({"vector": query, "k": 10}).to_string();
    cluster.kill_coordinator()?;
    let killed = Instant::now();
    cluster.start_coordinator()?;
    api.wait_ready(timeout).await?;
    let ready_s = killed.elapsed().as_secs_f64();
    let t = Instant::now();
    api.send(
        reqwest::Method::POST,
        &format!("/v1/memory/{COLLECTION}/search"),
        search_body.clone(),
    )
    .await
    .context("searching after the restart")?;
    let first_search_ms = ms(t.elapsed());
    let reindexed_s = loop {
        if api.unindexed().await? == 0 {
            break killed.elapsed().as_secs_f64();
        }
        if killed.elapsed() > timeout {
            bail!("not re-indexed within {timeout:?} of the restart");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t = Instant::now();
    api.send(
        reqwest::Method::POST,
        &format!("/v1/memory/{COLLECTION}/search"),
        search_body,
    )
    .await?;
    let indexed_search_ms = ms(t.elapsed());
    let load_end = loadavg();

    // A probe overlapping the rebuild window is a rebuild probe; any other belongs to the
    // phase it finished in.
    let names = [
        "load",
        "indexing",
        "baseline",
        "deletes below the threshold",
        "rebuild",
        "after",
    ];
    let mut hists = Vec::new();
    for _ in names {
        hists.push(Histogram::<u64>::new(3)?);
    }
    // Exact maxima, µs (the histogram's are rounded up to its precision, 0.1%).
    let mut maxes = [0u64; 6];
    for p in &probes {
        let phase = if p.end <= loaded_at {
            0
        } else if p.end <= baseline_start.max(indexed_at) {
            1
        } else if p.end <= deletes_start {
            2
        } else if p.end <= rebuild_start {
            3
        } else if p.start <= rebuilt_at {
            4
        } else {
            5
        };
        let us = (p.end - p.start).as_micros().max(1) as u64;
        hists[phase].record(us)?;
        maxes[phase] = maxes[phase].max(us);
    }

    println!(
        "load: {n} points in {upserts} upserts of up to {upsert_batch}{} in {load_s:.1} s ({:.0} points/s)",
        if upsert_batch < cfg.max_batch {
            format!(" (max_batch {}, capped so one upsert fits a Raft entry)", cfg.max_batch)
        } else {
            String::new()
        },
        n as f64 / load_s
    );
    if refused > 0 {
        println!(
            "  {refused} upsert answers were 503 (too many points waiting for the indexer), each sent again after 1 s"
        );
    }
    println!(
        "indexing: the last point was in the graph {indexing_s:.1} s after the last upsert's answer"
    );
    let threshold = format!(
        "tombstones ≥ {} and > {} × live",
        cfg.rebuild_min_tombstones, cfg.rebuild_tombstone_ratio
    );
    let mut deletes_line = String::new();
    for (i, (points, took, rebuilt)) in delete_report.iter().enumerate() {
        let _ = write!(
            deletes_line,
            "{}{points} points {:.1} ms{}",
            if i > 0 { ", " } else { "" },
            ms(*took),
            match rebuilt {
                Some(true) => " (a rebuild began in its apply)",
                Some(false) => "",
                None => " (rebuilt: ?)",
            }
        );
    }
    println!(
        "deletes: {deletes} points ({threshold}) in {} requests: {deletes_line}",
        delete_report.len()
    );
    println!(
        "rebuild window (last delete sent → info shows generation {gen0} → {gen1} and 0 tombstones, polled every 200 ms): {:.2} s, {live1} live points",
        window.as_secs_f64()
    );
    if let Some(p) = probes.iter().max_by_key(|p| p.end - p.start) {
        let rel = |a: Instant, b: Instant| {
            if a >= b {
                (a - b).as_secs_f64()
            } else {
                -(b - a).as_secs_f64()
            }
        };
        println!(
            "longest probe: {:.2} s, submitted {:+.2} s from the last delete's send, finished {:+.2} s from the rebuild's observation",
            (p.end - p.start).as_secs_f64(),
            rel(p.start, rebuild_start),
            rel(p.end, rebuilt_at)
        );
    }
    println!(
        "restart after SIGKILL: ready in {ready_s:.2} s; first search {first_search_ms:.1} ms; every point back in the graph {reindexed_s:.1} s after the kill; a search then {indexed_search_ms:.1} ms"
    );
    if let Some(e) = early {
        println!("note: {e}");
    }
    println!();
    println!("| phase | probes | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for ((name, h), max) in names.iter().zip(&hists).zip(maxes) {
        if h.is_empty() {
            println!("| {name} | 0 | - | - | - |");
            continue;
        }
        let q = |q: f64| h.value_at_quantile(q).min(max) as f64 / 1000.0;
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            h.len(),
            q(0.5),
            q(0.99),
            max as f64 / 1000.0
        );
    }
    println!();
    println!("load average (1/5/15 min): start {load_start}, end {load_end}");
    drop(cluster);
    Ok(())
}
