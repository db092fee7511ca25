//! What live output costs, and how live it is.
//!
//! Starts one coordinator (or `--nodes 3`) and `--workers` workers in this process, on
//! loopback, with real certificates, real QUIC and the real HTTP API (as `throughput`),
//! plus a long-running `exec` task, the **ticker**: `sh -c` printing
//! `tick <i> <ns since the epoch from date +%s%N>` to stderr every `--tick-ms`, until it is
//! cancelled (or the bench process is gone). It runs throughout; only its watchers come
//! and go. Then it measures:
//!
//! * **throughput** of `--tasks` no-op echo tasks (one per request, `--concurrency` in
//!   flight, all awaited: `throughput`'s method) with no watcher, and with `--watchers` SSE
//!   streams (`GET /v1/tasks/{id}/events`) following the ticker, so its worker streams
//!   every line to the leader and the leader fans it out. The two alternate, `--runs`
//!   times each, so machine noise hits both; the median and every run are printed.
//! * **live-stream latency**: for every `tick` line at every watcher, the time the
//!   watcher read it off its SSE stream minus the time printed in it (both the wall
//!   clock of this machine), for lines printed while the throughput runs were under way,
//!   and for lines printed during `--idle-secs` with the same watchers and no load.
//!   The printed time is read by `date` just before `sh` echoes the line, so the figure
//!   also holds the exit of `date` and the `echo` (a fork's worth, more under load).
//!
//! Run: `cargo run --release -p swarm-benches --bin live_output [-- --tasks 2000 --runs 1]`

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use swarm_benches::inproc::{
    run_throughput, spawn_worker, start_cluster, wait_for_workers, worker_config, ThroughputRun,
};
use tokio::task::JoinHandle;

#[derive(Parser, Clone, Debug)]
struct Args {
    /// Tasks in each throughput run.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Requests in flight during a throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Throughput runs of each kind (no watcher, `--watchers` watchers), alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// SSE watchers following the ticker in the watched runs and the idle phase.
    #[arg(long, default_value_t = 10)]
    watchers: usize,
    /// Workers.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per worker (the ticker holds one).
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Coordinators in the Raft cluster (1, 3 or 5), all in this process; the client and
    /// the watchers talk to the leader.
    #[arg(long, default_value_t = 1)]
    nodes: u64,
    /// The ticker prints a line every this many milliseconds (plus what `date` takes).
    #[arg(long, default_value_t = 10)]
    tick_ms: u64,
    /// Length of the idle latency phase (watchers attached, no load), seconds.
    #[arg(long, default_value_t = 3)]
    idle_secs: u64,
    /// Bound on each phase (a throughput run, attaching or detaching the watchers), seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout_secs: u64,
}

impl Args {
    /// Every option with its value, to reproduce this run.
    fn command(&self) -> String {
        format!(
            "cargo run --release -p swarm-benches --bin live_output -- --tasks {} --concurrency {} --runs {} --watchers {} --workers {} --slots {} --nodes {} --tick-ms {} --idle-secs {} --phase-timeout-secs {}",
            self.tasks,
            self.concurrency,
            self.runs,
            self.watchers,
            self.workers,
            self.slots,
            self.nodes,
            self.tick_ms,
            self.idle_secs,
            self.phase_timeout_secs
        )
    }
}

/// The ticker's per-attempt timeout: the bench cancels it long before.
const TICKER_TIMEOUT_MS: u64 = 3_600_000;

/// Nanoseconds since the epoch, the clock `date +%s%N` reads.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// One `tick` line as one watcher received it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tick: u64,
    /// When the ticker printed it (ns since the epoch).
    printed: u64,
    /// Arrival at the watcher minus `printed`, ns.
    latency: i64,
}

/// What one watcher saw.
#[derive(Debug, Default)]
struct WatchLog {
    samples: Vec<Sample>,
    /// Whether it received a line printed after it was attached: what came before is
    /// the replay of the worker's tail, which starts with a gap (what the tail no longer
    /// holds) and a piece of a line, neither counted below.
    live: bool,
    /// `gap` events, and holes in the offsets it saw, once live.
    gaps: u64,
    /// Output that was not a `tick` line, or not text, once live.
    bad: u64,
    /// The stream ended (`end`, or the server closed it) before it was told to stop.
    ended: bool,
}

