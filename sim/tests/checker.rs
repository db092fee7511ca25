//! The checker catches fabricated violations, and accepts what is allowed.

use std::collections::BTreeMap;
use std::time::Duration;

use swarm_sim::checker::{
    check, schedule_stats, AttemptRecord, Audit, ExecEvent, ExecRecord, History, MembershipChange,
    RateLimit, Read, ReadResult, ReplicaState, Replicas, ScheduleCreation, ScheduleStats,
    ScheduleStatus, Submit, SubmitResult, TaskRecord, Violation,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn submit(key: &str, invoked: u64, completed: u64, result: SubmitResult) -> Submit {
    Submit {
        client: "client".into(),
        key: key.into(),
        invoked: ms(invoked),
        completed: ms(completed),
        result,
    }
}

fn acked(key: &str, invoked: u64, completed: u64, id: u64) -> Submit {
    submit(key, invoked, completed, SubmitResult::Acked { id })
}

fn unknown(key: &str, invoked: u64, completed: u64) -> Submit {
    submit(
        key,
        invoked,
        completed,
        SubmitResult::Unknown {
            reason: "timed out".into(),
        },
    )
}

fn read(id: u64, invoked: u64, completed: u64, result: ReadResult) -> Read {
    Read {
        client: "reader".into(),
        id,
        invoked: ms(invoked),
        completed: ms(completed),
        result,
    }
}

fn found(state: &str) -> ReadResult {
    ReadResult::Found {
        state: state.into(),
    }
}

/// A succeeded echo task for `key`.
fn task(id: u64, key: &str) -> TaskRecord {
    let payload = format!("{{\"key\":\"{key}\"}}");
    TaskRecord {
        id,
        key: Some(key.into()),
        agent: "echo".into(),
        state: "succeeded".into(),
        payload: Some(payload.clone()),
        output: Some(payload),
        attempts: 1,
        succeeded_attempts: 1,
        attempt_log: vec![AttemptRecord {
            number: 1,
            worker: "w1".into(),
            started_ms: 3300,
            finished_ms: Some(3400),
            outcome: Some("succeeded".into()),
        }],
        concurrency_key: None,
        rate_limit: None,
        parents: Vec::new(),
        error: None,
    }
}

/// A journal line of worker `worker` (boot 1) about execution `task`.`attempt`.`term`.
fn ev(
    worker: &str,
    at_ms: u64,
    event: ExecEvent,
    (task, attempt, term): (u64, u32, u64),
) -> ExecRecord {
    ExecRecord {
        worker: worker.into(),
        boot: 1,
        at_ms,
        event,
        task,
        attempt,
        term,
    }
}

/// An execution held, run and ended on `worker` from `from` to `to`.
fn ran(worker: &str, from: u64, to: u64, exec: (u64, u32, u64)) -> Vec<ExecRecord> {
    vec![
        ev(worker, from, ExecEvent::Held, exec),
        ev(worker, from, ExecEvent::Started, exec),
        ev(worker, to, ExecEvent::Ended, exec),
    ]
}

fn audit(tasks: Vec<TaskRecord>) -> Option<Audit> {
    Some(Audit::Complete {
        invoked: ms(100_000),
        completed: ms(100_100),
        tasks,
        schedules: Vec::new(),
    })
}

/// Two keys, retries, an unknown outcome that did create its task, one that did not,
/// reads during and after: everything allowed.
fn good() -> History {
    History {
        submits: vec![
            unknown("a", 0, 3000),
            acked("a", 3100, 3200, 1),
            acked("a", 3300, 3400, 1),
            acked("b", 10, 20, 2),
            unknown("c", 30, 3030),
        ],
        reads: vec![
            read(1, 3500, 3510, found("queued")),
            read(1, 3600, 3610, found("running")),
            read(
                1,
                3700,
                6710,
                ReadResult::Unknown {
                    reason: "timed out".into(),
                },
            ),
            read(1, 4000, 4010, found("succeeded")),
            read(1, 5000, 5010, found("succeeded")),
            // Concurrent with the ack of task 2: may miss it.
            read(2, 15, 25, ReadResult::NotFound),
            read(2, 30, 40, found("queued")),
        ],
        audit: audit(vec![task(1, "a"), task(2, "b")]),
        membership: vec![MembershipChange {
            what: "replace n2 (c2) with n4 (c4)".into(),
            started: ms(2000),
            completed: Some(ms(9000)),
            notes: vec!["n4 did not catch up within 15s (via n1)".into()],
        }],
        replicas: Some(Replicas::Settled {
            index: 120,
            voters: vec![1, 3, 4],
            expected_voters: Some(vec![1, 3, 4]),
            nodes: [(1, "c1"), (3, "c3"), (4, "c4")]
                .into_iter()
                .map(|(node, host)| replica(node, host, 120))
                .collect(),
        }),
        executions: [
            ran("w1", 3300, 3400, (1, 1, 2)),
            ran("w1", 30, 40, (2, 1, 2)),
        ]
        .concat(),
        elections: vec![0],
        lease_ms: 5000,
        heartbeat_ms: 1000,
        key_limits: BTreeMap::from([("tenant".to_string(), 2)]),
        rate_limits: BTreeMap::from([(
            "bucket".to_string(),
            RateLimit {
                tokens: 5,
                per_ms: 1000,
                burst: 2,
            },
        )]),
        worker_clock_skew_ms: 0,
        schedules: Vec::new(),
    }
}

/// Task 1's first attempt was recorded on `w2` from 1000 ms and given up as lost at
/// `lost_at`; attempt 2 succeeded on `w1`.
fn lost_then_succeeded(h: &mut History, lost_at: u64) {
    let Some(Audit::Complete { tasks, .. }) = &mut h.audit else {
        unreachable!()
    };
    tasks[0].attempts = 2;
    tasks[0].attempt_log.insert(
        0,
        AttemptRecord {
            number: 1,
            worker: "w2".into(),
            started_ms: 1000,
            finished_ms: Some(lost_at),
            outcome: Some("lost".into()),
        },
    );
    tasks[0].attempt_log[1].number = 2;
}

#[test]
fn an_execution_run_twice_at_once_is_caught_and_attempts_of_other_terms_are_not() {
    let mut h = good();
    // The same attempt from two leaders (terms 2 and 3): the documented at-least-once case.
    h.executions.extend(ran("w2", 3350, 3450, (1, 1, 3)));
    assert_eq!(check(&h), vec![]);
    // One execution on two workers at once.
    h.executions.extend(ran("w3", 3390, 3500, (1, 1, 3)));
    let v = check(&h);
    assert!(
        matches!(&v[..], [Violation::DuplicateExecution { execution, runs }] if execution == "1.1.3" && runs.len() == 2),
        "{v:?}"
    );
    // One that never ended (its worker died) must not run again either.
    let mut h = good();
    h.executions
        .push(ev("w2", 10, ExecEvent::Started, (2, 1, 2)));
    let v = check(&h);
    assert!(
        matches!(&v[..], [Violation::DuplicateExecution { .. }]),
        "{v:?}"
    );
}

#[test]
fn an_attempt_recorded_on_a_worker_that_does_not_hold_it_is_caught_after_a_lease() {
    // Lost within a lease (plus a heartbeat and slack) of being recorded: allowed.
    let mut h = good();
    lost_then_succeeded(&mut h, 1000 + 7000);
    assert_eq!(check(&h), vec![]);
    // Never held by w2, recorded there for 9 s.
    let mut h = good();
    lost_then_succeeded(&mut h, 10_000);
    let v = check(&h);
    assert!(
        matches!(&v[..], [Violation::Phantom { id: 1, attempt: 1, worker, unheld_ms: 9000, .. }] if worker == "w2"),
        "{v:?}"
    );
    // Held until w2 restarted at 2000: unheld from then.
    let mut h = good();
    lost_then_succeeded(&mut h, 12_000);
    h.executions
        .push(ev("w2", 1200, ExecEvent::Held, (1, 1, 2)));
    let mut boot = ev("w2", 2000, ExecEvent::Boot, (0, 0, 0));
    boot.boot = 2;
    h.executions.push(boot);
    let v = check(&h);
    assert!(
        matches!(
            &v[..],
            [Violation::Phantom {
                unheld_ms: 10_000,
                ..
            }]
        ),
        "{v:?}"
    );
    // Held by w2 (unreachable) when given up: the lease did its work.
    let mut h = good();
    lost_then_succeeded(&mut h, 60_000);
    h.executions
        .push(ev("w2", 1200, ExecEvent::Held, (1, 1, 2)));
    assert_eq!(check(&h), vec![]);
}

/// A member's checkpoint at `index`, holding the same state as every other one made here.
fn replica(node: u64, host: &str, index: u64) -> ReplicaState {
    ReplicaState {
        node,
        host: host.into(),
        checkpoint_index: Some(index),
        dump_bytes: 4096,
        dump_hash: 0x5eed,
        finished_tasks: 2,
        last_task_id: 2,
        error: None,
    }
}

fn replicas(h: &mut History) -> &mut Vec<ReplicaState> {
    match &mut h.replicas {
        Some(Replicas::Settled { nodes, .. }) => nodes,
        other => panic!("not settled: {other:?}"),
    }
}

#[test]
fn an_allowed_history_passes() {
    assert_eq!(check(&good()), vec![]);
}

#[test]
fn an_unknown_submit_may_have_created_its_task() {
    let mut h = good();
    if let Some(Audit::Complete { tasks, .. }) = &mut h.audit {
        tasks.push(task(3, "c"));
    }
    assert_eq!(check(&h), vec![]);
}

#[test]
fn a_lost_acknowledged_task_is_caught() {
    let mut h = good();
    h.audit = audit(vec![task(1, "a")]);
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::LostAck { id: 2, key } if key == "b")),
        "{v:?}"
    );
}

