//! `swarm backup` / `swarm restore`: a consistent copy of a running cluster's state (tasks
//! and memory), streamed out as a dump ([`crate::raft::dump`], the format snapshots travel
//! in), and seeding a new, empty cluster from one, streamed in.
//!
//! A backup is taken on the leader after a linearizable barrier: a checkpoint at or
//! after the barrier is taken (a Raft snapshot), and the dump is read from a redb view
//! that stays at that checkpoint while it is sent, so it holds every write acknowledged
//! before the request and is one consistent cut, of any size, in bounded memory.
//!
//! A restore arrives as a stream and is proposed as it is parsed: `RestoreBegin` (refused
//! unless the cluster is empty), `RestoreChunk`s of tasks and memory bytes, each at most
//! one op's size, the backup's schedules (`ScheduleOp::Restore`, as many ops as their
//! size takes), then `RestoreCommit` once the dump's end record and checksum are
//! verified. Until the commit the cluster refuses every other change and dispatches
//! nothing. If the stream breaks, the dump is damaged, or leadership moves, the restore is
//! aborted (by the leader that finds it undriven, see [`Node`]'s maintenance loop): the
//! cluster returns to empty. Never half a backup.

use std::fmt::Display;
use std::io::{self, BufWriter, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::commit::CommitError;
use crate::limits::MAX_OP_BYTES;
use crate::node::{now_ms, Node};
use crate::raft::dump::{DumpParser, Record};
use crate::state::{
    Limits, LimitsOp, Op, OpResult, RestoreSummary, RestoredMeta, Schedule, ScheduleOp,
    ScheduleOutcome, Schedules, Task,
};

/// How long a backup waits for the checkpoint it needs.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(120);

/// Why a backup or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The stream is not a usable backup, or broke.
    #[error("{0}")]
    Invalid(String),
    /// A task of the backup does not fit one Raft entry of this cluster.
    #[error("{0}")]
    TooLarge(String),
    /// The cluster refused the restore (it is not empty, or another restore runs).
    #[error("{0}")]
    Refused(String),
    /// No consistent checkpoint could be had now.
    #[error("{0}")]
    Unavailable(String),
    /// Not committed (not the leader, a restore in progress, ...).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A result this code does not expect.
    #[error("{0}")]
    Internal(String),
}

/// A backup being taken: the log index it holds everything up to, and its bytes as they
/// are written (an error, and no end record, if writing fails part-way).
pub(crate) struct BackupStream {
    pub index: u64,
    pub chunks: mpsc::Receiver<Result<Bytes, io::Error>>,
}

/// Take a backup (leader): after a linearizable barrier, a checkpoint at or after it is
/// written out as a dump, in the background, into the returned stream.
pub(crate) async fn backup(node: &Node) -> Result<BackupStream, BackupError> {
    if node.read_table(|t| t.restoring().is_some()) {
        return Err(CommitError::Restoring.into());
    }
    let barrier = match node.raft().ensure_linearizable().await {
        Ok(read) => read.map_or(0, |l| l.index),
        Err(e) => {
            return Err(BackupError::Unavailable(format!(
                "cannot confirm leadership for a consistent backup: {e}"
            )))
        }
    };
    let view = checkpoint_at(node, barrier).await?;
    let (meta, view) = view;
    let index = meta.last_log_id.map_or(0, |l| l.index);
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(4);
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let out = BufWriter::with_capacity(1 << 20, ChannelWriter { tx: tx.clone() });
        match view.write_dump(out) {
            Ok(bytes) => info!(bytes, index, elapsed = ?started.elapsed(), "backup sent"),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "backup stream failed");
                // The client sees the stream break and no end record: never a short file
                // taken for a whole one.
                let _ = tx.blocking_send(Err(io::Error::other(format!("{e:#}"))));
            }
        }
    });
    Ok(BackupStream { index, chunks: rx })
}

/// A checkpoint at or after log index `index`: the current one, or a new one.
async fn checkpoint_at(
    node: &Node,
    index: u64,
) -> Result<
    (
        crate::raft::sm_store::SnapshotMetaOf,
        Arc<crate::raft::checkpoint::StoreReader>,
    ),
    BackupError,
> {
    let deadline = tokio::time::Instant::now() + CHECKPOINT_WAIT;
    let mut metrics = node.raft().metrics();
    loop {
        if let Some((meta, view)) = node.table.checkpoint() {
            if meta.last_log_id.is_some_and(|l| l.index >= index) {
                return Ok((meta, view));
            }
        }
        node.raft()
            .trigger()
            .snapshot()
            .await
            .map_err(|e| BackupError::Unavailable(format!("cannot take a checkpoint: {e}")))?;
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(BackupError::Unavailable("raft stopped".into())),
            Err(_) => {
                return Err(BackupError::Unavailable(format!(
                    "no checkpoint at index {index} within {CHECKPOINT_WAIT:?}"
                )))
            }
        }
    }
}

