//! What a node reports about the work: the connected workers and the status view (queue
//! counts, throughput, latency, swarms, the cluster).

use swarm_proto::api::{
    ClusterView, LatencyView, QueueCounts, StatusView, TaskState, Throughput, WorkerView,
};

use crate::node::{now_ms, Node};
use crate::state::TableEvent;

/// Seconds a [`LatencyWindow`] covers.
const WINDOW_S: u64 = 60;
/// Histogram bins: bin `b` holds latencies below `2^((b + 1) / 3)` ms, so a bin spans a
/// factor of 2^(1/3) (26%); the last one holds everything from about 17 minutes up.
const BINS: usize = 60;

/// Submit-to-final latencies of the tasks that finished over the last minute, in sixty
/// one-second log-scale histograms: fixed size whatever the rate. Node-local (each node
/// applies the same finishes), not replicated state: it starts empty after a restart.
#[derive(Debug)]
pub(crate) struct LatencyWindow {
    /// The second (since the epoch) the newest histogram counts.
    newest: u64,
    /// `seconds[s % 60]` counts finishes in second `s`.
    seconds: Vec<[u32; BINS]>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        LatencyWindow {
            newest: 0,
            seconds: vec![[0; BINS]; WINDOW_S as usize],
        }
    }
}

fn bin_of(ms: u64) -> usize {
    ((3.0 * ((ms + 1) as f64).log2()).floor() as usize).min(BINS - 1)
}

/// An upper bound (rounded up) of the latencies bin `b` holds, in ms: a figure read from
/// the bin is at most 26% (and 1 ms) above the true one.
fn edge_of(b: usize) -> u64 {
    (2f64.powf((b + 1) as f64 / 3.0) - 1.0).ceil() as u64
}

impl LatencyWindow {
    /// Count one task that finished at `now_ms` after `latency_ms`.
    pub fn record(&mut self, now_ms: u64, latency_ms: u64) {
        let s = now_ms / 1000;
        if s > self.newest {
            let gap = (s - self.newest).min(WINDOW_S);
            for k in 1..=gap {
                self.seconds[((self.newest + k) % WINDOW_S) as usize] = [0; BINS];
            }
            self.newest = s;
        }
        if s + WINDOW_S > self.newest {
            self.seconds[(s % WINDOW_S) as usize][bin_of(latency_ms)] += 1;
        }
    }

    /// Quantiles over the minute before `now_ms`, if anything finished in it.
    pub fn view(&self, now_ms: u64) -> Option<LatencyView> {
        let s = now_ms / 1000;
        let mut sum = [0u64; BINS];
        for k in 0..WINDOW_S {
            let Some(sec) = self.newest.checked_sub(k) else {
                break;
            };
            if sec + WINDOW_S <= s {
                continue;
            }
            for (total, n) in sum.iter_mut().zip(self.seconds[(sec % WINDOW_S) as usize]) {
                *total += u64::from(n);
            }
        }
        let tasks: u64 = sum.iter().sum();
        if tasks == 0 {
            return None;
        }
        let quantile = |q: f64| {
            let want = ((tasks as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (b, n) in sum.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return edge_of(b);
                }
            }
            edge_of(BINS - 1)
        };
        Some(LatencyView {
            tasks,
            p50_ms: quantile(0.5),
            p90_ms: quantile(0.9),
            p99_ms: quantile(0.99),
        })
    }
}

/// Count the latency of every task among `events` that reached a final state (the
/// applied loop calls this with each batch it drains).
pub(crate) fn on_applied(node: &Node, events: &[TableEvent]) {
    let finished: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TableEvent::Finalized(id, _) => Some(*id),
            _ => None,
        })
        .collect();
    if finished.is_empty() {
        return;
    }
    let latencies: Vec<(u64, u64)> = node.read_table(|t| {
        finished
            .iter()
            .filter_map(|id| t.get(*id))
            .filter_map(|t| {
                let at = t.finished_at_ms?;
                Some((at, at.saturating_sub(t.created_at_ms)))
            })
            .collect()
    });
    let mut w = node.latency.lock().unwrap_or_else(|p| p.into_inner());
    for (at, ms) in latencies {
        w.record(at, ms);
        metrics::histogram!("swarm_task_latency_seconds").record(ms as f64 / 1000.0);
    }
}

/// The workers connected to this node (the leader has them all), by id.
pub(crate) fn worker_views(node: &Node) -> Vec<WorkerView> {
    let d = node.lock_dispatch();
    let mut v: Vec<WorkerView> = d
        .sessions
        .values()
        .map(|s| {
            let mut w = s.info.clone();
            w.running = d
                .scheduler
                .workers()
                .get(&w.id)
                .map_or(w.running, |e| e.busy);
            w
        })
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

/// This node's status report around `cluster` (see [`crate::cluster::cluster_view`]).
pub(crate) fn status_view(node: &Node, cluster: ClusterView) -> StatusView {
    let now = now_ms();
    let (queue, finished) = node.read_table(|t| {
        (
            QueueCounts {
                waiting: t.count(TaskState::Waiting),
                queued: t.count(TaskState::Queued),
                running: t.count(TaskState::Running),
                succeeded: t.count(TaskState::Succeeded),
                failed: t.count(TaskState::Failed),
                cancelled: t.count(TaskState::Cancelled),
                dead_lettered: t.count(TaskState::DeadLettered),
                awaiting_approval: t.count(TaskState::AwaitingApproval),
            },
            t.finished_since(now),
        )
    });
    StatusView {
        cluster,
        workers: worker_views(node),
        queue,
        queue_limit: node.config().limits.queue_limit,
        throughput: Throughput {
            finished_last_minute: finished,
            per_second: finished as f64 / 60.0,
        },
        latency: node
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .view(now),
        swarms: {
            let names: Vec<String> =
                node.read_table(|t| t.defined_swarms().keys().cloned().collect());
            names
                .iter()
                .filter_map(|n| crate::swarms::swarm_view(node, n))
                .collect()
        },
        usage: node.read_table(|t| t.ledger().report().swarms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_grow_by_a_third_of_a_doubling_and_edges_bound_them() {
        let mut last = 0;
        for ms in 0..2_000_000u64 {
            let b = bin_of(ms);
            assert!(b >= last, "bins never go down: {ms} ms");
            last = b;
            assert!(ms <= edge_of(b) || b == BINS - 1, "{ms} ms in bin {b}");
            assert!(
                b == 0 || ms >= edge_of(b - 1),
                "{ms} ms belongs below bin {b}"
            );
        }
    }

    #[test]
    fn quantiles_cover_the_last_minute_only() {
        let mut w = LatencyWindow::default();
        assert!(w.view(1_000).is_none());
        // 90 tasks at 10 ms, 10 at 1 s, in second 100.
        for i in 0..100 {
            w.record(100_000 + i, if i < 90 { 10 } else { 1000 });
        }
        let v = w.view(100_900).unwrap();
        assert_eq!(v.tasks, 100);
        assert!((10..=13).contains(&v.p50_ms), "{v:?}");
        assert!((10..=13).contains(&v.p90_ms), "{v:?}");
        assert!((1000..=1260).contains(&v.p99_ms), "{v:?}");
        // A minute later they have left the window; new ones count alone.
        w.record(161_000, 50);
        let v = w.view(161_000).unwrap();
        assert_eq!(v.tasks, 1);
        assert!((50..=63).contains(&v.p50_ms), "{v:?}");
        assert!(w.view(222_000).is_none());
    }
}
