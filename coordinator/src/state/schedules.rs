//! Schedules: named standing orders that submit one task per tick, replicated like the
//! tasks.
//!
//! A schedule has a cadence — an interval (`every`, at least a second, ticks on the grid
//! `created_at + k × every`) or a cron expression (standard five fields, or six with
//! seconds first, evaluated in UTC) — and a task template. The leader proposes
//! [`ScheduleOp::Fire`] for a schedule whose `next_tick_ms` has come by its clock;
//! applying it submits the template through the same path as `Op::Submit`, with the
//! idempotency key `schedule:<name>:<tick_ms>`, and moves `next_tick_ms` past the tick.
//! A Fire whose tick is not the schedule's `next_tick_ms` (a replay, a stale proposal
//! of a deposed leader, a schedule paused or deleted meanwhile) is ignored, so each tick
//! submits at most one task, and the tick stays due until one Fire of it commits, so
//! none is lost to a failover.
//!
//! After an outage (no leader, or the schedule's ticks could not be proposed) several
//! ticks may be due at once. [`CatchUp::Skip`] fires only the latest of them and counts
//! the others as skipped; [`CatchUp::All`] fires each of them, one Fire at a time, but
//! at most `max` in all: older ones beyond that are skipped. A tick whose task the queue
//! refuses (queue full, its swarm deleted) counts as refused and is not retried: the
//! schedule moves on to its next tick.
//!
//! Everything here is a pure function of the op and the state: times come in the ops, and
//! a cron expression is evaluated from the tick it starts at, never from a clock.
//!
//! Stored whole by every checkpoint (`schedules` key) and every dump (a `Schedules`
//! record; older checkpoints and dumps read as none).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use swarm_proto::TaskId;

use super::TaskSpec;

/// Most schedules a cluster holds.
pub const MAX_SCHEDULES: usize = 10_000;
/// Largest task template of one schedule (its payload, labels and names), in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;
/// Most bytes of templates all schedules hold together (they are stored whole by every
/// checkpoint that follows a change).
pub const MAX_TOTAL_TEMPLATE_BYTES: usize = 16 << 20;
/// Shortest interval.
pub const MIN_INTERVAL_MS: u64 = 1000;
/// Longest interval (a year).
pub const MAX_INTERVAL_MS: u64 = 366 * 24 * 3600 * 1000;
/// Most missed ticks [`CatchUp::All`] may be asked to fire after an outage.
pub const MAX_CATCH_UP: u32 = 1000;
/// The bound of [`CatchUp::All`] when none is given.
pub const DEFAULT_CATCH_UP: u32 = 10;
/// Missed ticks of a cron schedule counted one by one per catch-up; beyond it the count
/// stops (the skipped counter then says "at least").
const MAX_COUNTED_CRON_TICKS: u64 = 10_000;
/// Longest schedule name (the same rule as swarm names).
pub const MAX_NAME_LEN: usize = 63;

/// The idempotency key of the task a schedule submits for a tick.
pub fn tick_key(name: &str, tick_ms: u64) -> String {
    format!("schedule:{name}:{tick_ms}")
}

/// When a schedule ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cadence {
    /// Every `every_ms`, on the grid `anchor_ms + k × every_ms` (the anchor is the
    /// creation time).
    Every { every_ms: u64, anchor_ms: u64 },
    /// A cron expression, evaluated in UTC.
    Cron { expr: String },
}

/// What happens to ticks missed while no tick could be fired (an outage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatchUp {
    /// Fire only the latest missed tick; count the others as skipped.
    Skip,
    /// Fire every missed tick, up to `max` of them (the latest); older ones are skipped.
    All { max: u32 },
}

impl CatchUp {
    /// How many of the ticks due at once are fired.
    fn keep(self) -> u64 {
        match self {
            CatchUp::Skip => 1,
            CatchUp::All { max } => u64::from(max.clamp(1, MAX_CATCH_UP)),
        }
    }
}

