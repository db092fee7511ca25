//! Tasks as format 1 encoded them, before [`Task::flow`]: kept to read what older
//! releases wrote — checkpoint stores of state format 1 (migrated when opened), dumps
//! of format 2 to 4, and [`Op::RestoreChunk`](super::Op::RestoreChunk) entries in a log.
//! Nothing writes this encoding any more. Postcard encodes a struct as its fields in
//! order, so this copy must keep the old fields exactly as they were.

use serde::{Deserialize, Serialize};
use swarm_proto::api::TaskState;
use swarm_proto::TaskId;

use super::{Attempt, Task, TaskSpec};

/// A task of format 1: [`Task`] without `flow`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskV1 {
    pub id: TaskId,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub attempts: Vec<Attempt>,
    #[serde(with = "serde_bytes")]
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    pub not_before_ms: u64,
    pub stage: u32,
    pub stage_base: u32,
    pub released: u32,
    pub stage_outputs: Vec<Vec<u8>>,
    pub moves: u32,
}

impl From<TaskV1> for Task {
    fn from(t: TaskV1) -> Task {
        Task {
            id: t.id,
            spec: t.spec,
            state: t.state,
            attempts: t.attempts,
            output: t.output,
            error: t.error,
            created_at_ms: t.created_at_ms,
            finished_at_ms: t.finished_at_ms,
            expires_at_ms: t.expires_at_ms,
            not_before_ms: t.not_before_ms,
            stage: t.stage,
            stage_base: t.stage_base,
            released: t.released,
            stage_outputs: t.stage_outputs,
            moves: t.moves,
            flow: None,
        }
    }
}

/// Decode a task stored by `format` (1: [`TaskV1`]; 2: [`Task`]).
pub fn decode_task(
    format: u32,
    bytes: &[u8],
    limit: usize,
) -> Result<Task, swarm_codec::CodecError> {
    if format < 2 {
        swarm_codec::decode::<TaskV1>(bytes, limit).map(Task::from)
    } else {
        swarm_codec::decode::<Task>(bytes, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A format 1 encoding reads as a task without flow; the new encoding differs only by
    /// the trailing flow field.
    #[test]
    fn a_format_1_task_reads_as_a_task_without_flow() {
        let old = TaskV1 {
            id: 7,
            spec: TaskSpec {
                agent: "echo".into(),
                payload: b"hi".to_vec(),
                priority: 1,
                timeout_ms: 1000,
                max_attempts: 3,
                idempotency_key: Some("k".into()),
                labels: Default::default(),
                patterns: 0,
                swarm: "default".into(),
                stages: Vec::new(),
                retain_ms: 5,
            },
            state: TaskState::Succeeded,
            attempts: Vec::new(),
            output: Some(b"out".to_vec()),
            error: None,
            created_at_ms: 1,
            finished_at_ms: Some(2),
            expires_at_ms: Some(3),
            not_before_ms: 0,
            stage: 0,
            stage_base: 0,
            released: 0,
            stage_outputs: Vec::new(),
            moves: 2,
        };
        let bytes = swarm_codec::encode(&old).unwrap();
        let task = decode_task(1, &bytes, usize::MAX).unwrap();
        assert_eq!(task.flow, None);
        assert_eq!(task.moves, 2);
        let new = swarm_codec::encode(&task).unwrap();
        assert_eq!(&new[..bytes.len()], &bytes[..]);
        assert_eq!(new.len(), bytes.len() + 1);
        assert_eq!(decode_task(2, &new, usize::MAX).unwrap(), task);
        // The old reader refuses the new encoding rather than misreading it.
        assert!(swarm_codec::decode::<TaskV1>(&new, usize::MAX).is_err());
    }
}
