//! Tests of the task table: the rules of every op over random histories, and the layers
//! (changes, checkpoints, the archive, restarts) against a table that never checkpoints.

use std::collections::BTreeMap;

use swarm_proto::api::TaskOrder::{self, Asc, Desc};
use swarm_proto::api::TaskState;
use swarm_proto::worker::{AttemptRef, FailureKind, Outcome};
use swarm_proto::TaskId;
use swarm_topology::{StageSpec, SwarmSpec};

use super::table::{CheckpointDelta, Lookup};
use super::*;

/// The archive as the checkpoint store keeps it, in memory: what a checkpoint writes, it
/// holds (the same rules as `raft/sm_store.rs`'s redb tables).
#[derive(Debug, Default, Clone)]
pub(super) struct MemArchive {
    live: BTreeMap<TaskId, Task>,
    done: BTreeMap<TaskId, Task>,
    keys: BTreeMap<String, TaskId>,
    staged: Vec<Vec<u8>>,
    meta: TableMeta,
    access: super::Access,
    ledger: super::Ledger,
    schedules: super::Schedules,
    limits: super::Limits,
    callbacks: super::Callbacks,
}

impl MemArchive {
    pub(super) fn write(&mut self, d: &CheckpointDelta) {
        let c = &d.changes;
        if c.reset {
            self.live.clear();
            self.done.clear();
            self.keys.clear();
        }
        if c.staging_cleared {
            self.staged.clear();
        }
        for id in &c.purged {
            self.done.remove(id);
        }
        for id in &c.live_gone {
            self.live.remove(id);
        }
        for t in &d.live {
            self.live.insert(t.id, (**t).clone());
        }
        for (id, t) in &c.finished {
            self.done.insert(*id, (**t).clone());
        }
        for (k, v) in &c.keys {
            match v {
                Some(id) => self.keys.insert(k.clone(), *id),
                None => self.keys.remove(k),
            };
        }
        self.staged.extend(c.staged_memory.iter().cloned());
        self.meta = d.meta.clone();
        if let Some(a) = &d.access {
            self.access = (**a).clone();
        }
        if let Some(l) = &d.ledger {
            self.ledger = (**l).clone();
        }
        if let Some(s) = &d.schedules {
            self.schedules = (**s).clone();
        }
        if let Some(l) = &d.limits {
            self.limits = (**l).clone();
        }
        if let Some(c) = &d.callbacks {
            self.callbacks = (**c).clone();
        }
    }

    /// A table restarted from this archive.
    pub(super) fn reload(&self) -> TaskTable {
        TaskTable::from_checkpoint(
            self.meta.clone(),
            self.access.clone(),
            self.ledger.clone(),
            self.schedules.clone(),
            self.limits.clone(),
            self.callbacks.clone(),
            self.live.values().cloned().collect(),
        )
        .unwrap()
    }
}

impl Archive for MemArchive {
    fn finished(&self, id: TaskId) -> Result<Option<Task>, ArchiveError> {
        Ok(self.done.get(&id).cloned())
    }

    fn key(&self, key: &str) -> Result<Option<TaskId>, ArchiveError> {
        Ok(self.keys.get(key).copied())
    }

    fn finished_after(
        &self,
        state: Option<TaskState>,
        after: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        Ok(self
            .done
            .range(after.saturating_add(1)..)
            .map(|(_, t)| t)
            .filter(|t| state.is_none_or(|s| t.state == s))
            .take(limit)
            .cloned()
            .collect())
    }

    fn finished_before(
        &self,
        state: Option<TaskState>,
        before: TaskId,
        limit: usize,
    ) -> Result<Vec<Task>, ArchiveError> {
        Ok(self
            .done
            .range(..before)
            .rev()
            .map(|(_, t)| t)
            .filter(|t| state.is_none_or(|s| t.state == s))
            .take(limit)
            .cloned()
            .collect())
    }

    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<TaskId>, ArchiveError> {
        let mut by_expiry: Vec<(u64, TaskId)> = self
            .done
            .values()
            .filter_map(|t| {
                t.expires_at_ms
                    .filter(|&at| at <= now_ms)
                    .map(|at| (at, t.id))
            })
            .collect();
        by_expiry.sort_unstable();
        Ok(by_expiry
            .into_iter()
            .take(limit)
            .map(|(_, id)| id)
            .collect())
    }

    fn staged_memory(&self) -> Result<Vec<Vec<u8>>, ArchiveError> {
        Ok(self.staged.clone())
    }
}

/// Write a whole checkpoint.
pub(super) fn checkpoint(t: &mut TaskTable, archive: &mut MemArchive) {
    let delta = t.begin_checkpoint().unwrap();
    archive.write(&delta);
    t.checkpoint_written();
}

/// Every id of a listing, read in pages of `limit` (each page's last id is the next
/// page's `after`), checking each page is in order.
fn page_through(
    t: &TaskTable,
    state: Option<TaskState>,
    order: TaskOrder,
    limit: usize,
    archive: &dyn Archive,
) -> Vec<TaskId> {
    let mut out: Vec<TaskId> = Vec::new();
    let mut after = None;
    loop {
        let page = t.list(state, order, after, limit, archive).unwrap();
        assert!(page.len() <= limit);
        for task in &page {
            if let Some(&prev) = out.last() {
                match order {
                    Asc => assert!(task.id > prev, "{order:?}: {} after {prev}", task.id),
                    Desc => assert!(task.id < prev, "{order:?}: {} after {prev}", task.id),
                }
            }
            assert!(state.is_none_or(|s| task.state == s));
            out.push(task.id);
        }
        if page.len() < limit {
            return out;
        }
        after = page.last().map(|t| t.id);
    }
}

pub(super) fn spec(agent: &str) -> TaskSpec {
    TaskSpec {
        agent: agent.into(),
        payload: b"p".to_vec(),
        priority: 0,
        timeout_ms: 1000,
        max_attempts: 3,
        idempotency_key: None,
        labels: BTreeMap::new(),
        patterns: 0,
        swarm: swarm_topology::DEFAULT_SWARM_NAME.to_string(),
        stages: Vec::new(),
        retain_ms: 1_000,
    }
}

fn submit(t: &mut TaskTable, s: TaskSpec) -> OpResult {
    one(
        t,
        Op::Submit {
            spec: s,
            now_ms: 1,
            queue_limit: 100,
        },
    )
}

fn one(t: &mut TaskTable, op: Op) -> OpResult {
    t.apply_op(&op, &NoArchive).unwrap()
}

fn many(t: &mut TaskTable, ops: Vec<Op>) -> Vec<OpResult> {
    ops.iter()
        .map(|op| t.apply_op(op, &NoArchive).unwrap())
        .collect()
}

fn at(task_id: TaskId, attempt: u32) -> AttemptRef {
    AttemptRef { task_id, attempt }
}

fn ok(output: &[u8]) -> Outcome {
    Outcome::Succeeded {
        output: output.to_vec(),
    }
}

fn fail(kind: FailureKind) -> Outcome {
    Outcome::Failed {
        kind,
        message: "boom".into(),
    }
}

fn finish(t: &mut TaskTable, a: AttemptRef, outcome: Outcome) -> OpResult {
    one(
        t,
        Op::Finish {
            attempt: a,
            worker: "w".into(),
            outcome,
            started_at_ms: 2,
            finished_at_ms: 3,
            now_ms: 3,
            retry_at_ms: 10,
        },
    )
}

fn start(t: &mut TaskTable, a: AttemptRef) -> OpResult {
    one(
        t,
        Op::Start {
            attempt: a,
            worker: "w".into(),
            now_ms: 2,
        },
    )
}