/// A schedule as its creator defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleDef {
    pub name: String,
    pub cadence: Cadence,
    pub catch_up: CatchUp,
    /// The task each tick submits (its idempotency key is set per tick).
    pub template: TaskSpec,
    /// Created paused (no tick fires until it is resumed).
    pub paused: bool,
}

/// A schedule and what it has done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub def: ScheduleDef,
    pub created_at_ms: u64,
    /// The tick the next Fire must name; `u64::MAX` when the cadence has no further tick.
    pub next_tick_ms: u64,
    /// Ticks that submitted their task (or found it submitted already).
    pub fired: u64,
    /// Missed ticks not fired, by the catch-up policy.
    pub skipped: u64,
    /// Ticks whose task was refused (queue full, unknown swarm).
    pub refused: u64,
    /// The last tick fired or refused, and its task if it got one.
    pub last_tick_ms: Option<u64>,
    pub last_task: Option<TaskId>,
    /// Why the last refused tick was refused (cleared by the next fired one).
    pub last_error: Option<String>,
}

/// Every schedule, by name. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedules {
    pub by_name: BTreeMap<String, Schedule>,
}

/// A change to the schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ScheduleOp {
    /// Define a schedule; its first tick is the first after `now_ms`.
    Create { def: Box<ScheduleDef>, now_ms: u64 },
    /// Remove a schedule (the tasks it submitted stay).
    Delete { name: String },
    /// Stop firing until resumed.
    Pause { name: String },
    /// Fire again from the first tick after `now_ms` (ticks missed while paused are not
    /// fired, nor counted).
    Resume { name: String, now_ms: u64 },
    /// The leader found `tick_ms` due at `now_ms`: submit its task (with `queue_limit`)
    /// and move on. Ignored unless `tick_ms` is the schedule's `next_tick_ms`.
    Fire {
        name: String,
        tick_ms: u64,
        now_ms: u64,
        queue_limit: u64,
    },
    /// Schedules of a backup being restored (only while restore `restore_id` is in
    /// progress).
    Restore {
        restore_id: u64,
        schedules: Vec<Schedule>,
    },
}

/// Why a schedule op was refused (identically on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFault {
    pub code: String,
    pub message: String,
}

impl ScheduleFault {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        ScheduleFault {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ScheduleFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What an applied schedule op did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ScheduleOutcome {
    /// A create, delete, pause, resume or restore took effect.
    Done,
    /// A tick submitted its task (`duplicate`: the task existed already); `skipped`
    /// older ticks were skipped first.
    Fired {
        tick_ms: u64,
        task: TaskId,
        duplicate: bool,
        skipped: u64,
    },
    /// A tick's task was refused (`reason`); the schedule moved on.
    Refused {
        tick_ms: u64,
        skipped: u64,
        reason: String,
    },
    /// A Fire that was not for the schedule's next tick (or a paused or unknown one).
    Ignored,
}

/// What a Fire does, decided before the submit: which tick it fires, how many older ones
/// it skips, the tick after it, and the task to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct FirePlan {
    pub tick_ms: u64,
    pub skipped: u64,
    pub next_tick_ms: u64,
    pub spec: TaskSpec,
}

/// Checks a schedule name: 1 to 63 characters from `a-z`, `0-9`, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "schedule name {name:?}: 1 to {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "schedule name {name:?}: character {c:?} not allowed (use a-z, 0-9, '-' and '_')"
        ));
    }
    Ok(())
}

/// Parses a cron expression: five fields (minute hour day-of-month month day-of-week)
/// or six with seconds first; `@hourly`, `@daily`, ... too. Day of week 0 or 7 is Sunday.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    use croner::parser::{CronParser, Seconds, Year};
    if expr.len() > 256 {
        return Err("a cron expression is at most 256 bytes".into());
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("bad cron expression {expr:?}: {e}"))
}

