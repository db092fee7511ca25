//! After the run: wait for every acknowledged task to be final, read the tasks back over
//! the API, read the agents' journal, and check what must hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::faults::{Fault, FaultKind};
use super::load::{Api, Outcome, SubmitRecord};

const FINAL_STATES: [&str; 4] = ["succeeded", "failed", "cancelled", "dead_lettered"];

pub fn is_final(task: &Value) -> bool {
    task["state"]
        .as_str()
        .is_some_and(|s| FINAL_STATES.contains(&s))
}

/// What `GET /v1/tasks/{id}` said about a task.
#[derive(Debug, Clone)]
pub enum Read {
    Found(Value),
    /// A definite answer that the task is not there (404), with the body.
    Missing(String),
    /// No definite answer within the retries.
    Unreadable(String),
}

/// `GET /v1/tasks/{id}`, asking each node in turn, a few rounds at most.
async fn read_task(api: &Api, id: u64) -> Read {
    let mut last = String::new();
    for round in 0..4 {
        for node in 0..api.urls.len() {
            match api
                .get(node, &format!("/v1/tasks/{id}"), Duration::from_secs(5))
                .await
            {
                Ok((200, v)) => return Read::Found(v),
                Ok((404, v)) => return Read::Missing(v.to_string()),
                Ok((status, v)) => last = format!("node-{}: {status} {v}", node + 1),
                Err(e) => last = format!("node-{}: {e}", node + 1),
            }
        }
        tokio::time::sleep(Duration::from_millis(250 * (round + 1))).await;
    }
    Read::Unreadable(last)
}

