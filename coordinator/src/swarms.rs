//! Swarms inside the coordinator: definitions in the replicated state, live layouts on
//! the leader, placement of queued tasks, and creating, reading and deleting swarms
//! ([`create`], [`swarm_view`], [`delete`]; refusals are [`SwarmError`]s).
//!
//! * A swarm's definition ([`SwarmRecord`]) is replicated ([`Op::SwarmCreate`],
//!   [`Op::SwarmDelete`]); a task names its swarm at submit and a ring task copies the
//!   ring's stages then.
//! * Its *layout* is leader-local: [`Topologies::refresh`] re-plans every swarm with
//!   `swarm_topology::plan` whenever workers join or leave or swarms change, from the
//!   connected workers that match the swarm's selector, keeping the previous plan where
//!   it still holds (a ring keeps the workers of its surviving stages).
//! * [`Topologies::place`] decides which workers may take a queued task and how many
//!   attempts each may hold: a star or mesh member its slots plus the swarm's queue depth
//!   (attempts queued on the worker; mesh peers steal from those queues), a ring task
//!   only the worker serving the task's current stage.
//! * Mesh members are sent their peers (`CoordinatorMsg::Peers`) after every re-plan; a
//!   steal they report (`WorkerMsg::Stole`) is recorded as [`Op::Move`].
//!
//! * Hierarchy members are sent `CoordinatorMsg::Parent` whenever their session does not
//!   take the planned route: a member connects to its lead's relay listener, and the lead
//!   relays its session to the coordinator as a further stream on the lead's own
//!   connection (`worker_session::accept_relayed`), so the coordinator holds one
//!   connection per lead.

use std::collections::BTreeMap;
use std::sync::Arc;

use swarm_proto::api::{CreateSwarm, SwarmList, SwarmTaskCounts, SwarmView};
use swarm_proto::worker::{AttemptRef, CoordinatorMsg, PeerInfo};
use swarm_topology::{
    parse_stages, plan, view, Load, Member, SwarmSpec, TopologyKind, TopologyOptions, TopologyPlan,
    TopologySpec, DEFAULT_SWARM_NAME,
};
use tracing::{debug, info, warn};

use crate::commit::CommitError;
use crate::node::{now_ms, Dispatch, Node, SessionHandle};
use crate::scheduler::{Scheduler, WorkerEntry};
use crate::state::{Op, OpResult, SwarmFault, SwarmRecord, Task, TaskTable};

/// Queue depth of a mesh swarm when none is given: enough queued work per member for an
/// idle peer to steal.
pub const DEFAULT_MESH_QUEUE_DEPTH: u32 = 4;
/// Largest queue depth accepted.
pub const MAX_QUEUE_DEPTH: u32 = 1024;
/// Most stages in a ring.
pub const MAX_STAGES: usize = 64;
/// Most labels in a swarm's selector.
pub const MAX_SELECTOR_LABELS: usize = 32;

/// One swarm's live layout on the leader.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub record: SwarmRecord,
    /// `None` when the topology cannot be planned over the current members.
    pub plan: Option<TopologyPlan>,
    /// Why there is no plan.
    pub problem: Option<String>,
    /// Mesh: the peer list last sent to each member, and the session it went to. A
    /// member is sent its list again only when either changes, so a re-plan costs
    /// messages only where links changed (or a member reconnected).
    told: BTreeMap<String, (u64, Vec<PeerInfo>)>,
}

/// Every defined swarm's layout, re-planned when membership or definitions change.
#[derive(Debug, Default)]
pub(crate) struct Topologies {
    layouts: BTreeMap<String, Layout>,
    /// (scheduler membership generation, table swarm generation) last planned for.
    planned_for: Option<(u64, u64)>,
}

/// Frames to send after a re-plan: (worker, message).
pub(crate) type Outbox = Vec<(String, CoordinatorMsg)>;

impl Topologies {
    /// Forget every layout (on losing leadership): the next leader plans afresh.
    pub fn clear(&mut self) {
        self.layouts.clear();
        self.planned_for = None;
    }

    /// The layout of swarm `name`, if it is defined (not the default swarm).
    pub fn layout(&self, name: &str) -> Option<&Layout> {
        self.layouts.get(name)
    }

    /// Largest queue depth of any swarm.
    pub fn max_queue_depth(&self) -> u32 {
        self.layouts
            .values()
            .map(|l| l.record.queue_depth)
            .max()
            .unwrap_or(0)
    }

