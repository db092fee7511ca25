//! Prometheus metrics: one process-wide recorder, rendered by `GET /metrics`.
//!
//! Metric names (all prefixed `swarm_`) are listed in README.md; counters are counted
//! by the leader where an op's committed result is known, gauges are refreshed from the
//! local replica once a second.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Buckets for latency histograms, 50 µs … 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A series not updated for this long leaves `/metrics`: the label sets of deleted swarms
/// go, so their number is bounded by the swarms in use, not by history. Counters with
/// fixed labels are kept by [`keep_alive`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Counters whose label sets are fixed: they stay in `/metrics` (at their value) however
/// long they go without an increment, so alerts on their increase always see them.
const FIXED_COUNTERS: &[&str] = &[
    "swarm_tasks_submitted_total",
    "swarm_tasks_succeeded_total",
    "swarm_tasks_failed_total",
    "swarm_tasks_retried_total",
    "swarm_tasks_dead_lettered_total",
    "swarm_tasks_cancelled_total",
    "swarm_tasks_redriven_total",
    "swarm_tasks_purged_total",
    "swarm_api_forwarded_total",
    "swarm_relayed_sessions_total",
    "swarm_protocol_errors_total",
    "swarm_peer_lost_total",
];

/// Counters labelled by swarm: kept while the swarm is defined.
const SWARM_COUNTERS: &[&str] = &[
    "swarm_swarm_dispatched_total",
    "swarm_swarm_steals_total",
    "swarm_swarm_steals_refused_total",
];

/// Mark every fixed counter, and the per-swarm counters of `swarms`, as current (called
/// once a second).
pub(crate) fn keep_alive<'a>(swarms: impl IntoIterator<Item = &'a String>) {
    for name in FIXED_COUNTERS {
        metrics::counter!(*name).increment(0);
    }
    metrics::counter!("swarm_submit_rejected_total", "reason" => "queue_full").increment(0);
    for decision in ["approved", "rejected", "expired"] {
        metrics::counter!("swarm_approvals_total", "decision" => decision).increment(0);
    }
    for swarm in swarms {
        for name in SWARM_COUNTERS {
            metrics::counter!(*name, "swarm" => swarm.clone()).increment(0);
        }
    }
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Install the process-wide recorder (once) and return its handle. `None` if another
/// recorder was installed first by the embedding program.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::ALL, Some(IDLE_TIMEOUT))
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("swarm_raft_batch_ops".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                    ],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            // Histogram samples pile up in the recorder until a scrape or an upkeep drains
            // them: without this, a node nobody scrapes grows by every latency it records.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the metrics upkeep thread");
            }
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "swarm_tasks_submitted_total",
        "Tasks accepted (committed) by submit."
    );
    describe_counter!("swarm_tasks_succeeded_total", "Tasks that ended succeeded.");
    describe_counter!("swarm_tasks_failed_total", "Tasks that ended failed.");
    describe_counter!(
        "swarm_tasks_retried_total",
        "Attempts that ended and were queued again."
    );
    describe_counter!(
        "swarm_tasks_redriven_total",
        "Failed or dead-lettered tasks run again on request (swarm task retry)."
    );
    describe_counter!(
        "swarm_tasks_dead_lettered_total",
        "Tasks whose every attempt was lost."
    );
    describe_counter!("swarm_tasks_cancelled_total", "Tasks cancelled on request.");
    describe_counter!(
        "swarm_approvals_total",
        "Tasks awaiting approval that were approved, rejected, or expired at their deadline."
    );
    describe_counter!("swarm_submit_rejected_total", "Submits refused, by reason.");
    describe_counter!(
        "swarm_schedule_ticks_total",
        "Schedule ticks by outcome: fired (a task submitted), skipped (missed, not fired), refused (queue full, swarm gone)."
    );
    describe_gauge!("swarm_queue_depth", "Tasks by state on this replica.");
    describe_gauge!(
        "swarm_tasks_running",
        "Tasks running on this replica's view."
    );
    describe_gauge!(
        "swarm_workers_connected",
        "Workers connected to this coordinator."
    );
    describe_gauge!(
        "swarm_workers_draining",
        "Connected workers that are draining (being stopped; given no new work)."
    );
    describe_counter!(
        "swarm_attempts_drained_total",
        "Attempts handed back by draining workers (not started, or cut short at the drain timeout); they run again without counting against max_attempts."
    );
    describe_histogram!(
        "swarm_checkpoint_seconds",
        Unit::Seconds,
        "Time to write a checkpoint (a Raft snapshot) to the checkpoint store."
    );
    describe_gauge!(
        "swarm_checkpoint_last_seconds",
        "Time the last checkpoint took to write."
    );
    describe_gauge!(
        "swarm_state_changes_bytes",
        "Bytes of changes held in memory since the last checkpoint."
    );
    describe_counter!(
        "swarm_tasks_purged_total",
        "Finished tasks purged after their retention."
    );
    describe_histogram!(
        "swarm_dispatch_latency_seconds",
        Unit::Seconds,
        "Submit (or retry due) to dispatch."
    );
    describe_histogram!(
        "swarm_task_latency_seconds",
        Unit::Seconds,
        "Submit to final state, per finished task."
    );
    describe_histogram!(
        "swarm_task_duration_seconds",
        Unit::Seconds,
        "Attempt run time reported by workers."
    );
    describe_histogram!(
        "swarm_raft_commit_seconds",
        Unit::Seconds,
        "Propose to applied, per Raft entry."
    );
    describe_histogram!("swarm_raft_batch_ops", "Task-table ops per Raft entry.");
    describe_histogram!(
        "swarm_raft_log_write_seconds",
        Unit::Seconds,
        "One durable (fsync'd) Raft log write transaction."
    );
    describe_gauge!("swarm_raft_term", "Current Raft term.");
    describe_gauge!(
        "swarm_raft_leader",
        "Id of the leader this node knows (0: none)."
    );
    describe_gauge!("swarm_raft_is_leader", "1 on the leader.");
    describe_gauge!("swarm_raft_last_applied", "Last applied log index.");
    describe_gauge!("swarm_raft_last_log", "Last log index.");
    describe_gauge!(
        "swarm_raft_replication_lag",
        "Entries each node trails the leader's log by (on the leader)."
    );
    describe_gauge!(
        "swarm_raft_snapshot_index",
        "Last log index covered by this node's snapshot."
    );
    describe_gauge!(
        "swarm_raft_purged_index",
        "Log entries up to here were compacted away."
    );
    describe_gauge!("swarm_raft_members", "Coordinators in the membership.");
    describe_counter!(
        "swarm_api_forwarded_total",
        "API requests this follower forwarded to the leader."
    );
    describe_counter!(
        "swarm_llm_tokens_total",
        "Tokens LLM agents reported, by agent, model and kind (prompt, completion)."
    );
    describe_counter!(
        "swarm_live_output_bytes_total",
        "Bytes of live output this leader received from workers for watchers."
    );
    describe_counter!(
        "swarm_live_events_dropped_total",
        "Live events dropped for watchers that fell a feed's ring behind."
    );
    describe_gauge!(
        "swarm_live_watchers",
        "Watchers of tasks' live events on this node."
    );
    describe_counter!(
        "swarm_worker_connections_total",
        "Worker connections accepted, by 0-RTT use."
    );
    describe_counter!(
        "swarm_protocol_errors_total",
        "Connections closed for malformed or unexpected frames."
    );
}
