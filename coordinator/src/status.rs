//! What a node reports about the work: the connected workers and the status view (queue
//! counts, throughput, swarms, the cluster).

use swarm_proto::api::{ClusterView, QueueCounts, StatusView, TaskState, Throughput, WorkerView};

use crate::node::{now_ms, Node};

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
                queued: t.count(TaskState::Queued),
                running: t.count(TaskState::Running),
                succeeded: t.count(TaskState::Succeeded),
                failed: t.count(TaskState::Failed),
                cancelled: t.count(TaskState::Cancelled),
                dead_lettered: t.count(TaskState::DeadLettered),
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
