//! What a task carries for flow control beyond its [`TaskSpec`](super::TaskSpec): its
//! place in a task graph (parents, children, the step it is), and the controls later
//! parts of flow control read (concurrency key, rate limit, approval, callback).
//! The callback outbox and its rules are in [`super::callbacks`].
//!
//! # Graph rules (applied in `table.rs`)
//! * A task with parents is `waiting` until every parent has succeeded; then it is queued
//!   like any other task. `Flow::waiting_on` counts the parents still to succeed.
//! * A parent that ends any other way (failed, cancelled, dead-lettered) cancels each of
//!   its waiting dependants with the error `dependency_failed`, and so on down the graph.
//! * A task's parents are fixed at submit and must exist then: unknown or purged ids are
//!   refused, and so is a parent that already ended other than `succeeded`. Cycles cannot
//!   be formed: a task only names tasks that existed before it (or, in one graph, steps
//!   listed before it).
//! * When a dependant starts, its input is its payload and its parents' outputs, read
//!   then from the table ([`graph_input`]): nothing is copied into the dependant, so
//!   many dependants of a large output cost nothing extra. Only when a parent's
//!   retention ends before a dependant ran is its output copied into that dependant
//!   ([`FlowAttr::ParentOutput`]), as the parent is purged: a purge is never held up.
//!
//! # Approval rules (applied in `table.rs`)
//! * A task carrying [`FlowAttr::Approval`] enters `awaiting_approval` where it would
//!   otherwise be queued: at submit, or (a graph step) once its last parent succeeded.
//!   Its deadline, if it has one, runs from then ([`FlowAttr::Approval::deadline_ms`]).
//! * `Op::Decide` approves (queued) or rejects (cancelled, `rejected: …`, the cascade
//!   cancels its dependants) a task awaiting approval, and records a
//!   [`FlowAttr::Decision`]; on any other task it changes nothing (`Ignored`).
//! * `Op::ExpireApprovals` fails (`approval_timeout: …`) the tasks it names that still
//!   await approval and whose deadline is at or before the op's own time; others are left.
//!
//! # Encoding
//! `Task::flow` is `None` for a task that uses none of this (one byte). The struct ends
//! with `more`, a list of an enum whose variants are only ever appended: a later control
//! goes there and needs no new task format.

use serde::{Deserialize, Serialize};
use swarm_proto::TaskId;

/// Most parents one task may name.
pub const MAX_PARENTS: usize = 100;
/// Most dependants one task may have (a graph's fan-out).
pub const MAX_CHILDREN: usize = 10_000;
/// Most steps in one graph.
pub const MAX_GRAPH_STEPS: usize = 1_000;
/// Longest step name.
pub const MAX_STEP_NAME: usize = 64;

/// A task's flow-control state; see the module docs. At submit only `parents`, `step`
/// and the controls are read: `children` and `waiting_on` are the table's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    /// Tasks this one runs after: all must succeed first.
    pub parents: Vec<TaskId>,
    /// Tasks that name this one as a parent, in the order they were submitted.
    pub children: Vec<TaskId>,
    /// Parents that have not succeeded yet; the task waits while this is above 0.
    pub waiting_on: u32,
    /// The task's step name in its graph (keys its output in a dependant's input).
    pub step: Option<String>,
    /// At most a configured number of tasks with the same key run at once.
    pub concurrency_key: Option<String>,
    /// The named rate limit a start of this task draws from.
    pub rate_limit: Option<String>,
    /// Controls added later (variants only ever appended).
    pub more: Vec<FlowAttr>,
}

/// Something a task carries that [`Flow`]'s fields do not: later controls are appended
/// here as new variants, without a new task format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FlowAttr {
    /// A parent's output kept for this dependant because the parent's retention ended
    /// (and it was purged) before the dependant ran; `key` is what it goes under.
    ParentOutput {
        parent: TaskId,
        key: String,
        #[serde(with = "serde_bytes")]
        output: Vec<u8>,
    },
    /// The task requires approval before it is queued. `timeout_ms` is fixed at submit;
    /// `deadline_ms` is set when the task begins awaiting approval (`None` before, or
    /// without a timeout).
    Approval {
        timeout_ms: Option<u64>,
        deadline_ms: Option<u64>,
    },
    /// An operator's approval or rejection: who (the token's name), when, and why.
    Decision {
        approved: bool,
        by: String,
        comment: Option<String>,
        at_ms: u64,
    },
    /// POST the task's view to `url` when it reaches a final state (see
    /// [`super::callbacks`]).
    Callback { url: String },
    /// How the callback's delivery ended (set once it left the outbox; a retried task
    /// drops it and delivers again when it finishes again).
    CallbackResult {
        delivered: bool,
        attempts: u32,
        status: Option<u16>,
        error: Option<String>,
        at_ms: u64,
    },
}

