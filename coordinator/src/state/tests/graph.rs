//! Task graphs: dependants wait for their parents, receive their outputs, and are
//! cancelled when a parent fails; graphs commit whole; the rules hold over random
//! histories and across checkpoints.

use super::*;
use crate::state::flow::{FlowAttr, MAX_CHILDREN};

fn step(name: &str, after: &[u32]) -> GraphStep {
    GraphStep {
        spec: spec("x"),
        flow: Flow {
            step: Some(name.into()),
            ..Flow::default()
        },
        after: after.to_vec(),
    }
}

fn graph(t: &mut TaskTable, steps: Vec<GraphStep>) -> OpResult {
    one(
        t,
        Op::Graph {
            steps,
            now_ms: 1,
            queue_limit: 100,
        },
    )
}

fn after(t: &mut TaskTable, parents: &[TaskId]) -> OpResult {
    one(
        t,
        Op::SubmitFlow {
            spec: spec("x"),
            flow: Box::new(Flow {
                parents: parents.to_vec(),
                ..Flow::default()
            }),
            now_ms: 1,
            queue_limit: 100,
        },
    )
}

fn state(t: &TaskTable, id: TaskId) -> TaskState {
    t.get(id).unwrap().state
}

/// Start and succeed `id`'s next attempt with `output`.
fn succeed(t: &mut TaskTable, id: TaskId, output: &[u8]) {
    let n = t.get(id).unwrap().next_attempt();
    start(t, at(id, n));
    assert_eq!(
        finish(t, at(id, n), ok(output)),
        OpResult::Applied {
            state: TaskState::Succeeded
        }
    );
}

fn input(t: &TaskTable, id: TaskId, archive: &dyn Archive) -> serde_json::Value {
    let task = t.lookup(id, archive).unwrap();
    let Lookup::Found(task) = task else {
        panic!("task {id}: {task:?}")
    };
    serde_json::from_slice(&t.input_of(&task, archive).unwrap()).unwrap()
}