    /// Re-plan if workers or swarms changed since the last plan. Returns the frames
    /// members must get: `Peers` for mesh members, `Parent` for hierarchy members whose
    /// session does not take the planned route yet.
    pub fn refresh(
        &mut self,
        scheduler: &Scheduler,
        table: &TaskTable,
        sessions: &BTreeMap<String, SessionHandle>,
    ) -> Outbox {
        let key = (scheduler.membership_gen(), table.swarms_gen());
        if self.planned_for == Some(key) {
            return Vec::new();
        }
        self.planned_for = Some(key);
        let mut out = Vec::new();
        let defined = table.defined_swarms();
        // Deleted swarms: their mesh members drop the links.
        let gone: Vec<String> = self
            .layouts
            .keys()
            .filter(|n| !defined.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(Layout {
                plan: Some(TopologyPlan::Mesh(m)),
                ..
            }) = self.layouts.remove(&name)
            {
                for w in m.peers.keys() {
                    out.push((
                        w.clone(),
                        CoordinatorMsg::Peers {
                            swarm: name.clone(),
                            peers: Vec::new(),
                        },
                    ));
                }
            }
        }
        for (name, record) in defined {
            let previous = self.layouts.get(name).and_then(|l| l.plan.clone());
            let mut told = self
                .layouts
                .get_mut(name)
                .map(|l| std::mem::take(&mut l.told))
                .unwrap_or_default();
            let members = members_of(scheduler, &record.spec, previous.as_ref());
            let planned = plan(&record.spec, &members, seed_of(name), previous.as_ref());
            let mut layout = match planned {
                Ok(p) => Layout {
                    record: record.clone(),
                    plan: Some(p),
                    problem: None,
                    told: BTreeMap::new(),
                },
                // Nothing is dispatched in this swarm until it can be planned again (e.g.
                // a ring stage no connected worker can serve).
                Err(e) => Layout {
                    record: record.clone(),
                    plan: None,
                    problem: Some(e.to_string()),
                    told: BTreeMap::new(),
                },
            };
            metrics::gauge!("swarm_swarm_members", "swarm" => name.clone())
                .set(members.len() as f64);
            if let Some(TopologyPlan::Mesh(m)) = &layout.plan {
                for (w, peers) in &m.peers {
                    let Some(session) = sessions.get(w).map(|s| s.conn_id) else {
                        continue;
                    };
                    let peers: Vec<PeerInfo> = peers
                        .iter()
                        .filter_map(|p| {
                            let addr = scheduler.workers().get(p)?.peer_addr.clone()?;
                            Some(PeerInfo {
                                worker_id: p.clone(),
                                addr,
                            })
                        })
                        .collect();
                    let entry = (session, peers);
                    if told.get(w) != Some(&entry) {
                        out.push((
                            w.clone(),
                            CoordinatorMsg::Peers {
                                swarm: name.clone(),
                                peers: entry.1.clone(),
                            },
                        ));
                    }
                    layout.told.insert(w.clone(), entry);
                }
                // Members that left the mesh (but are still connected) drop its links.
                for (w, _) in std::mem::take(&mut told) {
                    if !m.peers.contains_key(&w) && sessions.contains_key(&w) {
                        out.push((
                            w,
                            CoordinatorMsg::Peers {
                                swarm: name.clone(),
                                peers: Vec::new(),
                            },
                        ));
                    }
                }
            }
            if let Some(problem) = &layout.problem {
                debug!(swarm = %name, %problem, "swarm has no layout");
            }
            self.layouts.insert(name.clone(), layout);
        }
        out.extend(self.parents(scheduler, sessions));
        out
    }

    /// `Parent` frames for sessions whose route differs from the plan: a hierarchy member
    /// goes through its lead, a lead (and any worker no hierarchy wants relayed) connects
    /// directly. A worker in several hierarchies follows the first by swarm name.
    fn parents(&self, scheduler: &Scheduler, sessions: &BTreeMap<String, SessionHandle>) -> Outbox {
        let wanted = self.wanted_routes();
        let mut out = Vec::new();
        for (id, s) in sessions {
            let want = route_of(&wanted, id);
            if s.info.via.as_deref() == want {
                continue;
            }
            let lead = match want {
                Some(lead) => {
                    let Some(addr) = scheduler
                        .workers()
                        .get(lead)
                        .and_then(|w| w.peer_addr.clone())
                    else {
                        continue;
                    };
                    Some(PeerInfo {
                        worker_id: lead.to_string(),
                        addr,
                    })
                }
                None => None,
            };
            out.push((id.clone(), CoordinatorMsg::Parent { lead }));
        }
        out
    }

    /// Each worker a hierarchy places: `Some(lead)` for a member, `None` for a lead. A
    /// worker in several hierarchies follows the first by swarm name.
    fn wanted_routes(&self) -> BTreeMap<&str, Option<&str>> {
        let mut wanted: BTreeMap<&str, Option<&str>> = BTreeMap::new();
        for layout in self.layouts.values() {
            let Some(TopologyPlan::Hierarchical(h)) = &layout.plan else {
                continue;
            };
            for lead in &h.leads {
                wanted.entry(lead.as_str()).or_insert(None);
            }
            for (child, lead) in &h.parent {
                wanted.entry(child.as_str()).or_insert(Some(lead.as_str()));
            }
        }
        wanted
    }

    /// Whether the current plan routes `member`'s session through `lead` (what a lead
    /// may relay).
    pub fn relays_through(&self, member: &str, lead: &str) -> bool {
        route_of(&self.wanted_routes(), member) == Some(lead)
    }

    /// Whether `task`, held by `from`, may move to `thief`: its swarm is a mesh in which
    /// the two are peers, and the thief may take the task.
    pub fn may_move(&self, scheduler: &Scheduler, task: &Task, from: &str, thief: &str) -> bool {
        let peers = self
            .layouts
            .get(&task.spec.swarm)
            .is_some_and(|l| match &l.plan {
                Some(TopologyPlan::Mesh(m)) => m.peers.get(from).is_some_and(|p| p.contains(thief)),
                _ => false,
            });
        peers
            && scheduler.workers().get(thief).is_some_and(|w| {
                w.offers(task.current_agent()) && self.place(task, thief, w).is_some()
            })
    }