/// Longest approval timeout a task may ask for (30 days).
pub const MAX_APPROVAL_TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;
/// Longest comment recorded with a decision.
pub const MAX_DECISION_COMMENT: usize = 1024;
/// Longest decider name recorded.
pub const MAX_DECIDER_NAME: usize = 256;

impl Flow {
    /// Whether the flow carries nothing (a task stores `None` then).
    pub fn is_empty(&self) -> bool {
        *self == Flow::default()
    }

    /// Bytes this flow takes in an encoding, roughly.
    pub fn size_hint(&self) -> usize {
        16 + 10 * (self.parents.len() + self.children.len())
            + self.step.as_ref().map_or(0, String::len)
            + self.concurrency_key.as_ref().map_or(0, String::len)
            + self.rate_limit.as_ref().map_or(0, String::len)
            + self
                .more
                .iter()
                .map(|a| match a {
                    FlowAttr::ParentOutput { key, output, .. } => 16 + key.len() + output.len(),
                    FlowAttr::Approval { .. } => 24,
                    FlowAttr::Decision { by, comment, .. } => {
                        16 + by.len() + comment.as_ref().map_or(0, String::len)
                    }
                    FlowAttr::Callback { url } => 8 + url.len(),
                    FlowAttr::CallbackResult { error, .. } => {
                        24 + error.as_ref().map_or(0, String::len)
                    }
                })
                .sum::<usize>()
    }

    /// The task's approval requirement: (timeout, deadline), if it requires approval.
    pub fn approval(&self) -> Option<(Option<u64>, Option<u64>)> {
        self.more.iter().find_map(|a| match a {
            FlowAttr::Approval {
                timeout_ms,
                deadline_ms,
            } => Some((*timeout_ms, *deadline_ms)),
            _ => None,
        })
    }

    /// The URL the task's final state is POSTed to, if any.
    pub fn callback_url(&self) -> Option<&str> {
        self.more.iter().find_map(|a| match a {
            FlowAttr::Callback { url } => Some(url.as_str()),
            _ => None,
        })
    }

    /// How the callback's delivery ended, if it has.
    pub fn callback_result(&self) -> Option<&FlowAttr> {
        self.more
            .iter()
            .find(|a| matches!(a, FlowAttr::CallbackResult { .. }))
    }

    /// Record how the callback's delivery ended (replacing an earlier result).
    pub fn set_callback_result(&mut self, o: &super::callbacks::Outcome) {
        self.clear_callback_result();
        self.more.push(FlowAttr::CallbackResult {
            delivered: o.delivered,
            attempts: o.attempts,
            status: o.status,
            error: o.error.clone(),
            at_ms: o.at_ms,
        });
    }

    /// Forget how an earlier delivery ended (the task runs again).
    pub fn clear_callback_result(&mut self) {
        self.more
            .retain(|a| !matches!(a, FlowAttr::CallbackResult { .. }));
    }

    /// The decision made on the task's approval, if any: (approved, by, comment, at).
    pub fn decision(&self) -> Option<(bool, &str, Option<&str>, u64)> {
        self.more.iter().find_map(|a| match a {
            FlowAttr::Decision {
                approved,
                by,
                comment,
                at_ms,
            } => Some((*approved, by.as_str(), comment.as_deref(), *at_ms)),
            _ => None,
        })
    }

    /// Whether the task must await approval before it is queued: it requires approval and
    /// no decision was made yet.
    pub fn needs_approval(&self) -> bool {
        self.approval().is_some() && self.decision().is_none()
    }