#[test]
fn an_acknowledged_task_that_never_finishes_is_caught() {
    let mut h = good();
    let mut t = task(2, "b");
    t.state = "running".into();
    t.output = None;
    t.succeeded_attempts = 0;
    h.audit = audit(vec![task(1, "a"), t]);
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::NotFinal { id: 2, .. })),
        "{v:?}"
    );
}

#[test]
fn no_audit_is_a_violation() {
    let mut h = good();
    h.audit = Some(Audit::Incomplete {
        reason: "no leader".into(),
    });
    assert!(matches!(&check(&h)[..], [Violation::NoAudit { .. }]));
    h.audit = None;
    assert!(matches!(&check(&h)[..], [Violation::NoAudit { .. }]));
}

#[test]
fn a_double_result_is_caught() {
    let mut h = good();
    let mut t = task(1, "a");
    t.attempts = 2;
    t.succeeded_attempts = 2;
    h.audit = audit(vec![t, task(2, "b")]);
    let v = check(&h);
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::ResultCount {
                id: 1,
                succeeded_attempts: 2,
                ..
            }
        )),
        "{v:?}"
    );
}

#[test]
fn a_wrong_result_is_caught() {
    let mut h = good();
    let mut t = task(1, "a");
    t.output = Some("{\"key\":\"b\"}".into());
    h.audit = audit(vec![t, task(2, "b")]);
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::WrongResult { id: 1, .. })),
        "{v:?}"
    );
}

