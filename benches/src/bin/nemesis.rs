//! A nemesis on real processes: a three-coordinator swarm cluster and its workers on
//! loopback, a steady client load, and one fault at a time — SIGKILL of a coordinator
//! (the leader more often than not), SIGSTOP of the leader past its election timeout,
//! SIGKILL and SIGSTOP of a worker, and an iptables partition of one coordinator from the
//! other two — each healed before the next. Afterwards it waits for every acknowledged
//! task to be final and checks, over the API and against a journal the agents write:
//!
//! * durability: every acknowledged task exists and is final (and stays as first read);
//! * idempotency: one task per idempotency key, whatever node acknowledged it, and no
//!   task nobody submitted;
//! * results: a succeeded task's output is its payload, from one succeeded attempt that
//!   its worker really ran;
//! * no execution (`SWARM_EXECUTION_ID`, else `<task>.<attempt>`) ran on two workers at
//!   once; the same task under different executions at once (at-least-once after a lost
//!   lease or a failover) is counted, not a violation;
//! * no phantom attempts: an attempt recorded on a worker that never started it may not
//!   stay running longer than the lease plus 5 s;
//! * and it measures failover: from each fault that hit the leader to the next agent
//!   start.
//!
//! It is bounded in time (duration + at most 7 minutes), touches only loopback, and
//! kills every process it started (SIGKILL), removes its iptables chain and its temp dir
//! however it ends (error, panic, Ctrl-C / SIGTERM).
//!
//! `cargo build -p swarm-cli -p swarm-benches --bin nemesis &&
//!  target/debug/nemesis --swarm target/debug/swarm --out nemesis.json` (as root for the
//! partitions; without iptables permission they are skipped and the report says so).
//! Exit status: 0 when every check holds and every acknowledged task is final, 1 otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};

use swarm_benches::nemesis::audit::{self, Audit};
use swarm_benches::nemesis::cluster::{log_tails, Guard, Layout, Supervisor, LEASE_MS};
use swarm_benches::nemesis::faults::{FaultKind, Nemesis};
use swarm_benches::nemesis::firewall::{Firewall, CHAIN};
use swarm_benches::nemesis::load::{self, Api, Load, Outcome};
use swarm_benches::nemesis::now_ns;

#[derive(Parser, Debug)]
#[command(about = "Fault injection on a real swarm cluster (3 coordinators, workers) on loopback")]
struct Args {
    /// The `swarm` binary.
    #[arg(long)]
    swarm: PathBuf,
    /// How long the load and the faults last.
    #[arg(long, default_value_t = 150)]
    duration_secs: u64,
    /// Seed of the fault schedule and the load (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Workers (2-4 slots each).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Write the report here as JSON (and every submit's history beside it, as
    /// `<stem>.history.jsonl`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scratch dir for data, logs and the journal (kept afterwards). Default: a temp dir,
    /// deleted at the end.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// No iptables partitions.
    #[arg(long)]
    no_partitions: bool,
}