/// Hands what is written to an async body stream, a chunk at a time.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Marks this node as driving a restore while the request runs; when it ends without a
/// commit, the mark goes and the leader aborts the restore.
struct Driving<'a> {
    node: &'a Node,
    restore_id: u64,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.node.clear_restore_driver(self.restore_id);
    }
}

/// What a restore has parsed but not yet proposed.
#[derive(Default)]
struct Pending {
    tasks: Vec<Task>,
    bytes: usize,
}

/// Seed this empty cluster (leader) from a streamed backup; any failure after the
/// restore began gives it up (`RestoreAbort`), so the cluster is empty again.
pub(crate) async fn restore<S, E>(node: &Node, body: S) -> Result<RestoreSummary, BackupError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    let restore_id = rand::random::<u64>() | 1;
    node.set_restore_driver(restore_id);
    let _driving = Driving { node, restore_id };
    let mut begun = false;
    let result = run_restore(node, restore_id, body, &mut begun).await;
    if result.is_err() && begun {
        // Give it up now rather than when the maintenance loop finds it undriven, so a
        // retry can begin at once.
        if let Err(e) = propose_restore(node, Op::RestoreAbort { restore_id }).await {
            warn!(error = %e, "aborting the failed restore");
        }
    }
    result
}

async fn run_restore<S, E>(
    node: &Node,
    restore_id: u64,
    body: S,
    begun: &mut bool,
) -> Result<RestoreSummary, BackupError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Display,
{
    let started = std::time::Instant::now();
    let mut stream = std::pin::pin!(body);
    let mut parser = DumpParser::new();
    let mut meta = None;
    let mut seq = 0u64;
    let mut tasks = 0u64;
    let mut received = 0u64;
    let mut pending = Pending::default();
    loop {
        let record = parser
            .next_record()
            .map_err(|e| BackupError::Invalid(format!("not a usable backup: {e}")))?;
        let Some(record) = record else {
            if parser.ended() {
                break;
            }
            match stream.next().await {
                Some(Ok(bytes)) => {
                    received += bytes.len() as u64;
                    parser
                        .push(&bytes)
                        .map_err(|e| BackupError::Invalid(format!("not a usable backup: {e}")))?;
                    continue;
                }
                Some(Err(e)) => {
                    return Err(BackupError::Invalid(format!(
                        "the backup stream broke after {received} bytes: {e}"
                    )))
                }
                None => {
                    parser
                        .finish()
                        .map_err(|e| BackupError::Invalid(format!("not a usable backup: {e}")))?;
                    break;
                }
            }
        };
        match record {
            Record::Header(h) => {
                if h.meta.restore.is_some() {
                    return Err(BackupError::Invalid(
                        "the backup was taken while a restore was in progress; it is not complete"
                            .into(),
                    ));
                }
                meta = Some(RestoredMeta {
                    next_id: h.meta.next_id,
                    swarms: h.meta.swarms.clone(),
                });
                info!(
                    restore = format!("{restore_id:x}"),
                    tasks = h.tasks,
                    memory_bytes = h.memory_bytes,
                    "restore started"
                );
                propose_restore(
                    node,
                    Op::RestoreBegin {
                        restore_id,
                        now_ms: now_ms(),
                    },
                )
                .await?;
                *begun = true;
            }
            Record::Tasks(batch) => {
                for t in batch {
                    let size = t.size_hint();
                    if size > MAX_OP_BYTES {
                        return Err(BackupError::TooLarge(format!(
                            "task {} takes {size} bytes, more than one Raft entry holds ({MAX_OP_BYTES}); this cluster cannot restore it",
                            t.id
                        )));
                    }
                    if pending.bytes + size > MAX_OP_BYTES {
                        tasks +=
                            flush(node, restore_id, &mut seq, &mut pending, Vec::new()).await?;
                    }
                    pending.bytes += size;
                    pending.tasks.push(t);
                }
            }
            Record::Memory(bytes) => {
                // Memory pieces are at most a few MiB; each goes with the tasks pending.
                if pending.bytes + bytes.len() > MAX_OP_BYTES {
                    tasks += flush(node, restore_id, &mut seq, &mut pending, Vec::new()).await?;
                }
                tasks += flush(node, restore_id, &mut seq, &mut pending, bytes).await?;
            }
            Record::Staged(_) => {
                return Err(BackupError::Invalid(
                    "the backup holds a restore in progress; it is not complete".into(),
                ))
            }
            Record::Schedules(s) => restore_schedules(node, restore_id, *s).await?,
            Record::Limits(l) => restore_limits(node, *l).await?,
            // Tokens and revoked certificates are the old cluster's credentials, not its
            // data: this cluster keeps its own. Callbacks still waiting in the old
            // cluster are its notifications to send, not this one's: a restored task
            // does not notify again.
            Record::Access(_) | Record::Ledger(_) | Record::Callbacks(_) | Record::End { .. } => {}
        }
        if !*begun {
            return Err(BackupError::Invalid("the backup has no header".into()));
        }
    }
    tasks += flush(node, restore_id, &mut seq, &mut pending, Vec::new()).await?;
    let meta = meta.ok_or_else(|| BackupError::Invalid("the backup has no header".into()))?;
    let summary = propose_restore(
        node,
        Op::RestoreCommit {
            restore_id,
            chunks: seq,
            tasks,
            meta,
        },
    )
    .await?;
    info!(
        restore = format!("{restore_id:x}"),
        tasks = summary.tasks,
        collections = summary.collections,
        patterns = summary.patterns,
        bytes = received,
        elapsed = ?started.elapsed(),
        "restore committed"
    );
    Ok(summary)
}

