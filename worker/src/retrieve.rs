//! ReasoningBank retrieval over the worker's coordinator session: `Retrieve` out,
//! `Retrieved` back, matched by request id. Requests fail fast when there is no session
//! and are failed when the session ends, so an attempt never waits on a dead connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use swarm_proto::worker::{PatternHit, WorkerMsg};
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<Vec<PatternHit>, String>>;

#[derive(Default)]
struct State {
    sink: Option<mpsc::UnboundedSender<WorkerMsg>>,
    pending: HashMap<u64, Reply>,
}

/// Shared by the core (which sees the session come and go and the answers arrive) and
/// the attempts (which ask).
#[derive(Default)]
pub(crate) struct Retriever {
    state: Mutex<State>,
    next: AtomicU64,
}

impl Retriever {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session's writer, or `None` when disconnected (pending requests then fail).
    pub(crate) fn set_sink(&self, sink: Option<mpsc::UnboundedSender<WorkerMsg>>) {
        let mut st = self.lock();
        if sink.is_none() {
            for (_, reply) in st.pending.drain() {
                let _ = reply.send(Err("disconnected from the coordinator".into()));
            }
        }
        st.sink = sink;
    }

    /// An answer arrived.
    pub(crate) fn complete(&self, request_id: u64, result: Result<Vec<PatternHit>, String>) {
        if let Some(reply) = self.lock().pending.remove(&request_id) {
            let _ = reply.send(result);
        }
    }

    /// Ask the coordinator for up to `k` patterns for `query`.
    pub(crate) async fn retrieve(
        &self,
        query: String,
        k: u32,
        timeout: Duration,
    ) -> Result<Vec<PatternHit>, String> {
        let request_id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.lock();
            let Some(sink) = st.sink.clone() else {
                return Err("not connected to a coordinator".into());
            };
            st.pending.insert(request_id, tx);
            if sink
                .send(WorkerMsg::Retrieve {
                    request_id,
                    query,
                    k,
                })
                .is_err()
            {
                st.pending.remove(&request_id);
                return Err("the coordinator session is closing".into());
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("retrieval abandoned".into()),
            Err(_) => {
                self.lock().pending.remove(&request_id);
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}