fn utc(ms: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(i64::try_from(ms / 1000).ok()?, 0)
}

fn ms_of(t: chrono::DateTime<chrono::Utc>) -> Option<u64> {
    u64::try_from(t.timestamp()).ok()?.checked_mul(1000)
}

impl Cadence {
    /// Checks the cadence: an interval within bounds, a cron expression that parses and
    /// ticks after `now_ms`.
    pub fn check(&self, now_ms: u64) -> Result<(), String> {
        match self {
            Cadence::Every { every_ms, .. } => {
                if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(every_ms) {
                    return Err(format!("an interval is 1s to 366d, got {every_ms} ms"));
                }
            }
            Cadence::Cron { expr } => {
                let cron = parse_cron(expr)?;
                let next = utc(now_ms).and_then(|t| cron.find_next_occurrence(&t, false).ok());
                if next.is_none() {
                    return Err(format!("cron expression {expr:?} never ticks"));
                }
            }
        }
        Ok(())
    }

    /// The first tick strictly after `t_ms` (`None`: there is none).
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        match self {
            Cadence::Every {
                every_ms,
                anchor_ms,
            } => {
                let every = (*every_ms).max(1);
                if t_ms < *anchor_ms {
                    return Some(*anchor_ms);
                }
                let k = (t_ms - anchor_ms) / every + 1;
                k.checked_mul(every)?.checked_add(*anchor_ms)
            }
            Cadence::Cron { expr } => {
                let cron = parse_cron(expr).ok()?;
                let next = cron.find_next_occurrence(&utc(t_ms)?, false).ok()?;
                ms_of(next)
            }
        }
    }

    /// The `keep`-th latest tick at or before `now_ms` that is not before `first_ms`,
    /// and how many ticks in `[first_ms, that tick)` it passes over. `first_ms` is a
    /// tick; `first_ms <= now_ms`.
    fn latest_due(&self, first_ms: u64, now_ms: u64, keep: u64) -> (u64, u64) {
        match self {
            Cadence::Every { every_ms, .. } => {
                let every = (*every_ms).max(1);
                let due = (now_ms - first_ms) / every + 1;
                let over = due.saturating_sub(keep);
                (first_ms + over * every, over)
            }
            Cadence::Cron { expr } => {
                let Ok(cron) = parse_cron(expr) else {
                    return (first_ms, 0);
                };
                // Walk back from now through at most `keep` ticks.
                let mut latest = Vec::new();
                let mut at = utc(now_ms).and_then(|t| cron.find_previous_occurrence(&t, true).ok());
                while let Some(t) = at.and_then(ms_of) {
                    if t <= first_ms || latest.len() as u64 >= keep {
                        break;
                    }
                    latest.push(t);
                    at = utc(t).and_then(|t| cron.find_previous_occurrence(&t, false).ok());
                }
                if (latest.len() as u64) < keep {
                    // Every due tick is kept: fire the first.
                    return (first_ms, 0);
                }
                let fire = latest.last().copied().unwrap_or(first_ms);
                // Count the ticks passed over, from `first_ms` up to `fire` (bounded).
                let mut over = 0;
                let mut t = first_ms;
                while t < fire && over < MAX_COUNTED_CRON_TICKS {
                    over += 1;
                    match self.next_after(t) {
                        Some(n) => t = n,
                        None => break,
                    }
                }
                (fire, over)
            }
        }
    }
}