    /// How many attempts worker `id` may hold when it takes `task`, or `None` if it may
    /// not take it (see the module docs).
    pub fn place(&self, task: &Task, id: &str, w: &WorkerEntry) -> Option<u32> {
        if !w.has_labels(&task.spec.labels) {
            return None;
        }
        if task.spec.swarm == DEFAULT_SWARM_NAME {
            return Some(w.slots);
        }
        let layout = self.layouts.get(&task.spec.swarm)?;
        if !w.has_labels(&layout.record.spec.selector) {
            return None;
        }
        match layout.plan.as_ref()? {
            TopologyPlan::Ring(r) => (r.worker_for(task.stage as usize)? == id).then_some(w.slots),
            TopologyPlan::Mesh(m) => {
                // Only workers in the plan (with a peer listener) take mesh work: a
                // queued attempt elsewhere could never be stolen.
                m.peers
                    .contains_key(id)
                    .then_some(w.slots + layout.record.queue_depth)
            }
            _ => Some(w.slots + layout.record.queue_depth),
        }
    }
}

/// Connected workers matching `spec`'s selector, as the planners see them, draining ones
/// left out. A mesh or a hierarchy only counts workers that accept peer links (a lead
/// relays on its peer listener).
///
/// A hierarchy (given its `previous` plan) also keeps members that are between two
/// connections — a member moving to its lead drops its direct session before the relayed
/// one arrives — until their lease runs out, so moving members do not reshuffle the
/// leads. A lead that is not connected is dropped at once, so its members re-parent.
fn members_of(
    scheduler: &Scheduler,
    spec: &SwarmSpec,
    previous: Option<&TopologyPlan>,
) -> Vec<Member> {
    let mesh = matches!(
        spec.topology.kind(),
        TopologyKind::Mesh | TopologyKind::Hierarchical
    );
    let hierarchy = match previous {
        Some(TopologyPlan::Hierarchical(h)) => Some(h),
        _ => None,
    };
    // A draining worker takes no new work and is about to leave: it is in no layout.
    let present = |id: &str, w: &WorkerEntry| {
        !w.draining && (w.connected || hierarchy.is_some_and(|h| !h.leads.iter().any(|l| l == id)))
    };
    scheduler
        .workers()
        .iter()
        .filter(|(id, w)| present(id, w) && w.has_labels(&spec.selector))
        .filter(|(_, w)| !mesh || w.peer_addr.is_some())
        .map(|(id, w)| Member {
            id: id.clone(),
            labels: w.labels.clone(),
            agents: w.agents.clone(),
            slots: w.slots,
            running: w.busy.min(w.slots),
            queued_local: w.busy.saturating_sub(w.slots),
        })
        .collect()
}

/// A fixed seed per swarm name (FNV-1a), so every leader plans the same mesh.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Send the frames a re-plan produced.
pub(crate) fn deliver(d: &Dispatch, out: Outbox) {
    for (worker, msg) in out {
        if let Some(s) = d.sessions.get(&worker) {
            let _ = s.tx.send(msg);
        }
    }
}

/// A worker stole `attempt` from `from`. Accepted when the attempt is in flight on
/// `from`, its task belongs to a mesh swarm in which the two are peers, and the thief may
/// run it: then the scheduler moves it and the move is recorded ([`Op::Move`]).
/// Otherwise the thief is told to drop it, and — since `from` gave it away and no longer
/// holds it — an attempt still in flight on `from` is given up at once ([`Op::give_up`])
/// so it runs again where it belongs.
pub(crate) fn on_stole(node: &Arc<Node>, thief: &str, attempt: AttemptRef, from: &str) {
    let now = now_ms();
    let table = node.table.read();
    let task = table.get(attempt.task_id);
    let swarm = task.map(|t| t.spec.swarm.clone()).unwrap_or_default();
    let mut d = node.lock_dispatch();
    let d = &mut *d;
    let allowed = task.is_some_and(|t| d.topologies.may_move(&d.scheduler, t, from, thief));
    let in_flight_on_from = d
        .scheduler
        .in_flight(attempt.task_id)
        .is_some_and(|f| f.attempt == attempt && f.worker == from && !f.reported);
    let ops = if allowed && d.scheduler.moved(attempt, from, thief) {
        if let Some(s) = d.sessions.get_mut(from) {
            s.info.running = s.info.running.saturating_sub(1);
        }
        if let Some(s) = d.sessions.get_mut(thief) {
            s.info.running += 1;
        }
        metrics::counter!("swarm_swarm_steals_total", "swarm" => swarm).increment(1);
        vec![Op::Move {
            attempt,
            from: from.to_string(),
            to: thief.to_string(),
            now_ms: now,
        }]
    } else {
        if let Some(s) = d.sessions.get(thief) {
            let _ = s.tx.send(CoordinatorMsg::Cancel(attempt));
        }
        metrics::counter!("swarm_swarm_steals_refused_total", "swarm" => swarm).increment(1);
        debug!(
            task = attempt.task_id,
            thief, from, allowed, "steal refused"
        );
        if !in_flight_on_from {
            return;
        }
        d.scheduler.give_up(attempt.task_id);
        Op::give_up(
            attempt,
            from,
            format!("worker {from} handed it to {thief}, which may not run it; running it again"),
            now,
            now,
        )
        .to_vec()
    };
    drop(table);
    let node = node.clone();
    tokio::spawn(async move {
        match node.propose(ops).await {
            Ok(r) => node.count_results(&r),
            Err(e) => warn!(error = %e, "steal outcome (Move/Lose) not committed"),
        }
    });
}

