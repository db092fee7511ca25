//! Callbacks: the outbox of task-finished notifications still to deliver.
//!
//! A task submitted with a `callback_url` ([`super::FlowAttr::Callback`]) enters this
//! outbox when it reaches a final state (`table.rs`, as it is finalized). The leader
//! POSTs the task's view to the URL, signed (`callbacks.rs` at the crate root), and
//! proposes what came of each attempt ([`CallbackOp`]). Rules:
//! * An entry is `(task, attempts made, when the next is due)`. A first attempt is due at
//!   once.
//! * [`CallbackOp::Delivered`] and [`CallbackOp::Failed`] name the attempt they report
//!   (`attempt` = attempts made before it + 1): a report of any other attempt (a replay,
//!   a deposed leader's late report) is ignored, so each attempt counts once.
//! * A failed attempt is retried after an exponential backoff ([`retry_delay_ms`]) until
//!   [`MAX_ATTEMPTS`] were made, or at once given up when the receiver refused it for
//!   good (`retry: false`). Delivered or given up, the entry leaves the outbox and the
//!   outcome is recorded on the task ([`super::FlowAttr::CallbackResult`]).
//! * The outbox holds at most [`MAX_PENDING`] entries: a task finishing while it is full
//!   records its callback as given up (`outbox full`) instead. Purging a task, or
//!   retrying it (it will finish again), drops its entry.
//! * Delivery is at least once: a receiver may see an attempt whose report did not
//!   commit (a leader change), so a receiver dedupes by the task id and attempt headers.
//!
//! Stored whole by every checkpoint (`callbacks` key) and every dump (a `Callbacks`
//! record, dump format 7; older ones read as empty).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use swarm_proto::TaskId;

/// Most deliveries waiting at once (the outbox is stored whole: 100,000 entries are about
/// 2.5 MB).
pub const MAX_PENDING: usize = 100_000;
/// Attempts made before a callback is given up.
pub const MAX_ATTEMPTS: u32 = 12;
/// The first retry's delay; each later one doubles, up to [`MAX_RETRY_DELAY_MS`].
pub const FIRST_RETRY_DELAY_MS: u64 = 1_000;
/// The longest delay between two attempts.
pub const MAX_RETRY_DELAY_MS: u64 = 10 * 60 * 1000;
/// Longest callback URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest error recorded for a failed attempt.
pub const MAX_ERROR_BYTES: usize = 512;

/// How long after failed attempt `attempt` (1-based) the next is due: 1 s, 2 s, 4 s, …
/// up to 10 minutes (twelve attempts span about 27 minutes).
pub fn retry_delay_ms(attempt: u32) -> u64 {
    let exp = attempt.saturating_sub(1).min(30);
    FIRST_RETRY_DELAY_MS
        .saturating_mul(1u64 << exp)
        .min(MAX_RETRY_DELAY_MS)
}

/// One delivery waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due.
    pub next_at_ms: u64,
}

/// The outbox: deliveries waiting, by task, and by when they are due.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct Callbacks {
    pending: BTreeMap<TaskId, Pending>,
    /// `(next_at_ms, task)` of every entry: derived, rebuilt when decoded.
    #[serde(skip)]
    due: BTreeSet<(u64, TaskId)>,
}

/// What a checkpoint or dump stores of [`Callbacks`] (its `Serialize` writes the same).
#[derive(Deserialize)]
struct Stored {
    pending: BTreeMap<TaskId, Pending>,
}

impl From<Stored> for Callbacks {
    fn from(s: Stored) -> Self {
        let due = s
            .pending
            .iter()
            .map(|(id, p)| (p.next_at_ms, *id))
            .collect();
        Callbacks {
            pending: s.pending,
            due,
        }
    }
}

/// What came of a delivery attempt, as the leader proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallbackOp {
    /// The receiver answered 2xx.
    Delivered {
        task_id: TaskId,
        attempt: u32,
        status: u16,
        now_ms: u64,
    },
    /// The attempt failed: `status` is the receiver's answer if it gave one. `retry`:
    /// whether another attempt may succeed (no answer, a 5xx, 408 or 429).
    Failed {
        task_id: TaskId,
        attempt: u32,
        status: Option<u16>,
        error: String,
        retry: bool,
        now_ms: u64,
    },
}