#[test]
fn happy_path_and_single_final_result() {
    let mut t = TaskTable::new();
    assert_eq!(
        submit(&mut t, spec("echo")),
        OpResult::Submitted {
            id: 1,
            duplicate: false
        }
    );
    assert_eq!(
        start(&mut t, at(1, 1)),
        OpResult::Applied {
            state: TaskState::Running
        }
    );
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"out")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    // A second report (replay, or a stale duplicate) changes nothing.
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"other")),
        OpResult::Ignored {
            state: TaskState::Succeeded
        }
    );
    assert_eq!(t.get(1).unwrap().output.as_deref(), Some(&b"out"[..]));
    assert_eq!(t.count(TaskState::Succeeded), 1);
    t.check_indexes().unwrap();
    let events = t.take_events();
    assert_eq!(
        events,
        vec![
            TableEvent::Queued(1, 1),
            TableEvent::Running(1),
            TableEvent::Finalized(1, TaskState::Succeeded)
        ]
    );
}

#[test]
fn results_for_unknown_tasks_are_not_recorded() {
    let mut t = TaskTable::new();
    assert_eq!(finish(&mut t, at(9, 1), ok(b"x")), OpResult::NotFound);
    assert_eq!(start(&mut t, at(9, 1)), OpResult::NotFound);
    assert_eq!(
        one(
            &mut t,
            Op::Cancel {
                task_id: 9,
                now_ms: 1
            }
        ),
        OpResult::NotFound
    );
    assert!(t.get(9).is_none());
}

#[test]
fn idempotency_key_yields_one_task() {
    let mut t = TaskTable::new();
    let mut s = spec("echo");
    s.idempotency_key = Some("k".into());
    assert_eq!(
        submit(&mut t, s.clone()),
        OpResult::Submitted {
            id: 1,
            duplicate: false
        }
    );
    assert_eq!(
        submit(&mut t, s),
        OpResult::Submitted {
            id: 1,
            duplicate: true
        }
    );
    assert_eq!(t.count(TaskState::Queued), 1);
}

#[test]
fn queue_limit_counts_unfinished_tasks() {
    let mut t = TaskTable::new();
    let op = |n| Op::Submit {
        spec: spec("echo"),
        now_ms: n,
        queue_limit: 2,
    };
    let r = many(&mut t, vec![op(1), op(2), op(3)]);
    assert_eq!(r[2], OpResult::QueueFull { limit: 2 });
    start(&mut t, at(1, 1));
    finish(&mut t, at(1, 1), ok(b""));
    assert_eq!(
        one(&mut t, op(4)),
        OpResult::Submitted {
            id: 3,
            duplicate: false
        }
    );
}

#[test]
fn retryable_failures_requeue_until_max_attempts_then_fail() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("x"));
    for n in 1..=2 {
        start(&mut t, at(1, n));
        assert_eq!(
            finish(&mut t, at(1, n), fail(FailureKind::Exit)),
            OpResult::Applied {
                state: TaskState::Queued
            }
        );
        assert_eq!(t.get(1).unwrap().not_before_ms, 10);
    }
    start(&mut t, at(1, 3));
    assert_eq!(
        finish(&mut t, at(1, 3), fail(FailureKind::Exit)),
        OpResult::Applied {
            state: TaskState::Failed
        }
    );
    assert_eq!(t.get(1).unwrap().attempts.len(), 3);
    t.check_indexes().unwrap();
}

/// A failed or dead-lettered task runs again on request with a fresh `max_attempts`,
/// its earlier attempts kept; nothing else is retried.
#[test]
fn a_failed_task_is_retried_with_its_history() {
    let mut t = TaskTable::new();
    let mut s = spec("x");
    s.max_attempts = 1;
    submit(&mut t, s.clone());
    start(&mut t, at(1, 1));
    assert_eq!(
        finish(&mut t, at(1, 1), fail(FailureKind::Exit)),
        OpResult::Applied {
            state: TaskState::Failed
        }
    );
    assert_eq!(t.count(TaskState::Failed), 1);
    let retry = |id| Op::Retry {
        task_id: id,
        now_ms: 50,
    };
    assert_eq!(
        one(&mut t, retry(1)),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    let task = t.get(1).unwrap().clone();
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!((task.error.as_deref(), task.finished_at_ms), (None, None));
    assert_eq!(task.attempts.len(), 1, "history kept");
    assert_eq!(task.next_attempt(), 2);
    assert_eq!(t.count(TaskState::Failed), 0);
    assert_eq!(t.queued().map(|t| t.id).collect::<Vec<_>>(), vec![1]);
    // Live now: a second retry changes nothing. A fresh budget: attempt 2 may fail
    // once more before the task fails again.
    assert_eq!(
        one(&mut t, retry(1)),
        OpResult::Ignored {
            state: TaskState::Queued
        }
    );
    start(&mut t, at(1, 2));
    assert_eq!(
        finish(&mut t, at(1, 2), ok(b"second time")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    let task = t.get(1).unwrap();
    assert_eq!(task.output.as_deref(), Some(&b"second time"[..]));
    assert_eq!(task.attempts.len(), 2);
    // Succeeded and cancelled tasks are not retried; unknown ids are not found.
    assert_eq!(
        one(&mut t, retry(1)),
        OpResult::Ignored {
            state: TaskState::Succeeded
        }
    );
    submit(&mut t, s);
    one(
        &mut t,
        Op::Cancel {
            task_id: 2,
            now_ms: 3,
        },
    );
    assert_eq!(
        one(&mut t, retry(2)),
        OpResult::Ignored {
            state: TaskState::Cancelled
        }
    );
    assert_eq!(one(&mut t, retry(99)), OpResult::NotFound);
    t.check_indexes().unwrap();
}

#[test]
fn attempts_handed_back_by_a_draining_worker_do_not_count() {
    let mut t = TaskTable::new();
    let mut s = spec("x");
    s.max_attempts = 1;
    submit(&mut t, s);
    for n in 1..=5 {
        start(&mut t, at(1, n));
        assert_eq!(
            finish(&mut t, at(1, n), fail(FailureKind::Drained)),
            OpResult::Applied {
                state: TaskState::Queued
            }
        );
    }
    let task = t.get(1).unwrap();
    assert_eq!(task.released, 5);
    assert!(task
        .attempts
        .iter()
        .all(|a| matches!(a.end, Some(AttemptEnd::Released { .. }))));
    // The one counted attempt is still there to be made.
    start(&mut t, at(1, 6));
    assert_eq!(
        finish(&mut t, at(1, 6), fail(FailureKind::Exit)),
        OpResult::Applied {
            state: TaskState::Failed
        }
    );
    t.check_indexes().unwrap();
}

#[test]
fn non_retryable_failure_is_final_at_once() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("nope"));
    start(&mut t, at(1, 1));
    let r = finish(&mut t, at(1, 1), fail(FailureKind::UnknownAgent));
    assert_eq!(
        r,
        OpResult::Applied {
            state: TaskState::Failed
        }
    );
    assert!(t
        .get(1)
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .starts_with("unknown_agent"));
}

#[test]
fn lost_attempts_retry_then_dead_letter() {
    let mut t = TaskTable::new();
    let mut s = spec("x");
    s.max_attempts = 2;
    submit(&mut t, s);
    start(&mut t, at(1, 1));
    let lose = |n| Op::Lose {
        attempt: at(1, n),
        reason: "worker lost".into(),
        now_ms: 5,
        retry_at_ms: 6,
    };
    assert_eq!(
        one(&mut t, lose(1)),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    // Losing the same attempt again is a no-op.
    assert_eq!(
        one(&mut t, lose(1)),
        OpResult::Ignored {
            state: TaskState::Queued
        }
    );
    start(&mut t, at(1, 2));
    assert_eq!(
        one(&mut t, lose(2)),
        OpResult::Applied {
            state: TaskState::DeadLettered
        }
    );
    t.check_indexes().unwrap();
}

/// Giving up an attempt records it if its `Start` was not (still delayed), so the task's
/// next attempt carries a new number; an attempt already recorded is lost as it is.
#[test]
fn giving_up_an_unrecorded_attempt_records_it_and_moves_the_number_on() {
    let mut t = TaskTable::new();
    let mut s = spec("x");
    s.max_attempts = 3;
    submit(&mut t, s.clone());
    submit(&mut t, s);
    // Task 1's attempt 1 was sent but its `Start` never proposed.
    let give_up = |id, n| Op::give_up(at(id, n), "w1", "worker w1 restarted".into(), 5, 6).to_vec();
    let r = many(&mut t, give_up(1, 1));
    assert_eq!(
        r,
        vec![
            OpResult::Applied {
                state: TaskState::Running
            },
            OpResult::Applied {
                state: TaskState::Queued
            }
        ]
    );
    let task = t.get(1).unwrap();
    assert_eq!(task.next_attempt(), 2, "attempt 1 is never sent again");
    assert_eq!(task.attempts[0].worker, "w1");
    assert!(matches!(
        task.attempts[0].end,
        Some(AttemptEnd::Lost { .. })
    ));
    // Task 2's attempt was recorded: the `Start` is ignored, the `Lose` applies.
    start(&mut t, at(2, 1));
    let r = many(&mut t, give_up(2, 1));
    assert_eq!(
        r,
        vec![
            OpResult::Ignored {
                state: TaskState::Running
            },
            OpResult::Applied {
                state: TaskState::Queued
            }
        ]
    );
    assert_eq!(t.get(2).unwrap().attempts.len(), 1);
    // Given up again (a replay): both ignored.
    let r = many(&mut t, give_up(2, 1));
    assert!(r.iter().all(|r| matches!(r, OpResult::Ignored { .. })));
    t.check_indexes().unwrap();
}

#[test]
fn late_reports_of_a_lost_attempt_are_ignored() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("x"));
    submit(&mut t, spec("x"));
    for id in [1, 2] {
        start(&mut t, at(id, 1));
        one(
            &mut t,
            Op::Lose {
                attempt: at(id, 1),
                reason: "lease".into(),
                now_ms: 5,
                retry_at_ms: 6,
            },
        );
        start(&mut t, at(id, 2));
    }
    // The lost attempt 1 reports after all: failure or success, it is stale.
    assert_eq!(
        finish(&mut t, at(1, 1), fail(FailureKind::Exit)),
        OpResult::Ignored {
            state: TaskState::Running
        }
    );
    assert_eq!(
        finish(&mut t, at(2, 1), ok(b"late")),
        OpResult::Ignored {
            state: TaskState::Running
        }
    );
    assert_eq!(
        finish(&mut t, at(2, 2), ok(b"now")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
}

#[test]
fn report_before_start_is_recorded_and_start_after_is_ignored() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("x"));
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"r")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    assert_eq!(
        start(&mut t, at(1, 1)),
        OpResult::Ignored {
            state: TaskState::Succeeded
        }
    );
    assert_eq!(t.get(1).unwrap().attempts.len(), 1);
    t.check_indexes().unwrap();
}

