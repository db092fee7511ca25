//! Seeded simulations of a 3-coordinator cluster with workers and clients under faults,
//! snapshots on, and membership changes (a node replaced by a new one, a node wiped and
//! added back) while the faults run; two schedules submit a task a tick throughout, and
//! each run's summary says how many of their ticks the checker held to exactly one task.
//!
//! * by default `seeded_faults` runs the seeds of [`SEEDS`], chosen from the runs' fault
//!   logs to cover crashes, partitions, snapshot installs and membership changes, the
//!   seeds of [`RANGE`] (64 fixed seeds in all), plus one seed drawn from the clock
//!   (printed with the command that replays it);
//! * `SWARM_SIM_SEEDS=n` runs `n` seeds starting at `SWARM_SIM_SEED_BASE` (default: drawn
//!   from the clock, printed) instead;
//! * `SWARM_SIM_SEED=s` runs only seed `s` (a replay) and prints its fault log;
//! * `SWARM_SIM_SNAPSHOT_EVERY=n` makes coordinators snapshot every `n` entries instead of
//!   every [`scenario::SNAPSHOT_EVERY`];
//! * `SWARM_SIM_WORKER_CLOCK_SKEW_MS=ms` runs the workers' clocks that far ahead of the
//!   coordinators' (negative: behind);
//! * `SWARM_SIM_LOG=<filter>` turns on tracing (e.g. `info`, `swarm_coordinator=debug`),
//!   stamped with simulated time;
//! * `SWARM_SIM_DUMP=<dir>` writes each seed's log and history to `<dir>/<seed>.txt`.
//!
//! Every seed runs in a process of its own (this test binary, re-run on one seed): a
//! process carries state across runs that tokio does not let a simulation reset (task
//! ids, which decide the order tasks are dropped in when a host crashes), so a seed is
//! replayed exactly only in a fresh process, and that is how the batch runs it too.
//! `tokio::select!` picks among ready branches at random; only with tokio built with
//! `--cfg tokio_unstable` can turmoil seed that, so only then is an exact replay
//! guaranteed. The workspace builds with it (`.cargo/config.toml`); a `RUSTFLAGS` in the
//! environment replaces that setting. With it, a task that panics inside a simulated
//! host also fails the run (turmoil shuts that host's runtime down) instead of vanishing.
//! A failure names the seed and the command that replays it.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use swarm_sim::faults::{Episode, Fault, Target};
use swarm_sim::scenario::{self, Options, Report};

/// The seeds `seeded_faults` runs by default, with what each one's run does, read from
/// its fault log when the list was made (`SWARM_SIM_SEED=s` prints the log; a change to
/// the coordinator or the schedule may shift what a seed does).
const SEEDS: &[(u64, &str)] = &[
    // No membership change: snapshot installs after crashes and partitions.
    (1005, "a follower cut off from everyone, then from its peers, installs three snapshots in a row (the leader compacts while it catches up); the leader crashes and installs three more on restart, under message loss"),
    (1025, "one-way partition c3 -> c1 and message loss: c3 installs; the leader crashes while its link to c2 is held, and installs on restart"),
    // A node replaced by a brand-new one (new id, new host, empty).
    (1004, "a follower isolated from its peers installs; the leader n2 is replaced by n4 under a one-way partition and isolations, n4 and a lagging c3 install the same snapshot"),
    (1010, "the leader cut off from its peers, then the next leader crashes; n1 is replaced while it is down; the crashed leader installs two snapshots after the heal"),
    (1014, "the crashed leader installs on restart; the leader n2 is replaced under a one-way partition; the new leader n4 is isolated from everyone just before the heal"),
    (1039, "a crashed follower installs three snapshots in a row while the leader n1 is replaced; the new leader n4 has its link to c3 held, c3 crashes and installs after the heal"),
    // A node wiped and added back as a new member (same host, new id).
    (1018, "the leader n1 is wiped and added back under one-way drops, an isolation and 400 ms latency; it takes ten seconds and ends after the heal"),
    (1019, "a crashed follower installs; the leader crashes; n2 is wiped and added back while links are held and c3 isolated, completing after the heal"),
    (1036, "the leader n1 is wiped and added back while two other coordinators crash in turn (no quorum for a while); n4 installs twice"),
    // Both kinds of membership change in one run.
    (1001, "a crashed follower installs; the leader n1 is replaced by n4, then n4 (leading) is wiped and added back as n5 under 400 ms latency and an isolated leader"),
    (1013, "n2 is wiped and added back as n4; then n4 (added in this run) is replaced by n5 on c4 under a one-way partition"),
    (1017, "n2 replaced by n4, which installs two snapshots in a row; c3 crashes; the leader n1 is wiped and added back as n5; n3 and n5 install the same snapshot"),
    (1021, "one-way drop and held link between leader and c3, which installs twice; n2 wiped and added back while the leader is cut off; n1 replaced by n5, which crashes before the heal and installs again"),
    (1022, "n3 wiped and added back over nine seconds of leader isolations and message loss; the leader n1 replaced across the heal"),
    (1023, "n3 replaced under 400 ms latency (five seconds); the leader n1 wiped and added back while the new leader n4 crashes and messages are lost"),
    (1031, "the leader crashes and is isolated; the new leader n2 is replaced by n4, which leads and crashes; n3 wiped and added back while n4 is cut off from its peers"),
    (1032, "the leader n1 wiped and added back under 400 ms latency; the leader n3 replaced while n4 still catches up: both install snapshot after snapshot"),
    (1033, "the leader crashes; the leader n3 replaced by n4, which crashes at once; n2 wiped and added back while c1 is isolated and held; c1 installs after the heal"),
    (1035, "n2 replaced by n4; n4 crashes while leading, then is itself wiped and added back as n5 across the heal"),
    // Regressions: a write left unanswered by openraft 0.9 after a snapshot covered it
    // wedged the proposer of the node that took it, so that node, leading again, committed
    // nothing (the proposer now gives a write up when leadership changes).
    (1012, "c3 leads term 2, is cut off with uncommitted entries up to 130, installs snapshot 4-146 and later leads again"),
    (1038, "c1 restarts believing it leads term 1 for 12 ms, proposes, installs snapshot 2-47, and leads from 19 s"),
];