/// Propose the backup's schedules, in ops of at most one op's size.
async fn restore_schedules(
    node: &Node,
    restore_id: u64,
    schedules: Schedules,
) -> Result<(), BackupError> {
    let mut batch: Vec<Schedule> = Vec::new();
    let mut bytes = 0;
    let mut rest = schedules.by_name.into_values().peekable();
    while let Some(s) = rest.next() {
        bytes += Schedules::size_hint_of(&s);
        batch.push(s);
        let full = rest
            .peek()
            .is_some_and(|n| bytes + Schedules::size_hint_of(n) > MAX_OP_BYTES);
        if full || rest.peek().is_none() {
            bytes = 0;
            let op = Op::Schedule(ScheduleOp::Restore {
                restore_id,
                schedules: std::mem::take(&mut batch),
            });
            let r = node
                .proposer
                .propose_one(op)
                .await
                .map_err(|e| CommitError::from_propose(node, e))?;
            match r {
                OpResult::Schedule(Ok(ScheduleOutcome::Done)) => {}
                OpResult::Schedule(Err(f)) => return Err(BackupError::Refused(f.message)),
                OpResult::Restoring => return Err(CommitError::Restoring.into()),
                other => {
                    return Err(BackupError::Internal(format!(
                        "unexpected schedule restore result {other:?}"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Set the backup's limits (a limit this cluster has under the same name is replaced),
/// up to 1,000 in one entry.
async fn restore_limits(node: &Node, limits: Limits) -> Result<(), BackupError> {
    let ops: Vec<Op> = limits
        .by_name
        .into_iter()
        .map(|(name, def)| Op::Limits(LimitsOp::Set { name, def }))
        .collect();
    for chunk in ops.chunks(1_000) {
        let results = node
            .propose(chunk.to_vec())
            .await
            .map_err(|e| CommitError::from_propose(node, e))?;
        for r in results {
            match r {
                OpResult::Limits(Ok(())) => {}
                OpResult::Limits(Err(f)) => return Err(BackupError::Refused(f.to_string())),
                other => {
                    return Err(BackupError::Internal(format!(
                        "unexpected limit restore result {other:?}"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Propose the pending tasks (and `memory`) as the next chunk, if there is anything.
async fn flush(
    node: &Node,
    restore_id: u64,
    seq: &mut u64,
    pending: &mut Pending,
    memory: Vec<u8>,
) -> Result<u64, BackupError> {
    if pending.tasks.is_empty() && memory.is_empty() {
        return Ok(0);
    }
    let tasks = std::mem::take(&mut pending.tasks);
    pending.bytes = 0;
    let n = tasks.len() as u64;
    propose_restore(
        node,
        Op::RestoreTasks {
            restore_id,
            seq: *seq,
            tasks,
            memory,
        },
    )
    .await?;
    *seq += 1;
    Ok(n)
}

async fn propose_restore(node: &Node, op: Op) -> Result<RestoreSummary, BackupError> {
    let r = node
        .proposer
        .propose_one(op)
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match r {
        OpResult::Restored(Ok(summary)) => Ok(summary),
        OpResult::Restored(Err(reason)) => Err(BackupError::Refused(reason)),
        OpResult::Restoring => Err(CommitError::Restoring.into()),
        other => Err(BackupError::Internal(format!(
            "unexpected restore result {other:?}"
        ))),
    }
}