/// Why a swarm request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// No swarm of that name.
    #[error("no swarm named {0:?}")]
    Unknown(String),
    /// The definition is malformed (`unknown_topology`, `empty_ring`, `invalid_stage`,
    /// `invalid_label`, `invalid_queue_depth`, `option_not_applicable`, ...).
    #[error("{message}")]
    Invalid { code: String, message: String },
    /// The swarm cannot be laid out over the workers connected now (and the request did
    /// not allow that).
    #[error("{message}")]
    Unplaceable { code: String, message: String },
    /// The replicated state refused the op (`unknown_swarm`, `swarm_exists`,
    /// `swarm_busy`, `default_swarm`, ...).
    #[error("{}", .0.message)]
    Fault(SwarmFault),
    /// Not committed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A result this code does not expect.
    #[error("{0}")]
    Internal(String),
}

fn bad(code: &str, message: impl Into<String>) -> SwarmError {
    SwarmError::Invalid {
        code: code.into(),
        message: message.into(),
    }
}

/// Turn a create request into a record, or say what is wrong with it.
fn to_record(req: &CreateSwarm) -> Result<SwarmRecord, SwarmError> {
    let kind: TopologyKind = req
        .topology
        .parse()
        .map_err(|e: swarm_topology::TopologyError| bad(e.code(), e.to_string()))?;
    // Each element is one stage or a comma-separated list of them (as the CLI sends
    // `--stages a,b[k=v],c`); an element never continues into the next.
    let mut stages = Vec::new();
    for element in &req.stages {
        stages.extend(parse_stages(element).map_err(|e| bad(e.code(), e.to_string()))?);
    }
    if stages.len() > MAX_STAGES {
        return Err(bad(
            "invalid_stage",
            format!(
                "a ring has at most {MAX_STAGES} stages, got {}",
                stages.len()
            ),
        ));
    }
    if req.labels.len() > MAX_SELECTOR_LABELS {
        return Err(bad(
            "invalid_label",
            format!(
                "a selector has at most {MAX_SELECTOR_LABELS} labels, got {}",
                req.labels.len()
            ),
        ));
    }
    let topology = TopologySpec::build(
        kind,
        TopologyOptions {
            fan_out: req.fan_out,
            max_degree: req.max_degree,
            stages,
        },
    )
    .map_err(|e| bad(e.code(), e.to_string()))?;
    let spec = SwarmSpec::new(req.name.clone(), topology, req.labels.clone())
        .map_err(|e| bad(e.code(), e.to_string()))?;
    let queue_depth = req.queue_depth.unwrap_or(match kind {
        TopologyKind::Mesh => DEFAULT_MESH_QUEUE_DEPTH,
        _ => 0,
    });
    if queue_depth > MAX_QUEUE_DEPTH {
        return Err(bad(
            "invalid_queue_depth",
            format!("`queue_depth` is at most {MAX_QUEUE_DEPTH}, got {queue_depth}"),
        ));
    }
    if kind == TopologyKind::Ring && req.queue_depth.is_some_and(|d| d > 0) {
        return Err(bad(
            "option_not_applicable",
            "`queue_depth` does not apply to a ring: each stage runs on its own worker",
        ));
    }
    Ok(SwarmRecord {
        spec,
        queue_depth,
        created_at_ms: now_ms(),
    })
}

/// Define a swarm (`POST /v1/swarms`). Unless `allow_empty`, it must be plannable over
/// the workers connected now. Returns its view.
pub(crate) async fn create(node: &Node, req: CreateSwarm) -> Result<SwarmView, SwarmError> {
    let record = to_record(&req)?;
    if record.spec.name == DEFAULT_SWARM_NAME {
        return Err(SwarmError::Fault(SwarmFault {
            code: "swarm_exists".into(),
            message: format!("swarm {DEFAULT_SWARM_NAME:?} is built in"),
        }));
    }
    if !req.allow_empty {
        // Plan it over the workers connected now: a selector matching nobody or a ring
        // stage nobody can serve is a mistake to report now, not a silent stall later.
        let members = {
            let d = node.lock_dispatch();
            members_of(&d.scheduler, &record.spec, None)
        };
        if members.is_empty() {
            let err = if record.spec.selector.is_empty() {
                swarm_topology::TopologyError::NoWorkers
            } else {
                swarm_topology::TopologyError::NoMatchingWorkers {
                    selector: swarm_topology::format_selector(&record.spec.selector),
                }
            };
            return Err(SwarmError::Unplaceable {
                code: err.code().into(),
                message: format!(
                    "{err}{}; pass allow_empty to create it anyway",
                    if matches!(
                        record.spec.topology.kind(),
                        TopologyKind::Mesh | TopologyKind::Hierarchical
                    ) {
                        " (a mesh or a hierarchy counts only workers started with --peer-listen)"
                    } else {
                        ""
                    }
                ),
            });
        }
        if let Err(e) = plan(&record.spec, &members, seed_of(&record.spec.name), None) {
            return Err(SwarmError::Unplaceable {
                code: e.code().into(),
                message: format!("{e}; pass allow_empty to create it anyway"),
            });
        }
    }
    let name = record.spec.name.clone();
    let result = node
        .propose_client(vec![Op::SwarmCreate { record }])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match result.first() {
        Some(OpResult::Swarm(Ok(()))) => {}
        Some(OpResult::Swarm(Err(f))) => return Err(SwarmError::Fault(f.clone())),
        other => return Err(SwarmError::Internal(format!("unexpected result {other:?}"))),
    }
    info!(swarm = %name, "swarm created");
    node.poke();
    swarm_view(node, &name).ok_or(SwarmError::Unknown(name))
}