/// The seed `a_seed_replays_exactly` runs twice unless `SWARM_SIM_REPLAY_SEED` says
/// otherwise.
const REPLAY_SEED: u64 = 1021;

/// Whether this build is guaranteed to replay seeds exactly: tokio's `select!` draws from
/// a per-runtime random generator that only `--cfg tokio_unstable` lets turmoil seed.
const EXACT: bool = cfg!(tokio_unstable);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn env_i64(name: &str) -> Option<i64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The default run, with `SWARM_SIM_SNAPSHOT_EVERY` and `SWARM_SIM_WORKER_CLOCK_SKEW_MS`
/// applied.
fn options() -> Options {
    let mut opts = Options::default();
    if let Some(n) = env_u64("SWARM_SIM_SNAPSHOT_EVERY") {
        opts.snapshot_every = n;
    }
    if let Some(ms) = env_i64("SWARM_SIM_WORKER_CLOCK_SKEW_MS") {
        opts.worker_clock_skew_ms = ms;
    }
    opts
}

/// Tracing with simulated timestamps, when `SWARM_SIM_LOG` asks for it.
fn init_tracing() {
    struct SimTime;
    impl tracing_subscriber::fmt::time::FormatTime for SimTime {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            match turmoil::sim_elapsed() {
                Some(t) => write!(w, "{:>9.3}s", t.as_secs_f64()),
                None => write!(w, "      -   "),
            }
        }
    }
    if let Ok(filter) = std::env::var("SWARM_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(SimTime)
            .with_test_writer()
            .try_init();
    }
}

fn replay_command(seed: u64) -> String {
    let snapshots = env_u64("SWARM_SIM_SNAPSHOT_EVERY")
        .map(|n| format!("SWARM_SIM_SNAPSHOT_EVERY={n} "))
        .unwrap_or_default()
        + &env_i64("SWARM_SIM_WORKER_CLOCK_SKEW_MS")
            .map(|n| format!("SWARM_SIM_WORKER_CLOCK_SKEW_MS={n} "))
            .unwrap_or_default();
    format!(
        "SWARM_SIM_SEED={seed} {snapshots}cargo test -p swarm-sim --test simulation -- --exact seeded_faults --nocapture{}",
        if EXACT {
            ""
        } else {
            "\n  (built without --cfg tokio_unstable, which .cargo/config.toml sets unless \
             RUSTFLAGS overrides it: the replay is not guaranteed to interleave exactly as \
             this run did)"
        }
    )
}

