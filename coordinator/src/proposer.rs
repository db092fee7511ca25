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

use std::sync::Arc;

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
}

struct Pending {
    ops: Vec<Op>,
    bytes: usize,
    done: oneshot::Sender<Result<Vec<OpResult>, ProposeError>>,
}

/// Handle for proposing ops; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
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
        Proposer { tx }
    }

    /// Propose `ops` and wait until they are committed and applied.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, ProposeError> {
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
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { ops, bytes, done })
            .map_err(|_| ProposeError::Raft("proposer stopped".into()))?;
        rx.await
            .map_err(|_| ProposeError::Raft("proposer stopped".into()))?
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