#[test]
fn cancel_running_names_the_attempt_and_is_final() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("x"));
    submit(&mut t, spec("x"));
    start(&mut t, at(1, 1));
    let r = one(
        &mut t,
        Op::Cancel {
            task_id: 1,
            now_ms: 4,
        },
    );
    assert_eq!(
        r,
        OpResult::Cancelled {
            running: Some(("w".into(), at(1, 1)))
        }
    );
    assert_eq!(
        one(
            &mut t,
            Op::Cancel {
                task_id: 2,
                now_ms: 4
            }
        ),
        OpResult::Cancelled { running: None }
    );
    assert_eq!(
        one(
            &mut t,
            Op::Cancel {
                task_id: 2,
                now_ms: 4
            }
        ),
        OpResult::Ignored {
            state: TaskState::Cancelled
        }
    );
    // The cancelled attempt's late result does not resurrect the task.
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"x")),
        OpResult::Ignored {
            state: TaskState::Cancelled
        }
    );
    assert_eq!(t.queued().count(), 0);
    t.check_indexes().unwrap();
}

#[test]
fn queue_order_is_priority_then_age() {
    let mut t = TaskTable::new();
    for p in [0, 5, 0, 9] {
        let mut s = spec("x");
        s.priority = p;
        submit(&mut t, s);
    }
    let order: Vec<TaskId> = t.queued().map(|t| t.id).collect();
    assert_eq!(order, vec![4, 2, 1, 3]);
}

#[test]
fn checkpoint_round_trip_and_listing() {
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    for _ in 0..5 {
        submit(&mut t, spec("x"));
    }
    start(&mut t, at(2, 1));
    finish(&mut t, at(2, 1), ok(b"y"));
    checkpoint(&mut t, &mut archive);
    assert!(
        t.get(2).is_none(),
        "a checkpointed finished task leaves memory"
    );
    let back = archive.reload();
    assert_eq!(
        back.lookup(2, &archive).unwrap(),
        t.lookup(2, &archive).unwrap()
    );
    assert!(
        matches!(back.lookup(2, &archive).unwrap(), Lookup::Found(ref f) if f.output.as_deref() == Some(&b"y"[..]))
    );
    assert_eq!(back.lookup(9, &archive).unwrap(), Lookup::Unknown);
    assert_eq!(back.count(TaskState::Queued), 4);
    assert_eq!(back.count(TaskState::Succeeded), 1);
    let ids = |tasks: Vec<std::sync::Arc<Task>>| tasks.iter().map(|t| t.id).collect::<Vec<_>>();
    let page = back
        .list(Some(TaskState::Queued), Asc, Some(1), 2, &archive)
        .unwrap();
    assert_eq!(ids(page), vec![3, 4]);
    let all = back.list(None, Asc, None, 10, &archive).unwrap();
    assert_eq!(ids(all), vec![1, 2, 3, 4, 5]);
    let done = back
        .list(Some(TaskState::Succeeded), Asc, None, 10, &archive)
        .unwrap();
    assert_eq!(ids(done), vec![2]);
    let newest = back.list(None, Desc, None, 10, &archive).unwrap();
    assert_eq!(ids(newest), vec![5, 4, 3, 2, 1]);
    let page = back.list(None, Desc, Some(4), 2, &archive).unwrap();
    assert_eq!(ids(page), vec![3, 2], "ids below `after`, newest first");
    let page = back
        .list(Some(TaskState::Queued), Desc, Some(5), 2, &archive)
        .unwrap();
    assert_eq!(ids(page), vec![4, 3]);
    let done = back
        .list(Some(TaskState::Succeeded), Desc, Some(3), 10, &archive)
        .unwrap();
    assert_eq!(ids(done), vec![2]);
    assert!(back
        .list(None, Desc, Some(1), 10, &archive)
        .unwrap()
        .is_empty());
}

/// Random op sequences never break the indexes or change a final task.
#[test]
fn random_histories_keep_invariants() {
    use rand::{Rng, SeedableRng};
    for seed in 0..200u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = TaskTable::new();
        let mut finals: BTreeMap<TaskId, (TaskState, Option<Vec<u8>>)> = BTreeMap::new();
        for step in 0..200u64 {
            let id = rng.gen_range(1..=8);
            let n = rng.gen_range(1..=4);
            let op = match rng.gen_range(0..6) {
                0 => Op::Submit {
                    spec: spec("x"),
                    now_ms: step,
                    queue_limit: 6,
                },
                1 => Op::Start {
                    attempt: at(id, n),
                    worker: "w".into(),
                    now_ms: step,
                },
                2 => Op::Finish {
                    attempt: at(id, n),
                    worker: "w".into(),
                    outcome: ok(&step.to_le_bytes()),
                    started_at_ms: step,
                    finished_at_ms: step,
                    now_ms: step,
                    retry_at_ms: step,
                },
                3 => Op::Finish {
                    attempt: at(id, n),
                    worker: "w".into(),
                    outcome: fail(FailureKind::Exit),
                    started_at_ms: step,
                    finished_at_ms: step,
                    now_ms: step,
                    retry_at_ms: step,
                },
                4 => Op::Lose {
                    attempt: at(id, n),
                    reason: "r".into(),
                    now_ms: step,
                    retry_at_ms: step,
                },
                _ => Op::Cancel {
                    task_id: id,
                    now_ms: step,
                },
            };
            one(&mut t, op);
            t.check_indexes()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            for (fid, (st, out)) in &finals {
                let task = t.get(*fid).unwrap();
                assert_eq!(
                    (task.state, &task.output),
                    (*st, out),
                    "seed {seed}: final task {fid} changed"
                );
            }
            for task in t.list(None, Asc, None, usize::MAX, &NoArchive).unwrap() {
                if task.state.is_final() {
                    finals
                        .entry(task.id)
                        .or_insert((task.state, task.output.clone()));
                }
                assert!(task.attempts.len() as u32 <= 4);
            }
        }
    }
}

