//! Approvals: a task requiring approval waits in `awaiting_approval` until approved
//! (queued, then runs) or rejected (cancelled, its dependants with it); past its deadline
//! it fails with `approval_timeout`; stale decisions change nothing; all of it survives
//! checkpoints, restarts and the encoding.

use super::*;
use crate::state::flow::FlowAttr;

/// A flow that requires approval, with an optional timeout.
fn approval(timeout_ms: Option<u64>) -> Flow {
    Flow {
        more: vec![FlowAttr::Approval {
            timeout_ms,
            deadline_ms: None,
        }],
        ..Flow::default()
    }
}

fn submit_approval(t: &mut TaskTable, timeout_ms: Option<u64>, now_ms: u64) -> TaskId {
    match one(
        t,
        Op::SubmitFlow {
            spec: spec("x"),
            flow: Box::new(approval(timeout_ms)),
            now_ms,
            queue_limit: 100,
        },
    ) {
        OpResult::Submitted {
            id,
            duplicate: false,
        } => id,
        other => panic!("{other:?}"),
    }
}

fn decide(t: &mut TaskTable, id: TaskId, approve: bool, comment: Option<&str>) -> OpResult {
    one(
        t,
        Op::Decide {
            task_id: id,
            approve,
            by: "alice".into(),
            comment: comment.map(str::to_string),
            now_ms: 50,
        },
    )
}

fn expire(t: &mut TaskTable, ids: Vec<TaskId>, now_ms: u64) -> OpResult {
    one(t, Op::ExpireApprovals { ids, now_ms })
}

fn state(t: &TaskTable, id: TaskId) -> TaskState {
    t.get(id).unwrap().state
}

fn queued_ids(t: &TaskTable) -> Vec<TaskId> {
    t.queued().map(|t| t.id).collect()
}

fn step(name: &str, after: &[u32], flow: Flow) -> GraphStep {
    GraphStep {
        spec: spec("x"),
        flow: Flow {
            step: Some(name.into()),
            ..flow
        },
        after: after.to_vec(),
    }
}