impl WatchLog {
    fn gap(&mut self) {
        if self.live {
            self.gaps += 1;
        }
    }

    fn bad(&mut self) {
        if self.live {
            self.bad += 1;
        }
    }
}

/// Joins one attempt's output pieces, by offset, into lines.
#[derive(Default)]
struct Lines {
    /// The offset expected next (all streams of an attempt share one sequence).
    next: Option<u64>,
    attempt: Option<u64>,
    /// The unfinished last line of each stream.
    partial: HashMap<String, String>,
}

impl Lines {
    /// Takes one `output` event; returns the lines it completed. After a hole, what was
    /// partial is dropped, and so is the new piece up to its first line break.
    fn take(&mut self, v: &serde_json::Value, log: &mut WatchLog) -> Vec<String> {
        let (Some(text), Some(offset), Some(stream)) = (
            v["text"].as_str(),
            v["offset"].as_u64(),
            v["stream"].as_str(),
        ) else {
            log.bad();
            return Vec::new();
        };
        let attempt = v["attempt"].as_u64();
        if attempt != self.attempt {
            *self = Lines {
                attempt,
                ..Lines::default()
            };
        }
        let end = offset + text.len() as u64;
        let mut text = text;
        match self.next {
            Some(next) if end <= next => return Vec::new(),
            Some(next) if offset < next => {
                let skip = (next - offset) as usize;
                if !text.is_char_boundary(skip) {
                    log.bad();
                    return Vec::new();
                }
                text = &text[skip..];
            }
            Some(next) if offset > next => {
                log.gap();
                self.partial.clear();
                text = text.find('\n').map_or("", |i| &text[i + 1..]);
            }
            _ => {}
        }
        self.next = Some(end);
        let partial = self.partial.entry(stream.to_string()).or_default();
        partial.push_str(text);
        let mut lines = Vec::new();
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            lines.push(line.trim_end().to_string());
        }
        lines
    }
}

/// Follow the ticker's events until `stop`; `latest` is the print time of the newest
/// line received. The watcher was attached at `since`.
async fn watch(
    sse: reqwest::Client,
    url: String,
    token: String,
    since: u64,
    latest: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<WatchLog> {
    let mut resp = sse
        .get(&url)
        .bearer_auth(&token)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("{url}: {} {}", resp.status(), resp.text().await?);
    }
    let mut log = WatchLog::default();
    let mut lines = Lines::default();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            c = resp.chunk() => c?,
        };
        let Some(chunk) = chunk else {
            log.ended = true;
            break;
        };
        let arrival = now_ns();
        buf.extend_from_slice(&chunk);
        // Events end with a blank line.
        while let Some((end, sep)) = find_blank_line(&buf) {
            let event: Vec<u8> = buf.drain(..end + sep).collect();
            let event = String::from_utf8_lossy(&event[..end]);
            let (mut name, mut data) = ("message", String::new());
            for l in event.lines() {
                let l = l.trim_end_matches('\r');
                if let Some(v) = l.strip_prefix("event:") {
                    name = v.strip_prefix(' ').unwrap_or(v);
                } else if let Some(v) = l.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            match name {
                "output" => {
                    let v: serde_json::Value =
                        serde_json::from_str(&data).with_context(|| format!("event {data}"))?;
                    for line in lines.take(&v, &mut log) {
                        let mut f = line.split(' ');
                        match (f.next(), f.next(), f.next()) {
                            (Some("tick"), Some(i), Some(t)) => {
                                let (Ok(tick), Ok(printed)) = (i.parse(), t.parse::<u64>()) else {
                                    log.bad();
                                    continue;
                                };
                                log.live |= printed >= since;
                                log.samples.push(Sample {
                                    tick,
                                    printed,
                                    latency: arrival as i64 - printed as i64,
                                });
                                latest.fetch_max(printed, Ordering::Relaxed);
                            }
                            _ => log.bad(),
                        }
                    }
                }
                "gap" => log.gap(),
                "end" => {
                    log.ended = true;
                    return Ok(log);
                }
                _ => {}
            }
        }
    }
    Ok(log)
}