fn ring_record(name: &str, stages: &[&str]) -> SwarmRecord {
    SwarmRecord {
        spec: SwarmSpec::new(
            name,
            swarm_topology::TopologySpec::Ring {
                stages: stages.iter().map(|a| StageSpec::new(*a)).collect(),
            },
            BTreeMap::new(),
        )
        .unwrap(),
        queue_depth: 0,
        created_at_ms: 1,
    }
}

fn ring_spec(swarm: &str, stages: &[&str]) -> TaskSpec {
    TaskSpec {
        swarm: swarm.into(),
        stages: stages.iter().map(|a| StageSpec::new(*a)).collect(),
        agent: stages[0].into(),
        ..spec("x")
    }
}

#[test]
fn swarms_are_created_once_and_deleted_only_when_idle() {
    let mut t = TaskTable::new();
    let rec = ring_record("pipe", &["a", "b"]);
    assert_eq!(
        one(
            &mut t,
            Op::SwarmCreate {
                record: rec.clone()
            }
        ),
        OpResult::Swarm(Ok(()))
    );
    let again = one(&mut t, Op::SwarmCreate { record: rec });
    assert!(
        matches!(&again, OpResult::Swarm(Err(f)) if f.code == "swarm_exists"),
        "{again:?}"
    );
    let default = one(
        &mut t,
        Op::SwarmCreate {
            record: SwarmRecord::default_swarm(),
        },
    );
    assert!(matches!(&default, OpResult::Swarm(Err(f)) if f.code == "swarm_exists"));
    // A task in the swarm keeps it from being deleted.
    assert!(matches!(
        submit(&mut t, ring_spec("pipe", &["a", "b"])),
        OpResult::Submitted { id: 1, .. }
    ));
    let busy = one(
        &mut t,
        Op::SwarmDelete {
            name: "pipe".into(),
        },
    );
    assert!(
        matches!(&busy, OpResult::Swarm(Err(f)) if f.code == "swarm_busy"),
        "{busy:?}"
    );
    one(
        &mut t,
        Op::Cancel {
            task_id: 1,
            now_ms: 5,
        },
    );
    assert_eq!(
        one(
            &mut t,
            Op::SwarmDelete {
                name: "pipe".into()
            }
        ),
        OpResult::Swarm(Ok(()))
    );
    let gone = one(
        &mut t,
        Op::SwarmDelete {
            name: "pipe".into(),
        },
    );
    assert!(matches!(&gone, OpResult::Swarm(Err(f)) if f.code == "unknown_swarm"));
    let dflt = one(
        &mut t,
        Op::SwarmDelete {
            name: "default".into(),
        },
    );
    assert!(matches!(&dflt, OpResult::Swarm(Err(f)) if f.code == "default_swarm"));
    // Submitting to a swarm that does not exist is refused, and creates nothing.
    let unknown = submit(&mut t, ring_spec("pipe", &["a"]));
    assert!(matches!(&unknown, OpResult::Swarm(Err(f)) if f.code == "unknown_swarm"));
    assert_eq!(t.len(), 1);
    assert_eq!(t.swarms().len(), 1, "only the default swarm is left");
}

#[test]
fn a_ring_task_passes_each_stage_output_on_and_retries_per_stage() {
    let mut t = TaskTable::new();
    one(
        &mut t,
        Op::SwarmCreate {
            record: ring_record("pipe", &["up", "rev", "wrap"]),
        },
    );
    let mut s = ring_spec("pipe", &["up", "rev", "wrap"]);
    s.max_attempts = 2;
    submit(&mut t, s);
    let task = t.get(1).unwrap();
    assert_eq!(
        (task.stage, task.current_agent(), task.current_input()),
        (0, "up", &b"p"[..])
    );
    start(&mut t, at(1, 1));
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"P")),
        OpResult::Applied {
            state: TaskState::Queued
        },
        "stage 0 done: queued for stage 1"
    );
    let task = t.get(1).unwrap();
    assert_eq!(
        (task.stage, task.current_agent(), task.current_input()),
        (1, "rev", &b"P"[..])
    );
    assert_eq!(task.not_before_ms, 0, "the next stage may start at once");
    // Stage 1 fails once and is lost once: two attempts of this stage, the limit.
    start(&mut t, at(1, 2));
    assert_eq!(
        finish(&mut t, at(1, 2), fail(FailureKind::Exit)),
        OpResult::Applied {
            state: TaskState::Queued
        },
        "stage attempts count from the stage's start, not the task's"
    );
    start(&mut t, at(1, 3));
    assert_eq!(
        finish(&mut t, at(1, 3), ok(b"P!")),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    start(&mut t, at(1, 4));
    assert_eq!(
        finish(&mut t, at(1, 4), ok(b"[P!]")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    let task = t.get(1).unwrap();
    assert_eq!(task.output.as_deref(), Some(&b"[P!]"[..]));
    assert_eq!(
        task.stage_outputs,
        vec![b"P".to_vec(), b"P!".to_vec(), b"[P!]".to_vec()]
    );
    let stages: Vec<u32> = task.attempts.iter().map(|a| a.stage).collect();
    assert_eq!(stages, vec![0, 1, 1, 2]);
    // A late report of stage 0's attempt changes nothing.
    assert!(matches!(
        finish(&mut t, at(1, 1), ok(b"x")),
        OpResult::Ignored { .. }
    ));
    t.check_indexes().unwrap();
    let v = t.get(1).unwrap().view();
    assert_eq!(v.stages, vec!["up", "rev", "wrap"]);
    assert_eq!(v.stage_outputs, vec!["P", "P!", "[P!]"]);
}

#[test]
fn a_ring_stage_lost_too_often_dead_letters_the_task() {
    let mut t = TaskTable::new();
    one(
        &mut t,
        Op::SwarmCreate {
            record: ring_record("pipe", &["a", "b"]),
        },
    );
    let mut s = ring_spec("pipe", &["a", "b"]);
    s.max_attempts = 1;
    submit(&mut t, s);
    start(&mut t, at(1, 1));
    finish(&mut t, at(1, 1), ok(b"1"));
    start(&mut t, at(1, 2));
    let r = one(
        &mut t,
        Op::Lose {
            attempt: at(1, 2),
            reason: "gone".into(),
            now_ms: 9,
            retry_at_ms: 10,
        },
    );
    assert_eq!(
        r,
        OpResult::Applied {
            state: TaskState::DeadLettered
        }
    );
    assert_eq!(t.get(1).unwrap().stage_outputs, vec![b"1".to_vec()]);
}

/// A report is the attempt's result only from the worker the attempt is recorded on:
/// after a failover the same attempt number can have been sent to two workers, and the
/// one whose `Start` committed is the one that counts.
#[test]
fn reports_count_only_from_the_worker_holding_the_attempt() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("echo"));
    // Started on `w` (the helper's worker).
    start(&mut t, at(1, 1));
    let from = |worker: &str, outcome: Outcome| Op::Finish {
        attempt: at(1, 1),
        worker: worker.into(),
        outcome,
        started_at_ms: 2,
        finished_at_ms: 3,
        now_ms: 3,
        retry_at_ms: 10,
    };
    assert!(matches!(
        one(&mut t, from("stale", ok(b"theirs"))),
        OpResult::Ignored {
            state: TaskState::Running
        }
    ));
    assert!(matches!(
        one(&mut t, from("stale", fail(FailureKind::Exit))),
        OpResult::Ignored { .. }
    ));
    let task = t.get(1).unwrap();
    assert_eq!(
        (task.state, task.attempts[0].end.is_none()),
        (TaskState::Running, true)
    );
    assert_eq!(
        finish(&mut t, at(1, 1), ok(b"mine")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    let task = t.get(1).unwrap();
    assert_eq!(
        (task.output.as_deref(), task.attempts[0].worker.as_str()),
        (Some(&b"mine"[..]), "w")
    );
    t.check_indexes().unwrap();
}

#[test]
fn moves_are_recorded_only_from_the_current_holder() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("echo"));
    // Before its Start commits: the move records the attempt on the thief.
    let mv = |from: &str, to: &str| Op::Move {
        attempt: at(1, 1),
        from: from.into(),
        to: to.into(),
        now_ms: 4,
    };
    assert_eq!(
        one(&mut t, mv("a", "b")),
        OpResult::Applied {
            state: TaskState::Running
        }
    );
    assert!(matches!(start(&mut t, at(1, 1)), OpResult::Ignored { .. }));
    let task = t.get(1).unwrap();
    assert_eq!(
        (
            task.attempts.len(),
            task.attempts[0].worker.as_str(),
            task.moves
        ),
        (1, "b", 1)
    );
    // From a worker that does not hold it: ignored.
    assert!(matches!(
        one(&mut t, mv("a", "c")),
        OpResult::Ignored { .. }
    ));
    assert_eq!(
        one(&mut t, mv("b", "c")),
        OpResult::Applied {
            state: TaskState::Running
        }
    );
    assert_eq!(t.get(1).unwrap().attempts[0].worker, "c");
    t.check_indexes().unwrap();
    // A snapshot keeps swarms and moves.
    one(
        &mut t,
        Op::SwarmCreate {
            record: ring_record("pipe", &["a"]),
        },
    );
    let mut archive = MemArchive::default();
    checkpoint(&mut t, &mut archive);
    let back = archive.reload();
    assert_eq!(back.get(1).unwrap().moves, 2);
    assert!(back.swarm("pipe").is_some());
    assert_eq!(back.swarms_gen(), t.swarms_gen());
}