impl CallbackOp {
    /// The task the op reports on.
    pub fn task_id(&self) -> TaskId {
        match self {
            CallbackOp::Delivered { task_id, .. } | CallbackOp::Failed { task_id, .. } => *task_id,
        }
    }
}

/// How a delivery ended, recorded on its task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub delivered: bool,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub at_ms: u64,
}

/// What applying a [`CallbackOp`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Not the attempt the outbox waits for (or no entry): nothing changed.
    Ignored,
    /// Another attempt is due at the time given.
    Retry(u64),
    /// The entry left the outbox: record this on the task.
    Ended(Outcome),
}

impl Callbacks {
    /// Deliveries waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The waiting delivery of `task`, if any.
    pub fn get(&self, task: TaskId) -> Option<Pending> {
        self.pending.get(&task).copied()
    }

    /// Queue the delivery of a task that just finished, due at `now_ms`. `false` when the
    /// outbox is full (nothing queued).
    pub fn enqueue(&mut self, task: TaskId, now_ms: u64) -> bool {
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&task) {
            return false;
        }
        self.remove(task);
        self.pending.insert(
            task,
            Pending {
                attempts: 0,
                next_at_ms: now_ms,
            },
        );
        self.due.insert((now_ms, task));
        true
    }

    /// Drop the delivery of `task` (purged, or retried).
    pub fn remove(&mut self, task: TaskId) -> bool {
        match self.pending.remove(&task) {
            Some(p) => {
                self.due.remove(&(p.next_at_ms, task));
                true
            }
            None => false,
        }
    }

    /// Up to `limit` deliveries due by `now_ms` (task, the attempt to make), earliest
    /// due first. Costs what it returns, not what waits.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(TaskId, u32)> {
        self.due
            .range(..=(now_ms, TaskId::MAX))
            .take(limit)
            .filter_map(|(_, id)| Some((*id, self.pending.get(id)?.attempts + 1)))
            .collect()
    }

    /// When the earliest waiting delivery is due.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Apply what came of an attempt (see the module docs).
    pub fn apply(&mut self, op: &CallbackOp) -> Applied {
        let id = op.task_id();
        let (attempt, now_ms) = match op {
            CallbackOp::Delivered {
                attempt, now_ms, ..
            }
            | CallbackOp::Failed {
                attempt, now_ms, ..
            } => (*attempt, *now_ms),
        };
        let Some(p) = self.pending.get_mut(&id) else {
            return Applied::Ignored;
        };
        if attempt != p.attempts.saturating_add(1) {
            return Applied::Ignored;
        }
        p.attempts = attempt;
        let ended = match op {
            CallbackOp::Delivered { status, .. } => Outcome {
                delivered: true,
                attempts: attempt,
                status: Some(*status),
                error: None,
                at_ms: now_ms,
            },
            CallbackOp::Failed {
                status,
                error,
                retry,
                ..
            } => {
                if *retry && attempt < MAX_ATTEMPTS {
                    let was = p.next_at_ms;
                    p.next_at_ms = now_ms.saturating_add(retry_delay_ms(attempt));
                    let next = p.next_at_ms;
                    self.due.remove(&(was, id));
                    self.due.insert((next, id));
                    return Applied::Retry(next);
                }
                Outcome {
                    delivered: false,
                    attempts: attempt,
                    status: *status,
                    error: Some(truncate(error, MAX_ERROR_BYTES)),
                    at_ms: now_ms,
                }
            }
        };
        self.remove(id);
        Applied::Ended(ended)
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(attempt: u32, retry: bool, now_ms: u64) -> CallbackOp {
        CallbackOp::Failed {
            task_id: 7,
            attempt,
            status: Some(503),
            error: "503 Service Unavailable".into(),
            retry,
            now_ms,
        }
    }

    #[test]
    fn a_delivery_is_retried_with_backoff_then_given_up() {
        let mut c = Callbacks::default();
        assert!(c.enqueue(7, 100));
        assert_eq!(c.due(99, 10), vec![]);
        assert_eq!(c.due(100, 10), vec![(7, 1)]);
        let mut now = 100;
        for attempt in 1..MAX_ATTEMPTS {
            let Applied::Retry(next) = c.apply(&failed(attempt, true, now)) else {
                panic!("attempt {attempt} should be retried");
            };
            assert_eq!(next, now + retry_delay_ms(attempt));
            assert!(c.due(next - 1, 10).is_empty(), "not before its backoff");
            assert_eq!(c.due(next, 10), vec![(7, attempt + 1)]);
            now = next;
        }
        let Applied::Ended(o) = c.apply(&failed(MAX_ATTEMPTS, true, now)) else {
            panic!("the last attempt ends it");
        };
        assert!(!o.delivered);
        assert_eq!(o.attempts, MAX_ATTEMPTS);
        assert_eq!(o.status, Some(503));
        assert!(c.is_empty());
        // The delays double from 1 s and stop at 10 minutes.
        assert_eq!(retry_delay_ms(1), 1_000);
        assert_eq!(retry_delay_ms(2), 2_000);
        assert_eq!(retry_delay_ms(10), 512_000);
        assert_eq!(retry_delay_ms(11), MAX_RETRY_DELAY_MS);
        assert_eq!(retry_delay_ms(u32::MAX), MAX_RETRY_DELAY_MS);
    }

    #[test]
    fn each_attempt_counts_once_and_a_refusal_ends_it() {
        let mut c = Callbacks::default();
        c.enqueue(7, 0);
        assert!(matches!(c.apply(&failed(1, true, 5)), Applied::Retry(_)));
        // A replay of attempt 1, or a report of an attempt not yet due: ignored.
        assert_eq!(c.apply(&failed(1, true, 6)), Applied::Ignored);
        assert_eq!(c.apply(&failed(3, true, 6)), Applied::Ignored);
        assert_eq!(c.get(7).map(|p| p.attempts), Some(1));
        // A 400 will not get better: given up at once.
        let refused = CallbackOp::Failed {
            task_id: 7,
            attempt: 2,
            status: Some(400),
            error: "x".repeat(2 * MAX_ERROR_BYTES),
            retry: false,
            now_ms: 9,
        };
        let Applied::Ended(o) = c.apply(&refused) else {
            panic!("a refusal ends it");
        };
        assert_eq!((o.delivered, o.attempts), (false, 2));
        assert_eq!(o.error.map(|e| e.len()), Some(MAX_ERROR_BYTES));
        // Unknown task: ignored.
        assert_eq!(c.apply(&failed(1, true, 9)), Applied::Ignored);
    }

    #[test]
    fn delivered_ends_it_and_the_outbox_is_bounded() {
        let mut c = Callbacks::default();
        c.enqueue(7, 0);
        let done = CallbackOp::Delivered {
            task_id: 7,
            attempt: 1,
            status: 204,
            now_ms: 3,
        };
        assert_eq!(
            c.apply(&done),
            Applied::Ended(Outcome {
                delivered: true,
                attempts: 1,
                status: Some(204),
                error: None,
                at_ms: 3
            })
        );
        assert_eq!(c.apply(&done), Applied::Ignored);
        for id in 0..MAX_PENDING as u64 {
            assert!(c.enqueue(id, id));
        }
        assert!(!c.enqueue(u64::MAX, 0), "full");
        assert!(c.enqueue(5, 0), "already queued: still one entry");
        assert_eq!(c.len(), MAX_PENDING);
        assert_eq!(c.due(1, 3), vec![(0, 1), (5, 1), (1, 1)]);
        assert_eq!(c.next_due_ms(), Some(0));
        assert!(c.remove(0));
        assert!(!c.remove(0));
        // A full outbox survives encoding (a checkpoint, a dump) with its due order.
        let bytes = swarm_codec::encode(&c).unwrap();
        assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
        let back: Callbacks = swarm_codec::decode(&bytes, bytes.len()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.due(2, 3), vec![(5, 1), (1, 1), (2, 1)]);
        assert_eq!(back.next_due_ms(), Some(0));
    }
}
