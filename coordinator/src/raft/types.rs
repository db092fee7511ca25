//! The openraft type configuration of the coordinator cluster.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use serde::{Deserialize, Serialize};

use crate::state::{Command, CommandResponse};

openraft::declare_raft_types!(
    /// The Raft type configuration: log payloads are task-table [`Command`]s, node ids are
    /// `u64`, nodes carry their addresses, and snapshots are files (dumps of a checkpoint).
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = super::snapshot_data::SnapshotData,
        AsyncRuntime = SwarmRuntime,
);

/// A Raft node id.
pub type NodeId = u64;

/// A log entry of the coordinator's Raft log.
pub type Entry = openraft::Entry<TypeConfig>;

/// A log id of the coordinator's Raft log.
pub type LogId = openraft::LogId<NodeId>;

/// Where a coordinator can be reached; stored in the Raft membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// `host:port` of the QUIC endpoint that serves Raft RPCs (ALPN `swarm-raft/1`).
    pub raft_addr: String,
    /// `host:port` of the HTTP API.
    pub api_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// openraft's tokio runtime, except for where its randomness (the election timeouts) comes
/// from: [`seed_thread_rng`] makes it a seeded generator on the calling thread, which a
/// deterministic simulation needs; otherwise it is `rand::thread_rng`, as in openraft.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SwarmRuntime;

thread_local! {
    static SEEDED_RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// From now on, Raft randomness on this thread comes from a generator seeded with `seed`
/// (`None`: from `rand::thread_rng` again).
pub fn seed_thread_rng(seed: Option<u64>) {
    SEEDED_RNG.with(|r| *r.borrow_mut() = seed.map(StdRng::seed_from_u64));
}

/// The generator [`SwarmRuntime::thread_rng`] hands out: the thread's seeded one if there
/// is one, else `rand::thread_rng`.
pub struct RaftRng(Option<rand::rngs::ThreadRng>);

impl RaftRng {
    fn with<R>(&mut self, f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
        if let Some(rng) = &mut self.0 {
            return f(rng);
        }
        SEEDED_RNG.with(|cell| match cell.borrow_mut().as_mut() {
            Some(rng) => f(rng),
            None => f(&mut rand::thread_rng()),
        })
    }
}

impl RngCore for RaftRng {
    fn next_u32(&mut self) -> u32 {
        self.with(|r| r.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        self.with(|r| r.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.with(|r| r.fill_bytes(dest))
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.with(|r| r.try_fill_bytes(dest))
    }
}

impl AsyncRuntime for SwarmRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = RaftRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let seeded = SEEDED_RNG.with(|r| r.borrow().is_some());
        RaftRng((!seeded).then(rand::thread_rng))
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}
