//! What the worker's test binaries share.

use swarm_proto::worker::{AttemptRef, TaskAssignment};

/// An assignment of attempt 3 of task 42 (term 1) to `agent`.
pub fn task(agent: &str, payload: impl Into<Vec<u8>>, timeout_ms: u64) -> TaskAssignment {
    TaskAssignment {
        attempt: AttemptRef {
            task_id: 42,
            attempt: 3,
        },
        agent: agent.into(),
        payload: payload.into(),
        timeout_ms,
        idempotency_key: None,
        patterns: 0,
        swarm: "default".into(),
        term: 1,
    }
}