/// The end of the first event in `buf` and the length of the blank line after it.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\n\n") {
            Some((i + 1, 1))
        } else if buf[i..].starts_with(b"\n\r\n") {
            Some((i + 1, 2))
        } else {
            None
        }
    })
}

/// `n` watchers following one task.
struct Watchers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(Arc<AtomicU64>, JoinHandle<anyhow::Result<WatchLog>>)>,
}

impl Watchers {
    /// Attach `n` watchers and wait until each receives lines printed after it was
    /// attached (they start with a replay of what the worker's tail holds).
    async fn attach(
        n: usize,
        sse: &reqwest::Client,
        url: &str,
        token: &str,
        bound: Duration,
    ) -> anyhow::Result<Self> {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let since = now_ns();
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let latest = Arc::new(AtomicU64::new(0));
                let h = tokio::spawn(watch(
                    sse.clone(),
                    url.to_string(),
                    token.to_string(),
                    since,
                    latest.clone(),
                    stop_rx.clone(),
                ));
                (latest, h)
            })
            .collect();
        let mut w = Watchers { stop, tasks };
        w.wait_past(since, bound)
            .await
            .context("watchers attaching")?;
        Ok(w)
    }

    /// Wait until every watcher received a line printed at or after `t`.
    async fn wait_past(&mut self, t: u64, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            let behind = self
                .tasks
                .iter()
                .filter(|(l, _)| l.load(Ordering::Relaxed) < t)
                .count();
            if behind == 0 {
                return Ok(());
            }
            if let Some((_, h)) = self.tasks.iter_mut().find(|(_, h)| h.is_finished()) {
                h.await??;
                bail!("a watcher's stream ended");
            }
            if Instant::now() > deadline {
                bail!("{behind} watcher(s) got no line printed after {t} within {bound:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until every watcher saw what was printed until `t`, then detach them all.
    async fn detach(mut self, t: u64, bound: Duration) -> anyhow::Result<Vec<WatchLog>> {
        self.wait_past(t, bound)
            .await
            .context("watchers catching up")?;
        let _ = self.stop.send(true);
        let mut logs = Vec::new();
        for (_, h) in self.tasks {
            let log = tokio::time::timeout(bound, h)
                .await
                .context("a watcher did not stop")???;
            if log.ended {
                bail!("a watcher's stream ended while the ticker ran");
            }
            logs.push(log);
        }
        Ok(logs)
    }
}

/// Latency and completeness of the lines printed in `[from, to]` at every watcher.
struct Latency {
    /// Lines printed in the window (distinct tick numbers any watcher saw).
    printed: usize,
    /// Line arrivals: up to `printed` × watchers.
    arrivals: Vec<i64>,
    /// Lines some watcher saw and another did not.
    missed: usize,
    gaps: u64,
    bad: u64,
}

impl Latency {
    fn of(logs: &[WatchLog], from: u64, to: u64) -> Self {
        let mut ticks = BTreeSet::new();
        let mut arrivals = Vec::new();
        let mut seen = Vec::new();
        for log in logs {
            let mut mine = BTreeSet::new();
            for s in log
                .samples
                .iter()
                .filter(|s| (from..=to).contains(&s.printed))
            {
                ticks.insert(s.tick);
                if mine.insert(s.tick) {
                    arrivals.push(s.latency);
                }
            }
            seen.push(mine.len());
        }
        Latency {
            printed: ticks.len(),
            missed: seen.iter().map(|n| ticks.len() - n).sum(),
            arrivals,
            gaps: logs.iter().map(|l| l.gaps).sum(),
            bad: logs.iter().map(|l| l.bad).sum(),
        }
    }

    fn merge(all: Vec<Latency>) -> Self {
        let mut out = Latency {
            printed: 0,
            arrivals: Vec::new(),
            missed: 0,
            gaps: 0,
            bad: 0,
        };
        for l in all {
            out.printed += l.printed;
            out.arrivals.extend(l.arrivals);
            out.missed += l.missed;
            out.gaps += l.gaps;
            out.bad += l.bad;
        }
        out
    }

    /// "N arrivals: p50 … max …", ms.
    fn describe(&self, watchers: usize) -> String {
        let mut v = self.arrivals.clone();
        v.sort_unstable();
        if v.is_empty() {
            return "no line arrived".into();
        }
        let q = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1e6
        };
        let negative = v.iter().filter(|&&l| l < 0).count();
        format!(
            "{} lines x {watchers} watchers = {} arrivals ({} missed, {} gaps{}{}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.printed,
            v.len(),
            self.missed,
            self.gaps,
            if self.bad > 0 {
                format!(", {} unparsed pieces", self.bad)
            } else {
                String::new()
            },
            if negative > 0 {
                format!(", {negative} negative: the clock stepped")
            } else {
                String::new()
            },
            q(0.5),
            q(0.9),
            q(0.99),
            *v.last().unwrap_or(&0) as f64 / 1e6
        )
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_start = loadavg();
    let argv: Vec<String> = std::env::args().collect();
    let bound = Duration::from_secs(args.phase_timeout_secs);
    let dir = tempfile::tempdir().context("tempdir")?;
    let certs = dir.path().join("certs");
    swarm_transport::init_certs(&certs, &[], false)?;
    let token = "bench-token".to_string();

    // The ticker: `kill -0 $PPID` ends it if this process is gone without cancelling it.
    let tick_s = format!("{}.{:03}", args.tick_ms / 1000, args.tick_ms % 1000);
    let script = format!(
        "i=0; while kill -0 $PPID 2>/dev/null; do i=$((i+1)); echo \"tick $i $(date +%s%N)\" >&2; sleep {tick_s}; done"
    );
    let agents = dir.path().join("agents.toml");
    std::fs::write(
        &agents,
        format!("[agents.ticker]\ncommand = \"sh\"\nargs = [\"-c\", '{script}']\n"),
    )?;

    let (coords, leader) = start_cluster(args.nodes.max(1), dir.path(), &certs, &token).await?;
    let coord = &coords[leader];
    let quic: Vec<String> = coords.iter().map(|c| c.quic_addr.to_string()).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for i in 0..args.workers {
        let wcfg = swarm_worker::WorkerConfig {
            agents_file: Some(agents.clone()),
            ..worker_config(&quic, &certs, i, args.slots)
        };
        spawn_worker(wcfg, stop_rx.clone());
    }
    let api = format!("http://{}", coord.api_addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(8))
        .build()?;
    // The watchers' own client, so they hold no connection the load would use.
    let sse = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    wait_for_workers(&http, &api, &token, args.workers as usize).await?;
    let run = ThroughputRun {
        tasks: args.tasks,
        concurrency: args.concurrency,
        batch: 1,
        swarm: "default",
        keys: 0,
    };
    let throughput = |r: ThroughputRun| {
        let (http, api, token) = (http.clone(), api.clone(), token.clone());
        async move {
            let (elapsed, n) = tokio::time::timeout(bound, run_throughput(&http, &api, &token, &r))
                .await
                .context("throughput run timed out")??;
            anyhow::Ok(n as f64 / elapsed.as_secs_f64())
        }
    };
    // Warm up connections and code paths.
    throughput(ThroughputRun { tasks: 500, ..run }).await?;

    // Start the ticker and wait until it runs.
    let v: serde_json::Value = http
        .post(format!("{api}/v1/tasks"))
        .bearer_auth(&token)
        .json(
            &serde_json::json!({"agent": "ticker", "swarm": "default", "payload": "",
                                  "timeout_ms": TICKER_TIMEOUT_MS, "max_attempts": 1}),
        )
        .send()
        .await?
        .json()
        .await?;
    let ticker = v["id"]
        .as_u64()
        .with_context(|| format!("submitting the ticker: {v}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let ticker_worker = loop {
        let v: serde_json::Value = http
            .get(format!("{api}/v1/tasks/{ticker}"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        match v["state"].as_str() {
            Some("running") => {
                break v["attempts"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|a| a["worker"].as_str())
                    .unwrap_or("?")
                    .to_string()
            }
            Some("queued") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            _ => bail!("the ticker is not running: {v}"),
        }
    };
    let events = format!("{api}/v1/tasks/{ticker}/events");

    println!(
        "# swarm live output benchmark ({} coordinator(s) in one Raft cluster, {} workers x {} slots, loopback, fsync'd Raft log, {} CPUs)",
        args.nodes.max(1),
        args.workers,
        args.slots,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("# command: {}", argv.join(" "));
    println!("# reproduce: {}", args.command());
    println!("# load average (1/5/15 min) at start: {load_start}");
    println!(
        "# ticker: task {ticker} on {ticker_worker}, `sh -c` printing `tick <i> <date +%s%N>` to stderr every {} ms, running throughout; watchers: {} SSE streams of GET /v1/tasks/{ticker}/events",
        args.tick_ms, args.watchers
    );

    // Idle: the watchers, no load.
    let w = Watchers::attach(args.watchers, &sse, &events, &token, bound).await?;
    let (t0, start) = (now_ns(), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (t1, secs) = (now_ns(), start.elapsed().as_secs_f64());
    let idle = Latency::of(&w.detach(t1, bound).await?, t0, t1);
    println!(
        "idle ({secs:.1} s, {} watchers, no load): ticker printed {:.0} lines/s; latency print -> SSE arrival: {}",
        args.watchers,
        idle.printed as f64 / secs,
        idle.describe(args.watchers)
    );

    // Throughput, alternating no watcher / watchers.
    let (mut bare, mut watched, mut loaded) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=args.runs {
        let rate = throughput(run).await?;
        bare.push(rate);
        println!(
            "run {r}/{}, 0 watchers: {} tasks (concurrency {}) submitted then awaited = {rate:.0} tasks/s",
            args.runs, args.tasks, args.concurrency
        );
        let w = Watchers::attach(args.watchers, &sse, &events, &token, bound).await?;
        let (t0, start) = (now_ns(), Instant::now());
        let rate = throughput(run).await?;
        let (t1, secs) = (now_ns(), start.elapsed().as_secs_f64());
        let lat = Latency::of(&w.detach(t1, bound).await?, t0, t1);
        watched.push(rate);
        println!(
            "run {r}/{}, {} watchers: {} tasks (concurrency {}) submitted then awaited = {rate:.0} tasks/s; ticker printed {:.0} lines/s; latency: {}",
            args.runs,
            args.watchers,
            args.tasks,
            args.concurrency,
            lat.printed as f64 / secs,
            lat.describe(args.watchers)
        );
        loaded.push(lat);
    }
    let loaded = Latency::merge(loaded);

    // The end of the ticker.
    let v: serde_json::Value = http
        .post(format!("{api}/v1/tasks/{ticker}/cancel"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let v: serde_json::Value = if v["state"].as_str() == Some("cancelled") {
        v
    } else {
        http.get(format!("{api}/v1/tasks/{ticker}?wait=10s"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?
    };
    let ticker_end = v["state"].as_str().unwrap_or("?").to_string();
    let load_end = loadavg();

    println!();
    let (m0, m1) = (median(&bare), median(&watched));
    println!(
        "throughput, 0 watchers: median {m0:.0} tasks/s (runs: {})",
        list(&bare)
    );
    println!(
        "throughput, {} watchers: median {m1:.0} tasks/s (runs: {}) = {:+.1}% against 0 watchers",
        args.watchers,
        list(&watched),
        (m1 / m0 - 1.0) * 100.0
    );
    println!(
        "live latency under load (lines printed during the {} watched runs): {}",
        args.runs,
        loaded.describe(args.watchers)
    );
    println!(
        "live latency idle ({} s, no load): {}",
        args.idle_secs,
        idle.describe(args.watchers)
    );
    println!("ticker after its cancel: {ticker_end}");
    println!("load average (1/5/15 min): start {load_start}, end {load_end}");

    let _ = stop_tx.send(true);
    for c in coords {
        if tokio::time::timeout(Duration::from_secs(30), c.shutdown())
            .await
            .is_err()
        {
            eprintln!("a coordinator did not shut down within 30 s");
        }
    }
    Ok(())
}
