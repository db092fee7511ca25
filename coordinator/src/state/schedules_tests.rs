//! The schedules' rules, on a bare task table: each tick submits exactly one task, stale
//! and replayed Fires are ignored, pauses, catch-up policies, cron evaluation, checkpoints.

use swarm_proto::api::TaskState;

use super::schedules::{
    tick_key, Cadence, CatchUp, ScheduleDef, ScheduleOp, ScheduleOutcome, MAX_SCHEDULES,
};
use super::tests::{checkpoint, spec, MemArchive};
use super::*;

const S: u64 = 1000;
/// 2023-11-14 22:13:20 UTC: a whole second, a few minutes past a quarter hour.
const T0: u64 = 1_700_000_000_000;

fn every(name: &str, every_ms: u64, catch_up: CatchUp) -> ScheduleDef {
    ScheduleDef {
        name: name.into(),
        cadence: Cadence::Every {
            every_ms,
            anchor_ms: 0,
        },
        catch_up,
        template: spec("echo"),
        paused: false,
    }
}

fn cron(name: &str, expr: &str, catch_up: CatchUp) -> ScheduleDef {
    ScheduleDef {
        cadence: Cadence::Cron { expr: expr.into() },
        ..every(name, S, catch_up)
    }
}

fn apply(t: &mut TaskTable, op: ScheduleOp) -> Result<ScheduleOutcome, ScheduleFault> {
    match t.apply_op(&Op::Schedule(op), &NoArchive).unwrap() {
        OpResult::Schedule(r) => r,
        other => panic!("not a schedule result: {other:?}"),
    }
}

fn create(t: &mut TaskTable, def: ScheduleDef, now_ms: u64) -> Result<(), ScheduleFault> {
    apply(
        t,
        ScheduleOp::Create {
            def: Box::new(def),
            now_ms,
        },
    )
    .map(|o| assert_eq!(o, ScheduleOutcome::Done))
}

fn fire(t: &mut TaskTable, name: &str, tick_ms: u64, now_ms: u64) -> ScheduleOutcome {
    apply(
        t,
        ScheduleOp::Fire {
            name: name.into(),
            tick_ms,
            now_ms,
            queue_limit: 1000,
        },
    )
    .unwrap()
}

/// Fire `name`'s next tick as a leader would at `now_ms`, if it is due.
fn fire_due(t: &mut TaskTable, name: &str, now_ms: u64) -> Option<ScheduleOutcome> {
    let next = t.schedules().get(name)?.next_tick_ms;
    (next <= now_ms).then(|| fire(t, name, next, now_ms))
}

fn next_tick(t: &TaskTable, name: &str) -> u64 {
    t.schedules().get(name).unwrap().next_tick_ms
}

/// The ticks of the tasks `name` submitted, from their idempotency keys, in id order.
fn ticks_submitted(t: &TaskTable, name: &str) -> Vec<u64> {
    let prefix = format!("schedule:{name}:");
    t.list(
        None,
        swarm_proto::api::TaskOrder::Asc,
        None,
        100_000,
        &NoArchive,
    )
    .unwrap()
    .iter()
    .filter_map(|task| {
        task.spec
            .idempotency_key
            .as_deref()?
            .strip_prefix(&prefix)?
            .parse()
            .ok()
    })
    .collect()
}