/// Submitted with approval: awaiting, not queued, counted as unfinished; approved: queued
/// and it runs to success, the decision recorded and shown.
#[test]
fn an_approved_task_is_queued_and_runs() {
    let mut t = TaskTable::new();
    let id = submit_approval(&mut t, None, 1);
    assert_eq!(state(&t, id), TaskState::AwaitingApproval);
    assert!(queued_ids(&t).is_empty());
    assert_eq!(t.count(TaskState::AwaitingApproval), 1);
    assert_eq!(t.unfinished(), 1);
    t.check_indexes().unwrap();
    // It cannot start while it awaits approval.
    assert_eq!(
        start(&mut t, at(id, 1)),
        OpResult::Ignored {
            state: TaskState::AwaitingApproval
        }
    );
    // The queue limit counts it.
    let full = one(
        &mut t,
        Op::Submit {
            spec: spec("x"),
            now_ms: 1,
            queue_limit: 1,
        },
    );
    assert_eq!(full, OpResult::QueueFull { limit: 1 });

    assert_eq!(
        decide(&mut t, id, true, Some("looks fine")),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    assert_eq!(queued_ids(&t), vec![id]);
    assert_eq!(t.count(TaskState::AwaitingApproval), 0);
    t.check_indexes().unwrap();
    let view = t.get(id).unwrap().view();
    let d = view.approval.unwrap().decision.unwrap();
    assert_eq!(
        (d.approved, d.by.as_str(), d.comment.as_deref(), d.at_ms),
        (true, "alice", Some("looks fine"), 50)
    );
    assert_eq!(
        start(&mut t, at(id, 1)),
        OpResult::Applied {
            state: TaskState::Running
        }
    );
    assert_eq!(
        finish(&mut t, at(id, 1), ok(b"done")),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
}

/// A replayed approve, or a decision on a task that no longer awaits approval, is a
/// no-op naming the task's state; unknown tasks are `NotFound`.
#[test]
fn stale_or_replayed_decisions_change_nothing() {
    let mut t = TaskTable::new();
    let id = submit_approval(&mut t, None, 1);
    decide(&mut t, id, true, None);
    let before = t.get(id).unwrap().clone();
    assert_eq!(
        decide(&mut t, id, true, None),
        OpResult::Ignored {
            state: TaskState::Queued
        }
    );
    assert_eq!(
        decide(&mut t, id, false, Some("too late")),
        OpResult::Ignored {
            state: TaskState::Queued
        }
    );
    assert_eq!(
        t.get(id).unwrap(),
        &before,
        "a stale decision changed the task"
    );
    // A plain task never awaits approval.
    let OpResult::Submitted { id: plain, .. } = submit(&mut t, spec("x")) else {
        panic!()
    };
    assert_eq!(
        decide(&mut t, plain, true, None),
        OpResult::Ignored {
            state: TaskState::Queued
        }
    );
    assert!(t.get(plain).unwrap().view().approval.is_none());
    assert_eq!(decide(&mut t, 99, true, None), OpResult::NotFound);
    // A finished task: ignored with its final state.
    let cancelled = submit_approval(&mut t, None, 1);
    one(
        &mut t,
        Op::Cancel {
            task_id: cancelled,
            now_ms: 5,
        },
    );
    assert_eq!(
        decide(&mut t, cancelled, true, None),
        OpResult::Ignored {
            state: TaskState::Cancelled
        }
    );
    t.check_indexes().unwrap();
}

/// Rejected: cancelled with an error naming the rejection, who and why; dependants are
/// cancelled with `dependency_failed`, down the graph.
#[test]
fn a_rejected_task_is_cancelled_and_its_dependants_cascade() {
    let mut t = TaskTable::new();
    let r = one(
        &mut t,
        Op::Graph {
            steps: vec![
                step("gate", &[], approval(None)),
                step("b", &[0], Flow::default()),
                step("c", &[1], Flow::default()),
            ],
            now_ms: 1,
            queue_limit: 100,
        },
    );
    assert_eq!(
        r,
        OpResult::Graph {
            ids: vec![1, 2, 3],
            duplicate: false
        }
    );
    assert_eq!(state(&t, 1), TaskState::AwaitingApproval);
    assert_eq!(state(&t, 2), TaskState::Waiting);
    assert_eq!(
        decide(&mut t, 1, false, Some("not today")),
        OpResult::Applied {
            state: TaskState::Cancelled
        }
    );
    let gate = t.get(1).unwrap();
    assert_eq!(gate.state, TaskState::Cancelled);
    assert_eq!(gate.error.as_deref(), Some("rejected by alice: not today"));
    let d = gate.view().approval.unwrap().decision.unwrap();
    assert!(!d.approved);
    for id in [2, 3] {
        assert_cancelled_by_a_parent(&t, id);
    }
    assert_eq!(t.unfinished(), 0);
    t.check_indexes().unwrap();
    // Without a comment, the error names the rejection alone.
    let id = submit_approval(&mut t, None, 1);
    decide(&mut t, id, false, None);
    assert_eq!(
        t.get(id).unwrap().error.as_deref(),
        Some("rejected by alice")
    );
}

/// A graph step requiring approval awaits it only once its parents succeeded, and holds
/// its dependants until approved; its deadline runs from when it began awaiting.
#[test]
fn a_graph_step_awaits_approval_after_its_parents_and_holds_its_dependants() {
    let mut t = TaskTable::new();
    one(
        &mut t,
        Op::Graph {
            steps: vec![
                step("a", &[], Flow::default()),
                step("gate", &[0], approval(Some(100))),
                step("d", &[1], Flow::default()),
            ],
            now_ms: 1,
            queue_limit: 100,
        },
    );
    assert_eq!(state(&t, 2), TaskState::Waiting);
    let gate = t.get(2).unwrap().view().approval.unwrap();
    assert_eq!((gate.timeout_ms, gate.deadline_ms), (Some(100), None));
    // Not awaiting yet: neither a decision nor an expiry applies.
    assert_eq!(
        decide(&mut t, 2, true, None),
        OpResult::Ignored {
            state: TaskState::Waiting
        }
    );
    assert_eq!(
        expire(&mut t, vec![2], 1_000_000),
        OpResult::ApprovalsExpired { expired: 0 }
    );
    // A succeeds at 3: the gate awaits approval, its deadline 3 + 100.
    start(&mut t, at(1, 1));
    finish(&mut t, at(1, 1), ok(b"\"a\""));
    assert_eq!(state(&t, 2), TaskState::AwaitingApproval);
    assert_eq!(
        t.get(2).unwrap().view().approval.unwrap().deadline_ms,
        Some(103)
    );
    assert_eq!(state(&t, 3), TaskState::Waiting);
    assert!(queued_ids(&t).is_empty());
    t.check_indexes().unwrap();
    decide(&mut t, 2, true, None);
    assert_eq!(queued_ids(&t), vec![2]);
    start(&mut t, at(2, 1));
    finish(&mut t, at(2, 1), ok(b"\"gate\""));
    assert_eq!(queued_ids(&t), vec![3]);
    // A parent that had already succeeded: the step awaits approval at once.
    let r = one(
        &mut t,
        Op::SubmitFlow {
            spec: spec("x"),
            flow: Box::new(Flow {
                parents: vec![1],
                ..approval(None)
            }),
            now_ms: 7,
            queue_limit: 100,
        },
    );
    let OpResult::Submitted { id, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(state(&t, id), TaskState::AwaitingApproval);
    t.check_indexes().unwrap();
}

/// Past the deadline the task fails with `approval_timeout` (never before it), and its
/// dependants are cancelled; the leader's candidates are exactly the tasks due.
#[test]
fn a_deadline_fails_the_task_only_once_passed() {
    let mut t = TaskTable::new();
    one(
        &mut t,
        Op::Graph {
            steps: vec![
                step("gate", &[], approval(Some(1_000))),
                step("after", &[0], Flow::default()),
            ],
            now_ms: 10,
            queue_limit: 100,
        },
    );
    let no_deadline = submit_approval(&mut t, None, 10);
    assert_eq!(
        t.get(1).unwrap().view().approval.unwrap().deadline_ms,
        Some(1_010)
    );
    assert!(t.approvals_due(1_009, 10).is_empty());
    assert_eq!(t.approvals_due(1_010, 10), vec![1]);
    // An op stamped before the deadline expires nothing, whatever it names.
    assert_eq!(
        expire(&mut t, vec![1, 2, no_deadline, 77], 1_009),
        OpResult::ApprovalsExpired { expired: 0 }
    );
    assert_eq!(state(&t, 1), TaskState::AwaitingApproval);
    assert_eq!(
        expire(&mut t, vec![1, no_deadline], 1_010),
        OpResult::ApprovalsExpired { expired: 1 }
    );
    let gate = t.get(1).unwrap();
    assert_eq!(gate.state, TaskState::Failed);
    assert!(gate
        .error
        .as_deref()
        .unwrap()
        .starts_with("approval_timeout"));
    assert_eq!(state(&t, 2), TaskState::Cancelled);
    assert_eq!(state(&t, no_deadline), TaskState::AwaitingApproval);
    // Replayed: nothing more, and a decision after the expiry is refused.
    assert_eq!(
        expire(&mut t, vec![1], 5_000),
        OpResult::ApprovalsExpired { expired: 0 }
    );
    assert_eq!(
        decide(&mut t, 1, true, None),
        OpResult::Ignored {
            state: TaskState::Failed
        }
    );
    // An approved task is no longer due, whatever the time.
    let id = submit_approval(&mut t, Some(5), 10);
    decide(&mut t, id, true, None);
    assert!(!t.approvals_due(u64::MAX, 10).contains(&id));
    assert_eq!(
        expire(&mut t, vec![id], u64::MAX),
        OpResult::ApprovalsExpired { expired: 0 }
    );
    assert_eq!(state(&t, id), TaskState::Queued);
    t.check_indexes().unwrap();
}

/// Retrying a task whose approval timed out puts it back awaiting approval, with a
/// fresh deadline: a retry is not an approval.
#[test]
fn a_retried_timeout_awaits_approval_again() {
    let mut t = TaskTable::new();
    let id = submit_approval(&mut t, Some(100), 10);
    expire(&mut t, vec![id], 110);
    assert_eq!(state(&t, id), TaskState::Failed);
    assert_eq!(
        one(
            &mut t,
            Op::Retry {
                task_id: id,
                now_ms: 500
            }
        ),
        OpResult::Applied {
            state: TaskState::AwaitingApproval
        }
    );
    assert_eq!(
        t.get(id).unwrap().view().approval.unwrap().deadline_ms,
        Some(600)
    );
    assert!(queued_ids(&t).is_empty());
    t.check_indexes().unwrap();
    decide(&mut t, id, true, None);
    assert_eq!(queued_ids(&t), vec![id]);
}

/// A cancel works on a task awaiting approval.
#[test]
fn cancel_works_while_awaiting_approval() {
    let mut t = TaskTable::new();
    let id = submit_approval(&mut t, Some(100), 1);
    assert!(matches!(
        one(
            &mut t,
            Op::Cancel {
                task_id: id,
                now_ms: 2
            }
        ),
        OpResult::Cancelled { running: None }
    ));
    assert_eq!(state(&t, id), TaskState::Cancelled);
    assert!(t.approvals_due(u64::MAX, 10).is_empty());
    t.check_indexes().unwrap();
}

/// Awaiting tasks, their deadlines and decisions survive a checkpoint and a restart
/// from it (and the encoding every checkpoint, dump and log entry uses); a decision
/// after the restart acts as before it.
#[test]
fn approvals_survive_checkpoints_and_restarts() {
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    let waits = submit_approval(&mut t, Some(1_000), 10);
    let approved = submit_approval(&mut t, None, 10);
    let rejected = submit_approval(&mut t, None, 10);
    let expires = submit_approval(&mut t, Some(5), 10);
    decide(&mut t, approved, true, Some("ok"));
    decide(&mut t, rejected, false, Some("no"));
    checkpoint(&mut t, &mut archive);
    let mut t = archive.reload();
    t.check_indexes().unwrap();
    assert_eq!(t.count(TaskState::AwaitingApproval), 2);
    assert_eq!(state(&t, waits), TaskState::AwaitingApproval);
    assert_eq!(queued_ids(&t), vec![approved]);
    let rej = t.lookup(rejected, &archive).unwrap();
    let Lookup::Found(rej) = rej else {
        panic!("{rej:?}")
    };
    assert_eq!(rej.state, TaskState::Cancelled);
    assert_eq!(rej.error.as_deref(), Some("rejected by alice: no"));
    // The encoding keeps every attribute.
    for task in [t.get(waits).unwrap().clone(), (*rej).clone()] {
        let bytes = swarm_codec::encode(&task).unwrap();
        assert_eq!(
            swarm_codec::decode::<Task>(&bytes, bytes.len()).unwrap(),
            task
        );
    }
    for op in [
        Op::Decide {
            task_id: 1,
            approve: false,
            by: "bob".into(),
            comment: Some("why".into()),
            now_ms: 3,
        },
        Op::ExpireApprovals {
            ids: vec![1, 2],
            now_ms: 4,
        },
    ] {
        let bytes = swarm_codec::encode(&op).unwrap();
        assert_eq!(swarm_codec::decode::<Op>(&bytes, bytes.len()).unwrap(), op);
    }
    // After the restart: the deadline still holds, and decisions still apply.
    let approve_at_30 = |task_id| Op::Decide {
        task_id,
        approve: true,
        by: "bob".into(),
        comment: None,
        now_ms: 30,
    };
    assert_eq!(t.approvals_due(20, 10), vec![expires]);
    assert_eq!(
        t.apply_op(
            &Op::ExpireApprovals {
                ids: vec![waits, expires],
                now_ms: 20
            },
            &archive
        )
        .unwrap(),
        OpResult::ApprovalsExpired { expired: 1 }
    );
    assert_eq!(
        t.apply_op(&approve_at_30(waits), &archive).unwrap(),
        OpResult::Applied {
            state: TaskState::Queued
        }
    );
    assert_eq!(
        t.apply_op(&approve_at_30(rejected), &archive).unwrap(),
        OpResult::Ignored {
            state: TaskState::Cancelled
        }
    );
    checkpoint(&mut t, &mut archive);
    let t = archive.reload();
    t.check_indexes().unwrap();
    assert_eq!(queued_ids(&t), vec![waits, approved]);
    assert_eq!(t.count(TaskState::AwaitingApproval), 0);
}
