//! Group commit for task-table ops.
//!
//! Callers hand in ops and await their results; one loop packs whatever is waiting
//! into a single [`Command`] (one Raft entry, one fsync) and splits the response back.
//! Under load the batches grow by themselves; an idle system pays one commit per op.
//!
//! An entry holds at most [`MAX_OPS_PER_ENTRY`] ops and [`ENTRY_BUDGET`] bytes (by
//! [`Op::size_hint`]); one request's ops always stay in one entry, and a request larger
//! than the budget is refused ([`ProposeError::TooLarge`]; the API refuses such requests
//! with `413` before they get here).
//!
//! Client requests go through [`Proposer::propose_admitted`]: they are refused at once
//! ([`ProposeError::Busy`], `503`) while more than [`QUEUE_BYTES`] or [`QUEUE_REQUESTS`]
//! wait to commit, and answered [`ProposeError::Timeout`] after [`PROPOSE_TIMEOUT`], so
//! while quorum is lost requests and their payloads do not pile up in memory. The
//! coordinator's own ops (dispatch records, reports, sweeps) are small and bounded by the
//! work in flight; they use [`Proposer::propose`], which neither refuses nor times out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::limits::ENTRY_BUDGET;
use crate::raft::types::{NodeAddr, TypeConfig};
use crate::state::{Command, Op, OpResult};

/// Why a proposal did not commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; `leader` is who is, if known.
    #[error("this coordinator is not the leader")]
    NotLeader { leader: Option<(u64, NodeAddr)> },
    /// Raft is shutting down or failed.
    #[error("raft: {0}")]
    Raft(String),
    /// The ops take more than one entry holds.
    #[error("{bytes} bytes of ops exceed the {limit}-byte budget of one Raft entry")]
    TooLarge { bytes: usize, limit: usize },
    /// Too much is waiting to commit already; nothing was proposed.
    #[error("the coordinator is overloaded ({0} waiting to commit); retry later")]
    Busy(String),
    /// Not committed within [`PROPOSE_TIMEOUT`]. It may still commit: the outcome is
    /// unknown (retry with the same idempotency key).
    #[error("not committed within {0:?} (is a quorum of coordinators up?); it may still take effect: retry with the same idempotency_key")]
    Timeout(Duration),
}

/// Most bytes of client requests waiting to commit (eight full entries).
pub const QUEUE_BYTES: usize = 8 * ENTRY_BUDGET;
/// Most client requests waiting to commit.
pub const QUEUE_REQUESTS: usize = 16_384;
/// Longest a client request waits for its commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);

struct Pending {
    ops: Vec<Op>,
    bytes: usize,
    done: oneshot::Sender<Result<Vec<OpResult>, ProposeError>>,
    /// Held while a client request waits (released however the request ends).
    _queued: Option<Queued>,
}

/// What client requests waiting to commit take.
#[derive(Default)]
struct Queue {
    bytes: AtomicUsize,
    requests: AtomicUsize,
}

/// One client request's share of the [`Queue`], given back on drop.
struct Queued {
    queue: Arc<Queue>,
    bytes: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queue.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.queue.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle for proposing ops; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
    queue: Arc<Queue>,
}

/// Most ops packed into one Raft entry.
pub const MAX_OPS_PER_ENTRY: usize = 4096;
/// Entries in flight at once (openraft appends them together).
const MAX_IN_FLIGHT: usize = 1;

impl Proposer {
    /// Start the batching loop for `raft`.
    pub fn spawn(raft: Raft<TypeConfig>) -> Proposer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Proposer {
            tx,
            queue: Arc::default(),
        }
    }

    /// Propose `ops` and wait until they are committed and applied (the coordinator's
    /// own ops: never refused for load, no timeout).
    pub async fn propose(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ProposeError> {
        self.enqueue(ops, false).await
    }

    /// Propose a client request's `ops`: refused with [`ProposeError::Busy`] when the
    /// queue is full, [`ProposeError::Timeout`] when not committed in time.
    pub async fn propose_admitted(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ProposeError> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.enqueue(ops, true)).await {
            Ok(r) => r,
            Err(_) => {
                metrics::counter!("swarm_proposals_timed_out_total").increment(1);
                Err(ProposeError::Timeout(PROPOSE_TIMEOUT))
            }
        }
    }

    async fn enqueue(&self, ops: Vec<Op>, admit: bool) -> Result<Vec<OpResult>, ProposeError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let bytes = ops.iter().map(Op::size_hint).sum();
        if bytes > ENTRY_BUDGET {
            return Err(ProposeError::TooLarge {
                bytes,
                limit: ENTRY_BUDGET,
            });
        }
        let queued = if admit {
            Some(self.admit(bytes)?)
        } else {
            None
        };
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                ops,
                bytes,
                done,
                _queued: queued,
            })
            .map_err(|_| ProposeError::Raft("proposer stopped".into()))?;
        rx.await
            .map_err(|_| ProposeError::Raft("proposer stopped".into()))?
    }

    /// Takes `bytes` of the client queue, or refuses when it is full.
    fn admit(&self, bytes: usize) -> Result<Queued, ProposeError> {
        let q = &self.queue;
        let total = q.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let requests = q.requests.fetch_add(1, Ordering::AcqRel) + 1;
        let queued = Queued {
            queue: q.clone(),
            bytes,
        };
        if total > QUEUE_BYTES || requests > QUEUE_REQUESTS {
            drop(queued);
            metrics::counter!("swarm_proposals_refused_total").increment(1);
            return Err(ProposeError::Busy(format!(
                "{requests} requests, {total} bytes; at most {QUEUE_REQUESTS} and {QUEUE_BYTES}"
            )));
        }
        Ok(queued)
    }

    /// Client requests waiting to commit, and their bytes.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.queue.requests.load(Ordering::Acquire),
            self.queue.bytes.load(Ordering::Acquire),
        )
    }

    /// Propose one op.
    pub async fn propose_one(&self, op: Op) -> Result<OpResult, ProposeError> {
        let mut r = self.propose(vec![op]).await?;
        r.pop()
            .ok_or_else(|| ProposeError::Raft("empty response".into()))
    }
}