#[test]
fn a_tick_fires_once_and_moves_on() {
    let mut t = TaskTable::new();
    create(&mut t, every("nightly", 2 * S, CatchUp::Skip), T0).unwrap();
    assert_eq!(
        next_tick(&t, "nightly"),
        T0 + 2 * S,
        "first tick one interval after create"
    );
    assert_eq!(fire_due(&mut t, "nightly", T0 + S), None, "not due yet");

    let first = fire(&mut t, "nightly", T0 + 2 * S, T0 + 2 * S + 5);
    let ScheduleOutcome::Fired {
        tick_ms,
        task,
        duplicate: false,
        skipped: 0,
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(tick_ms, T0 + 2 * S);
    assert_eq!(
        next_tick(&t, "nightly"),
        T0 + 4 * S,
        "on the grid, not from now"
    );
    let Lookup::Found(task) = t.lookup(task, &NoArchive).unwrap() else {
        panic!("the tick's task is not there")
    };
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(task.spec.agent, "echo");
    assert_eq!(
        task.spec.idempotency_key.as_deref(),
        Some(tick_key("nightly", T0 + 2 * S).as_str())
    );
    assert_eq!(task.created_at_ms, T0 + 2 * S + 5);

    // The same Fire again (a replay, or a second leader's proposal) does nothing.
    assert_eq!(
        fire(&mut t, "nightly", T0 + 2 * S, T0 + 2 * S + 9),
        ScheduleOutcome::Ignored
    );
    // Nor does a Fire of a tick that is not the next one, or one not due by its own time.
    assert_eq!(
        fire(&mut t, "nightly", T0 + 6 * S, T0 + 7 * S),
        ScheduleOutcome::Ignored
    );
    assert_eq!(
        fire(&mut t, "nightly", T0 + 4 * S, T0 + 3 * S),
        ScheduleOutcome::Ignored
    );
    assert_eq!(
        fire(&mut t, "other", T0 + 4 * S, T0 + 5 * S),
        ScheduleOutcome::Ignored
    );
    assert_eq!(t.len(), 1);

    for k in 2..10 {
        assert!(matches!(
            fire_due(&mut t, "nightly", T0 + 2 * k * S + 100),
            Some(ScheduleOutcome::Fired { skipped: 0, .. })
        ));
    }
    let ticks = ticks_submitted(&t, "nightly");
    let want: Vec<u64> = (1..10).map(|k| T0 + 2 * k * S).collect();
    assert_eq!(ticks, want, "one task per tick, in order, none twice");
    let s = t.schedules().get("nightly").unwrap();
    assert_eq!((s.fired, s.skipped, s.refused), (9, 0, 0));
    assert_eq!(s.last_tick_ms, Some(T0 + 18 * S));
}

#[test]
fn a_raced_duplicate_dedupes_on_its_key() {
    // A task already holds the tick's key (e.g. a restore brought it back): the tick
    // finds it and submits nothing new.
    let mut t = TaskTable::new();
    create(&mut t, every("s", S, CatchUp::Skip), T0).unwrap();
    let mut existing = spec("echo");
    existing.idempotency_key = Some(tick_key("s", T0 + S));
    let OpResult::Submitted { id, .. } = t
        .apply_op(
            &Op::Submit {
                spec: existing,
                now_ms: T0,
                queue_limit: 10,
            },
            &NoArchive,
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        fire(&mut t, "s", T0 + S, T0 + S),
        ScheduleOutcome::Fired {
            tick_ms: T0 + S,
            task: id,
            duplicate: true,
            skipped: 0
        }
    );
    assert_eq!(t.len(), 1);
}

#[test]
fn skip_fires_only_the_latest_missed_tick() {
    let mut t = TaskTable::new();
    create(&mut t, every("s", 2 * S, CatchUp::Skip), T0).unwrap();
    // An outage: ticks at +2, +4, ..., +12 s are due at +13 s.
    let out = fire_due(&mut t, "s", T0 + 13 * S).unwrap();
    assert!(
        matches!(out, ScheduleOutcome::Fired { tick_ms, skipped: 5, .. } if tick_ms == T0 + 12 * S),
        "{out:?}"
    );
    assert_eq!(next_tick(&t, "s"), T0 + 14 * S);
    assert_eq!(fire_due(&mut t, "s", T0 + 13 * S), None);
    assert_eq!(ticks_submitted(&t, "s"), vec![T0 + 12 * S]);
    assert_eq!(t.schedules().get("s").unwrap().skipped, 5);
}

#[test]
fn catching_up_all_fires_every_missed_tick_up_to_the_bound() {
    let mut t = TaskTable::new();
    create(&mut t, every("few", 2 * S, CatchUp::All { max: 10 }), T0).unwrap();
    create(&mut t, every("many", 2 * S, CatchUp::All { max: 3 }), T0).unwrap();
    // Six ticks missed (+2 .. +12 s), the leader back at +13 s.
    let now = T0 + 13 * S;
    while fire_due(&mut t, "few", now).is_some() {}
    while fire_due(&mut t, "many", now).is_some() {}
    let all: Vec<u64> = (1..=6).map(|k| T0 + 2 * k * S).collect();
    assert_eq!(ticks_submitted(&t, "few"), all, "all six, oldest first");
    assert_eq!(
        ticks_submitted(&t, "many"),
        all[3..].to_vec(),
        "the latest three; the older ones skipped"
    );
    let many = t.schedules().get("many").unwrap();
    assert_eq!((many.fired, many.skipped), (3, 3));
    assert_eq!(next_tick(&t, "few"), T0 + 14 * S);
}

#[test]
fn pause_stops_ticks_and_resume_does_not_fire_what_the_pause_missed() {
    let mut t = TaskTable::new();
    create(&mut t, every("s", 2 * S, CatchUp::All { max: 100 }), T0).unwrap();
    fire_due(&mut t, "s", T0 + 2 * S).unwrap();
    apply(&mut t, ScheduleOp::Pause { name: "s".into() }).unwrap();
    assert_eq!(
        fire(&mut t, "s", T0 + 4 * S, T0 + 4 * S),
        ScheduleOutcome::Ignored,
        "a paused schedule does not fire"
    );
    assert!(t.schedules().due(T0 + 60 * S, 10).is_empty());
    apply(
        &mut t,
        ScheduleOp::Resume {
            name: "s".into(),
            now_ms: T0 + 61 * S,
        },
    )
    .unwrap();
    assert_eq!(
        next_tick(&t, "s"),
        T0 + 62 * S,
        "the next grid tick after the resume"
    );
    assert_eq!(
        fire(&mut t, "s", T0 + 4 * S, T0 + 62 * S),
        ScheduleOutcome::Ignored
    );
    fire_due(&mut t, "s", T0 + 62 * S).unwrap();
    assert_eq!(ticks_submitted(&t, "s"), vec![T0 + 2 * S, T0 + 62 * S]);
    assert_eq!(t.schedules().get("s").unwrap().skipped, 0);

    // Created paused: nothing until resumed.
    let mut def = every("later", S, CatchUp::Skip);
    def.paused = true;
    create(&mut t, def, T0).unwrap();
    assert!(t
        .schedules()
        .due(T0 + 100 * S, 10)
        .iter()
        .all(|(n, _)| n != "later"));
}

#[test]
fn create_delete_and_their_refusals() {
    let mut t = TaskTable::new();
    create(&mut t, every("a", S, CatchUp::Skip), T0).unwrap();
    let code = |r: Result<(), ScheduleFault>| r.unwrap_err().code;
    assert_eq!(
        code(create(&mut t, every("a", S, CatchUp::Skip), T0)),
        "schedule_exists"
    );
    assert_eq!(
        code(create(&mut t, every("b", 999, CatchUp::Skip), T0)),
        "invalid_schedule"
    );
    assert_eq!(
        code(create(&mut t, every("Bad!", S, CatchUp::Skip), T0)),
        "invalid_schedule"
    );
    assert_eq!(
        code(create(&mut t, every("b", S, CatchUp::All { max: 0 }), T0)),
        "invalid_schedule"
    );
    assert_eq!(
        code(create(&mut t, cron("b", "61 * * * *", CatchUp::Skip), T0)),
        "invalid_schedule"
    );
    assert_eq!(
        code(create(&mut t, cron("b", "0 0 31 2 *", CatchUp::Skip), T0)),
        "invalid_schedule"
    );
    let mut keyed = every("b", S, CatchUp::Skip);
    keyed.template.idempotency_key = Some("k".into());
    assert_eq!(code(create(&mut t, keyed, T0)), "invalid_schedule");
    let mut big = every("b", S, CatchUp::Skip);
    big.template.payload = vec![0; 100 << 10];
    assert_eq!(code(create(&mut t, big, T0)), "too_large");
    let mut elsewhere = every("b", S, CatchUp::Skip);
    elsewhere.template.swarm = "nowhere".into();
    assert_eq!(code(create(&mut t, elsewhere, T0)), "unknown_swarm");

    let err = apply(&mut t, ScheduleOp::Delete { name: "b".into() }).unwrap_err();
    assert_eq!(err.code, "unknown_schedule");
    assert_eq!(
        apply(&mut t, ScheduleOp::Pause { name: "b".into() })
            .unwrap_err()
            .code,
        "unknown_schedule"
    );
    apply(&mut t, ScheduleOp::Delete { name: "a".into() }).unwrap();
    assert!(t.schedules().is_empty());
    assert_eq!(
        fire(&mut t, "a", T0 + S, T0 + S),
        ScheduleOutcome::Ignored,
        "deleted"
    );
    assert!(t.is_empty());
}

#[test]
fn the_number_of_schedules_is_bounded() {
    let mut t = TaskTable::new();
    for i in 0..MAX_SCHEDULES {
        create(&mut t, every(&format!("s{i}"), S, CatchUp::Skip), T0).unwrap();
    }
    let err = create(&mut t, every("one-more", S, CatchUp::Skip), T0).unwrap_err();
    assert_eq!(err.code, "too_many_schedules");
    assert!(err.message.contains("10000"), "{}", err.message);
}

#[test]
fn a_refused_tick_counts_and_moves_on() {
    let mut t = TaskTable::new();
    create(&mut t, every("s", S, CatchUp::Skip), T0).unwrap();
    let full = apply(
        &mut t,
        ScheduleOp::Fire {
            name: "s".into(),
            tick_ms: T0 + S,
            now_ms: T0 + S,
            queue_limit: 0,
        },
    )
    .unwrap();
    assert!(
        matches!(&full, ScheduleOutcome::Refused { tick_ms, reason, .. } if *tick_ms == T0 + S && reason.contains("queue full")),
        "{full:?}"
    );
    assert!(t.is_empty());
    assert_eq!(next_tick(&t, "s"), T0 + 2 * S, "not retried");
    let s = t.schedules().get("s").unwrap();
    assert_eq!((s.fired, s.refused), (0, 1));
    assert!(s.last_error.as_deref().unwrap().contains("queue full"));
    fire_due(&mut t, "s", T0 + 2 * S).unwrap();
    let s = t.schedules().get("s").unwrap();
    assert_eq!((s.fired, s.refused, s.last_error.as_deref()), (1, 1, None));
}

#[test]
fn cron_ticks_are_evaluated_in_utc_from_the_tick() {
    let mut t = TaskTable::new();
    // T0 is 22:13:20 UTC: the next quarter hour is 22:15:00.
    create(&mut t, cron("q", "*/15 * * * *", CatchUp::Skip), T0).unwrap();
    let q0 = T0 + 100 * S;
    assert_eq!(next_tick(&t, "q"), q0);
    fire_due(&mut t, "q", q0 + 3 * S).unwrap();
    assert_eq!(next_tick(&t, "q"), q0 + 900 * S);
    // Six fields: seconds first.
    create(
        &mut t,
        cron("sec", "*/5 * * * * *", CatchUp::All { max: 10 }),
        T0 + 1,
    )
    .unwrap();
    assert_eq!(next_tick(&t, "sec"), T0 + 5 * S);
    // Catch up after 31 s away: six ticks due (+5 .. +30), all fired in order.
    while fire_due(&mut t, "sec", T0 + 31 * S).is_some() {}
    let want: Vec<u64> = (1..=6).map(|k| T0 + 5 * k * S).collect();
    assert_eq!(ticks_submitted(&t, "sec"), want);
    // Skip over an hour: only the latest quarter hour fires, three skipped.
    let out = fire_due(&mut t, "q", q0 + 3700 * S).unwrap();
    assert!(
        matches!(out, ScheduleOutcome::Fired { tick_ms, skipped: 3, .. } if tick_ms == q0 + 3600 * S),
        "{out:?}"
    );
    // Day of week 1-5 is Monday to Friday (Unix cron), 0 and 7 Sunday; T0 is a Tuesday.
    create(&mut t, cron("weekend", "0 9 * * 0,6", CatchUp::Skip), T0).unwrap();
    let saturday_9am = T0 + (3 * 86400 + 10 * 3600 + 46 * 60 + 40) * S;
    assert_eq!(next_tick(&t, "weekend"), saturday_9am);
    // The same expression gives the same ticks from the same tick, on any replica.
    let c = Cadence::Cron {
        expr: "7 3 * * *".into(),
    };
    assert_eq!(c.next_after(T0), c.next_after(T0));
    assert_eq!(
        c.next_after(T0).unwrap() % (86_400 * S),
        (3 * 3600 + 7 * 60) * S
    );
}

#[test]
fn schedules_survive_checkpoints_and_restarts() {
    let mut t = TaskTable::new();
    let mut archive = MemArchive::default();
    create(&mut t, every("s", 2 * S, CatchUp::Skip), T0).unwrap();
    create(&mut t, cron("c", "0 * * * *", CatchUp::All { max: 5 }), T0).unwrap();
    checkpoint(&mut t, &mut archive);
    fire_due(&mut t, "s", T0 + 2 * S).unwrap();
    checkpoint(&mut t, &mut archive);
    let reloaded = archive.reload();
    assert_eq!(reloaded.schedules(), t.schedules());
    assert_eq!(next_tick(&reloaded, "s"), T0 + 4 * S);
    // A checkpoint that changed no schedule writes none; the archive keeps the last.
    let delta = t.begin_checkpoint().unwrap();
    assert!(delta.schedules.is_none());
    archive.write(&delta);
    t.checkpoint_written();
    // The tick fired before the restart is not fired again after it.
    let mut reloaded = archive.reload();
    assert_eq!(
        fire(&mut reloaded, "s", T0 + 2 * S, T0 + 3 * S),
        ScheduleOutcome::Ignored
    );
    fire_due(&mut reloaded, "s", T0 + 4 * S).unwrap();
    assert_eq!(next_tick(&reloaded, "s"), T0 + 6 * S);
}

#[test]
fn a_restore_brings_schedules_back_and_an_abort_takes_them_away() {
    let mut source = TaskTable::new();
    create(&mut source, every("s", S, CatchUp::Skip), T0).unwrap();
    fire_due(&mut source, "s", T0 + S).unwrap();
    let backed_up: Vec<Schedule> = source.schedules().by_name.values().cloned().collect();

    let mut memory = swarm_memory::MemoryStore::new(Default::default()).unwrap();
    let mut t = TaskTable::new();
    let restore = |restore_id| {
        Op::Schedule(ScheduleOp::Restore {
            restore_id,
            schedules: backed_up.clone(),
        })
    };
    // Not outside a restore.
    assert!(matches!(
        t.apply_op(&restore(7), &NoArchive).unwrap(),
        OpResult::Schedule(Err(f)) if f.code == "no_restore"
    ));
    t.restore_begin(7, T0, &memory).unwrap();
    assert_eq!(
        t.apply_op(&restore(7), &NoArchive).unwrap(),
        OpResult::Schedule(Ok(ScheduleOutcome::Done))
    );
    // Other schedule ops wait for the restore to end.
    assert_eq!(
        t.apply_op(
            &Op::Schedule(ScheduleOp::Fire {
                name: "s".into(),
                tick_ms: T0 + 2 * S,
                now_ms: T0 + 2 * S,
                queue_limit: 10
            }),
            &NoArchive
        )
        .unwrap(),
        OpResult::Restoring
    );
    t.restore_abort(7, &mut memory).unwrap();
    assert!(t.schedules().is_empty(), "an aborted restore leaves none");

    t.restore_begin(8, T0, &memory).unwrap();
    t.apply_op(&restore(8), &NoArchive).unwrap();
    t.restore_commit_check(8, 0, 0).unwrap();
    t.restore_commit(&RestoredMeta::default());
    assert_eq!(t.schedules(), source.schedules());
    // A cluster holding schedules is not empty: no restore into it.
    assert!(t
        .restore_begin(9, T0, &memory)
        .unwrap_err()
        .contains("1 schedules"));
}

#[test]
fn a_random_sequence_of_fires_submits_each_tick_once() {
    use rand::{Rng, SeedableRng};
    // Proposals from several "leaders" with stale views, replays, outages: the tasks are
    // exactly the ticks fired, each once, and with `All` and a generous bound none of
    // the due ticks is missing.
    for seed in 0..20u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = TaskTable::new();
        create(&mut t, every("s", S, CatchUp::All { max: 1000 }), T0).unwrap();
        let mut now = T0;
        let mut seen_ticks: Vec<u64> = Vec::new();
        for _ in 0..300 {
            now += rng.gen_range(0..3 * S);
            let next = next_tick(&t, "s");
            seen_ticks.push(next);
            // A stale view: some tick seen earlier.
            let tick = if rng.gen_bool(0.3) {
                seen_ticks[rng.gen_range(0..seen_ticks.len())]
            } else {
                next
            };
            if tick <= now {
                fire(&mut t, "s", tick, now);
            }
        }
        while fire_due(&mut t, "s", now).is_some() {}
        let ticks = ticks_submitted(&t, "s");
        let want: Vec<u64> = (1..)
            .map(|k| T0 + k * S)
            .take_while(|x| *x <= now)
            .collect();
        assert_eq!(ticks, want, "seed {seed}");
    }
}