/// Client tasks submitting at once.
const CLIENTS: usize = 3;
/// How long to wait, after the run, for every acknowledged task to be final.
const FINAL_WAIT: Duration = Duration::from_secs(120);
/// How long a submit still being retried when the run ends may take to be acknowledged.
const SUBMIT_GRACE: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let args = Args::parse();
    if args.workers == 0 {
        eprintln!("nemesis: --workers must be at least 1");
        return ExitCode::from(2);
    }
    let seed = args
        .seed
        .unwrap_or_else(|| now_ns() ^ (u64::from(std::process::id()) << 32));
    println!("nemesis: seed {seed} (replay the fault schedule with --seed {seed})");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nemesis: tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let bound = Duration::from_secs(args.duration_secs)
        + FINAL_WAIT
        + SUBMIT_GRACE
        + Duration::from_secs(280);
    let code = rt.block_on(async {
        // The run owns its cleanup guard: when a signal or the time bound wins here, the
        // run is dropped, and with it the guard (processes, firewall, temp dir).
        tokio::select! {
            r = tokio::time::timeout(bound, run(&args, seed)) => match r {
                Ok(Ok(code)) => code,
                Ok(Err(e)) => {
                    eprintln!("nemesis: {e:#}");
                    1
                }
                Err(_) => {
                    eprintln!("nemesis: the run took longer than its bound ({} s): stopped", bound.as_secs());
                    1
                }
            },
            sig = signals() => {
                eprintln!("nemesis: {sig}: stopping; killing every process and removing the firewall chain");
                130
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    ExitCode::from(code)
}

/// The first of SIGINT, SIGTERM, SIGHUP.
async fn signals() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// Sets up the scratch dir, the guard and the firewall, then [`drive`]s the run; on an
/// error prints every process's log tail before the guard cleans up.
async fn run(args: &Args, seed: u64) -> anyhow::Result<u8> {
    let (dir, temp) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("swarm-nemesis-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir)?;
    let sup = Arc::new(Supervisor::new(&dir));
    let mut guard = Guard {
        sup: sup.clone(),
        firewall: None,
        temp,
    };
    // Agents orphaned by a SIGKILLed worker become our children: reaped, and killed at
    // the end.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("nemesis: cannot become a child subreaper ({e}): agents orphaned by killed workers are left to finish by themselves");
    }
    let iptables: Result<Arc<Firewall>, String> = if args.no_partitions {
        Err("not used (--no-partitions)".into())
    } else {
        Firewall::setup(sup.clone()).map(Arc::new)
    };
    match &iptables {
        Ok(fw) => {
            guard.firewall = Some(fw.clone());
            println!("nemesis: iptables available (chain {CHAIN}, jumped to from INPUT)");
        }
        Err(e) => println!("nemesis: iptables unavailable, no partitions: {e}"),
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let layout = Layout::create(&sup, &args.swarm, &dir, args.workers, &mut rng)?;
    println!(
        "nemesis: scratch dir {}{}",
        layout.dir.display(),
        if args.dir.is_some() {
            " (kept)"
        } else {
            " (deleted at the end)"
        }
    );
    let result = drive(args, seed, rng, &layout, sup.clone(), iptables).await;
    if let Err(e) = &result {
        eprintln!(
            "nemesis: the run failed: {e:#}\n{}",
            log_tails(&layout, &sup, 40)
        );
    }
    drop(guard);
    result
}

async fn drive(
    args: &Args,
    seed: u64,
    rng: StdRng,
    layout: &Layout,
    sup: Arc<Supervisor>,
    iptables: Result<Arc<Firewall>, String>,
) -> anyhow::Result<u8> {
    let api = Api::new(
        layout.nodes.iter().map(|n| n.api_url()).collect(),
        layout.token.clone(),
    )?;
    let mut nem = Nemesis {
        layout: layout.clone(),
        sup: sup.clone(),
        firewall: iptables.as_ref().ok().cloned(),
        api: api.clone(),
        rng,
        t0_ns: 0,
        faults: Vec::new(),
        exits: Vec::new(),
        problems: Vec::new(),
    };

    // --- The cluster.
    for n in &layout.nodes {
        sup.spawn(&n.name(), layout.coordinator_command(n.id))?;
    }
    let (Some((leader, _)), _) = nem.wait_agreed_leader(Duration::from_secs(60)).await else {
        bail!("the coordinators did not agree on a leader within 60 s");
    };
    for w in &layout.workers {
        sup.spawn(&w.name, layout.worker_command(&w.name)?)?;
    }
    if !nem.wait_workers(Duration::from_secs(60)).await {
        bail!("the workers did not all connect within 60 s");
    }
    let slots: Vec<String> = layout
        .workers
        .iter()
        .map(|w| format!("{} ({} slots)", w.name, w.slots))
        .collect();
    println!(
        "nemesis: cluster up: leader node-{leader}; workers {}; lease {LEASE_MS} ms",
        slots.join(", ")
    );

    // Reap agents orphaned by killed workers as they exit.
    let reaper = {
        let sup = sup.clone();
        tokio::spawn(async move {
            loop {
                sup.reap_orphans(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // --- Load and faults.
    let t0 = Instant::now();
    let t0_ns = now_ns();
    nem.t0_ns = t0_ns;
    let until = t0 + Duration::from_secs(args.duration_secs);
    let load = Arc::new(Load::default());
    let watcher = tokio::spawn(load::watch_queue(api.clone(), load.clone(), seed));
    let submitters: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(load::submitter(api.clone(), load.clone(), c, seed)))
        .collect();
    // Some load before the first fault.
    tokio::time::sleep(Duration::from_secs(args.duration_secs.min(50) / 10)).await;
    nem.run(until).await;
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;

    // --- Heal, stop submitting, let everything finish.
    nem.heal_all();
    load.stop_new();
    let (agreed, _) = nem.wait_agreed_leader(Duration::from_secs(30)).await;
    let workers_back = nem.wait_workers(Duration::from_secs(30)).await;
    let grace_end = Instant::now() + SUBMIT_GRACE;
    while Instant::now() < grace_end && submitters.iter().any(|s| !s.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.give_up();
    for s in submitters {
        let _ = s.await;
    }
    let _ = watcher.await;
    let records = load.records();
    let acked: BTreeSet<u64> = records.iter().filter_map(|r| r.acked_id()).collect();
    println!(
        "nemesis: load stopped after {:.0} s: {} submits, {} acknowledged; waiting for them to be final",
        t0.elapsed().as_secs_f64(),
        records.len(),
        acked.len()
    );
    let (first_finals, _) = audit::wait_final(&api, &acked, FINAL_WAIT).await;
    nem.restart_exited();

    // --- Audit.
    let mut audit_errors = Vec::new();
    let listed = match audit::list_all(&api).await {
        Ok(l) => l,
        Err(e) => {
            audit_errors.push(format!("listing every task: {e}"));
            Vec::new()
        }
    };
    let ids: Vec<u64> = acked.iter().copied().collect();
    let reads = audit::read_tasks(&api, &ids).await;
    // Agents still running (e.g. orphans of a killed worker) have a moment to finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (journal, malformed) = match audit::read_journal(&layout.journal) {
        Ok(j) => j,
        Err(e) => {
            audit_errors.push(format!(
                "reading the journal {}: {e}",
                layout.journal.display()
            ));
            (Vec::new(), Vec::new())
        }
    };
    reaper.abort();
    let mut a = audit::check(&audit::Inputs {
        records: &records,
        first_finals: &first_finals,
        reads: &reads,
        listed: &listed,
        journal: &journal,
        malformed_lines: malformed.len(),
        faults: &nem.faults,
        lease_ms: LEASE_MS,
    });
    for e in &nem.exits {
        a.violations.push(audit::Violation {
            kind: "process_exit",
            detail: format!(
                "{} exited by itself at {} ms ({}); see {}",
                e.name,
                e.at_ms,
                e.status,
                sup.log_path(&e.name).display()
            ),
        });
    }
    if !malformed.is_empty() {
        audit_errors.push(format!(
            "{} journal lines do not parse, e.g. {:?}",
            malformed.len(),
            malformed.iter().take(3).collect::<Vec<_>>()
        ));
    }
    if agreed.is_none() {
        audit_errors.push("no agreed leader within 30 s of the final heal".into());
    }
    if !workers_back {
        audit_errors.push("not every worker connected within 30 s of the final heal".into());
    }

    // --- Report.
    let report = Report {
        args,
        seed,
        t0_ns,
        elapsed: t0.elapsed(),
        layout,
        iptables: &iptables,
        records: &records,
        nem: &nem,
        audit: &a,
        audit_errors: &audit_errors,
    };
    let failed = !a.violations.is_empty() || !a.not_final.is_empty() || !audit_errors.is_empty();
    report.print();
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let j = report.json(failed);
        std::fs::write(out, serde_json::to_string_pretty(&j)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        let hist = history_path(out);
        let mut lines = String::new();
        for r in &records {
            lines.push_str(&r.to_json().to_string());
            lines.push('\n');
        }
        std::fs::write(&hist, lines).with_context(|| format!("writing {}", hist.display()))?;
        println!(
            "nemesis: report written to {} (submit history: {})",
            out.display(),
            hist.display()
        );
    }
    if failed {
        println!("\n{}", log_tails(layout, &sup, 40));
        println!("nemesis: FAILED (seed {seed})");
        Ok(1)
    } else {
        println!("nemesis: passed (seed {seed})");
        Ok(0)
    }
}

fn history_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map_or_else(
        || "nemesis".to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    out.with_file_name(format!("{stem}.history.jsonl"))
}

struct Report<'a> {
    args: &'a Args,
    seed: u64,
    t0_ns: u64,
    elapsed: Duration,
    layout: &'a Layout,
    iptables: &'a Result<Arc<Firewall>, String>,
    records: &'a [load::SubmitRecord],
    nem: &'a Nemesis,
    audit: &'a Audit,
    audit_errors: &'a [String],
}

impl Report<'_> {
    fn submits(&self) -> (usize, usize, usize, u64) {
        let mut acked = 0;
        let mut refused = 0;
        let mut unknown = 0;
        let mut retries = 0;
        for r in self.records {
            match r.outcome {
                Outcome::Acked { .. } => acked += 1,
                Outcome::Refused { .. } => refused += 1,
                Outcome::Unknown => unknown += 1,
            }
            retries += u64::from(r.tries.saturating_sub(1));
        }
        (acked, refused, unknown, retries)
    }

    fn faults_by_kind(&self) -> BTreeMap<&'static str, (usize, usize)> {
        let mut m: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
        for k in FaultKind::ALL {
            m.insert(k.as_str(), (0, 0));
        }
        for f in &self.nem.faults {
            let e = m.entry(f.kind.as_str()).or_default();
            e.0 += 1;
            if f.hit_leader {
                e.1 += 1;
            }
        }
        m
    }

    /// Failover summaries, overall and per fault kind: `which` picks the measure.
    fn failover(
        &self,
        which: fn(&audit::Failover) -> Option<u64>,
    ) -> (Value, BTreeMap<&'static str, Value>) {
        let fo = &self.audit.failover;
        let all: Vec<u64> = fo.iter().filter_map(which).collect();
        let mut by_kind = BTreeMap::new();
        for k in [
            FaultKind::KillCoordinator,
            FaultKind::StopLeader,
            FaultKind::Partition,
        ] {
            let ms: Vec<u64> = fo
                .iter()
                .filter(|f| f.kind == k)
                .filter_map(which)
                .collect();
            let mut s = audit::summary(&ms);
            s["unmeasured"] = json!(fo
                .iter()
                .filter(|f| f.kind == k && which(f).is_none())
                .count());
            by_kind.insert(k.as_str(), s);
        }
        let mut all = audit::summary(&all);
        all["unmeasured"] = json!(fo.iter().filter(|f| which(f).is_none()).count());
        (all, by_kind)
    }

    fn iptables_text(&self) -> String {
        match self.iptables {
            Ok(_) => "available".into(),
            Err(e) => format!("unavailable: {e}"),
        }
    }

    fn exec_id_source(&self) -> &'static str {
        match (self.audit.exec_ids_from_env, self.audit.exec_ids_fallback) {
            (0, 0) => "none",
            (_, 0) => "SWARM_EXECUTION_ID",
            (0, _) => "fallback <task>.<attempt> (SWARM_EXECUTION_ID unset)",
            _ => "mixed",
        }
    }

    fn print(&self) {
        let a = self.audit;
        let (acked, refused, unknown, retries) = self.submits();
        println!("\n===== nemesis report =====");
        println!(
            "seed {}  duration {} s (ran {:.0} s)  swarm {}",
            self.seed,
            self.args.duration_secs,
            self.elapsed.as_secs_f64(),
            self.layout.swarm_original.display()
        );
        println!(
            "cluster: 3 coordinators, workers {}, lease {LEASE_MS} ms",
            self.layout
                .workers
                .iter()
                .map(|w| format!("{}x{}", w.name, w.slots))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("iptables: {}", self.iptables_text());
        println!(
            "submits: {} (acked {acked}, refused {refused}, unknown {unknown}); {retries} retries; {} idempotency probes; {} unacknowledged submits created a task",
            self.records.len(),
            a.repeat_submits,
            a.unacked_with_task
        );
        let states: Vec<String> = a.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
        println!(
            "tasks: {} held by the cluster: {}",
            a.tasks_listed,
            states.join(", ")
        );
        println!(
            "executions: {} started, {} ended; {} execution ids ({}), {} started more than once",
            a.executions_started,
            a.executions_ended,
            a.exec_ids,
            self.exec_id_source(),
            a.exec_ids_started_more_than_once
        );
        println!(
            "  locks: {} starts found their execution's lock held, {} their task's{}",
            a.busy_exec_lines,
            a.busy_task_lines,
            if a.executions_without_flock > 0 {
                format!(
                    "; {} executions had no flock (judged by their lines alone)",
                    a.executions_without_flock
                )
            } else {
                String::new()
            }
        );
        for r in a.repeated_execs.iter().take(10) {
            println!("  {r}");
        }
        let faults: Vec<String> = self
            .faults_by_kind()
            .iter()
            .map(|(k, (n, l))| format!("{k} {n} ({l} on the leader)"))
            .collect();
        println!("faults: {}: {}", self.nem.faults.len(), faults.join(", "));
        let fmt = |v: &Value| {
            let unmeasured = v["unmeasured"].as_u64().unwrap_or(0);
            let measured = if v["n"].as_u64().unwrap_or(0) == 0 {
                "none".to_string()
            } else {
                format!("n {} p50 {} ms max {} ms", v["n"], v["p50_ms"], v["max_ms"])
            };
            if unmeasured > 0 {
                format!("{measured} ({unmeasured} without a later start)")
            } else {
                measured
            }
        };
        let (all, by_kind) = self.failover(|f| f.next_dispatch_ms);
        println!(
            "failover (fault on the leader -> first agent start dispatched in a later term{}): {}",
            if self.audit.exec_ids_fallback == 0 {
                ""
            } else {
                ", i.e. after a leader of a later term was seen"
            },
            fmt(&all)
        );
        for (k, v) in &by_kind {
            println!("  {k}: {}", fmt(v));
        }
        let (all, by_kind) = self.failover(|f| f.first_start_ms);
        println!(
            "  (fault on the leader -> first agent start of any kind: {})",
            fmt(&all)
        );
        for (k, v) in &by_kind {
            println!("    {k}: {}", fmt(v));
        }
        let old_term: usize = self
            .audit
            .failover
            .iter()
            .filter_map(|f| f.old_term_starts)
            .sum();
        if self.audit.exec_ids_fallback == 0 {
            println!("  ({old_term} agents started on executions of the old leader's term while a fault on it held)");
        }
        let certain = a.overlaps.iter().filter(|o| o.certain).count();
        println!(
            "at-least-once overlaps (one task, different executions, two workers at once; not violations): {} on {} tasks ({certain} certain, {} possible)",
            a.overlaps.len(),
            a.overlaps.iter().map(|o| o.task).collect::<BTreeSet<_>>().len(),
            a.overlaps.len() - certain
        );
        for o in a.overlaps.iter().take(5) {
            println!(
                "  task {}: {} and {} ({:.0} ms later){}",
                o.task,
                o.a,
                o.b,
                o.starts_apart_ms,
                if o.certain { "" } else { ", possibly" }
            );
        }
        for p in &self.nem.problems {
            println!("nemesis problem: {p}");
        }
        for e in self.audit_errors {
            println!("audit incomplete: {e}");
        }
        if a.not_final.is_empty() {
            println!("recovered: every acknowledged task is final");
        } else {
            println!(
                "NOT RECOVERED: {} acknowledged tasks not final:",
                a.not_final.len()
            );
            for n in a.not_final.iter().take(20) {
                println!("  {n}");
            }
        }
        if a.violations.is_empty() {
            println!("violations: none");
        } else {
            println!("VIOLATIONS: {}", a.violations.len());
            for v in a.violations.iter().take(50) {
                println!("  [{}] {}", v.kind, v.detail);
            }
        }
    }

    fn json(&self, failed: bool) -> Value {
        let a = self.audit;
        let (acked, refused, unknown, retries) = self.submits();
        let (all, by_kind) = self.failover(|f| f.next_dispatch_ms);
        let (first_all, first_by_kind) = self.failover(|f| f.first_start_ms);
        let faults_by_kind: BTreeMap<&str, Value> = self
            .faults_by_kind()
            .into_iter()
            .map(|(k, (n, l))| (k, json!({"count": n, "on_leader": l})))
            .collect();
        json!({
            "seed": self.seed,
            "duration_secs": self.args.duration_secs,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "load_began_unix_ns": self.t0_ns,
            "swarm": self.layout.swarm_original,
            "lease_ms": LEASE_MS,
            "workers": self.layout.workers.iter().map(|w| json!({"name": w.name, "slots": w.slots})).collect::<Vec<_>>(),
            "submits": {
                "total": self.records.len(),
                "acked": acked,
                "refused": refused,
                "unknown": unknown,
                "retries": retries,
                "idempotency_probes": a.repeat_submits,
                "unacked_that_created_a_task": a.unacked_with_task,
            },
            "tasks": {
                "held_by_cluster": a.tasks_listed,
                "by_state": a.by_state,
            },
            "executions": {
                "started": a.executions_started,
                "ended": a.executions_ended,
                "unmatched_lines": a.unmatched_ends,
                "without_flock": a.executions_without_flock,
                "found_execution_lock_held": a.busy_exec_lines,
                "found_task_lock_held": a.busy_task_lines,
                "malformed_journal_lines": a.malformed_lines,
                "execution_ids": a.exec_ids,
                "execution_id_source": self.exec_id_source(),
                "execution_ids_started_more_than_once": a.exec_ids_started_more_than_once,
                "started_more_than_once": a.repeated_execs,
            },
            "faults": {
                "total": self.nem.faults.len(),
                "by_kind": faults_by_kind,
                "list": self.nem.faults.iter().map(|f| f.to_json(self.t0_ns)).collect::<Vec<_>>(),
            },
            "iptables": {
                "available": self.iptables.is_ok(),
                "detail": self.iptables_text(),
            },
            "violations": a.violations.iter().map(|v| json!({"kind": v.kind, "detail": v.detail})).collect::<Vec<_>>(),
            "not_final": a.not_final,
            "recovered": a.not_final.is_empty(),
            "audit_errors": self.audit_errors,
            "nemesis_problems": self.nem.problems,
            "at_least_once_overlaps": {
                "count": a.overlaps.len(),
                "certain": a.overlaps.iter().filter(|o| o.certain).count(),
                "tasks": a.overlaps.iter().map(|o| o.task).collect::<BTreeSet<_>>().len(),
                "examples": a.overlaps.iter().take(20).map(|o| json!({"task": o.task, "first": o.a, "second": o.b, "second_started_ms_later": o.starts_apart_ms, "certain": o.certain})).collect::<Vec<_>>(),
            },
            "failover": {
                "measure": "ms from a fault on the leader to the first agent start of an execution dispatched by a leader of a later term (by the execution id's term; without one, the first start after such a leader was seen)",
                "all": all,
                "by_kind": by_kind,
                "first_start_of_any_kind": {"all": first_all, "by_kind": first_by_kind},
                "per_fault": a.failover.iter().map(|f| json!({"kind": f.kind.as_str(), "next_dispatch_ms": f.next_dispatch_ms, "first_start_ms": f.first_start_ms, "old_term_starts_during_fault": f.old_term_starts})).collect::<Vec<_>>(),
            },
            "process_exits": self.nem.exits.iter().map(|e| json!({"name": e.name, "status": e.status, "at_ms": e.at_ms})).collect::<Vec<_>>(),
            "passed": !failed,
        })
    }
}