/// The lead `id`'s session goes through, if any. A lead that is itself relayed (as a
/// member of an earlier hierarchy) cannot relay: its members connect directly instead.
fn route_of<'a>(wanted: &BTreeMap<&'a str, Option<&'a str>>, id: &str) -> Option<&'a str> {
    wanted
        .get(id)
        .copied()
        .flatten()
        .filter(|lead| wanted.get(lead).copied().flatten().is_none())
}

/// Set (`Some`) or clear (`None`) swarm `name`'s token budget
/// (`PUT /v1/swarms/{name}/budget`); returns the swarm's usage and budget after it.
/// Raising a spent budget releases the tasks it held at the next dispatch round.
pub(crate) async fn set_budget(
    node: &Node,
    name: &str,
    tokens: Option<u64>,
) -> Result<swarm_proto::api::SwarmUsageView, SwarmError> {
    if node.read_table(|t| t.swarm(name)).is_none() {
        return Err(SwarmError::Unknown(name.to_string()));
    }
    let result = node
        .propose_client(vec![Op::Ledger(crate::state::LedgerOp::Budget {
            swarm: name.to_string(),
            tokens,
        })])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    if !matches!(result.first(), Some(OpResult::Ledger)) {
        return Err(SwarmError::Internal(format!(
            "unexpected result {result:?}"
        )));
    }
    info!(swarm = %name, ?tokens, "token budget set");
    node.poke();
    Ok(usage(node)
        .swarms
        .into_iter()
        .find(|s| s.swarm == name)
        .unwrap_or(swarm_proto::api::SwarmUsageView {
            swarm: name.to_string(),
            tokens: 0,
            budget: None,
            exhausted: false,
            agents: Vec::new(),
        }))
}

/// Tokens spent by swarm, agent and model, and the budgets (`GET /v1/usage`).
pub(crate) fn usage(node: &Node) -> swarm_proto::api::UsageReport {
    node.read_table(|t| t.ledger().report())
}

/// Every swarm's view (`GET /v1/swarms`), the default one included.
pub(crate) fn list(node: &Node) -> SwarmList {
    let names: Vec<String> =
        node.read_table(|t| t.swarms().into_iter().map(|r| r.spec.name).collect());
    SwarmList {
        swarms: names.iter().filter_map(|n| swarm_view(node, n)).collect(),
    }
}

/// Swarm `name`'s view (`GET /v1/swarms/{name}`).
pub(crate) fn get(node: &Node, name: &str) -> Result<SwarmView, SwarmError> {
    swarm_view(node, name).ok_or_else(|| SwarmError::Unknown(name.to_string()))
}

/// Delete swarm `name` (`DELETE /v1/swarms/{name}`).
pub(crate) async fn delete(node: &Node, name: &str) -> Result<(), SwarmError> {
    let result = node
        .propose_client(vec![Op::SwarmDelete {
            name: name.to_string(),
        }])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match result.first() {
        Some(OpResult::Swarm(Ok(()))) => {
            info!(swarm = %name, "swarm deleted");
            node.poke();
            Ok(())
        }
        Some(OpResult::Swarm(Err(f))) => Err(SwarmError::Fault(f.clone())),
        other => Err(SwarmError::Internal(format!("unexpected result {other:?}"))),
    }
}

