//! Workers as an operator acts on them: drain one remotely, and resume it (worker
//! protocol 7, [`swarm_proto::DRAIN_PROTOCOL`]), like `kubectl cordon`/`drain` or Nomad's
//! node drain.
//!
//! A drained worker gets no new work: the leader marks it draining in the scheduler at
//! once (so no `Run` follows the request; its swarm layouts re-plan without it) and sends
//! it `CoordinatorMsg::Drain { on: true }`, behind every `Run` already queued for it. The
//! worker hands back what it has not started, lets what runs finish and stays connected;
//! it states its drain back (`WorkerMsg::Drain`), first on every later session too, so a
//! new leader learns it (see `worker_session`). Resuming is the reverse. The drain lives
//! in the worker's memory: a restarted worker starts undrained.
//!
//! Refusals are [`WorkerError`]s; nothing here knows HTTP.

use std::collections::BTreeMap;

use swarm_proto::api::{DrainKind, WorkerView};
use swarm_proto::worker::CoordinatorMsg;
use swarm_proto::DRAIN_PROTOCOL;
use tracing::info;

use crate::node::{Node, SessionHandle};
use crate::scheduler::Scheduler;

/// Why a worker could not be drained or resumed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No worker of that id is connected to this (leading) coordinator.
    #[error("no worker {0:?} is connected")]
    Unknown(String),
    /// The worker speaks a protocol without remote drain.
    #[error("worker {id} speaks protocol {protocol}; remote drain needs {DRAIN_PROTOCOL}")]
    TooOld { id: String, protocol: u32 },
    /// A resume of a worker that is being stopped.
    #[error(
        "worker {0} is being stopped: it leaves once what it runs has ended, and cannot be resumed"
    )]
    Stopping(String),
}

/// Drain worker `id` (`on`) or resume it, and return its view as it is now. Draining a
/// worker that is being stopped changes nothing; draining a drained worker, or resuming
/// one that is not, asks it again (idempotent).
pub fn drain_worker(node: &Node, id: &str, on: bool) -> Result<WorkerView, WorkerError> {
    let (view, changed) = {
        let mut d = node.lock_dispatch();
        let d = &mut *d;
        // Under the dispatch lock, which dispatch holds while it queues a `Run`: no `Run`
        // comes between the scheduler's mark and the message.
        apply(&mut d.sessions, &mut d.scheduler, id, on)?
    };
    if changed {
        info!(
            worker = id,
            running = view.running,
            "{}",
            if on {
                "worker drained by an operator: no new work goes to it; it finishes what it runs and stays"
            } else {
                "worker resumed by an operator: it takes new work again"
            }
        );
        // Swarm layouts re-plan without it (or with it again) at the next dispatch round.
        node.poke();
    }
    Ok(view)
}