/// A thief's report overtakes the steal's own `Move` proposal: the report is proposed
/// with the steal's moves in front (as the leader's session does), so its result counts,
/// and the steal's `Move`, arriving later, changes nothing.
#[test]
fn a_report_that_overtakes_its_steal_carries_the_move() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("echo"));
    start(&mut t, at(1, 1)); // on "w"
    let mv = Op::Move {
        attempt: at(1, 1),
        from: "w".into(),
        to: "thief".into(),
        now_ms: 4,
    };
    let report = Op::Finish {
        attempt: at(1, 1),
        worker: "thief".into(),
        outcome: ok(b"stolen"),
        started_at_ms: 4,
        finished_at_ms: 5,
        now_ms: 5,
        retry_at_ms: 10,
    };
    // Alone, the thief's report is not the attempt's result (it is recorded on "w").
    let mut alone = TaskTable::new();
    submit(&mut alone, spec("echo"));
    start(&mut alone, at(1, 1));
    assert!(matches!(
        one(&mut alone, report.clone()),
        OpResult::Ignored { .. }
    ));
    let r = many(&mut t, vec![mv.clone(), report]);
    assert_eq!(
        r[1],
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    assert!(matches!(
        one(&mut t, mv),
        OpResult::NotFound | OpResult::Ignored { .. }
    ));
    let task = t.get(1).unwrap();
    assert_eq!(
        (task.output.as_deref(), task.attempts[0].worker.as_str()),
        (Some(&b"stolen"[..]), "thief")
    );
    t.check_indexes().unwrap();
}

/// A random op for the layered-history test: submits (some with idempotency keys),
/// starts, finishes, losses, cancels, drains, retries of finished tasks and purges over
/// a few dozen ids.
fn random_op(rng: &mut rand::rngs::StdRng, step: u64) -> Op {
    use rand::Rng;
    let id = rng.gen_range(1..=40);
    let n = rng.gen_range(1..=4);
    match rng.gen_range(0..10) {
        0 | 1 => {
            let mut s = spec("x");
            s.retain_ms = rng.gen_range(0..400);
            if rng.gen_bool(0.3) {
                s.idempotency_key = Some(format!("k{}", rng.gen_range(0..15)));
            }
            Op::Submit {
                spec: s,
                now_ms: step,
                queue_limit: 25,
            }
        }
        2 => Op::Start {
            attempt: at(id, n),
            worker: "w".into(),
            now_ms: step,
        },
        3 | 4 => Op::Finish {
            attempt: at(id, n),
            worker: "w".into(),
            outcome: match rng.gen_range(0..3) {
                0 => fail(FailureKind::Exit),
                1 => fail(FailureKind::Drained),
                _ => ok(&step.to_le_bytes()),
            },
            started_at_ms: step,
            finished_at_ms: step,
            now_ms: step,
            retry_at_ms: step,
        },
        5 => Op::Lose {
            attempt: at(id, n),
            reason: "r".into(),
            now_ms: step,
            retry_at_ms: step,
        },
        6 => Op::Cancel {
            task_id: id,
            now_ms: step,
        },
        7 => Op::Retry {
            task_id: id,
            now_ms: step,
        },
        _ => Op::Purge {
            ids: (1..=40).filter(|_| rng.gen_bool(0.5)).collect(),
            now_ms: step,
        },
    }
}

/// Checkpoints (with and without a restart from the archive, some of them left half
/// done while more ops apply) change nothing anyone can observe: every op answers as it
/// does on a table that never checkpoints, and so does every read.
#[test]
fn checkpoints_and_restarts_are_invisible() {
    use rand::{Rng, SeedableRng};
    for seed in 0..150u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut reference = TaskTable::new();
        let mut t = TaskTable::new();
        let mut archive = MemArchive::default();
        // Every op applied, and how many of them the archive reflects.
        let mut log: Vec<Op> = Vec::new();
        let mut archived = 0;
        // A checkpoint begun but not yet written (ops keep applying on top of it), with
        // the number of ops it covers.
        let mut in_flight: Option<(CheckpointDelta, usize)> = None;
        for step in 0..400u64 {
            let op = random_op(&mut rng, step);
            let want = reference.apply_op(&op, &NoArchive).unwrap();
            let got = t.apply_op(&op, &archive).unwrap();
            assert_eq!(got, want, "seed {seed} step {step}: {op:?}");
            log.push(op);
            match rng.gen_range(0..20) {
                0 if in_flight.is_none() => {
                    in_flight = Some((t.begin_checkpoint().unwrap(), log.len()))
                }
                1 | 2 => {
                    if let Some((d, covers)) = in_flight.take() {
                        archive.write(&d);
                        archived = covers;
                        t.checkpoint_written();
                    }
                }
                3 => {
                    // A crash: a checkpoint in flight is lost; the replica restarts from
                    // the archive and re-applies the log after it.
                    in_flight = None;
                    t = archive.reload();
                    for op in &log[archived..] {
                        t.apply_op(op, &archive).unwrap();
                    }
                }
                4 if in_flight.take().is_some() => t.checkpoint_failed(),
                _ => {}
            }
            t.check_indexes()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            if step % 40 == 39 {
                same_listings(
                    &t,
                    &reference,
                    &archive,
                    &format!("seed {seed} step {step}"),
                );
            }
        }
        for id in 0..=42 {
            assert_eq!(
                t.lookup(id, &archive).unwrap(),
                reference.lookup(id, &NoArchive).unwrap(),
                "seed {seed}: task {id}"
            );
        }
        same_listings(&t, &reference, &archive, &format!("seed {seed}"));
        for k in 0..15 {
            let key = format!("k{k}");
            assert_eq!(
                t.by_idempotency_key(&key, &archive).unwrap(),
                reference.by_idempotency_key(&key, &NoArchive).unwrap()
            );
        }
    }
}