#[test]
fn a_task_nobody_submitted_is_caught() {
    let mut h = good();
    h.audit = audit(vec![task(1, "a"), task(2, "b"), task(9, "zzz")]);
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::Unsubmitted { id: 9, .. })),
        "{v:?}"
    );
}

#[test]
fn one_key_two_tasks_is_caught() {
    // Acknowledged twice with different ids.
    let mut h = good();
    h.submits.push(acked("a", 3500, 3600, 7));
    let v = check(&h);
    assert!(
        v.iter().any(
            |v| matches!(v, Violation::KeyTwoTasks { key, ids } if key == "a" && ids == &vec![1, 7])
        ),
        "{v:?}"
    );
    // Or two tasks with one key in the table.
    let mut h = good();
    h.audit = audit(vec![task(1, "a"), task(2, "b"), task(3, "a")]);
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::KeyTwoTasks { key, .. } if key == "a")),
        "{v:?}"
    );
}

#[test]
fn a_stale_read_is_caught() {
    // After a read saw the task succeeded, a later read sees it queued again.
    let mut h = good();
    h.reads.push(read(1, 5100, 5110, found("queued")));
    let v = check(&h);
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::StaleRead { id: 1, earlier, later }
                if earlier.result == found("succeeded") && later.result == found("queued")
        )),
        "{v:?}"
    );
    // Or the final audit disagrees with a final state a read saw.
    let mut h = good();
    let mut t = task(1, "a");
    t.state = "failed".into();
    t.succeeded_attempts = 0;
    t.output = None;
    h.audit = audit(vec![t, task(2, "b")]);
    let v = check(&h);
    assert!(
        v.iter().any(
            |v| matches!(v, Violation::StaleRead { id: 1, later, .. } if later.client == "audit")
        ),
        "{v:?}"
    );
}