/// Reads the tasks `ids`, 16 requests at a time.
pub async fn read_tasks(api: &Api, ids: &[u64]) -> BTreeMap<u64, Read> {
    let permits = Arc::new(Semaphore::new(16));
    let mut set = JoinSet::new();
    for &id in ids {
        let api = api.clone();
        let permits = permits.clone();
        set.spawn(async move {
            let _p = permits.acquire_owned().await;
            (id, read_task(&api, id).await)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((id, read)) = r {
            out.insert(id, read);
        }
    }
    out
}

/// Waits (for at most `within`) until every task in `ids` reads final; returns the first
/// final view of each task that got there, and the ids that did not.
pub async fn wait_final(
    api: &Api,
    ids: &BTreeSet<u64>,
    within: Duration,
) -> (BTreeMap<u64, Value>, Vec<u64>) {
    let deadline = Instant::now() + within;
    let mut finals = BTreeMap::new();
    let mut pending: Vec<u64> = ids.iter().copied().collect();
    loop {
        let reads = read_tasks(api, &pending).await;
        pending.clear();
        for (id, r) in reads {
            match r {
                Read::Found(v) if is_final(&v) => {
                    finals.insert(id, v);
                }
                _ => pending.push(id),
            }
        }
        if pending.is_empty() || Instant::now() >= deadline {
            return (finals, pending);
        }
        eprintln!(
            "nemesis: {} acknowledged tasks not final yet",
            pending.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every task the cluster holds, paged through `GET /v1/tasks`.
pub async fn list_all(api: &Api) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut after = 0u64;
    'pages: loop {
        let mut last = String::new();
        for attempt in 0..(3 * api.urls.len()) {
            let node = attempt % api.urls.len();
            match api
                .get(
                    node,
                    &format!("/v1/tasks?after={after}&limit=1000"),
                    Duration::from_secs(15),
                )
                .await
            {
                Ok((200, v)) => {
                    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
                    out.extend(tasks);
                    match v["next_after"].as_u64() {
                        Some(next) => {
                            after = next;
                            continue 'pages;
                        }
                        None => return Ok(out),
                    }
                }
                Ok((status, v)) => last = format!("{status} {v}"),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        return Err(format!("listing tasks after {after}: {last}"));
    }
}

/// What a journal line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Start,
    End,
    /// Another agent of the same execution id held its lock as this one started.
    BusyExec,
    /// Another agent of the same task held its lock as this one started.
    BusyTask,
    /// `flock` was missing: overlaps are judged from the `start`/`end` lines alone.
    NoFlock,
}

/// One journal line: `<kind> <execution id> <task> <attempt> <worker> <unix ns>`.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: Kind,
    pub exec: String,
    pub task: u64,
    pub attempt: u32,
    pub worker: String,
    pub ns: u64,
}

/// The journal's lines in file order, and the lines that do not parse.
pub fn read_journal(path: &Path) -> std::io::Result<(Vec<Line>, Vec<String>)> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for raw in text.lines() {
        let f: Vec<&str> = raw.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [kind, exec, task, attempt, worker, ns] => {
                let kind = match *kind {
                    "start" => Some(Kind::Start),
                    "end" => Some(Kind::End),
                    "busy-exec" => Some(Kind::BusyExec),
                    "busy-task" => Some(Kind::BusyTask),
                    "no-flock" => Some(Kind::NoFlock),
                    _ => None,
                };
                match (kind, task.parse(), attempt.parse(), ns.parse()) {
                    (Some(kind), Ok(task), Ok(attempt), Ok(ns)) => Some(Line {
                        kind,
                        exec: exec.to_string(),
                        task,
                        attempt,
                        worker: worker.to_string(),
                        ns,
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        match parsed {
            Some(l) => lines.push(l),
            None => bad.push(raw.to_string()),
        }
    }
    Ok((lines, bad))
}

/// One run of the agent: a `start` line, its `end` line if it got that far (an agent
/// killed on a timeout or a cancel has none), and what its locks said as it started.
#[derive(Debug, Clone)]
pub struct Execution {
    pub exec: String,
    pub task: u64,
    pub attempt: u32,
    pub worker: String,
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    /// Another agent of this execution id / this task was running as it started.
    pub busy_exec: bool,
    pub busy_task: bool,
    /// The agent could not take locks (no `flock`).
    pub no_flock: bool,
}

/// Whether two runs overlapped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlapping {
    No,
    /// Certainly: by their `start`/`end` lines, or by a lock the later one found held.
    Yes,
    /// Perhaps: the earlier one has no `end`, and the locks do not tell (another run may
    /// have held the lock the later one found held), or there were no locks and it
    /// started within the earlier one's planned sleep.
    Possibly,
}

/// Pairs every `start` with the next `end` of the same execution on the same worker,
/// and the `busy-*` lines with the `start` they follow.
pub fn executions(lines: &[Line]) -> (Vec<Execution>, usize) {
    let mut out: Vec<Execution> = Vec::new();
    let mut open: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    let mut last_start: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut no_flock: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unmatched = 0;
    for l in lines {
        let k = (l.exec.clone(), l.worker.clone());
        match l.kind {
            Kind::NoFlock => {
                no_flock.insert(k);
            }
            Kind::Start => {
                open.entry(k.clone()).or_default().push(out.len());
                last_start.insert(k.clone(), out.len());
                out.push(Execution {
                    exec: l.exec.clone(),
                    task: l.task,
                    attempt: l.attempt,
                    worker: l.worker.clone(),
                    start_ns: l.ns,
                    end_ns: None,
                    busy_exec: false,
                    busy_task: false,
                    no_flock: no_flock.remove(&k),
                });
            }
            Kind::End => match open.get_mut(&k).filter(|v| !v.is_empty()) {
                Some(v) => {
                    let i = v.remove(0);
                    out[i].end_ns = Some(l.ns);
                }
                None => unmatched += 1,
            },
            Kind::BusyExec | Kind::BusyTask => match last_start.get(&k) {
                Some(&i) if l.kind == Kind::BusyExec => out[i].busy_exec = true,
                Some(&i) => out[i].busy_task = true,
                None => unmatched += 1,
            },
        }
    }
    (out, unmatched)
}

/// The sleep a payload asks the agent for (its `-ms<N>` suffix).
pub fn planned_ms(payload: &str) -> u64 {
    payload
        .rsplit_once("-ms")
        .and_then(|(_, ms)| ms.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
}

/// Two executions of one task on different workers at overlapping times.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub task: u64,
    /// `<execution id>@<worker>`, the one that started first, and the other.
    pub a: String,
    pub b: String,
    /// How far apart they started.
    pub starts_apart_ms: f64,
    pub certain: bool,
}

/// Everything the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub violations: Vec<Violation>,
    /// Acknowledged tasks not final after the wait (or unreadable).
    pub not_final: Vec<String>,
    pub by_state: BTreeMap<String, u64>,
    pub tasks_listed: usize,
    /// Submits never acknowledged whose key did create a task.
    pub unacked_with_task: usize,
    pub executions_started: usize,
    pub executions_ended: usize,
    /// `end` and `busy-*` lines with no `start` before them.
    pub unmatched_ends: usize,
    /// Executions that could not take locks (no `flock` where the agent ran).
    pub executions_without_flock: usize,
    /// Executions that found their own execution id's lock held / their task's.
    pub busy_exec_lines: usize,
    pub busy_task_lines: usize,
    pub malformed_lines: usize,
    pub exec_ids: usize,
    pub exec_ids_started_more_than_once: usize,
    /// Each execution id started more than once: where and when.
    pub repeated_execs: Vec<String>,
    /// Executions whose id came from `SWARM_EXECUTION_ID` (three fields) and from the
    /// `<task>.<attempt>` fallback.
    pub exec_ids_from_env: usize,
    pub exec_ids_fallback: usize,
    pub overlaps: Vec<Overlap>,
    pub repeat_submits: usize,
    /// Per fault on the leader: how long until the first agent started on a dispatch
    /// of a later leader (see [`Failover`]).
    pub failover: Vec<Failover>,
}

/// How one fault on the leader delayed work.
#[derive(Debug, Clone)]
pub struct Failover {
    pub kind: FaultKind,
    /// From the fault to the first agent start of an execution dispatched by a leader
    /// of a later term: by the term in the execution id when it has one, else the
    /// first start after a leader of a later term was seen.
    pub next_dispatch_ms: Option<u64>,
    /// From the fault to the first agent start of any kind (runs already sent by the
    /// old leader included).
    pub first_start_ms: Option<u64>,
    /// Agents started while the fault held on executions of the old leader's term (by
    /// the execution id's term; `None` without terms).
    pub old_term_starts: Option<usize>,
}

/// Where `ns` falls among the faults: during one, after one, or before any.
pub fn fault_context(faults: &[Fault], ns: u64) -> String {
    match faults.iter().rev().find(|f| f.start_ns <= ns) {
        None => match faults.first() {
            Some(f) => format!(
                "before any fault ({:.1} s before the first)",
                (f.start_ns - ns) as f64 / 1e9
            ),
            None => "no fault was injected".into(),
        },
        Some(f) if ns <= f.heal_ns => format!(
            "during {} of {} ({:.1} s after it began)",
            f.kind.as_str(),
            f.target,
            (ns - f.start_ns) as f64 / 1e9
        ),
        Some(f) => format!(
            "{:.1} s after {} of {} was healed",
            (ns - f.heal_ns) as f64 / 1e9,
            f.kind.as_str(),
            f.target
        ),
    }
}

/// A task's recorded attempts, compactly: `1@w4 succeeded [started..finished]`.
fn attempts_text(task: Option<&&Value>) -> String {
    let Some(t) = task else {
        return "task not read".into();
    };
    let list: Vec<String> = t["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|at| {
                    format!(
                        "{}@{} {} [{}..{}]",
                        at["attempt"],
                        at["worker"].as_str().unwrap_or("?"),
                        at["outcome"].as_str().unwrap_or("running"),
                        at["started_at_ms"],
                        at["finished_at_ms"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "task is {}; recorded attempts: {}",
        t["state"],
        list.join(", ")
    )
}

/// The term in an execution id `<task>.<attempt>.<term>`, if it has one.
fn exec_term(exec: &str) -> Option<u64> {
    let mut parts = exec.split('.');
    let (_, _, term) = (parts.next()?, parts.next()?, parts.next()?);
    term.parse().ok()
}

fn v(kind: &'static str, detail: String) -> Violation {
    Violation { kind, detail }
}

/// The inputs of [`check`].
pub struct Inputs<'a> {
    pub records: &'a [SubmitRecord],
    /// The first final view of each acknowledged task (from [`wait_final`]).
    pub first_finals: &'a BTreeMap<u64, Value>,
    /// The acknowledged tasks read again once all were final.
    pub reads: &'a BTreeMap<u64, Read>,
    /// Every task the cluster holds.
    pub listed: &'a [Value],
    pub journal: &'a [Line],
    pub malformed_lines: usize,
    pub faults: &'a [Fault],
    pub lease_ms: u64,
}

pub fn check(inp: &Inputs<'_>) -> Audit {
    let mut a = Audit {
        malformed_lines: inp.malformed_lines,
        tasks_listed: inp.listed.len(),
        ..Audit::default()
    };

    // --- Submits: durability and idempotency of what was acknowledged.
    let mut ids_of_key: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut record_of_id: BTreeMap<u64, &SubmitRecord> = BTreeMap::new();
    for r in inp.records {
        let ids = ids_of_key.entry(r.key.as_str()).or_default();
        if let Some(id) = r.acked_id() {
            ids.insert(id);
            record_of_id.insert(id, r);
        }
        for (_, id) in &r.repeat_acks {
            ids.insert(*id);
            a.repeat_submits += 1;
        }
    }
    for (key, ids) in &ids_of_key {
        if ids.len() > 1 {
            a.violations.push(v(
                "idempotency",
                format!("key {key} was acknowledged as different tasks {ids:?}"),
            ));
        }
    }
    for r in inp.records {
        let Some(id) = r.acked_id() else { continue };
        match inp.reads.get(&id) {
            Some(Read::Found(t)) => {
                if !is_final(t) {
                    a.not_final
                        .push(format!("task {id} ({}) is {}", r.key, t["state"]));
                }
                if t["idempotency_key"].as_str() != Some(r.key.as_str()) {
                    a.violations.push(v(
                        "wrong_task",
                        format!(
                            "key {} was acknowledged as task {id}, whose key is {}",
                            r.key, t["idempotency_key"]
                        ),
                    ));
                } else if t["payload"].as_str() != Some(r.payload.as_str()) {
                    a.violations.push(v(
                        "wrong_task",
                        format!(
                            "task {id} ({}) holds payload {} instead of {:?}",
                            r.key, t["payload"], r.payload
                        ),
                    ));
                }
                if let Some(first) = inp.first_finals.get(&id) {
                    for field in ["state", "output", "finished_at_ms", "attempts"] {
                        if first[field] != t[field] {
                            a.violations.push(v(
                                "final_changed",
                                format!(
                                    "task {id}: {field} read {} once final, later {}",
                                    first[field], t[field]
                                ),
                            ));
                        }
                    }
                }
            }
            Some(Read::Missing(body)) => a.violations.push(v(
                "lost",
                format!(
                    "task {id} (key {}, acknowledged at {} ms) is not found: {body}",
                    r.key, r.decided_ms
                ),
            )),
            Some(Read::Unreadable(e)) => a
                .not_final
                .push(format!("task {id} ({}) could not be read: {e}", r.key)),
            None => a
                .not_final
                .push(format!("task {id} ({}) was not read", r.key)),
        }
    }

    // --- Every task the cluster holds: one per key, and only ours.
    let mut tasks_of_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut listed_by_id: BTreeMap<u64, &Value> = BTreeMap::new();
    for t in inp.listed {
        let Some(id) = t["id"].as_u64() else { continue };
        listed_by_id.insert(id, t);
        *a.by_state
            .entry(t["state"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        match t["idempotency_key"].as_str() {
            Some(k) => tasks_of_key.entry(k.to_string()).or_default().push(id),
            None => a.violations.push(v(
                "unknown_task",
                format!("task {id} has no idempotency key: nobody submitted it"),
            )),
        }
    }
    let records_by_key: BTreeMap<&str, &SubmitRecord> =
        inp.records.iter().map(|r| (r.key.as_str(), r)).collect();
    for (key, ids) in &tasks_of_key {
        if ids.len() > 1 {
            a.violations.push(v(
                "idempotency",
                format!("key {key} has {} tasks: {ids:?}", ids.len()),
            ));
        }
        match records_by_key.get(key.as_str()) {
            None => a.violations.push(v(
                "unknown_task",
                format!("tasks {ids:?} carry key {key}, which was never submitted"),
            )),
            Some(r) => match &r.outcome {
                Outcome::Unknown => a.unacked_with_task += 1,
                Outcome::Refused { status, .. } => a.violations.push(v(
                    "refused_but_created",
                    format!("key {key} was refused ({status}) yet tasks {ids:?} exist"),
                )),
                Outcome::Acked { .. } => {}
            },
        }
    }
    for id in record_of_id.keys() {
        if !listed_by_id.contains_key(id) && matches!(inp.reads.get(id), Some(Read::Found(_))) {
            a.violations.push(v(
                "listing_incomplete",
                format!("task {id} reads back but is missing from GET /v1/tasks"),
            ));
        }
    }

    // Acknowledged tasks as read back, and the tasks of unacknowledged submits as listed.
    let mut all: BTreeMap<u64, &Value> = listed_by_id.clone();
    for (id, read) in inp.reads {
        if let Read::Found(t) = read {
            all.insert(*id, t);
        }
    }

    // --- The journal.
    let (execs, unmatched) = executions(inp.journal);
    a.unmatched_ends = unmatched;
    a.executions_started = execs.len();
    a.executions_ended = execs.iter().filter(|e| e.end_ns.is_some()).count();
    let planned = |task: u64| -> u64 {
        listed_by_id
            .get(&task)
            .and_then(|t| t["payload"].as_str())
            .map_or(300, planned_ms)
    };
    let mut by_exec: BTreeMap<&str, Vec<&Execution>> = BTreeMap::new();
    for e in &execs {
        by_exec.entry(e.exec.as_str()).or_default().push(e);
        if !listed_by_id.contains_key(&e.task) {
            a.violations.push(v(
                "unknown_task",
                format!(
                    "worker {} ran task {} (execution {}), which the cluster does not hold",
                    e.worker, e.task, e.exec
                ),
            ));
        }
    }
    a.exec_ids = by_exec.len();
    a.executions_without_flock = execs.iter().filter(|e| e.no_flock).count();
    a.busy_exec_lines = execs.iter().filter(|e| e.busy_exec).count();
    a.busy_task_lines = execs.iter().filter(|e| e.busy_task).count();
    for (exec, group) in by_exec.iter_mut() {
        group.sort_by_key(|e| e.start_ns);
        if exec.split('.').count() >= 3 {
            a.exec_ids_from_env += 1;
        } else {
            a.exec_ids_fallback += 1;
        }
        if group.len() > 1 {
            a.exec_ids_started_more_than_once += 1;
            let runs: Vec<String> = group.iter().map(|e| run_text(e)).collect();
            a.repeated_execs.push(format!(
                "execution {exec} started {} times: {}; {}; {}",
                group.len(),
                runs.join(", "),
                fault_context(inp.faults, group[0].start_ns),
                attempts_text(all.get(&group[0].task))
            ));
        }
        let p = planned(group[0].task);
        for (i, j, o) in concurrent_pairs(group, |e| e.busy_exec, p) {
            let (x, y) = (group[i], group[j]);
            if x.worker == y.worker {
                continue;
            }
            let how = match o {
                Overlapping::Yes if x.end_ns.is_some() => {
                    "by their journal lines: the second started before the first ended"
                }
                Overlapping::Yes if y.busy_exec => {
                    "the second found the execution's lock held by the first as it started"
                }
                Overlapping::Yes => {
                    "the first found the execution's lock held by the second (their start stamps are in the other order)"
                }
                _ => "POSSIBLY: the first has no `end`, and the locks do not tell whether it still ran",
            };
            a.violations.push(v(
                "concurrent_execution",
                format!(
                    "execution {exec} of task {} ran on {} and on {} at once ({how}); {}; {}",
                    x.task,
                    run_text(x),
                    run_text(y),
                    fault_context(inp.faults, x.start_ns),
                    attempts_text(all.get(&x.task)),
                ),
            ));
        }
    }
    // The documented at-least-once case: the same task, different executions, on two
    // workers at overlapping times.
    let mut by_task: BTreeMap<u64, Vec<&Execution>> = BTreeMap::new();
    for e in &execs {
        by_task.entry(e.task).or_default().push(e);
    }
    for (task, group) in by_task.iter_mut() {
        group.sort_by_key(|e| e.start_ns);
        for (i, j, o) in concurrent_pairs(group, |e| e.busy_task, planned(*task)) {
            let (x, y) = (group[i], group[j]);
            if x.worker == y.worker || x.exec == y.exec {
                continue;
            }
            a.overlaps.push(Overlap {
                task: *task,
                a: format!("{}@{}", x.exec, x.worker),
                b: format!("{}@{}", y.exec, y.worker),
                starts_apart_ms: (y.start_ns - x.start_ns) as f64 / 1e6,
                certain: o == Overlapping::Yes,
            });
        }
    }

    // --- Attempts as recorded against what the workers ran.
    let started: BTreeSet<(u64, u32, &str)> = execs
        .iter()
        .map(|e| (e.task, e.attempt, e.worker.as_str()))
        .collect();
    let ended: BTreeSet<(u64, u32, &str)> = execs
        .iter()
        .filter(|e| e.end_ns.is_some())
        .map(|e| (e.task, e.attempt, e.worker.as_str()))
        .collect();
    let phantom_ms = inp.lease_ms + 5_000;
    for (id, t) in &all {
        let attempts = t["attempts"].as_array().cloned().unwrap_or_default();
        let mut succeeded = Vec::new();
        for at in &attempts {
            let n = at["attempt"].as_u64().unwrap_or(0) as u32;
            let worker = at["worker"].as_str().unwrap_or("");
            let outcome = at["outcome"].as_str().unwrap_or("");
            if outcome == "succeeded" {
                succeeded.push(n);
                if !ended.contains(&(*id, n, worker)) {
                    a.violations.push(v(
                        "result_without_run",
                        format!(
                            "task {id} attempt {n} is recorded as succeeded on {worker}, whose journal has no {} of it",
                            if started.contains(&(*id, n, worker)) { "`end`" } else { "`start`" }
                        ),
                    ));
                }
            }
            let begun = at["started_at_ms"].as_u64().unwrap_or(0);
            let finished = at["finished_at_ms"]
                .as_u64()
                .or_else(|| t["finished_at_ms"].as_u64())
                .unwrap_or(begun);
            let ran_ms = finished.saturating_sub(begun);
            if !started.contains(&(*id, n, worker)) && ran_ms > phantom_ms {
                a.violations.push(v(
                    "phantom_attempt",
                    format!(
                        "task {id} attempt {n} is recorded as running on {worker} for {ran_ms} ms (outcome {outcome:?}, {}), but {worker} never started it; it began {}",
                        at["error"].as_str().unwrap_or("no error"),
                        fault_context(inp.faults, begun.saturating_mul(1_000_000))
                    ),
                ));
            }
        }
        if succeeded.len() > 1 {
            a.violations.push(v(
                "several_successes",
                format!("task {id} records succeeded attempts {succeeded:?}"),
            ));
        }
        let state = t["state"].as_str().unwrap_or("");
        if state == "succeeded" {
            if succeeded.is_empty() {
                a.violations.push(v(
                    "success_without_attempt",
                    format!("task {id} is succeeded but no attempt is"),
                ));
            }
            if t["output"] != t["payload"] {
                a.violations.push(v(
                    "wrong_output",
                    format!(
                        "task {id}: output {} is not its payload {}",
                        t["output"], t["payload"]
                    ),
                ));
            }
        } else if !succeeded.is_empty() {
            a.violations.push(v(
                "success_lost",
                format!("task {id} is {state} although attempt {succeeded:?} succeeded"),
            ));
        }
    }

    // --- Failover: from each fault that hit the leader to the next agent start.
    let mut starts: Vec<(u64, Option<u64>)> = execs
        .iter()
        .map(|e| (e.start_ns, exec_term(&e.exec)))
        .collect();
    starts.sort_unstable();
    let with_terms = a.exec_ids_fallback == 0 && a.exec_ids_from_env > 0;
    for f in inp.faults.iter().filter(|f| f.hit_leader) {
        let after = |from: u64| starts.iter().find(|(s, _)| *s > from).map(|(s, _)| *s);
        let first_start = after(f.start_ns);
        let next_dispatch = match (with_terms, f.term_before) {
            (true, Some(term)) => starts
                .iter()
                .find(|(s, t)| *s > f.start_ns && t.is_some_and(|t| t > term))
                .map(|(s, _)| *s),
            _ => f.new_term_ns.and_then(after),
        };
        let old_term_starts = match (with_terms, f.term_before) {
            (true, Some(term)) => Some(
                starts
                    .iter()
                    .filter(|(s, t)| *s > f.start_ns && *s <= f.heal_ns && *t == Some(term))
                    .count(),
            ),
            _ => None,
        };
        a.failover.push(Failover {
            kind: f.kind,
            next_dispatch_ms: next_dispatch.map(|s| (s - f.start_ns) / 1_000_000),
            first_start_ms: first_start.map(|s| (s - f.start_ns) / 1_000_000),
            old_term_starts,
        });
    }
    a
}

/// `worker [start .. end]` in unix ns, noting a missing `end` and held locks.
fn run_text(e: &Execution) -> String {
    let end = e
        .end_ns
        .map_or_else(|| "no end".to_string(), |e| e.to_string());
    let mut locks = Vec::new();
    if e.busy_exec {
        locks.push("execution lock held by another");
    }
    if e.busy_task {
        locks.push("task lock held by another");
    }
    if locks.is_empty() {
        format!("{} [{} .. {end}]", e.worker, e.start_ns)
    } else {
        format!(
            "{} [{} .. {end}; {}]",
            e.worker,
            e.start_ns,
            locks.join(", ")
        )
    }
}

/// How far apart an agent's lock and its `start` stamp may be (it stamps after taking
/// its locks; generous, for a loaded machine).
const STAMP_SKEW_NS: u64 = 50_000_000;

/// Runs of `runs` other than `r` that may have held the group's lock when `r` tried it.
fn may_hold<'a>(runs: &'a [&'a Execution], r: usize) -> Vec<usize> {
    let t = runs[r].start_ns;
    (0..runs.len())
        .filter(|&z| z != r)
        .filter(|&z| {
            runs[z].start_ns <= t + STAMP_SKEW_NS
                && runs[z].end_ns.is_none_or(|e| e + STAMP_SKEW_NS > t)
        })
        .collect()
}

/// For runs of one execution id or one task, sorted by start: the pairs `(i, j)`
/// (`i` started first) that ran at once, and how certainly. Two runs with `end` lines
/// are judged by them; a run without one (killed) by the locks: a run that found the
/// group's lock held (`lock`) had another running then, which is certainly the other
/// run of the pair when no other run may have held it.
fn concurrent_pairs(
    runs: &[&Execution],
    lock: impl Fn(&Execution) -> bool,
    planned_ms: u64,
) -> Vec<(usize, usize, Overlapping)> {
    let holders: Vec<Vec<usize>> = (0..runs.len()).map(|r| may_hold(runs, r)).collect();
    let mut out = Vec::new();
    for j in 0..runs.len() {
        for i in 0..j {
            let (x, y) = (runs[i], runs[j]);
            let o = match x.end_ns {
                // x started first: with its end known, the lines decide.
                Some(xe) if y.start_ns < xe => Overlapping::Yes,
                Some(_) => Overlapping::No,
                // No locks: x, killed, ran at most its planned sleep.
                None if x.no_flock || y.no_flock => {
                    if y.start_ns < x.start_ns + planned_ms * 1_000_000 {
                        Overlapping::Possibly
                    } else {
                        Overlapping::No
                    }
                }
                _ => {
                    let only = |r: usize, other: usize| lock(runs[r]) && holders[r] == [other];
                    let maybe =
                        |r: usize, other: usize| lock(runs[r]) && holders[r].contains(&other);
                    if only(j, i) || only(i, j) {
                        Overlapping::Yes
                    } else if maybe(j, i) || maybe(i, j) {
                        Overlapping::Possibly
                    } else {
                        Overlapping::No
                    }
                }
            };
            if o != Overlapping::No {
                out.push((i, j, o));
            }
        }
    }
    out
}

/// `{n, p50, max}` of some milliseconds (nearest-rank p50).
pub fn summary(ms: &[u64]) -> Value {
    let mut s = ms.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return json!({"n": 0, "p50_ms": null, "max_ms": null});
    }
    let p50 = s[(s.len() - 1) / 2];
    json!({"n": s.len(), "p50_ms": p50, "max_ms": s[s.len() - 1]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::load::{Outcome, SubmitRecord};

    const MS: u64 = 1_000_000;

    fn line(kind: Kind, exec: &str, worker: &str, ms: u64) -> Line {
        let mut parts = exec.split('.');
        Line {
            kind,
            exec: exec.into(),
            task: parts.next().and_then(|t| t.parse().ok()).unwrap_or(0),
            attempt: parts.next().and_then(|a| a.parse().ok()).unwrap_or(0),
            worker: worker.into(),
            ns: ms * MS,
        }
    }

    fn record(key: &str, payload: &str, id: Option<u64>) -> SubmitRecord {
        SubmitRecord {
            key: key.into(),
            payload: payload.into(),
            client: 0,
            first_sent_ms: 0,
            decided_ms: 0,
            tries: 1,
            outcome: match id {
                Some(id) => Outcome::Acked {
                    id,
                    node: 0,
                    duplicate: false,
                },
                None => Outcome::Unknown,
            },
            errors: Vec::new(),
            repeat_acks: Vec::new(),
        }
    }

    fn task(id: u64, key: &str, payload: &str, state: &str, attempts: Value) -> Value {
        let output = if state == "succeeded" {
            json!(payload)
        } else {
            Value::Null
        };
        json!({"id": id, "idempotency_key": key, "payload": payload, "state": state,
               "output": output, "attempts": attempts, "finished_at_ms": 10_000})
    }

    fn run(records: &[SubmitRecord], tasks: &[Value], journal: &[Line], faults: &[Fault]) -> Audit {
        let reads: BTreeMap<u64, Read> = tasks
            .iter()
            .map(|t| (t["id"].as_u64().unwrap_or(0), Read::Found(t.clone())))
            .collect();
        let finals: BTreeMap<u64, Value> = tasks
            .iter()
            .map(|t| (t["id"].as_u64().unwrap_or(0), t.clone()))
            .collect();
        check(&Inputs {
            records,
            first_finals: &finals,
            reads: &reads,
            listed: tasks,
            journal,
            malformed_lines: 0,
            faults,
            lease_ms: 1_500,
        })
    }

    fn kinds(a: &Audit) -> Vec<&'static str> {
        a.violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn journal_lines_parse_and_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.log");
        std::fs::write(
            &path,
            "start 7.1.3 7 1 w1 1000\nbusy-exec 7.1.3 7 1 w2 1500\nstart 7.1.3 7 1 w2 1400\n\
             end 7.1.3 7 1 w1 2000\ngarbage line\nend 7.1.3 7 1 w9 3000\n",
        )
        .expect("write");
        let (lines, bad) = read_journal(&path).expect("read");
        assert_eq!(bad, vec!["garbage line".to_string()]);
        let (execs, unmatched) = executions(&lines);
        // The busy line precedes w2's start: nothing to attach it to; w9's end has no start.
        assert_eq!(unmatched, 2);
        assert_eq!(execs.len(), 2);
        assert_eq!(execs[0].end_ns, Some(2000));
        assert_eq!(execs[1].end_ns, None);
        assert_eq!(planned_ms("nem-1-c0-3-abcd-ms250"), 250);
        assert_eq!(planned_ms("no suffix"), 0);
    }

    #[test]
    fn a_clean_history_passes() {
        let records = [
            record("k1", "p1-ms10", Some(1)),
            record("k2", "p2-ms10", None),
        ];
        let tasks = [task(
            1,
            "k1",
            "p1-ms10",
            "succeeded",
            json!([{"attempt": 1, "worker": "w1", "outcome": "succeeded",
                    "started_at_ms": 1000, "finished_at_ms": 1010}]),
        )];
        let journal = [
            line(Kind::Start, "1.1.1", "w1", 1000),
            line(Kind::End, "1.1.1", "w1", 1010),
        ];
        let a = run(&records, &tasks, &journal, &[]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert!(a.not_final.is_empty());
        assert_eq!(a.exec_ids_from_env, 1);
    }

    #[test]
    fn the_same_execution_on_two_workers_at_once_is_a_violation() {
        let records = [record("k1", "p1-ms100", Some(1))];
        let tasks = [task(
            1,
            "k1",
            "p1-ms100",
            "succeeded",
            json!([{"attempt": 1, "worker": "w2", "outcome": "succeeded",
                    "started_at_ms": 1000, "finished_at_ms": 1100}]),
        )];
        // w1's agent was killed (no end), w2 found the execution's lock held.
        let mut journal = vec![
            line(Kind::Start, "1.1.1", "w1", 1000),
            line(Kind::Start, "1.1.1", "w2", 1005),
            line(Kind::BusyExec, "1.1.1", "w2", 1005),
            line(Kind::BusyTask, "1.1.1", "w2", 1005),
            line(Kind::End, "1.1.1", "w2", 1100),
        ];
        let a = run(&records, &tasks, &journal, &[]);
        assert_eq!(
            kinds(&a),
            vec!["concurrent_execution"],
            "{:?}",
            a.violations
        );
        assert_eq!(a.exec_ids_started_more_than_once, 1);
        // Without the lock held, the killed run was gone: started twice, not at once.
        journal.retain(|l| !matches!(l.kind, Kind::BusyExec | Kind::BusyTask));
        let a = run(&records, &tasks, &journal, &[]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.exec_ids_started_more_than_once, 1);
    }

    #[test]
    fn different_executions_of_a_task_at_once_are_counted_not_violations() {
        let records = [record("k1", "p1-ms100", Some(1))];
        let tasks = [task(
            1,
            "k1",
            "p1-ms100",
            "succeeded",
            json!([
                {"attempt": 1, "worker": "w1", "outcome": "lost", "started_at_ms": 1000, "finished_at_ms": 1050},
                {"attempt": 2, "worker": "w2", "outcome": "succeeded", "started_at_ms": 1050, "finished_at_ms": 1150}
            ]),
        )];
        let journal = [
            line(Kind::Start, "1.1.1", "w1", 1000),
            line(Kind::Start, "1.2.2", "w2", 1050),
            line(Kind::End, "1.1.1", "w1", 1100),
            line(Kind::End, "1.2.2", "w2", 1150),
        ];
        let a = run(&records, &tasks, &journal, &[]);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!(a.overlaps.len(), 1);
        assert!(a.overlaps[0].certain);
    }

    #[test]
    fn lost_duplicate_wrong_output_and_phantom_are_found() {
        let records = [
            record("k1", "p1-ms0", Some(1)),
            record("k2", "p2-ms0", Some(2)),
            record("k3", "p3-ms0", Some(3)),
        ];
        let mut t1 = task(
            1,
            "k1",
            "p1-ms0",
            "succeeded",
            json!([{"attempt": 1, "worker": "w1", "outcome": "succeeded",
                    "started_at_ms": 1000, "finished_at_ms": 1010}]),
        );
        t1["output"] = json!("something else");
        let t2 = task(
            2,
            "k2",
            "p2-ms0",
            "dead_lettered",
            // Recorded on w2 for 20 s; w2 never started it.
            json!([{"attempt": 1, "worker": "w2", "outcome": "lost",
                    "started_at_ms": 1000, "finished_at_ms": 21000}]),
        );
        let dup = task(4, "k2", "p2-ms0", "succeeded", json!([]));
        let journal = [
            line(Kind::Start, "1.1.1", "w1", 1000),
            line(Kind::End, "1.1.1", "w1", 1010),
        ];
        let listed = [t1.clone(), t2.clone(), dup];
        let reads: BTreeMap<u64, Read> = [
            (1, Read::Found(t1.clone())),
            (2, Read::Found(t2.clone())),
            (3, Read::Missing("no task 3".into())),
        ]
        .into_iter()
        .collect();
        let finals: BTreeMap<u64, Value> = [(1, t1), (2, t2)].into_iter().collect();
        let a = check(&Inputs {
            records: &records,
            first_finals: &finals,
            reads: &reads,
            listed: &listed,
            journal: &journal,
            malformed_lines: 0,
            faults: &[],
            lease_ms: 1_500,
        });
        let mut k = kinds(&a);
        k.sort_unstable();
        assert_eq!(
            k,
            vec![
                "idempotency",
                "lost",
                "phantom_attempt",
                "success_without_attempt",
                "wrong_output"
            ],
            "{:?}",
            a.violations
        );
    }
}