/// Every listing of `t` (with its archive) equals `reference`'s, in both orders, with and
/// without a state, from several cursors; descending, paged with small limits, is the
/// ascending listing reversed.
fn same_listings(t: &TaskTable, reference: &TaskTable, archive: &MemArchive, at: &str) {
    let ids = |v: &[std::sync::Arc<Task>]| v.iter().map(|t| t.id).collect::<Vec<_>>();
    for state in [None]
        .into_iter()
        .chain(TaskState::ALL.iter().copied().map(Some))
    {
        for order in [Asc, Desc] {
            for (after, limit) in [(None, 1000), (Some(3), 2), (Some(10), 5), (Some(30), 4)] {
                let a = t.list(state, order, after, limit, archive).unwrap();
                let b = reference
                    .list(state, order, after, limit, &NoArchive)
                    .unwrap();
                assert_eq!(
                    ids(&a),
                    ids(&b),
                    "{at}: list {state:?} {order:?} after {after:?} limit {limit}"
                );
                assert_eq!(a, b, "{at}: list {state:?} {order:?} after {after:?}");
            }
        }
        let asc = ids(&t.list(state, Asc, None, usize::MAX, archive).unwrap());
        let mut reversed = asc.clone();
        reversed.reverse();
        for limit in [1, 2, 3, 7] {
            assert_eq!(
                page_through(t, state, Desc, limit, archive),
                reversed,
                "{at}: {state:?} desc by {limit}"
            );
            assert_eq!(
                page_through(t, state, Asc, limit, archive),
                asc,
                "{at}: {state:?} asc by {limit}"
            );
        }
        if let Some(s) = state {
            assert_eq!(t.count(s), reference.count(s), "{at}: count {s:?}");
        }
    }
}

#[test]
fn expired_tasks_are_purged_everywhere_and_their_keys_freed() {
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    let run = |t: &mut TaskTable, a: &MemArchive, op: Op| t.apply_op(&op, a).unwrap();
    let mut s = spec("x");
    s.retain_ms = 100;
    s.idempotency_key = Some("once".into());
    run(
        &mut t,
        &archive,
        Op::Submit {
            spec: s.clone(),
            now_ms: 1,
            queue_limit: 100,
        },
    );
    start(&mut t, at(1, 1));
    // Finished at 3: expires at 103.
    finish(&mut t, at(1, 1), ok(b"r"));
    checkpoint(&mut t, &mut archive);
    assert!(t.expired_in_archive(102, 10, &archive).unwrap().is_empty());
    assert_eq!(t.expired_in_archive(103, 10, &archive).unwrap(), vec![1]);
    // Too early for this replica's op: nothing happens.
    assert_eq!(
        run(
            &mut t,
            &archive,
            Op::Purge {
                ids: vec![1],
                now_ms: 50
            }
        ),
        OpResult::Purged { purged: 0 }
    );
    assert_eq!(
        run(
            &mut t,
            &archive,
            Op::Submit {
                spec: s.clone(),
                now_ms: 60,
                queue_limit: 100
            }
        ),
        OpResult::Submitted {
            id: 1,
            duplicate: true
        },
        "the key dedupes while its task is retained"
    );
    assert_eq!(
        run(
            &mut t,
            &archive,
            Op::Purge {
                ids: vec![1, 7],
                now_ms: 103
            }
        ),
        OpResult::Purged { purged: 1 }
    );
    assert_eq!(t.lookup(1, &archive).unwrap(), Lookup::Expired);
    assert_eq!(t.count(TaskState::Succeeded), 0);
    assert!(t.expired_in_archive(200, 10, &archive).unwrap().is_empty());
    // A late report of the purged task is answered, not recorded.
    let late = Op::Finish {
        attempt: at(1, 1),
        worker: "w".into(),
        outcome: ok(b"again"),
        started_at_ms: 2,
        finished_at_ms: 3,
        now_ms: 3,
        retry_at_ms: 10,
    };
    assert_eq!(run(&mut t, &archive, late), OpResult::Expired);
    // The key is free again: a new task.
    assert_eq!(
        run(
            &mut t,
            &archive,
            Op::Submit {
                spec: s,
                now_ms: 110,
                queue_limit: 100
            }
        ),
        OpResult::Submitted {
            id: 2,
            duplicate: false
        }
    );
    checkpoint(&mut t, &mut archive);
    assert!(archive.done.is_empty());
    assert_eq!(archive.keys.get("once"), Some(&2));
    let back = archive.reload();
    assert_eq!(back.lookup(1, &archive).unwrap(), Lookup::Expired);
    assert_eq!(back.lookup(3, &archive).unwrap(), Lookup::Unknown);
}

fn restored_task(id: TaskId, state: TaskState) -> Task {
    let mut s = spec("x");
    s.idempotency_key = Some(format!("r{id}"));
    Task {
        id,
        spec: s,
        state,
        attempts: Vec::new(),
        output: None,
        error: None,
        created_at_ms: 1,
        finished_at_ms: state.is_final().then_some(2),
        expires_at_ms: state.is_final().then_some(10_000),
        not_before_ms: 0,
        stage: 0,
        stage_base: 0,
        released: 0,
        stage_outputs: Vec::new(),
        moves: 0,
        flow: None,
    }
}

#[test]
fn a_restore_is_all_or_nothing_across_checkpoints() {
    let config = swarm_memory::StoreConfig::default();
    let mut memory = swarm_memory::MemoryStore::new(config.clone()).unwrap();
    let source = swarm_memory::MemoryStore::new(config).unwrap();
    let blob = source.snapshot_bytes().unwrap();
    let (first, second) = blob.split_at(blob.len() / 2);
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    let run = |t: &mut TaskTable, m: &mut swarm_memory::MemoryStore, a: &MemArchive, op: Op| {
        let table = std::cell::RefCell::new(std::mem::take(t));
        let r = apply_memory_command(|| table.borrow_mut(), m, &Command { ops: vec![op] }, a)
            .unwrap()
            .results
            .remove(0);
        *t = table.into_inner();
        r
    };
    let begin = Op::RestoreBegin {
        restore_id: 7,
        now_ms: 1,
    };
    assert!(matches!(
        run(&mut t, &mut memory, &archive, begin.clone()),
        OpResult::Restored(Ok(_))
    ));
    assert!(matches!(
        run(&mut t, &mut memory, &archive, begin),
        OpResult::Restored(Err(_))
    ));
    let chunk = |seq, tasks, memory: &[u8]| Op::RestoreTasks {
        restore_id: 7,
        seq,
        tasks,
        memory: memory.to_vec(),
    };
    let r = run(
        &mut t,
        &mut memory,
        &archive,
        chunk(
            0,
            vec![
                restored_task(1, TaskState::Succeeded),
                restored_task(4, TaskState::Queued),
            ],
            first,
        ),
    );
    assert!(
        matches!(r, OpResult::Restored(Ok(RestoreSummary { tasks: 2, .. }))),
        "{r:?}"
    );
    // Nothing else changes the replica meanwhile.
    assert_eq!(submit(&mut t, spec("x")), OpResult::Restoring);
    checkpoint(&mut t, &mut archive);
    // Out of order: refused.
    assert!(matches!(
        run(&mut t, &mut memory, &archive, chunk(5, vec![], b"")),
        OpResult::Restored(Err(_))
    ));
    run(
        &mut t,
        &mut memory,
        &archive,
        chunk(1, vec![restored_task(2, TaskState::Failed)], second),
    );
    let mut aborted = t.begin_checkpoint().unwrap();
    archive.write(&aborted);
    t.checkpoint_written();
    // An abort empties everything, however much was checkpointed.
    let mut t2 = archive.reload();
    let mut memory2 = memory
        .snapshot_bytes()
        .map(|b| swarm_memory::MemoryStore::restore_bytes(&b).unwrap())
        .unwrap();
    assert!(matches!(
        run(
            &mut t2,
            &mut memory2,
            &archive,
            Op::RestoreAbort { restore_id: 7 }
        ),
        OpResult::Restored(Ok(_))
    ));
    assert!(t2.is_empty());
    assert_eq!(t2.lookup(1, &archive).unwrap(), Lookup::Unknown);
    assert_eq!(t2.by_idempotency_key("r1", &archive).unwrap(), None);
    let mut archive2 = archive.clone();
    checkpoint(&mut t2, &mut archive2);
    assert!(archive2.done.is_empty() && archive2.live.is_empty() && archive2.staged.is_empty());
    // The other branch: commit. The staged memory comes from the archive and memory.
    let commit = Op::RestoreCommit {
        restore_id: 7,
        chunks: 2,
        tasks: 3,
        meta: RestoredMeta {
            next_id: 9,
            swarms: BTreeMap::new(),
        },
    };
    aborted = t.begin_checkpoint().unwrap();
    archive.write(&aborted);
    t.checkpoint_written();
    let r = run(&mut t, &mut memory, &archive, commit);
    assert!(
        matches!(r, OpResult::Restored(Ok(RestoreSummary { tasks: 3, .. }))),
        "{r:?}"
    );
    assert_eq!(t.count(TaskState::Queued), 1);
    assert_eq!(t.count(TaskState::Succeeded), 1);
    assert_eq!(t.by_idempotency_key("r2", &archive).unwrap(), Some(2));
    assert_eq!(
        submit(&mut t, spec("x")),
        OpResult::Submitted {
            id: 10,
            duplicate: false
        },
        "ids continue after the restored ones"
    );
    assert!(t.restoring().is_none());
}