#[test]
fn overlapping_reads_may_disagree() {
    // The second read started before the first completed: either order is linearizable.
    let mut h = good();
    h.reads.push(read(1, 3950, 4100, found("running")));
    assert_eq!(check(&h), vec![]);
}

#[test]
fn a_read_after_the_ack_that_misses_the_task_is_caught() {
    let mut h = good();
    h.reads.push(read(2, 21, 30, ReadResult::NotFound));
    let v = check(&h);
    assert!(
        v.iter()
            .any(|v| matches!(v, Violation::ReadMissedAck { id: 2, .. })),
        "{v:?}"
    );
}

#[test]
fn an_unfinished_membership_change_is_caught() {
    let mut h = good();
    h.membership[0].completed = None;
    h.membership[0].notes.push("gave up adding n4".into());
    let v = check(&h);
    assert!(
        matches!(&v[..], [Violation::MembershipIncomplete { what, notes }]
            if what.contains("n4") && notes.len() == 2),
        "{v:?}"
    );
}

#[test]
fn replicas_that_differ_are_caught() {
    // Another state at the same index.
    let mut h = good();
    replicas(&mut h)[1].dump_hash = 0xbad;
    assert!(
        matches!(&check(&h)[..], [Violation::ReplicasDiffer { index: 120, nodes }] if nodes.len() == 3)
    );
    // A member checkpointed at another index.
    let mut h = good();
    replicas(&mut h)[2].checkpoint_index = Some(119);
    assert!(matches!(&check(&h)[..], [Violation::ReplicasDiffer { .. }]));
    // A member whose checkpoint cannot be read.
    let mut h = good();
    replicas(&mut h)[0].error = Some("opening state.redb: no such file".into());
    assert!(matches!(&check(&h)[..], [Violation::ReplicasDiffer { .. }]));
}

#[test]
fn members_that_never_caught_up_or_wrong_voters_are_caught() {
    let mut h = good();
    h.replicas = Some(Replicas::Unsettled {
        reason: "n4 at applied 80 of 120".into(),
    });
    assert!(matches!(&check(&h)[..], [Violation::Unsettled { .. }]));

    let mut h = good();
    if let Some(Replicas::Settled { voters, .. }) = &mut h.replicas {
        *voters = vec![1, 2, 3, 4];
    }
    assert!(matches!(
        &check(&h)[..],
        [Violation::WrongVoters { expected, actual }] if expected == &vec![1, 3, 4] && actual.len() == 4
    ));
    // Unknown expectations (a change did not complete) are not judged here.
    if let Some(Replicas::Settled {
        expected_voters, ..
    }) = &mut h.replicas
    {
        *expected_voters = None;
    }
    assert_eq!(check(&h), vec![]);
}

/// Task 3 (key "c", acknowledged) depends on task 2.
fn with_dependant(dependant: TaskRecord) -> History {
    let mut h = good();
    h.submits.push(acked("c", 3050, 3060, 3));
    h.audit = audit(vec![task(1, "a"), task(2, "b"), dependant]);
    h
}

fn dependant() -> TaskRecord {
    let mut t = task(3, "c");
    t.parents = vec![2];
    t.output = Some(r#"{"payload":{"key":"c"},"parents":{"2":{"key":"b"}}}"#.into());
    t
}

#[test]
fn a_dependant_that_ran_after_its_parent_passes_and_one_that_ran_early_is_caught() {
    let mut t = dependant();
    // Task 2 succeeded at 3400 ms; this one started at 3500 ms.
    t.attempt_log[0].started_ms = 3500;
    t.attempt_log[0].finished_ms = Some(3600);
    assert_eq!(check(&with_dependant(t.clone())), vec![]);
    t.attempt_log[0].started_ms = 3350;
    let v = check(&with_dependant(t));
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::Dependency {
                id: 3,
                parent: 2,
                ..
            }
        )),
        "{v:?}"
    );
}