/// The diamond A → B, C → D: D runs once B and C succeeded and receives both outputs.
#[test]
fn a_diamond_runs_in_order_and_the_join_gets_both_outputs() {
    let mut t = TaskTable::new();
    let r = graph(
        &mut t,
        vec![
            step("a", &[]),
            step("b", &[0]),
            step("c", &[0]),
            step("d", &[1, 2]),
        ],
    );
    assert_eq!(
        r,
        OpResult::Graph {
            ids: vec![1, 2, 3, 4],
            duplicate: false
        }
    );
    assert_eq!(t.queued().map(|t| t.id).collect::<Vec<_>>(), vec![1]);
    for id in [2, 3, 4] {
        assert_eq!(state(&t, id), TaskState::Waiting);
    }
    assert_eq!(t.get(4).unwrap().flow.as_ref().unwrap().waiting_on, 2);
    assert_eq!(
        t.get(1).unwrap().flow.as_ref().unwrap().children,
        vec![2, 3]
    );
    t.check_indexes().unwrap();

    succeed(&mut t, 1, b"\"A\"");
    assert_eq!(t.queued().map(|t| t.id).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(input(&t, 2, &NoArchive)["parents"]["a"], "A");
    succeed(&mut t, 2, b"{\"b\":1}");
    assert_eq!(state(&t, 4), TaskState::Waiting);
    assert_eq!(t.get(4).unwrap().flow.as_ref().unwrap().waiting_on, 1);
    succeed(&mut t, 3, b"plain");
    assert_eq!(state(&t, 4), TaskState::Queued);
    let v = input(&t, 4, &NoArchive);
    assert_eq!(v["payload"], "p");
    assert_eq!(v["parents"]["b"], serde_json::json!({"b": 1}));
    assert_eq!(v["parents"]["c"], "plain");
    t.check_indexes().unwrap();
    let view = t.get(4).unwrap().view();
    assert_eq!(
        (view.parents, view.step.as_deref()),
        (vec![2, 3], Some("d"))
    );
}

/// A failed parent cancels its dependants with `dependency_failed`, down the graph; the
/// other branch runs on.
#[test]
fn a_failed_parent_cancels_its_dependants_down_the_graph() {
    let mut t = TaskTable::new();
    graph(
        &mut t,
        vec![
            step("a", &[]),
            step("b", &[0]),
            step("c", &[0]),
            step("d", &[1, 2]),
            step("e", &[3]),
        ],
    );
    succeed(&mut t, 1, b"1");
    start(&mut t, at(2, 1));
    assert_eq!(
        finish(&mut t, at(2, 1), fail(FailureKind::BadPayload)),
        OpResult::Applied {
            state: TaskState::Failed
        }
    );
    for id in [4, 5] {
        assert_cancelled_by_a_parent(&t, id);
        assert!(t.get(id).unwrap().attempts.is_empty());
    }
    assert_eq!(state(&t, 3), TaskState::Queued);
    succeed(&mut t, 3, b"3");
    assert_eq!(state(&t, 4), TaskState::Cancelled);
    t.check_indexes().unwrap();
    // Cancelling a waiting task cancels its own dependants too.
    let mut t = TaskTable::new();
    graph(
        &mut t,
        vec![step("a", &[]), step("b", &[0]), step("c", &[1])],
    );
    assert!(matches!(
        one(
            &mut t,
            Op::Cancel {
                task_id: 2,
                now_ms: 5
            }
        ),
        OpResult::Cancelled { running: None }
    ));
    assert_eq!(state(&t, 3), TaskState::Cancelled);
    assert_eq!(state(&t, 1), TaskState::Queued);
}

/// A long chain is cancelled iteratively, not by recursion.
#[test]
fn a_long_chain_cancels_without_recursion() {
    let mut t = TaskTable::new();
    let n = 20_000u64;
    for id in 1..=n {
        let r = one(
            &mut t,
            Op::SubmitFlow {
                spec: spec("x"),
                flow: Box::new(Flow {
                    parents: (id > 1).then_some(id - 1).into_iter().collect(),
                    ..Flow::default()
                }),
                now_ms: 1,
                queue_limit: n,
            },
        );
        assert_eq!(
            r,
            OpResult::Submitted {
                id,
                duplicate: false
            }
        );
    }
    one(
        &mut t,
        Op::Cancel {
            task_id: 1,
            now_ms: 2,
        },
    );
    assert_eq!(t.unfinished(), 0);
    assert_eq!(t.count(TaskState::Cancelled), n);
}

/// Parents are checked when the dependant applies: unknown, purged or failed ones are
/// refused; a succeeded one counts at once and records its new dependant.
#[test]
fn parents_are_checked_at_submit() {
    let mut t = TaskTable::new();
    let refused = |r: OpResult| match r {
        OpResult::Refused(f) => f.code,
        other => panic!("{other:?}"),
    };
    assert_eq!(refused(after(&mut t, &[9])), "unknown_parent");
    submit(&mut t, spec("x"));
    submit(&mut t, spec("x"));
    succeed(&mut t, 1, b"one");
    start(&mut t, at(2, 1));
    finish(&mut t, at(2, 1), fail(FailureKind::BadPayload));
    assert_eq!(refused(after(&mut t, &[2])), "dependency_failed");
    assert_eq!(refused(after(&mut t, &[1, 1])), "bad_parent");
    assert_eq!(t.unfinished(), 0);
    // A succeeded parent: the dependant is queued at once, and the parent (finished)
    // lists it.
    assert_eq!(
        after(&mut t, &[1]),
        OpResult::Submitted {
            id: 3,
            duplicate: false
        }
    );
    assert_eq!(state(&t, 3), TaskState::Queued);
    assert_eq!(t.get(1).unwrap().flow.as_ref().unwrap().children, vec![3]);
    assert_eq!(t.count(TaskState::Succeeded), 1);
    assert_eq!(input(&t, 3, &NoArchive)["parents"]["1"], "one");
    // Purged: refused as unknown.
    one(
        &mut t,
        Op::Purge {
            ids: vec![1],
            now_ms: 1_000_000,
        },
    );
    assert_eq!(refused(after(&mut t, &[1])), "unknown_parent");
}

/// A parent may have at most `MAX_CHILDREN` dependants.
#[test]
fn dependants_per_parent_are_bounded() {
    let mut t = TaskTable::new();
    submit(&mut t, spec("x"));
    let mut limit = 100_000;
    for _ in 0..MAX_CHILDREN {
        assert!(matches!(
            one(
                &mut t,
                Op::SubmitFlow {
                    spec: spec("x"),
                    flow: Box::new(Flow {
                        parents: vec![1],
                        ..Flow::default()
                    }),
                    now_ms: 1,
                    queue_limit: limit,
                }
            ),
            OpResult::Submitted { .. }
        ));
    }
    limit += 1;
    let r = one(
        &mut t,
        Op::SubmitFlow {
            spec: spec("x"),
            flow: Box::new(Flow {
                parents: vec![1],
                ..Flow::default()
            }),
            now_ms: 1,
            queue_limit: limit,
        },
    );
    assert!(matches!(r, OpResult::Refused(f) if f.code == "too_many_children"));
}

/// A graph commits whole or not at all; a replay under the same keys is a duplicate.
#[test]
fn a_graph_commits_whole_or_not_at_all() {
    let mut t = TaskTable::new();
    // A step naming a later step: refused, nothing submitted.
    let r = graph(&mut t, vec![step("a", &[1]), step("b", &[])]);
    assert!(matches!(r, OpResult::Refused(f) if f.code == "bad_graph"));
    // A failed external parent: refused, nothing submitted.
    submit(&mut t, spec("x"));
    one(
        &mut t,
        Op::Cancel {
            task_id: 1,
            now_ms: 1,
        },
    );
    let mut s = step("b", &[]);
    s.flow.parents = vec![1];
    let r = graph(&mut t, vec![step("a", &[]), s]);
    assert!(matches!(r, OpResult::Refused(f) if f.code == "dependency_failed"));
    // No room for every step: refused whole.
    let r = one(
        &mut t,
        Op::Graph {
            steps: vec![step("a", &[]), step("b", &[0])],
            now_ms: 1,
            queue_limit: 1,
        },
    );
    assert_eq!(r, OpResult::QueueFull { limit: 1 });
    assert_eq!((t.unfinished(), t.last_id()), (0, 1));
    // Keys: a replay returns the same ids; a partial overlap is a conflict.
    let keyed = |name: &str, after: &[u32]| {
        let mut s = step(name, after);
        s.spec.idempotency_key = Some(format!("g-{name}"));
        s
    };
    let first = graph(&mut t, vec![keyed("a", &[]), keyed("b", &[0])]);
    assert_eq!(
        first,
        OpResult::Graph {
            ids: vec![2, 3],
            duplicate: false
        }
    );
    let again = graph(&mut t, vec![keyed("a", &[]), keyed("b", &[0])]);
    assert_eq!(
        again,
        OpResult::Graph {
            ids: vec![2, 3],
            duplicate: true
        }
    );
    let r = graph(&mut t, vec![keyed("a", &[]), keyed("c", &[0])]);
    assert!(matches!(r, OpResult::Refused(f) if f.code == "graph_conflict"));
}

/// A parent purged before its dependant ran leaves its output with the dependant; the
/// graph survives checkpoints and a restart from the archive.
#[test]
fn a_parent_purged_early_leaves_its_output_and_graphs_survive_restarts() {
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    graph(
        &mut t,
        vec![step("a", &[]), step("b", &[]), step("c", &[0, 1])],
    );
    succeed(&mut t, 1, b"\"from a\"");
    checkpoint(&mut t, &mut archive);
    // Reads of the archived parent at dispatch.
    let mut t = archive.reload();
    t.check_indexes().unwrap();
    assert_eq!(state(&t, 3), TaskState::Waiting);
    assert_eq!(input(&t, 3, &archive)["parents"]["a"], "from a");
    // A's retention ends: it is purged, and C keeps its output.
    let r = t
        .apply_op(
            &Op::Purge {
                ids: vec![1],
                now_ms: 1_000_000,
            },
            &archive,
        )
        .unwrap();
    assert_eq!(r, OpResult::Purged { purged: 1 });
    let kept = &t.get(3).unwrap().flow.as_ref().unwrap().more;
    assert!(matches!(&kept[..], [FlowAttr::ParentOutput { parent: 1, key, .. }] if key == "a"));
    checkpoint(&mut t, &mut archive);
    let mut t = archive.reload();
    assert_eq!(t.lookup(1, &archive).unwrap(), Lookup::Expired);
    let n = t.get(2).unwrap().next_attempt();
    t.apply_op(
        &Op::Start {
            attempt: at(2, n),
            worker: "w".into(),
            now_ms: 5,
        },
        &archive,
    )
    .unwrap();
    t.apply_op(
        &Op::Finish {
            attempt: at(2, n),
            worker: "w".into(),
            outcome: ok(b"7"),
            started_at_ms: 5,
            finished_at_ms: 6,
            now_ms: 6,
            retry_at_ms: 6,
        },
        &archive,
    )
    .unwrap();
    assert_eq!(state(&t, 3), TaskState::Queued);
    let v = input(&t, 3, &archive);
    assert_eq!(
        (v["parents"]["a"].clone(), v["parents"]["b"].clone()),
        ("from a".into(), 7.into())
    );
}

/// Random graphs over random histories: no dependant ever starts before all its parents
/// succeeded, a dependant of a parent that ended otherwise is cancelled, and the
/// indexes stay right.
#[test]
fn random_graph_histories_keep_the_dependency_rule() {
    use rand::{Rng, SeedableRng};
    for seed in 0..150u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = TaskTable::new();
        for step_no in 0..300u64 {
            let last = t.last_id();
            let id = rng.gen_range(1..=last.max(1));
            let n = t.get(id).map_or(1, |t| t.next_attempt());
            let op = match rng.gen_range(0..7) {
                0 | 1 => {
                    let parents: Vec<TaskId> = (0..rng.gen_range(0..3))
                        .map(|_| rng.gen_range(1..=last.max(1)))
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .filter(|_| last > 0)
                        .collect();
                    Op::SubmitFlow {
                        spec: spec("x"),
                        flow: Box::new(Flow {
                            parents,
                            ..Flow::default()
                        }),
                        now_ms: step_no,
                        queue_limit: 40,
                    }
                }
                2 => Op::Start {
                    attempt: at(id, n),
                    worker: "w".into(),
                    now_ms: step_no,
                },
                3 | 4 => Op::Finish {
                    attempt: at(id, n.saturating_sub(1).max(1)),
                    worker: "w".into(),
                    outcome: if rng.gen_bool(0.8) {
                        ok(b"1")
                    } else {
                        fail(FailureKind::BadPayload)
                    },
                    started_at_ms: step_no,
                    finished_at_ms: step_no,
                    now_ms: step_no,
                    retry_at_ms: step_no,
                },
                5 => Op::Cancel {
                    task_id: id,
                    now_ms: step_no,
                },
                _ => Op::Retry {
                    task_id: id,
                    now_ms: step_no,
                },
            };
            let before: Option<TaskState> = match &op {
                Op::Start { attempt, .. } => t.get(attempt.task_id).map(|t| t.state),
                _ => None,
            };
            let r = one(&mut t, op.clone());
            t.check_indexes()
                .unwrap_or_else(|e| panic!("seed {seed} step {step_no}: {e}"));
            // A start applies only to a queued task, never to a waiting one.
            if let (Op::Start { attempt, .. }, Some(TaskState::Waiting)) = (&op, before) {
                assert!(
                    matches!(r, OpResult::Ignored { .. }),
                    "seed {seed}: waiting task {} started",
                    attempt.task_id
                );
            }
            for task in t.list(None, Asc, None, usize::MAX, &NoArchive).unwrap() {
                let Some(flow) = &task.flow else { continue };
                let parents: Vec<TaskState> = flow
                    .parents
                    .iter()
                    .map(|p| t.get(*p).unwrap().state)
                    .collect();
                let unmet = parents
                    .iter()
                    .filter(|s| **s != TaskState::Succeeded)
                    .count() as u32;
                match task.state {
                    TaskState::Waiting => {
                        assert_eq!(flow.waiting_on, unmet, "seed {seed}: task {}", task.id);
                        assert!(unmet > 0);
                        assert!(task.attempts.is_empty());
                    }
                    // Ran (or runs): every parent had succeeded — a retried parent may
                    // be live again since.
                    _ if !task.attempts.is_empty() => {}
                    TaskState::Queued => assert_eq!(unmet, 0, "seed {seed}: task {}", task.id),
                    _ => {}
                }
                for p in &flow.parents {
                    let parent = t.get(*p).unwrap();
                    assert!(parent.flow.as_ref().unwrap().children.contains(&task.id));
                }
            }
        }
    }
}