/// A worker whose clock is days behind does not make its tasks expire early: a task is
/// finished at, and retained from, the leader's time.
#[test]
fn retention_counts_from_the_leaders_clock_not_the_workers() {
    let mut t = TaskTable::new();
    let mut s = spec("x");
    s.retain_ms = 1_000;
    one(
        &mut t,
        Op::Submit {
            spec: s,
            now_ms: 345_600_000,
            queue_limit: 10,
        },
    );
    start(&mut t, at(1, 1));
    let four_days_behind = 1;
    one(
        &mut t,
        Op::Finish {
            attempt: at(1, 1),
            worker: "w".into(),
            outcome: ok(b"r"),
            started_at_ms: four_days_behind,
            finished_at_ms: four_days_behind,
            now_ms: 345_600_500,
            retry_at_ms: 345_600_500,
        },
    );
    let task = t.get(1).unwrap();
    assert_eq!(task.finished_at_ms, Some(345_600_500));
    assert_eq!(task.expires_at_ms, Some(345_601_500));
    assert_eq!(task.attempts[0].finished_at_ms, Some(four_days_behind));
    assert!(t.expired_in_memory(345_601_499, 10).is_empty());
}

/// A worker's report and the judgement of the patterns its agent used travel in one
/// command: the judgement applies only when the report's `Finish` is recorded, so a
/// pattern is judged once per recorded result (a stale report judges nothing).
#[test]
fn patterns_are_judged_only_with_a_recorded_result() {
    let mut memory = swarm_memory::MemoryStore::new(swarm_memory::StoreConfig::default()).unwrap();
    let archive = MemArchive::default();
    let table = std::cell::RefCell::new(TaskTable::new());
    submit(&mut table.borrow_mut(), spec("echo"));
    start(&mut table.borrow_mut(), at(1, 1));
    let finish_from = |worker: &str| Op::Finish {
        attempt: at(1, 1),
        worker: worker.into(),
        outcome: ok(b"out"),
        started_at_ms: 2,
        finished_at_ms: 3,
        now_ms: 3,
        retry_at_ms: 10,
    };
    let judge = |task| {
        Op::Memory(swarm_memory::MemoryOp::PatternJudge {
            task_id: Some(task),
            item_ids: vec!["pat-000000000042".into()],
            outcome: swarm_memory::Outcome::Success,
            now_ms: 3,
        })
    };
    let mut run = |ops: Vec<Op>| {
        apply_memory_command(
            || table.borrow_mut(),
            &mut memory,
            &Command { ops },
            &archive,
        )
        .unwrap()
        .results
    };
    // What a judgement that applied says of an unknown pattern, and of a skipped one.
    let judged = |r: &OpResult| match r {
        OpResult::Memory(Ok(OpOutcome::Judged { missing, .. })) => !missing.is_empty(),
        other => panic!("not a judgement: {other:?}"),
    };
    // ... and whether a result was queued for distillation.
    let queue = Op::Memory(swarm_memory::MemoryOp::DistillQueue {
        task_id: 1,
        attempt: 1,
        now_ms: 3,
    });
    let queued = |r: &OpResult| match r {
        OpResult::Memory(Ok(OpOutcome::DistillQueued { queued, .. })) => *queued,
        other => panic!("not a distill queue: {other:?}"),
    };
    let r = run(vec![finish_from("stale"), judge(1), queue.clone()]);
    assert!(matches!(r[0], OpResult::Ignored { .. }));
    assert!(!judged(&r[1]), "a stale report judges nothing");
    assert!(!queued(&r[2]), "nor is it distilled");
    let r = run(vec![finish_from("w"), judge(1), queue.clone()]);
    assert!(matches!(r[0], OpResult::Applied { .. }));
    assert!(judged(&r[1]), "the recorded result is judged");
    assert!(queued(&r[2]), "and waits in the outbox");
    // The same report again (a retry after a lost Ack): recorded once, judged once,
    // queued once.
    let r = run(vec![finish_from("w"), judge(1), queue]);
    assert!(matches!(r[0], OpResult::Ignored { .. }));
    assert!(!judged(&r[1]));
    assert!(!queued(&r[2]));
    // A judgement on its own (the API's) applies as before.
    let r = run(vec![judge(1)]);
    assert!(judged(&r[0]));
}

#[test]
fn access_applies_in_order_and_survives_checkpoints() {
    use super::access::{RevokedCert, TokenRecord};
    use super::AccessOp;
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    let token = TokenRecord {
        id: "0a0b".into(),
        name: "ci".into(),
        scope: swarm_proto::api::Scope::Submit,
        swarms: vec![],
        hash: [1; 32],
        created_at_ms: 5,
        expires_at_ms: None,
    };
    let cmd = Command {
        ops: vec![
            Op::Access(AccessOp::TokenCreate {
                record: token.clone(),
                now_ms: 5,
            }),
            Op::Access(AccessOp::CertRevoke {
                cert: RevokedCert {
                    serial: "1f".into(),
                    subject: "worker w9".into(),
                    not_after_ms: None,
                    revoked_at_ms: 5,
                },
                now_ms: 5,
            }),
        ],
    };
    let r = t.apply(&cmd);
    assert_eq!(
        r.results,
        [OpResult::Access(Ok(())), OpResult::Access(Ok(()))]
    );
    checkpoint(&mut t, &mut archive);
    let back = archive.reload();
    assert_eq!(back.access().token("0a0b"), Some(&token));
    assert!(back.access().is_revoked("1f"));
    // The reloaded table goes on applying them.
    let mut t = back;
    let r = t.apply(&Command {
        ops: vec![Op::Access(AccessOp::TokenRevoke {
            token: "ci".into(),
            now_ms: 6,
        })],
    });
    assert_eq!(r.results, [OpResult::Access(Ok(()))]);
    assert!(t.access().tokens.is_empty());
    assert!(t.access().is_revoked("1f"));
}

#[test]
fn the_access_state_is_written_only_by_the_checkpoint_after_a_change() {
    use super::access::TokenRecord;
    use super::AccessOp;
    let mut t = TaskTable::new();
    // A fresh table's archive holds none yet.
    assert!(t.begin_checkpoint().unwrap().access.is_some());
    t.checkpoint_written();
    submit(&mut t, spec("x"));
    assert!(t.begin_checkpoint().unwrap().access.is_none(), "unchanged");
    t.checkpoint_written();
    let r = t.apply(&Command {
        ops: vec![Op::Access(AccessOp::TokenCreate {
            record: TokenRecord {
                id: "0a".into(),
                name: "ci".into(),
                scope: swarm_proto::api::Scope::Read,
                swarms: vec![],
                hash: [3; 32],
                created_at_ms: 1,
                expires_at_ms: None,
            },
            now_ms: 1,
        })],
    });
    assert_eq!(r.results, [OpResult::Access(Ok(()))]);
    let d = t.begin_checkpoint().unwrap();
    assert!(d.access.as_ref().is_some_and(|a| a.token("0a").is_some()));
    // A failed checkpoint leaves it for the next one.
    t.checkpoint_failed();
    assert!(t.begin_checkpoint().unwrap().access.is_some());
    t.checkpoint_written();
    assert!(t.begin_checkpoint().unwrap().access.is_none());
}