#[test]
fn a_parent_end_on_a_skewed_worker_clock_is_corrected() {
    // Task 2's success ended at 3400 ms as its worker, 200 ms ahead, reported it: 3200 ms
    // on the leader's clock, before the dependant started at 3300 ms (if that is the
    // leader's time; if it is the worker's, 3100 ms: early either way without skew).
    let mut t = dependant();
    t.attempt_log[0].started_ms = 3300;
    let mut h = with_dependant(t);
    assert!(
        matches!(
            &check(&h)[..],
            [Violation::Dependency {
                id: 3,
                parent: 2,
                ..
            }]
        ),
        "unskewed, it started early"
    );
    h.worker_clock_skew_ms = 200;
    assert_eq!(check(&h), vec![]);
    // A worker 200 ms behind the leader: the start may be on that worker's clock too, so
    // only a start before the end as reported is early.
    h.worker_clock_skew_ms = -200;
    assert!(
        matches!(
            &check(&h)[..],
            [Violation::Dependency {
                id: 3,
                parent: 2,
                ..
            }]
        ),
        "{:?}",
        check(&h)
    );
    let mut t = dependant();
    t.attempt_log[0].started_ms = 3450;
    t.attempt_log[0].finished_ms = Some(3500);
    let mut h = with_dependant(t);
    h.worker_clock_skew_ms = -200;
    assert_eq!(check(&h), vec![]);
    h.worker_clock_skew_ms = 0;
    assert_eq!(check(&h), vec![]);
    h.worker_clock_skew_ms = 100;
    assert_eq!(check(&h), vec![]);
}

#[test]
fn a_dependant_of_a_failed_parent_must_be_cancelled_without_running() {
    let mut failed = task(2, "b");
    failed.state = "failed".into();
    failed.succeeded_attempts = 0;
    failed.attempt_log[0].outcome = Some("failed".into());
    failed.output = None;
    let mut t = dependant();
    t.state = "cancelled".into();
    t.attempts = 0;
    t.succeeded_attempts = 0;
    t.attempt_log.clear();
    t.output = None;
    t.error = Some("dependency_failed: parent 2 is failed".into());
    let history = |t: TaskRecord| {
        let mut h = with_dependant(t);
        h.audit = audit(vec![task(1, "a"), failed.clone(), h_task(&h, 3)]);
        h
    };
    fn h_task(h: &History, id: u64) -> TaskRecord {
        match &h.audit {
            Some(Audit::Complete { tasks, .. }) => {
                tasks.iter().find(|t| t.id == id).cloned().unwrap()
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(check(&history(t.clone())), vec![]);
    // It ran anyway: caught.
    let mut ran = dependant();
    ran.attempt_log[0].started_ms = 3500;
    let v = check(&history(ran));
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::Dependency {
                id: 3,
                parent: 2,
                ..
            }
        )),
        "{v:?}"
    );
    // Cancelled for another reason (or not at all): caught.
    t.error = Some("cancelled on request".into());
    let v = check(&history(t));
    assert!(
        v.iter().any(|v| matches!(
            v,
            Violation::Dependency {
                id: 3,
                parent: 2,
                ..
            }
        )),
        "{v:?}"
    );
}

/// `good()` plus tasks 10, 11, … (acknowledged, succeeded echo tasks), one per
/// `(started, finished)`, each with concurrency key `key` and rate limit `limit`.
fn limited(
    key: Option<&str>,
    limit: Option<&str>,
    attempts: &[(u64, Option<u64>, &str)],
) -> History {
    let mut h = good();
    let mut tasks = vec![task(1, "a"), task(2, "b")];
    for (i, &(started, finished, outcome)) in attempts.iter().enumerate() {
        let id = 10 + i as u64;
        let k = format!("l{id}");
        h.submits.push(acked(&k, 3000, 3010, id));
        let mut t = task(id, &k);
        t.concurrency_key = key.map(str::to_string);
        t.rate_limit = limit.map(str::to_string);
        t.attempt_log[0].started_ms = started;
        t.attempt_log[0].finished_ms = finished;
        t.attempt_log[0].outcome = Some(outcome.into());
        if outcome != "succeeded" {
            t.state = "dead_lettered".into();
            t.succeeded_attempts = 0;
            t.output = None;
        }
        tasks.push(t);
    }
    h.audit = audit(tasks);
    h
}