/// [`drain_worker`] on the sessions and the scheduler: the worker's view, and whether
/// the scheduler's mark changed.
fn apply(
    sessions: &mut BTreeMap<String, SessionHandle>,
    scheduler: &mut Scheduler,
    id: &str,
    on: bool,
) -> Result<(WorkerView, bool), WorkerError> {
    let Some(session) = sessions.get_mut(id) else {
        return Err(WorkerError::Unknown(id.to_string()));
    };
    if session.protocol < DRAIN_PROTOCOL {
        return Err(WorkerError::TooOld {
            id: id.to_string(),
            protocol: session.protocol,
        });
    }
    let stopping = session.info.drain == Some(DrainKind::Stopping);
    let changed = match (on, stopping) {
        (true, true) => false,
        (false, true) => return Err(WorkerError::Stopping(id.to_string())),
        (_, false) => {
            if session.tx.send(CoordinatorMsg::Drain { on }).is_err() {
                return Err(WorkerError::Unknown(id.to_string()));
            }
            session.info.draining = on;
            session.info.drain = on.then_some(DrainKind::Operator);
            if on {
                scheduler.worker_draining(id)
            } else {
                scheduler.worker_resumed(id)
            }
        }
    };
    let mut view = session.info.clone();
    if let Some(w) = scheduler.workers().get(id) {
        view.running = w.busy;
    }
    Ok((view, changed))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::sync::mpsc;

    use super::*;
    use crate::scheduler::SchedulerConfig;

    fn session(
        id: &str,
        protocol: u32,
    ) -> (SessionHandle, mpsc::UnboundedReceiver<CoordinatorMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = SessionHandle {
            conn_id: 1,
            tx,
            stop: None,
            protocol,
            cert: swarm_transport::CertName::Pool(String::new()),
            info: WorkerView {
                id: id.into(),
                addr: "127.0.0.1:1".into(),
                slots: 2,
                running: 0,
                labels: BTreeMap::new(),
                agents: vec![],
                connected_at_ms: 0,
                last_heartbeat_ms: 0,
                zero_rtt: false,
                via: None,
                draining: false,
                drain: None,
            },
        };
        (handle, rx)
    }

    #[test]
    fn drain_and_resume_reach_workers_of_protocol_7_only() {
        let mut scheduler = Scheduler::new(SchedulerConfig::default());
        let mut sessions = BTreeMap::new();
        let (new, mut new_rx) = session("new", DRAIN_PROTOCOL);
        let (old, mut old_rx) = session("old", DRAIN_PROTOCOL - 1);
        for (id, s) in [("new", new), ("old", old)] {
            scheduler.worker_connected(id, 2, BTreeMap::new(), 0);
            sessions.insert(id.to_string(), s);
        }

        let e = apply(&mut sessions, &mut scheduler, "nobody", true).unwrap_err();
        assert!(matches!(e, WorkerError::Unknown(_)), "{e}");
        let e = apply(&mut sessions, &mut scheduler, "old", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "worker old speaks protocol 6; remote drain needs 7"
        );
        assert!(
            old_rx.try_recv().is_err(),
            "nothing sent to an older worker"
        );
        assert!(scheduler.workers()["old"].takes_work());

        let (view, changed) = apply(&mut sessions, &mut scheduler, "new", true).unwrap();
        assert!(changed);
        assert!(view.draining);
        assert_eq!(view.drain, Some(DrainKind::Operator));
        assert_eq!(
            new_rx.try_recv().unwrap(),
            CoordinatorMsg::Drain { on: true }
        );
        assert!(!scheduler.workers()["new"].takes_work());
        // Again: asked again, nothing changes in the scheduler.
        let (_, changed) = apply(&mut sessions, &mut scheduler, "new", true).unwrap();
        assert!(!changed);
        assert_eq!(
            new_rx.try_recv().unwrap(),
            CoordinatorMsg::Drain { on: true }
        );

        let (view, changed) = apply(&mut sessions, &mut scheduler, "new", false).unwrap();
        assert!(changed);
        assert!(!view.draining);
        assert_eq!(view.drain, None);
        assert_eq!(
            new_rx.try_recv().unwrap(),
            CoordinatorMsg::Drain { on: false }
        );
        assert!(scheduler.workers()["new"].takes_work());

        // A worker being stopped: a drain changes nothing, a resume is refused.
        sessions.get_mut("new").unwrap().info.drain = Some(DrainKind::Stopping);
        sessions.get_mut("new").unwrap().info.draining = true;
        scheduler.worker_draining("new");
        let (view, changed) = apply(&mut sessions, &mut scheduler, "new", true).unwrap();
        assert!(!changed);
        assert_eq!(view.drain, Some(DrainKind::Stopping));
        let e = apply(&mut sessions, &mut scheduler, "new", false).unwrap_err();
        assert!(matches!(e, WorkerError::Stopping(_)), "{e}");
        assert!(
            new_rx.try_recv().is_err(),
            "nothing sent to a stopping worker"
        );
        assert!(!scheduler.workers()["new"].takes_work());

        // A session whose writer is gone counts as not connected.
        drop(new_rx);
        sessions.get_mut("new").unwrap().info.drain = None;
        let e = apply(&mut sessions, &mut scheduler, "new", true).unwrap_err();
        assert!(matches!(e, WorkerError::Unknown(_)), "{e}");
    }
}