async fn run(raft: Raft<TypeConfig>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A request that did not fit the previous entry; it starts the next one.
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // Take everything that queued up meanwhile, up to the entry's limits.
        let mut n = first.ops.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while n < MAX_OPS_PER_ENTRY && bytes < ENTRY_BUDGET {
            match rx.try_recv() {
                Ok(p) => {
                    if n + p.ops.len() > MAX_OPS_PER_ENTRY || bytes + p.bytes > ENTRY_BUDGET {
                        carry = Some(p);
                        break;
                    }
                    n += p.ops.len();
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("swarm_raft_batch_bytes").record(bytes as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch, n).await;
            drop(permit);
        });
    }
}

/// Completes once this node's term differs from `term` or it no longer leads.
async fn leadership_changed(raft: &Raft<TypeConfig>, term: u64) {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_term != term || m.state != openraft::ServerState::Leader {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

async fn commit(raft: &Raft<TypeConfig>, batch: Vec<Pending>, n: usize) {
    let mut ops = Vec::with_capacity(n);
    let mut sizes = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    for p in batch {
        sizes.push(p.ops.len());
        ops.extend(p.ops);
        waiters.push(p.done);
    }
    metrics::histogram!("swarm_raft_batch_ops").record(n as f64);
    let started = std::time::Instant::now();
    let term = raft.metrics().borrow().current_term;
    // A write is answered by the leader that took it; if leadership changes first, it may
    // never be (openraft 0.9 leaves a write unanswered when a snapshot installed later
    // covers it), and this loop, one entry in flight at a time, would wait for good. The
    // outcome is then unknown to the caller, as after any lost leadership.
    let result = tokio::select! {
        r = raft.client_write(Command { ops }) => r,
        () = leadership_changed(raft, term) => {
            let err = ProposeError::NotLeader { leader: None };
            for done in waiters {
                let _ = done.send(Err(err.clone()));
            }
            return;
        }
    };
    metrics::histogram!("swarm_raft_commit_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) => {
            let mut results = resp.data.results.into_iter();
            for (size, done) in sizes.into_iter().zip(waiters) {
                let mine: Vec<OpResult> = results.by_ref().take(size).collect();
                let _ = done.send(Ok(mine));
            }
        }
        Err(e) => {
            let err = match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    ProposeError::NotLeader {
                        leader: f.leader_id.zip(f.leader_node),
                    }
                }
                other => ProposeError::Raft(other.to_string()),
            };
            for done in waiters {
                let _ = done.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proposer whose batching loop never runs: what it is handed waits for good, as
    /// when a leader has lost its quorum.
    fn stuck() -> (Proposer, mpsc::UnboundedReceiver<Pending>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Proposer {
            tx,
            queue: Arc::default(),
        };
        (p, rx)
    }

    fn cancel(id: u64) -> Op {
        Op::Cancel {
            task_id: id,
            now_ms: 0,
        }
    }

    /// Client requests are refused once the queue is full by bytes or by count, and
    /// their share is given back however they end; the coordinator's own ops are never
    /// refused.
    #[test]
    fn the_client_queue_is_bounded_and_given_back() {
        let (p, _rx) = stuck();
        let big = p.admit(QUEUE_BYTES).expect("fits exactly");
        assert!(matches!(p.admit(1), Err(ProposeError::Busy(_))));
        assert_eq!(p.queued(), (1, QUEUE_BYTES), "a refusal takes nothing");
        drop(big);
        assert_eq!(p.queued(), (0, 0));
        let held: Vec<Queued> = (0..QUEUE_REQUESTS).map(|_| p.admit(1).unwrap()).collect();
        assert!(matches!(p.admit(1), Err(ProposeError::Busy(_))));
        drop(held);
        assert_eq!(p.queued(), (0, 0));
    }

    /// A client request not committed in time is answered `Timeout` and its share of
    /// the queue given back; the coordinator's own proposals keep waiting.
    #[tokio::test(start_paused = true)]
    async fn client_requests_time_out_and_leave_the_queue() {
        let (p, mut rx) = stuck();
        let own = tokio::spawn({
            let p = p.clone();
            async move { p.propose(vec![cancel(1)]).await }
        });
        let r = p.propose_admitted(vec![cancel(2)]).await;
        assert!(matches!(r, Err(ProposeError::Timeout(_))), "{r:?}");
        // The request is still queued in the channel; its waiter is gone.
        let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        let (mine, client) = if a._queued.is_none() { (a, b) } else { (b, a) };
        assert!(mine._queued.is_none() && client._queued.is_some());
        assert_eq!(p.queued(), (1, client.bytes));
        drop(client);
        assert_eq!(p.queued(), (0, 0));
        assert!(!own.is_finished(), "own ops do not time out");
        let _ = mine.done.send(Ok(vec![OpResult::NotFound]));
        assert!(matches!(own.await.unwrap(), Ok(r) if r.len() == 1));
    }
}