#[test]
fn a_key_over_its_limit_is_caught_and_one_at_its_limit_is_not() {
    // Limit 2 (by the class `tenant`): two overlapping attempts, and a third that starts
    // as the first ends, are fine.
    let ok = [
        (4000, Some(5000), "succeeded"),
        (4100, Some(6000), "succeeded"),
        (5000, Some(5500), "succeeded"),
        (5600, None, "succeeded"),
    ];
    assert_eq!(check(&limited(Some("tenant:1"), None, &ok)), vec![]);
    // A third while both still run: caught, naming them.
    let mut over = ok;
    over[2].0 = 4900;
    let v = check(&limited(Some("tenant:1"), None, &over));
    assert_eq!(
        v,
        vec![Violation::KeyLimit {
            key: "tenant:1".into(),
            limit: 2,
            id: 12,
            attempt: 1,
            at_ms: 4900,
            running: vec![(10, 1), (11, 1)],
        }],
    );
    // An attempt with no end runs for ever; a lost one ends when it was given up.
    let forever = [
        (4000, None, "succeeded"),
        (4100, Some(4500), "lost"),
        (4600, Some(9000), "succeeded"),
        (9500, Some(9600), "succeeded"),
    ];
    assert_eq!(check(&limited(Some("tenant:1"), None, &forever)), vec![]);
    let mut forever_over = forever;
    forever_over[1].1 = Some(4700);
    let v = check(&limited(Some("tenant:1"), None, &forever_over));
    assert!(
        matches!(&v[..], [Violation::KeyLimit { id: 12, .. }]),
        "{v:?}"
    );
    // A key with no limit, or the same starts on other keys, are not limited.
    assert_eq!(check(&limited(Some("other:1"), None, &over)), vec![]);
    // A limit named by the key itself overrides its class.
    let mut h = limited(Some("tenant:1"), None, &over);
    h.key_limits.insert("tenant:1".into(), 3);
    assert_eq!(check(&h), vec![]);
}

#[test]
fn an_end_on_a_skewed_worker_clock_is_corrected() {
    // Workers 700 ms ahead: attempt 10 reported its end at 5700 ms, 5000 ms on the
    // leader's clock, so the third attempt starting at 5000 ms did not pass the limit.
    let attempts = [
        (4000, Some(5700), "succeeded"),
        (4100, Some(6700), "succeeded"),
        (5000, Some(6000), "succeeded"),
    ];
    let mut h = limited(Some("tenant:2"), None, &attempts);
    assert!(
        matches!(&check(&h)[..], [Violation::KeyLimit { id: 12, .. }]),
        "unskewed, it overlaps"
    );
    h.worker_clock_skew_ms = 700;
    assert_eq!(check(&h), vec![]);
    // A worker behind the leader: its ends are later than they read.
    let attempts = [
        (4000, Some(4800), "succeeded"),
        (4100, Some(6000), "succeeded"),
        (5000, Some(6000), "succeeded"),
    ];
    let mut h = limited(Some("tenant:2"), None, &attempts);
    assert_eq!(check(&h), vec![]);
    h.worker_clock_skew_ms = -300;
    assert!(
        matches!(&check(&h)[..], [Violation::KeyLimit { id: 12, .. }]),
        "{:?}",
        check(&h)
    );
    // A lost attempt's end is the leader's: not corrected.
    let attempts = [
        (4000, Some(4800), "lost"),
        (4100, Some(6000), "succeeded"),
        (5000, Some(6000), "succeeded"),
    ];
    let mut h = limited(Some("tenant:2"), None, &attempts);
    h.worker_clock_skew_ms = -300;
    assert_eq!(check(&h), vec![]);
}