impl Schedules {
    pub fn get(&self, name: &str) -> Option<&Schedule> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Schedules whose next tick has come by `now_ms` (not paused), as `(name, tick)`,
    /// at most `limit`, by name.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(String, u64)> {
        self.by_name
            .values()
            .filter(|s| !s.def.paused && s.next_tick_ms <= now_ms)
            .take(limit)
            .map(|s| (s.def.name.clone(), s.next_tick_ms))
            .collect()
    }

    fn template_bytes(&self) -> usize {
        self.by_name
            .values()
            .map(|s| s.def.template.size_hint())
            .sum()
    }

    /// Add a schedule defined at `now_ms`.
    pub fn create(&mut self, def: &ScheduleDef, now_ms: u64) -> Result<(), ScheduleFault> {
        let invalid = |m: String| ScheduleFault::new("invalid_schedule", m);
        check_name(&def.name).map_err(invalid)?;
        if def.template.idempotency_key.is_some() {
            return Err(invalid(
                "a schedule's task has no idempotency key: each tick gets its own".into(),
            ));
        }
        if let CatchUp::All { max } = def.catch_up {
            if !(1..=MAX_CATCH_UP).contains(&max) {
                return Err(invalid(format!(
                    "catch-up of all missed ticks is bounded by 1 to {MAX_CATCH_UP}, got {max}"
                )));
            }
        }
        let mut def = def.clone();
        // An interval's grid starts at creation, whatever the op says.
        if let Cadence::Every { anchor_ms, .. } = &mut def.cadence {
            *anchor_ms = now_ms;
        }
        def.cadence.check(now_ms).map_err(invalid)?;
        let size = def.template.size_hint();
        if size > MAX_TEMPLATE_BYTES {
            return Err(ScheduleFault::new(
                "too_large",
                format!(
                    "a schedule's task takes {size} bytes; at most {MAX_TEMPLATE_BYTES} \
                     (keep large inputs elsewhere and pass a reference)"
                ),
            ));
        }
        if self.by_name.contains_key(&def.name) {
            return Err(ScheduleFault::new(
                "schedule_exists",
                format!("schedule {:?} already exists", def.name),
            ));
        }
        if self.by_name.len() >= MAX_SCHEDULES {
            return Err(ScheduleFault::new(
                "too_many_schedules",
                format!("the cluster holds {MAX_SCHEDULES} schedules, the most it may; delete some first"),
            ));
        }
        if self.template_bytes() + size > MAX_TOTAL_TEMPLATE_BYTES {
            return Err(ScheduleFault::new(
                "too_many_schedules",
                format!(
                    "the schedules' tasks would take more than {MAX_TOTAL_TEMPLATE_BYTES} bytes in all; delete some first"
                ),
            ));
        }
        let next_tick_ms = match &def.cadence {
            Cadence::Every { every_ms, .. } => now_ms.saturating_add(*every_ms),
            cron => cron.next_after(now_ms).unwrap_or(u64::MAX),
        };
        self.by_name.insert(
            def.name.clone(),
            Schedule {
                def,
                created_at_ms: now_ms,
                next_tick_ms,
                fired: 0,
                skipped: 0,
                refused: 0,
                last_tick_ms: None,
                last_task: None,
                last_error: None,
            },
        );
        Ok(())
    }

    pub fn delete(&mut self, name: &str) -> Result<(), ScheduleFault> {
        self.by_name
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| unknown(name))
    }

    pub fn pause(&mut self, name: &str) -> Result<(), ScheduleFault> {
        let s = self.by_name.get_mut(name).ok_or_else(|| unknown(name))?;
        s.def.paused = true;
        Ok(())
    }

    /// Resume a paused schedule from the first tick after `now_ms` (a running one is left
    /// as it is).
    pub fn resume(&mut self, name: &str, now_ms: u64) -> Result<(), ScheduleFault> {
        let s = self.by_name.get_mut(name).ok_or_else(|| unknown(name))?;
        if s.def.paused {
            s.def.paused = false;
            s.next_tick_ms = s.def.cadence.next_after(now_ms).unwrap_or(u64::MAX);
        }
        Ok(())
    }

    /// What a Fire of `name` at `tick_ms` does, or `None` if it is to be ignored: the
    /// schedule is unknown or paused, `tick_ms` is not its next tick, or it is not due by
    /// `now_ms`.
    pub fn plan_fire(&self, name: &str, tick_ms: u64, now_ms: u64) -> Option<FirePlan> {
        let s = self.by_name.get(name)?;
        if s.def.paused || s.next_tick_ms != tick_ms || tick_ms > now_ms {
            return None;
        }
        let keep = s.def.catch_up.keep();
        let (fire, skipped) = s.def.cadence.latest_due(tick_ms, now_ms, keep);
        let next_tick_ms = s.def.cadence.next_after(fire).unwrap_or(u64::MAX);
        let mut spec = s.def.template.clone();
        spec.idempotency_key = Some(tick_key(name, fire));
        Some(FirePlan {
            tick_ms: fire,
            skipped,
            next_tick_ms,
            spec,
        })
    }

    /// Record what the planned Fire did: `Ok(task, duplicate)` or `Err(reason)`.
    pub fn record_fire(
        &mut self,
        name: &str,
        plan: &FirePlan,
        result: Result<(TaskId, bool), String>,
    ) -> ScheduleOutcome {
        let Some(s) = self.by_name.get_mut(name) else {
            return ScheduleOutcome::Ignored;
        };
        s.next_tick_ms = plan.next_tick_ms;
        s.skipped = s.skipped.saturating_add(plan.skipped);
        s.last_tick_ms = Some(plan.tick_ms);
        match result {
            Ok((task, duplicate)) => {
                s.fired = s.fired.saturating_add(1);
                s.last_task = Some(task);
                s.last_error = None;
                ScheduleOutcome::Fired {
                    tick_ms: plan.tick_ms,
                    task,
                    duplicate,
                    skipped: plan.skipped,
                }
            }
            Err(reason) => {
                s.refused = s.refused.saturating_add(1);
                s.last_error = Some(reason.clone());
                ScheduleOutcome::Refused {
                    tick_ms: plan.tick_ms,
                    skipped: plan.skipped,
                    reason,
                }
            }
        }
    }

    /// Add the schedules of a backup being restored.
    pub fn restore(&mut self, schedules: &[Schedule]) -> Result<(), ScheduleFault> {
        if self.by_name.len() + schedules.len() > MAX_SCHEDULES {
            return Err(ScheduleFault::new(
                "too_many_schedules",
                format!("the backup holds more than {MAX_SCHEDULES} schedules"),
            ));
        }
        for s in schedules {
            let invalid = |m: String| ScheduleFault::new("invalid_schedule", m);
            check_name(&s.def.name).map_err(invalid)?;
            // A backup's cadence is checked as a create's is (not whether it still ticks).
            match &s.def.cadence {
                Cadence::Every { every_ms, .. }
                    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(every_ms) =>
                {
                    return Err(invalid(format!(
                        "schedule {:?}: an interval of {every_ms} ms",
                        s.def.name
                    )));
                }
                Cadence::Cron { expr } => {
                    parse_cron(expr).map_err(invalid)?;
                }
                Cadence::Every { .. } => {}
            }
            if self.by_name.contains_key(&s.def.name) {
                return Err(ScheduleFault::new(
                    "schedule_exists",
                    format!("the backup holds schedule {:?} twice", s.def.name),
                ));
            }
        }
        for s in schedules {
            self.by_name.insert(s.def.name.clone(), s.clone());
        }
        Ok(())
    }

    /// Bytes these schedules take in an encoding, roughly (for packing restore ops).
    pub fn size_hint_of(s: &Schedule) -> usize {
        256 + s.def.name.len()
            + s.def.template.size_hint()
            + s.last_error.as_ref().map_or(0, String::len)
            + match &s.def.cadence {
                Cadence::Cron { expr } => expr.len(),
                Cadence::Every { .. } => 16,
            }
    }
}

fn unknown(name: &str) -> ScheduleFault {
    ScheduleFault::new("unknown_schedule", format!("no schedule named {name:?}"))
}