/// The API view of swarm `name` (with its layout when this node leads), or `None` if no
/// such swarm exists.
pub(crate) fn swarm_view(node: &Node, name: &str) -> Option<SwarmView> {
    // Lock order: table, then dispatch.
    let table = node.table.read();
    let record = table.swarm(name)?;
    let ((queued, running), mut by_stage) = table.swarm_load(name);
    let mut d = node.lock_dispatch();
    let d = &mut *d;
    let (layout, problem) = if name == DEFAULT_SWARM_NAME {
        let members = members_of(&d.scheduler, &record.spec, None);
        (plan(&record.spec, &members, 0, None).ok(), None)
    } else {
        // Plan now if the dispatcher has not yet (e.g. just created).
        let out = d.topologies.refresh(&d.scheduler, &table, &d.sessions);
        deliver(d, out);
        match d.topologies.layout(name) {
            Some(l) => (l.plan.clone(), l.problem.clone()),
            None => (None, None),
        }
    };
    drop(table);
    let loads: BTreeMap<String, Load> = {
        d.scheduler
            .workers()
            .iter()
            .filter(|(_, w)| w.connected)
            .map(|(id, w)| {
                (
                    id.clone(),
                    Load {
                        slots: w.slots,
                        // Attempts held, queued ones included.
                        running: w.busy,
                    },
                )
            })
            .collect()
    };
    let (fan_out, max_degree, stages) = match &record.spec.topology {
        TopologySpec::Star => (None, None, Vec::new()),
        TopologySpec::Hierarchical { fan_out } => (Some(*fan_out), None, Vec::new()),
        TopologySpec::Mesh { max_degree } => (None, Some(*max_degree), Vec::new()),
        TopologySpec::Ring { stages } => {
            (None, None, stages.iter().map(|s| s.to_string()).collect())
        }
    };
    let ring_stages = stages.len();
    Some(SwarmView {
        name: record.spec.name.clone(),
        topology: record.spec.topology.kind().to_string(),
        labels: record.spec.selector.clone(),
        fan_out,
        max_degree,
        stages,
        queue_depth: record.queue_depth,
        created_at_ms: record.created_at_ms,
        tasks: SwarmTaskCounts { queued, running },
        stage_tasks: match ring_stages {
            0 => Vec::new(),
            n => {
                by_stage.resize(n, (0, 0));
                by_stage
                    .into_iter()
                    .map(|(queued, running)| SwarmTaskCounts { queued, running })
                    .collect()
            }
        },
        layout: layout.map(|p| view(&record.spec, &p, &loads)),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, TaskSpec};

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn record(req: CreateSwarm) -> SwarmRecord {
        to_record(&req).unwrap()
    }

    fn submit(t: &mut TaskTable, swarm: &str, agent: &str) {
        let spec = TaskSpec {
            agent: agent.into(),
            payload: vec![],
            priority: 0,
            timeout_ms: 1000,
            max_attempts: 1,
            idempotency_key: None,
            labels: BTreeMap::new(),
            patterns: 0,
            swarm: swarm.into(),
            stages: match t.swarm(swarm).map(|r| r.spec.topology) {
                Some(TopologySpec::Ring { stages }) => stages,
                _ => Vec::new(),
            },
            retain_ms: 60_000,
        };
        t.apply(&Command {
            ops: vec![Op::Submit {
                spec,
                now_ms: 0,
                queue_limit: 100,
            }],
        });
    }

    /// A table with one hierarchical swarm "h" over pool=x, fan-out 1.
    fn hierarchy_table() -> TaskTable {
        let mut t = TaskTable::new();
        t.apply(&Command {
            ops: vec![Op::SwarmCreate {
                record: record(CreateSwarm {
                    name: "h".into(),
                    topology: "hierarchical".into(),
                    labels: labels(&[("pool", "x")]),
                    fan_out: Some(1),
                    ..Default::default()
                }),
            }],
        });
        t
    }

    /// A session handle (the frames sent to it are dropped).
    fn session(conn_id: u64, via: Option<&str>) -> SessionHandle {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        SessionHandle {
            conn_id,
            tx,
            stop: None,
            protocol: swarm_proto::PROTOCOL_VERSION,
            cert: swarm_transport::CertName::Pool(String::new()),
            info: swarm_proto::api::WorkerView {
                id: String::new(),
                addr: String::new(),
                slots: 1,
                running: 0,
                labels: BTreeMap::new(),
                agents: vec![],
                connected_at_ms: 0,
                last_heartbeat_ms: 0,
                zero_rtt: false,
                via: via.map(String::from),
                draining: false,
                drain: None,
            },
        }
    }

    fn sessions(ids: &[(&str, u64, Option<&str>)]) -> BTreeMap<String, SessionHandle> {
        ids.iter()
            .map(|(id, conn, via)| (id.to_string(), session(*conn, *via)))
            .collect()
    }

    fn peers_told(out: &Outbox) -> Vec<&str> {
        out.iter()
            .filter(|(_, m)| matches!(m, CoordinatorMsg::Peers { .. }))
            .map(|(w, _)| w.as_str())
            .collect()
    }

    /// Workers a, b (pool=x, peer listeners), c (pool=y, peer listener), d (pool=x, none).
    fn scheduler() -> Scheduler {
        let mut s = Scheduler::new(Default::default());
        for (id, pool, peer) in [
            ("a", "x", true),
            ("b", "x", true),
            ("c", "y", true),
            ("d", "x", false),
        ] {
            s.worker_joined(
                id,
                1,
                labels(&[("pool", pool)]),
                ["echo".to_string(), "up".to_string()].into(),
                peer.then(|| format!("127.0.0.1:{}", 7000 + id.as_bytes()[0] as u16)),
                0,
            );
        }
        s
    }

    /// Mesh swarm `m` (pool=x) and ring swarm `r` (stage 0 on pool=y, stage 1 on pool=x).
    fn mesh_and_ring_table() -> TaskTable {
        let mut t = TaskTable::new();
        for req in [
            CreateSwarm {
                name: "m".into(),
                topology: "mesh".into(),
                labels: labels(&[("pool", "x")]),
                ..Default::default()
            },
            CreateSwarm {
                name: "r".into(),
                topology: "ring".into(),
                stages: vec!["up[pool=y]".into(), "echo[pool=x]".into()],
                ..Default::default()
            },
        ] {
            t.apply(&Command {
                ops: vec![Op::SwarmCreate {
                    record: record(req),
                }],
            });
        }
        t
    }

    #[test]
    fn placement_follows_each_topology() {
        let mut t = mesh_and_ring_table();
        submit(&mut t, "m", "echo");
        submit(&mut t, "r", "up");
        submit(&mut t, "default", "echo");
        let mut s = scheduler();
        let mut topo = Topologies::default();
        let all = [
            ("a", 1, None),
            ("b", 2, None),
            ("c", 3, None),
            ("d", 4, None),
        ];
        let out = topo.refresh(&s, &t, &sessions(&all));
        // Mesh members with a peer listener learn their peers: a and b.
        assert_eq!(peers_told(&out), vec!["a", "b"]);
        assert!(
            topo.refresh(&s, &t, &sessions(&all)).is_empty(),
            "nothing changed"
        );
        // A worker outside the mesh comes and goes: the members are not told again.
        s.worker_disconnected("c");
        let out = topo.refresh(&s, &t, &sessions(&all));
        assert!(peers_told(&out).is_empty(), "{out:?}");
        s.worker_joined(
            "c",
            1,
            labels(&[("pool", "y")]),
            ["echo".to_string(), "up".to_string()].into(),
            Some("127.0.0.1:7099".into()),
            0,
        );
        // A member reconnects (a new session): only it is told again.
        let reconnected = [
            ("a", 9, None),
            ("b", 2, None),
            ("c", 3, None),
            ("d", 4, None),
        ];
        let out = topo.refresh(&s, &t, &sessions(&reconnected));
        assert_eq!(peers_told(&out), vec!["a"]);
        s.worker_disconnected("d");
        let out = topo.refresh(&s, &t, &sessions(&reconnected));
        assert!(peers_told(&out).is_empty(), "{out:?}");
        let w = s.workers();
        let mesh = t.get(1).unwrap();
        assert_eq!(
            topo.place(mesh, "a", &w["a"]),
            Some(1 + DEFAULT_MESH_QUEUE_DEPTH)
        );
        assert_eq!(topo.place(mesh, "c", &w["c"]), None, "not in the selector");
        assert_eq!(topo.place(mesh, "d", &w["d"]), None, "no peer listener");
        let ring = t.get(2).unwrap();
        let takers: Vec<&str> = ["a", "b", "c", "d"]
            .into_iter()
            .filter(|id| topo.place(ring, id, &w[*id]).is_some())
            .collect();
        assert_eq!(takers, vec!["c"], "stage 0 runs only on its ring worker");
        let default = t.get(3).unwrap();
        assert!(["a", "b", "c", "d"]
            .iter()
            .all(|id| topo.place(default, id, &w[*id]) == Some(1)));
        // Moves: only between peers of the task's mesh.
        assert!(topo.may_move(&s, mesh, "a", "b"));
        assert!(!topo.may_move(&s, mesh, "a", "c"), "c is not a member");
        assert!(
            !topo.may_move(&s, ring, "c", "a"),
            "a ring task never moves"
        );
        assert!(!topo.may_move(&s, default, "a", "b"), "nor a star task");
    }

    #[test]
    fn a_draining_worker_leaves_every_layout() {
        let mut t = mesh_and_ring_table();
        submit(&mut t, "m", "echo");
        let mut s = scheduler();
        let mut topo = Topologies::default();
        let all = sessions(&[
            ("a", 1, None),
            ("b", 2, None),
            ("c", 3, None),
            ("d", 4, None),
        ]);
        topo.refresh(&s, &t, &all);
        let stage_1 = |topo: &Topologies| match &topo.layout("r").and_then(|l| l.plan.clone()) {
            Some(TopologyPlan::Ring(r)) => r.worker_for(1).cloned(),
            _ => None,
        };
        let ring_worker = stage_1(&topo).expect("ring planned");
        let mesh = t.get(1).unwrap();
        assert!(topo.place(mesh, "a", &s.workers()["a"]).is_some());

        // a drains: it leaves the mesh (its links are dropped, b's list loses it), so no
        // mesh task is placed on it; a ring stage it served moves to another member.
        assert!(s.worker_draining("a"));
        let out = topo.refresh(&s, &t, &all);
        let mut told: Vec<(&str, usize)> = out
            .iter()
            .filter_map(|(w, m)| match m {
                CoordinatorMsg::Peers { swarm, peers } if swarm == "m" => {
                    Some((w.as_str(), peers.len()))
                }
                _ => None,
            })
            .collect();
        told.sort();
        assert_eq!(told, vec![("a", 0), ("b", 0)], "{out:?}");
        assert_eq!(topo.place(mesh, "a", &s.workers()["a"]), None);
        let after = stage_1(&topo).expect("ring still planned");
        assert_ne!(after, "a", "a draining worker serves no ring stage");
        if ring_worker != "a" {
            assert_eq!(
                after, ring_worker,
                "a stage off the draining worker stays put"
            );
        }
        // Drain the ring's other candidates for stage 1 too: the swarm waits for members
        // rather than placing work on a draining one.
        s.worker_draining("b");
        s.worker_draining("d");
        topo.refresh(&s, &t, &all);
        assert!(topo.layout("r").is_some_and(|l| l.plan.is_none()));
    }

    #[test]
    fn a_hierarchy_routes_members_through_leads() {
        let t = hierarchy_table();
        let s = scheduler();
        let sessions = sessions(&[("a", 1, None), ("b", 2, None), ("c", 3, Some("a"))]);
        let mut topo = Topologies::default();
        let out = topo.refresh(&s, &t, &sessions);
        let parents: Vec<(String, Option<String>)> = out
            .into_iter()
            .filter_map(|(w, m)| match m {
                CoordinatorMsg::Parent { lead } => Some((w, lead.map(|l| l.worker_id))),
                _ => None,
            })
            .collect();
        // a and b (with peer listeners) form the hierarchy at fan-out 1: one lead, one
        // member. The member is told its lead; c, relayed but in no hierarchy, is told
        // to connect directly.
        let Some(TopologyPlan::Hierarchical(h)) = &topo.layout("h").unwrap().plan else {
            panic!("not planned");
        };
        assert_eq!(h.leads.len(), 1);
        let lead = h.leads[0].clone();
        let member = if lead == "a" { "b" } else { "a" };
        assert!(
            parents.contains(&(member.to_string(), Some(lead.clone()))),
            "{parents:?}"
        );
        assert!(parents.contains(&("c".to_string(), None)), "{parents:?}");
        assert!(
            !parents.iter().any(|(w, _)| *w == lead),
            "the lead stays direct: {parents:?}"
        );
    }

    #[test]
    fn bad_definitions_are_refused_with_their_codes() {
        let code = |req: CreateSwarm| match to_record(&req) {
            Err(SwarmError::Invalid { code, .. }) => code,
            other => panic!("{other:?}"),
        };
        let req = |topology: &str| CreateSwarm {
            name: "s".into(),
            topology: topology.into(),
            ..Default::default()
        };
        assert_eq!(code(req("torus")), "unknown_topology");
        assert_eq!(code(req("ring")), "empty_ring");
        assert_eq!(
            code(CreateSwarm {
                stages: vec!["a".into()],
                ..req("mesh")
            }),
            "option_not_applicable"
        );
        assert_eq!(
            code(CreateSwarm {
                queue_depth: Some(MAX_QUEUE_DEPTH + 1),
                ..req("star")
            }),
            "invalid_queue_depth"
        );
        assert_eq!(
            code(CreateSwarm {
                stages: vec!["a".into()],
                queue_depth: Some(2),
                ..req("ring")
            }),
            "option_not_applicable"
        );
        assert_eq!(
            to_record(&req("mesh")).unwrap().queue_depth,
            DEFAULT_MESH_QUEUE_DEPTH
        );
        // Stages: one list string (the CLI's) or one stage per element; an element never
        // continues into the next.
        let stages = |list: &[&str]| {
            to_record(&CreateSwarm {
                stages: list.iter().map(|s| s.to_string()).collect(),
                ..req("ring")
            })
        };
        let from_list = stages(&["coder,reviewer[lang=rust,tier=2],tester"]).unwrap();
        let from_items = stages(&["coder", "reviewer[lang=rust,tier=2]", "tester"]).unwrap();
        assert_eq!(from_list.spec, from_items.spec);
        match stages(&["a[x=1", "y=2]"]) {
            Err(SwarmError::Invalid { code, .. }) => assert_eq!(code, "invalid_stage"),
            other => panic!("{other:?}"),
        }
        let many: Vec<String> = (0..=MAX_STAGES).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(stages(&many), Err(SwarmError::Invalid { .. })));
    }

    #[test]
    fn a_lead_relayed_by_another_hierarchy_does_not_relay() {
        let mut t = TaskTable::new();
        for (name, label) in [("a-tree", "t1"), ("b-tree", "t2")] {
            t.apply(&Command {
                ops: vec![Op::SwarmCreate {
                    record: record(CreateSwarm {
                        name: name.into(),
                        topology: "hierarchical".into(),
                        labels: labels(&[(label, "yes")]),
                        fan_out: Some(1),
                        ..Default::default()
                    }),
                }],
            });
        }
        // Leads are the members with the most slots: a leads a-tree (a, b), b leads
        // b-tree (b, c), but b is a member in a-tree, which comes first by name.
        let mut s = Scheduler::new(Default::default());
        for (id, slots, l) in [
            ("a", 3, vec![("t1", "yes")]),
            ("b", 2, vec![("t1", "yes"), ("t2", "yes")]),
            ("c", 1, vec![("t2", "yes")]),
        ] {
            s.worker_joined(
                id,
                slots,
                labels(&l),
                Default::default(),
                Some(format!("{id}:1")),
                0,
            );
        }
        let mut topo = Topologies::default();
        let out = topo.refresh(
            &s,
            &t,
            &sessions(&[("a", 1, None), ("b", 2, None), ("c", 3, None)]),
        );
        let parents: Vec<(String, Option<String>)> = out
            .into_iter()
            .filter_map(|(w, m)| match m {
                CoordinatorMsg::Parent { lead } => Some((w, lead.map(|l| l.worker_id))),
                _ => None,
            })
            .collect();
        assert_eq!(parents, vec![("b".to_string(), Some("a".to_string()))]);
    }

    #[test]
    fn members_in_transit_keep_the_hierarchy_and_a_lost_lead_is_replaced() {
        let t = hierarchy_table();
        let mut s = scheduler();
        let mut topo = Topologies::default();
        let none = BTreeMap::new();
        topo.refresh(&s, &t, &none);
        let plan = |topo: &Topologies| match &topo.layout("h").unwrap().plan {
            Some(TopologyPlan::Hierarchical(h)) => h.clone(),
            other => panic!("{other:?}"),
        };
        let first = plan(&topo);
        let lead = first.leads[0].clone();
        let member = first.parent.keys().next().unwrap().clone();
        // The member drops its session to move behind its lead: nothing changes.
        s.worker_disconnected(&member);
        topo.refresh(&s, &t, &none);
        assert_eq!(plan(&topo), first);
        // The lead goes: the member (back, directly) becomes the lead.
        s.worker_joined(
            &member,
            1,
            labels(&[("pool", "x")]),
            Default::default(),
            Some("m:1".into()),
            0,
        );
        s.worker_disconnected(&lead);
        topo.refresh(&s, &t, &none);
        let after = plan(&topo);
        assert_eq!(after.leads, vec![member.clone()]);
        assert!(after.parent.is_empty(), "{after:?}");
    }
}