fn log_of(text: &str) -> swarm_proto::worker::LogTail {
    use swarm_proto::worker::{LogPiece, LogTail, OutputStream};
    LogTail {
        offset: 7,
        pieces: vec![
            LogPiece {
                stream: OutputStream::Stdout,
                data: text.as_bytes().to_vec(),
            },
            LogPiece {
                stream: OutputStream::Stderr,
                data: b"warn\n".to_vec(),
            },
        ],
    }
}

/// A report's log tail and usage are kept with its attempt (whatever the outcome), read
/// back through a checkpoint and a restart, and an attempt reported without them has
/// none.
#[test]
fn log_tails_and_usage_are_stored_with_their_attempts() {
    let usage = swarm_proto::worker::Usage {
        model: "m".into(),
        prompt_tokens: 10,
        completion_tokens: 4,
    };
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    submit(&mut t, spec("a"));
    start(&mut t, at(1, 1));
    let report = |attempt: u32, outcome: Outcome, log, usage| {
        Op::Report(Box::new(Report {
            attempt: at(1, attempt),
            worker: "w".into(),
            outcome,
            started_at_ms: 2,
            finished_at_ms: 3,
            now_ms: 3,
            retry_at_ms: 3,
            log,
            usage,
        }))
    };
    assert_eq!(
        one(
            &mut t,
            report(1, fail(FailureKind::Exit), log_of("first\n"), None)
        ),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    start(&mut t, at(1, 2));
    assert_eq!(
        one(
            &mut t,
            report(2, ok(b"done"), log_of("second\n"), Some(usage.clone()))
        ),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
    checkpoint(&mut t, &mut archive);
    let t = archive.reload();
    let Lookup::Found(task) = t.lookup(1, &archive).unwrap() else {
        panic!("task 1 not found after the restart");
    };
    let a = &task.attempts;
    assert_eq!(a[0].log(), Some(&log_of("first\n")));
    assert_eq!(a[0].usage(), None);
    assert!(matches!(
        a[0].outcome(),
        Some(AttemptEnd::Failed {
            kind: FailureKind::Exit,
            ..
        })
    ));
    assert_eq!(a[1].log(), Some(&log_of("second\n")));
    assert_eq!(a[1].usage(), Some(&usage));
    assert_eq!(a[1].outcome(), Some(&AttemptEnd::Succeeded));
    let view = task.view();
    assert_eq!(view.attempts[1].outcome.as_deref(), Some("succeeded"));
    assert_eq!(view.attempts[1].output_bytes, 7 + 7 + 5);
    assert_eq!(view.attempts[1].usage.as_ref().unwrap().prompt_tokens, 10);
    // The task round-trips through the codec as every store writes it.
    let bytes = swarm_codec::encode(&*task).unwrap();
    let back: Task = swarm_codec::decode(&bytes, bytes.len()).unwrap();
    assert_eq!(back, *task);
}

/// A `Logged` end never holds another: an encoding that nests them is refused, not
/// decoded recursively.
#[test]
fn nested_logged_ends_are_refused() {
    let inner = AttemptEnd::Logged(Box::new(LoggedEnd {
        end: AttemptEnd::Cancelled,
        log: Default::default(),
        usage: None,
    }));
    let nested = AttemptEnd::Logged(Box::new(LoggedEnd {
        end: inner.clone(),
        log: Default::default(),
        usage: None,
    }));
    let ok = swarm_codec::encode(&inner).unwrap();
    assert_eq!(
        swarm_codec::decode::<AttemptEnd>(&ok, ok.len()).unwrap(),
        inner
    );
    let bad = swarm_codec::encode(&nested).unwrap();
    assert!(swarm_codec::decode::<AttemptEnd>(&bad, bad.len()).is_err());
    // `with_log` never nests either.
    let again = inner.clone().with_log(Some(&log_of("x")), None);
    let AttemptEnd::Logged(l) = again else {
        panic!("not logged")
    };
    assert_eq!(l.end, AttemptEnd::Cancelled);
}

/// Task `id` was cancelled because a parent did not succeed (`dependency_failed`).
fn assert_cancelled_by_a_parent(t: &TaskTable, id: TaskId) {
    let task = t.get(id).unwrap();
    assert_eq!(task.state, TaskState::Cancelled, "task {id}");
    assert!(
        task.error
            .as_deref()
            .is_some_and(|e| e.starts_with("dependency_failed")),
        "task {id}: {:?}",
        task.error
    );
}

mod approvals;
mod graph;

/// A task with a callback enters the outbox when it finishes (any final state), and
/// leaves it when the delivery ends (recorded on the task), when it is purged, or when it
/// is retried (it will notify again when it finishes again).
#[test]
fn finished_tasks_with_a_callback_wait_in_the_outbox_until_delivered() {
    use super::callbacks::{Applied, CallbackOp};
    use super::flow::FlowAttr;
    let mut t = TaskTable::new();
    let with_callback = |t: &mut TaskTable, payload: &str| {
        let mut s = spec(payload);
        s.max_attempts = 1;
        s.retain_ms = 10;
        let flow = Flow {
            more: vec![FlowAttr::Callback {
                url: "http://127.0.0.1:9/cb".into(),
            }],
            ..Flow::default()
        };
        match one(
            t,
            Op::SubmitFlow {
                spec: s,
                flow: Box::new(flow),
                now_ms: 1,
                queue_limit: 100,
            },
        ) {
            OpResult::Submitted { id, .. } => id,
            other => panic!("{other:?}"),
        }
    };
    let a = with_callback(&mut t, "a");
    let b = with_callback(&mut t, "b");
    submit(&mut t, spec("no callback"));
    assert!(t.callbacks().is_empty(), "nothing finished yet");
    start(&mut t, at(a, 1));
    finish(&mut t, at(a, 1), ok(b"out"));
    start(&mut t, at(b, 1));
    finish(&mut t, at(b, 1), fail(FailureKind::Exit));
    start(&mut t, at(3, 1));
    finish(&mut t, at(3, 1), ok(b"x"));
    assert_eq!(
        t.callbacks().len(),
        2,
        "the task without a callback is not there"
    );
    // Delivered: it leaves the outbox, and the task says so.
    let delivered = Op::Callback(CallbackOp::Delivered {
        task_id: a,
        attempt: 1,
        status: 200,
        now_ms: 50,
    });
    assert!(matches!(
        one(&mut t, delivered.clone()),
        OpResult::Callback(Applied::Ended(_))
    ));
    assert_eq!(
        one(&mut t, delivered),
        OpResult::Callback(Applied::Ignored),
        "a replay"
    );
    let view = t.get(a).unwrap().view();
    let cb = view.callback.unwrap();
    assert_eq!(
        (cb.state.as_str(), cb.attempts, cb.status),
        ("delivered", Some(1), Some(200))
    );
    // Retried (redrive): b's pending delivery is dropped; it notifies when it ends again.
    assert_eq!(
        one(
            &mut t,
            Op::Retry {
                task_id: b,
                now_ms: 60
            }
        ),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    assert!(t.callbacks().get(b).is_none());
    start(&mut t, at(b, 2));
    finish(&mut t, at(b, 2), fail(FailureKind::Exit));
    assert_eq!(t.callbacks().get(b).map(|p| p.attempts), Some(0));
    // Purged after its retention: gone from the outbox too.
    let r = one(
        &mut t,
        Op::Purge {
            ids: vec![b],
            now_ms: 10_000,
        },
    );
    assert_eq!(r, OpResult::Purged { purged: 1 });
    assert!(t.callbacks().is_empty());
    t.check_indexes().unwrap();
}