#[test]
fn an_overdrawn_bucket_is_caught_and_a_spaced_one_is_not() {
    // 5 a second, burst 2: two at once, then one every 200 ms.
    let spaced: Vec<(u64, Option<u64>, &str)> = [4000, 4000, 4200, 4400, 4600, 4800, 6000, 6000]
        .iter()
        .map(|&s| (s, Some(s + 100), "succeeded"))
        .collect();
    assert_eq!(check(&limited(None, Some("bucket"), &spaced)), vec![]);
    // Three at once.
    let mut burst = spaced.clone();
    burst[2].0 = 4000;
    let v = check(&limited(None, Some("bucket"), &burst));
    assert!(
        matches!(&v[..], [Violation::Bucket { limit, starts, .. }]
            if limit == "bucket" && starts.len() >= 3 && starts[0].0 == 4000),
        "{v:?}"
    );
    // One too early over a longer window: 2 + 5 × 0.79 s < 6 starts in 4000..=4790.
    let mut early = spaced.clone();
    early[5].0 = 4790;
    let v = check(&limited(None, Some("bucket"), &early));
    assert!(
        matches!(&v[..], [Violation::Bucket { starts, .. }] if starts.len() == 6),
        "{v:?}"
    );
    // Retries draw tokens too, and other buckets (or none) are not limited.
    assert_eq!(check(&limited(None, Some("other"), &burst)), vec![]);
    assert_eq!(check(&limited(None, None, &burst)), vec![]);
}

/// Schedule `tick`'s creation time and interval in [`scheduled`].
const ANCHOR: u64 = 1_000_000;
const EVERY: u64 = 1000;

/// The task of schedule `tick`'s `k`-th tick.
fn tick_task(id: u64, k: u64) -> TaskRecord {
    task(id, &format!("schedule:tick:{}", ANCHOR + k * EVERY))
}

/// [`good`] with schedule `tick` (every second, catching up to `max` missed ticks),
/// created at [`ANCHOR`] while its create was in flight; its ticks 1 to 5 submitted tasks
/// 11 to 15, the audit read it with tick 6 next, and tick 6 fired before the listing.
fn scheduled(max: u32) -> History {
    let mut h = good();
    h.schedules = vec![ScheduleCreation {
        name: "tick".into(),
        every_ms: EVERY,
        max_catch_up: max,
        agent: "echo".into(),
        invoked_ms: ANCHOR - 200,
        confirmed: Some((ANCHOR + 300, ANCHOR)),
    }];
    let Some(Audit::Complete {
        tasks, schedules, ..
    }) = &mut h.audit
    else {
        unreachable!()
    };
    tasks.extend((1..=6).map(|k| tick_task(10 + k, k)));
    schedules.push(ScheduleStatus {
        name: "tick".into(),
        every_ms: Some(EVERY),
        catch_up: "all".into(),
        max_catch_up: Some(max),
        paused: false,
        agent: "echo".into(),
        created_at_ms: ANCHOR,
        next_tick_ms: Some(ANCHOR + 6 * EVERY),
        fired: 5,
        skipped: 0,
        refused: 0,
        last_tick_ms: Some(ANCHOR + 5 * EVERY),
    });
    h
}

fn audit_parts(h: &mut History) -> (&mut Vec<TaskRecord>, &mut ScheduleStatus) {
    let Some(Audit::Complete {
        tasks, schedules, ..
    }) = &mut h.audit
    else {
        unreachable!()
    };
    (tasks, &mut schedules[0])
}

#[test]
fn a_schedule_that_fired_every_tick_once_passes_and_its_ticks_are_counted() {
    let h = scheduled(1000);
    assert_eq!(check(&h), vec![]);
    assert_eq!(
        schedule_stats(&h),
        ScheduleStats {
            schedules: 1,
            ticks: 5,
            fired: 5,
            late: 0
        }
    );
    // A tick whose task started a second or more after it counts as late (tick 6 is
    // after the schedule's next tick as the audit read it: not counted).
    let mut h = scheduled(1000);
    for t in audit_parts(&mut h).0.iter_mut().filter(|t| t.id >= 14) {
        t.attempt_log[0].started_ms = ANCHOR + (t.id - 10) * EVERY + 1000;
    }
    assert_eq!(check(&h), vec![]);
    assert_eq!(schedule_stats(&h).late, 2);
}