    /// Start the approval deadline clock at `now_ms` (a task entering `awaiting_approval`).
    pub fn start_deadline(&mut self, now_ms: u64) {
        for a in &mut self.more {
            if let FlowAttr::Approval {
                timeout_ms: Some(t),
                deadline_ms,
            } = a
            {
                *deadline_ms = Some(now_ms.saturating_add(*t));
            }
        }
    }

    /// The name a parent's output goes under in a dependant's input: its step name, or
    /// its id.
    pub fn key_of(id: TaskId, step: Option<&str>) -> String {
        step.map_or_else(|| id.to_string(), str::to_string)
    }
}

/// One step of a graph submitted in one request: a task, and the steps (by index, all
/// earlier in the list) it runs after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphStep {
    pub spec: super::TaskSpec,
    /// `parents` may name existing tasks; `step` is required and unique in the graph.
    pub flow: Flow,
    /// Indexes of the earlier steps this one runs after.
    pub after: Vec<u32>,
}

/// Why a submit with flow controls was refused (identically on every replica).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowFault {
    pub code: String,
    pub message: String,
}

impl FlowFault {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        FlowFault {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// Check a graph's shape before it is proposed (the apply checks it again): names
/// present, unique and short, edges to earlier steps only, fan-in and size bounded.
pub fn check_graph(steps: &[GraphStep]) -> Result<(), FlowFault> {
    if steps.is_empty() {
        return Err(FlowFault::new(
            "bad_graph",
            "a graph needs at least one step",
        ));
    }
    if steps.len() > MAX_GRAPH_STEPS {
        return Err(FlowFault::new(
            "bad_graph",
            format!(
                "a graph of {} steps exceeds the limit of {MAX_GRAPH_STEPS}",
                steps.len()
            ),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in steps.iter().enumerate() {
        let name = s.flow.step.as_deref().unwrap_or("");
        check_step_name(name)?;
        if !names.insert(name) {
            return Err(FlowFault::new(
                "bad_graph",
                format!("step {name:?} appears twice"),
            ));
        }
        if let Some(&bad) = s.after.iter().find(|&&a| a as usize >= i) {
            return Err(FlowFault::new(
                "bad_graph",
                format!("step {name:?} runs after step #{bad}, which is not listed before it"),
            ));
        }
        if s.after.len() + s.flow.parents.len() > MAX_PARENTS {
            return Err(FlowFault::new(
                "too_many_parents",
                format!("step {name:?} has more than {MAX_PARENTS} parents"),
            ));
        }
    }
    Ok(())
}

/// A step name: 1 to [`MAX_STEP_NAME`] letters, digits, `-`, `_` or `.`.
pub fn check_step_name(name: &str) -> Result<(), FlowFault> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STEP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(FlowFault::new(
            "bad_step",
            format!("step name {name:?}: 1 to {MAX_STEP_NAME} letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// The input a dependant's agent receives: a JSON object with its own payload and each
/// parent's output under the parent's step name (or id), in the order of `parents`.
/// Bytes that are JSON are embedded as JSON, anything else as a string (lossy UTF-8).
pub fn graph_input<'a>(
    payload: &[u8],
    parents: impl IntoIterator<Item = (String, Option<&'a [u8]>)>,
) -> Vec<u8> {
    let mut outputs = serde_json::Map::new();
    for (key, output) in parents {
        outputs.insert(key, output.map_or(serde_json::Value::Null, as_json));
    }
    let input = serde_json::json!({
        "payload": as_json(payload),
        "parents": outputs,
    });
    serde_json::to_vec(&input).unwrap_or_default()
}

fn as_json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_input_embeds_json_and_strings() {
        let input = graph_input(
            b"{\"n\":1}",
            [
                ("b".to_string(), Some(&b"[1,2]"[..])),
                ("c".to_string(), Some(&b"plain text"[..])),
                ("7".to_string(), None),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&input).unwrap();
        assert_eq!(v["payload"]["n"], 1);
        assert_eq!(v["parents"]["b"], serde_json::json!([1, 2]));
        assert_eq!(v["parents"]["c"], "plain text");
        assert!(v["parents"]["7"].is_null());
    }

    #[test]
    fn step_names_are_checked() {
        assert!(check_step_name("fetch-1.b_c").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(MAX_STEP_NAME + 1)] {
            assert_eq!(check_step_name(bad).unwrap_err().code, "bad_step");
        }
    }
}