/// Run one seed in this process; `Err` with a full explanation when it fails.
fn run_checked(seed: u64, opts: &Options) -> Result<Report, String> {
    let report = scenario::run(seed, opts).map_err(|e| {
        format!(
            "seed {seed}: the simulation broke: {e}\nreplay: {}",
            replay_command(seed)
        )
    })?;
    if let Ok(dir) = std::env::var("SWARM_SIM_DUMP") {
        let text = format!(
            "{}\n{}\n{:#?}\n",
            report.summary(),
            report.log.join("\n"),
            report.history
        );
        let path = std::path::Path::new(&dir).join(format!("{seed}.txt"));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
    if report.violations.is_empty() {
        return Ok(report);
    }
    let mut msg = format!("seed {seed}: {} violation(s):\n", report.violations.len());
    for v in report.violations.iter().take(20) {
        msg.push_str(&format!("  - {v}\n"));
    }
    msg.push_str(&format!(
        "{}\nfault and leadership log (last 60 lines):\n{}\nreplay: {}",
        report.summary(),
        scenario::tail(&report.log, 60),
        replay_command(seed)
    ));
    Err(msg)
}

/// What a child process running one seed said: its summary line (with the digest), or
/// why it failed.
fn run_in_child(seed: u64) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("seed {seed}: no test binary: {e}"))?;
    let out = Command::new(exe)
        .args([
            "--exact",
            "seeded_faults",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SWARM_SIM_SEED", seed.to_string())
        .env("SWARM_SIM_CHILD", "1")
        .output()
        .map_err(|e| format!("seed {seed}: cannot start the test binary: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with(&format!("seed {seed}: ")) && l.contains("digest"))
        .map(str::to_string);
    match (out.status.success(), summary) {
        (true, Some(s)) => Ok(s),
        _ => {
            // The child's panic message, or all it said.
            let msg = text
                .split_once("panicked at")
                .and_then(|(_, rest)| rest.split_once('\n'))
                .map(|(_, msg)| {
                    let end = ["\nnote: ", "\nstack backtrace:"]
                        .iter()
                        .filter_map(|m| msg.find(m))
                        .min()
                        .unwrap_or(msg.len());
                    msg[..end].to_string()
                })
                .unwrap_or(text);
            Err(msg)
        }
    }
}

fn digest_of(summary: &str) -> Option<&str> {
    summary.split("digest ").nth(1)?.split_whitespace().next()
}

#[test]
fn calm_cluster_serves_and_the_history_checks() {
    init_tracing();
    let opts = Options {
        faults: false,
        load: Duration::from_secs(8),
        ..Options::default()
    };
    let started = Instant::now();
    let report = run_checked(7, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} ({:.1?} wall)", report.summary(), started.elapsed());
    let acked = report
        .history
        .submits
        .iter()
        .filter(|s| matches!(s.result, swarm_sim::checker::SubmitResult::Acked { .. }))
        .count();
    assert!(
        acked > 20,
        "too few acknowledged submits: {}",
        report.summary()
    );
    // The workers' journals reached the checker: every task that succeeded ran.
    let started = report
        .history
        .executions
        .iter()
        .filter(|e| e.event == swarm_sim::checker::ExecEvent::Started)
        .count();
    let succeeded = match &report.history.audit {
        Some(swarm_sim::checker::Audit::Complete { tasks, .. }) => {
            tasks.iter().filter(|t| t.state == "succeeded").count()
        }
        _ => 0,
    };
    assert!(
        succeeded > 20 && started >= succeeded,
        "{started} executions journaled for {succeeded} succeeded tasks: {}",
        report.summary()
    );
    // The run set its limits, and limited tasks ran under them: the key and bucket
    // rules had attempts to check.
    let limits = report.limits();
    assert!(
        limits.keyed > 5 && limits.bucketed > 2,
        "too few limited attempts: {}",
        report.summary()
    );
    // Both schedules were created and ticked all along: the schedule rule had ticks to
    // check (the audit comes about 10 s after their creation: the 1 s schedule alone
    // ticks about ten times by then, the 2 s one half as often).
    let ticks = report.schedule_ticks();
    assert!(
        ticks.schedules == scenario::SCHEDULES.len() && ticks.ticks >= 12,
        "too few schedule ticks checked: {}",
        report.summary()
    );
    // Snapshots are on: every node checkpointed several times.
    assert_eq!(report.snapshots.len(), 3, "{}", report.summary());
    for (node, s) in &report.snapshots {
        assert!(
            s.built.len() >= 3,
            "n{node} built {} snapshots: {}",
            s.built.len(),
            report.summary()
        );
    }
}

/// A run designed to need snapshots: a follower down for five seconds, a node replaced by
/// a brand-new one, then a node wiped and added back, all while clients write. Each of
/// them catches up by installing a snapshot, sent in several chunks (the log is
/// compacted), and the replicas end identical (`run_checked` fails otherwise).
#[test]
fn crashed_new_and_wiped_nodes_catch_up_from_snapshots() {
    init_tracing();
    let at = Duration::from_millis;
    let opts = Options {
        faults: false,
        script: Some(vec![
            Episode {
                start: at(4_000),
                end: at(9_000),
                fault: Fault::CrashCoordinator(Target::Node(1)),
            },
            Episode {
                start: at(11_000),
                end: at(11_000),
                fault: Fault::Replace(Target::Node(2)),
            },
            Episode {
                start: at(14_000),
                end: at(14_000),
                fault: Fault::Rejoin(Target::Node(0)),
            },
        ]),
        ..Options::default()
    };
    let started = Instant::now();
    let report = run_checked(11, &opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{} ({:.1?} wall)", report.summary(), started.elapsed());
    let installed = |node: u64| report.snapshots.get(&node).map_or(0, |s| s.installed.len());
    // n2 was down while the leader compacted its log.
    assert!(
        installed(2) >= 1,
        "n2 installed nothing: {}",
        report.summary()
    );
    // n4 replaced n3 on the spare host c4; n5 is c1 wiped and added back.
    assert!(
        installed(4) >= 1,
        "n4 installed nothing: {}",
        report.summary()
    );
    assert!(
        installed(5) >= 1,
        "n5 installed nothing: {}",
        report.summary()
    );
    assert_eq!(report.history.membership.len(), 2, "{}", report.summary());
    match &report.history.replicas {
        Some(swarm_sim::checker::Replicas::Settled { voters, nodes, .. }) => {
            assert_eq!(voters, &vec![2, 4, 5], "{}", report.summary());
            // Snapshots of a few KiB in 1 KiB chunks: several InstallSnapshot RPCs each.
            assert!(
                nodes
                    .iter()
                    .all(|n| n.dump_bytes >= 4 * opts.snapshot_chunk),
                "{nodes:?}"
            );
        }
        other => panic!("replicas not compared: {other:?}"),
    }
}

/// Seeds run by default besides [`SEEDS`]: a fixed range, so the suite runs 64 fixed
/// seeds (42 of these took 183 s on 2 cores; all 65 about 290 s).
const RANGE: std::ops::Range<u64> = 3000..3042;

/// The seeds to run: `SWARM_SIM_SEEDS` from `SWARM_SIM_SEED_BASE`, or [`SEEDS`], the
/// seeds of [`RANGE`] and one drawn from the clock.
fn seeds() -> Vec<u64> {
    let clock = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .wrapping_mul(1000)
    };
    match env_u64("SWARM_SIM_SEEDS") {
        Some(count) => {
            let base = env_u64("SWARM_SIM_SEED_BASE").unwrap_or_else(clock);
            eprintln!(
                "running {count} seeds from {base} (SWARM_SIM_SEED_BASE={base} repeats this set){}",
                if EXACT {
                    ""
                } else {
                    "; built without --cfg tokio_unstable, so exact replays are not guaranteed"
                }
            );
            (0..count).map(|i| base.wrapping_add(i)).collect()
        }
        None => {
            let random = clock();
            eprintln!(
                "running {} fixed seeds and seed {random}, drawn from the clock; replay it with:\n  {}",
                SEEDS.len() + RANGE.count(),
                replay_command(random)
            );
            SEEDS
                .iter()
                .map(|(s, _)| *s)
                .chain(RANGE)
                .chain([random])
                .collect()
        }
    }
}

#[test]
fn seeded_faults() {
    init_tracing();
    if let Some(seed) = env_u64("SWARM_SIM_SEED") {
        let started = Instant::now();
        let opts = options();
        match run_checked(seed, &opts) {
            Ok(report) => {
                if std::env::var("SWARM_SIM_CHILD").is_err() {
                    eprintln!("{}", report.log.join("\n"));
                }
                eprintln!("{}", report.summary());
                eprintln!("({:.1?} wall)", started.elapsed());
            }
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let seeds = seeds();
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel.min(seeds.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else {
                    return;
                };
                let t = Instant::now();
                match run_in_child(seed) {
                    Ok(summary) => eprintln!("ok   {summary} ({:.1?} wall)", t.elapsed()),
                    Err(e) => {
                        let e = match SEEDS.iter().find(|(s, _)| *s == seed) {
                            Some((_, what)) => format!("seed {seed} ({what}):\n{e}"),
                            None => e,
                        };
                        eprintln!("FAIL {e}");
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!("{} seeds in {:.1?}", seeds.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n\n")
    );
}

/// Two runs of one seed, each in a fresh process, see the same history, log, snapshots
/// and final replicas (their checkpoints, byte for byte). Guards against nondeterminism
/// creeping into the simulated system (a thread, a wall clock, hash map order that
/// reaches the network). The seed's run installs snapshots on old and new nodes and
/// changes the membership twice. Guaranteed with `--cfg tokio_unstable`, which the
/// workspace sets (see the module docs).
#[test]
fn a_seed_replays_exactly() {
    let seed = env_u64("SWARM_SIM_REPLAY_SEED").unwrap_or(REPLAY_SEED);
    let a = run_in_child(seed).unwrap_or_else(|e| panic!("{e}"));
    let b = run_in_child(seed).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{a}\n{b}");
    assert_eq!(
        digest_of(&a),
        digest_of(&b),
        "seed {seed} did not replay: compare the runs with SWARM_SIM_DUMP"
    );
}