#[test]
fn a_tick_with_two_tasks_is_caught() {
    let mut h = scheduled(1000);
    audit_parts(&mut h).0.push(tick_task(30, 3));
    let v = check(&h);
    assert!(
        v.contains(&Violation::ScheduleTickTwice {
            name: "tick".into(),
            tick_ms: ANCHOR + 3 * EVERY,
            ids: vec![13, 30],
        }),
        "{v:?}"
    );
}

#[test]
fn a_missing_tick_is_caught_and_so_are_counters_that_hide_it() {
    let mut h = scheduled(1000);
    audit_parts(&mut h).0.retain(|t| t.id != 13);
    let v = check(&h);
    assert!(
        v.contains(&Violation::ScheduleTicksMissing {
            name: "tick".into(),
            missing: 1,
            first: vec![ANCHOR + 3 * EVERY],
            skipped: 0,
            refused: 0,
        }),
        "{v:?}"
    );
    assert!(
        v.iter().any(
            |v| matches!(v, Violation::ScheduleCounters { why, .. } if why.contains("5 fired"))
        ),
        "{v:?}"
    );
    // Counted as skipped: the tasks agree with the counters, but with at most 5 ticks
    // ever due and a catch-up of up to 1000, no tick may be skipped.
    let (_, st) = audit_parts(&mut h);
    st.fired = 4;
    st.skipped = 1;
    let v = check(&h);
    assert!(
        matches!(&v[..], [Violation::ScheduleCounters { why, .. }] if why.contains("1 skipped")),
        "{v:?}"
    );
}

#[test]
fn ticks_skipped_by_a_catch_up_bound_are_accounted_for_exactly() {
    // With a catch-up of up to 2 missed ticks, ticks 1 and 2 skipped (counted) pass.
    let mut h = scheduled(2);
    let (tasks, st) = audit_parts(&mut h);
    tasks.retain(|t| t.id != 11 && t.id != 12);
    st.fired = 3;
    st.skipped = 2;
    assert_eq!(check(&h), vec![]);
    // Counting one fewer skipped than ticks are missing is caught.
    audit_parts(&mut h).1.skipped = 1;
    let v = check(&h);
    assert!(
        v.contains(&Violation::ScheduleTicksMissing {
            name: "tick".into(),
            missing: 2,
            first: vec![ANCHOR + EVERY, ANCHOR + 2 * EVERY],
            skipped: 1,
            refused: 0,
        }),
        "{v:?}"
    );
}

#[test]
fn a_task_off_the_schedule_grid_is_caught() {
    let mut h = scheduled(1000);
    audit_parts(&mut h)
        .0
        .push(task(40, &format!("schedule:tick:{}", ANCHOR + 2500)));
    audit_parts(&mut h).0.push(task(41, "schedule:tick:soon"));
    let v = check(&h);
    assert_eq!(
        v.iter()
            .filter(|v| matches!(v, Violation::ScheduleOffGrid { id: 40 | 41, .. }))
            .count(),
        2,
        "{v:?}"
    );
}

#[test]
fn a_lost_changed_or_unknown_schedule_is_caught() {
    // Missing from the audit although its create was confirmed.
    let mut h = scheduled(1000);
    let Some(Audit::Complete { schedules, .. }) = &mut h.audit else {
        unreachable!()
    };
    schedules.clear();
    assert!(check(&h).contains(&Violation::ScheduleLost {
        name: "tick".into()
    }));
    // Created before anyone asked for it.
    let mut h = scheduled(1000);
    h.schedules[0].invoked_ms = ANCHOR + 1;
    let v = check(&h);
    assert!(
        v.iter().any(
            |v| matches!(v, Violation::ScheduleDiffers { why, .. } if why.contains("outside"))
        ),
        "{v:?}"
    );
    // Paused: no next tick to judge by.
    let mut h = scheduled(1000);
    audit_parts(&mut h).1.next_tick_ms = None;
    assert!(matches!(
        &check(&h)[..],
        [Violation::ScheduleDiffers { .. }]
    ));
    // Tasks of a schedule no client created were never submitted.
    let mut h = scheduled(1000);
    h.schedules.clear();
    let v = check(&h);
    assert_eq!(
        v.iter()
            .filter(|v| matches!(v, Violation::Unsubmitted { .. }))
            .count(),
        6,
        "{v:?}"
    );
}
