//! Seeded simulations of a 3-coordinator cluster with workers and clients under faults.
//!
//! * `SWARM_SIM_SEEDS=n` runs `n` seeds (default 24) starting at `SWARM_SIM_SEED_BASE`
//!   (default: drawn from the clock, printed);
//! * `SWARM_SIM_SEED=s` runs only seed `s` (a replay) and prints its fault log;
//! * `SWARM_SIM_SNAPSHOT_EVERY=n` makes coordinators snapshot every `n` entries (off by
//!   default: snapshot I/O is not replayable yet);
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
//! guaranteed (without it, runs have replayed exactly in every comparison made so far).
//! A failure names the seed and the command that replays it.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use swarm_sim::scenario::{self, Options, Report};

/// Seeds per run of `seeded_faults` unless `SWARM_SIM_SEEDS` says otherwise.
const DEFAULT_SEEDS: u64 = 24;

/// Whether this build is guaranteed to replay seeds exactly: tokio's `select!` draws from
/// a per-runtime random generator that only `--cfg tokio_unstable` lets turmoil seed.
const EXACT: bool = cfg!(tokio_unstable);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The default run, with `SWARM_SIM_SNAPSHOT_EVERY` applied.
fn options() -> Options {
    let mut opts = Options::default();
    if let Some(n) = env_u64("SWARM_SIM_SNAPSHOT_EVERY") {
        opts.snapshot_every = n;
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
        .unwrap_or_default();
    let flags = if EXACT {
        "RUSTFLAGS=\"--cfg tokio_unstable\" "
    } else {
        ""
    };
    format!(
        "SWARM_SIM_SEED={seed} {snapshots}{flags}cargo test -p swarm-sim --test simulation -- --exact seeded_faults --nocapture{}",
        if EXACT {
            ""
        } else {
            "\n  (built without --cfg tokio_unstable: the replay is not guaranteed to interleave \
             exactly as this run did; with RUSTFLAGS=\"--cfg tokio_unstable\" and a separate \
             CARGO_TARGET_DIR it is)"
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
}

#[test]
fn seeded_faults() {
    init_tracing();
    if let Some(seed) = env_u64("SWARM_SIM_SEED") {
        let started = Instant::now();
        match run_checked(seed, &options()) {
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
    let count = env_u64("SWARM_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let base = env_u64("SWARM_SIM_SEED_BASE").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .wrapping_mul(1000)
    });
    eprintln!(
        "running {count} seeds from {base} (SWARM_SIM_SEED_BASE={base} repeats this set){}",
        if EXACT {
            ""
        } else {
            "; built without --cfg tokio_unstable, so exact replays are not guaranteed"
        }
    );
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..parallel.min(count as usize) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as u64;
                if i >= count {
                    return;
                }
                let seed = base.wrapping_add(i);
                let t = Instant::now();
                match run_in_child(seed) {
                    Ok(summary) => eprintln!("ok   {summary} ({:.1?} wall)", t.elapsed()),
                    Err(e) => {
                        eprintln!("FAIL {e}");
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!("{count} seeds in {:.1?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {count} seeds failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Two runs of one seed, each in a fresh process, see the same history. Guards against
/// nondeterminism creeping into the simulated system (a thread, a wall clock, hash map
/// order that reaches the network). Guaranteed only with `--cfg tokio_unstable` (see the
/// module docs); this seed has replayed exactly without it in every run so far.
#[test]
fn a_seed_replays_exactly() {
    // A seed whose schedule crashes a coordinator and a worker and isolates the leader.
    let seed = env_u64("SWARM_SIM_REPLAY_SEED").unwrap_or(9_000);
    let a = run_in_child(seed).unwrap_or_else(|e| panic!("{e}"));
    let b = run_in_child(seed).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{a}\n{b}");
    assert_eq!(
        digest_of(&a),
        digest_of(&b),
        "seed {seed} did not replay: compare the runs with SWARM_SIM_DUMP"
    );
}
