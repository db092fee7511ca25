//! [`InlineStateMachine`]: the state machine store, minus a trip to tokio's blocking pool
//! when there is no snapshot.
//!
//! [`StateMachineStore`] reads, builds and installs snapshots on tokio's blocking pool, so
//! the work completes whenever the OS scheduler lets it, between other tasks, at a moment
//! that differs from run to run; a single-threaded deterministic simulation cannot replay
//! that. openraft asks for the current snapshot every time a node starts. When there is
//! none the answer needs no I/O at all, and this wrapper gives it right away; everything
//! else is delegated as is. So a simulation whose nodes never snapshot replays exactly,
//! while one that snapshots replays exactly only up to the first snapshot I/O (running
//! `StateMachineStore`'s blocking work in place, as
//! [`RedbLogStore::open_inline`](super::RedbLogStore::open_inline) does for the log, would
//! lift that).

use std::io::Cursor;

use openraft::storage::RaftStateMachine;
use openraft::{
    OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StoredMembership,
};

use super::sm_store::StateMachineStore;
use super::types::{Entry, LogId, NodeAddr, NodeId, TypeConfig};
use crate::state::CommandResponse;

type StoreResult<T> = Result<T, StorageError<NodeId>>;

/// A [`StateMachineStore`] that answers "no snapshot" without the blocking pool.
#[derive(Clone)]
pub struct InlineStateMachine(pub StateMachineStore);

impl RaftSnapshotBuilder<TypeConfig> for InlineStateMachine {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        self.0.build_snapshot().await
    }
}

impl RaftStateMachine<TypeConfig> for InlineStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId>, StoredMembership<NodeId, NodeAddr>)> {
        self.0.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<CommandResponse>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.0.apply(entries).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        self.0.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        self.0.install_snapshot(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        // The store reads the snapshot file only when it knows of a snapshot.
        if self.0.snapshot_meta().is_none() {
            return Ok(None);
        }
        self.0.get_current_snapshot().await
    }
}
