//! Membership changes under faults, and the final comparison of the members' replicas.
//!
//! The **operator** is a client of the simulation that carries out the membership changes
//! the schedule asks for, one at a time, as an operator of a real cluster would with
//! `swarm cluster add|remove`, retrying each step until the cluster confirms it:
//!
//! * adding node `n` is what `POST /v1/cluster/nodes` does on the leader — `add_learner`
//!   (blocking until the learner has caught up), then `change_membership` to make it a
//!   voter — once the leader's log is compacted, so that the new node, empty, must catch
//!   up from a snapshot; the calls are made on the leader's Raft
//!   handle, because that endpoint answers with a cluster view whose health probe runs on
//!   tokio's blocking pool, whose timing a simulation cannot replay;
//! * removing node `n` is `DELETE /v1/cluster/nodes/{n}` through a random member's API
//!   (forwarded to the leader like any request);
//! * a step counts as done only once the leader's *committed* membership shows it.
//!
//! After the audit, every node is asked to checkpoint what it applied ([`settle`] waits
//! until every member of the leader's membership has applied the leader's whole log and
//! checkpointed it); after the run [`read_replicas`] reads each member's checkpoint from
//! its data dir and the checker compares their dumps.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use rand::rngs::StdRng;
use rand::SeedableRng;
use swarm_coordinator::raft::checkpoint::{CheckpointStore, STATE_DB_FILE};
use swarm_coordinator::raft::{NodeAddr, Raft};

use crate::checker::{MembershipChange, ReplicaState, Replicas};
use crate::scenario::{call, data_dir, lock, now, pick_api, sub_seed, Job, Request, SharedRef};

/// How long the operator waits for one step (a learner to catch up, a membership change
/// to commit) before it checks the cluster again and retries.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Retried steps recorded per change.
const MAX_NOTES: usize = 6;

/// What the operator needs to reach the cluster.
pub(crate) struct Operator {
    pub shared: SharedRef,
    /// Every coordinator host's QUIC and API addresses.
    pub quic: Vec<SocketAddr>,
    pub apis: Vec<SocketAddr>,
    /// When the operator stops retrying a change.
    pub give_up: Duration,
    pub rng: StdRng,
}

impl Operator {
    pub(crate) fn new(
        shared: SharedRef,
        quic: Vec<SocketAddr>,
        apis: Vec<SocketAddr>,
        seed: u64,
        give_up: Duration,
    ) -> Self {
        Operator {
            shared,
            quic,
            apis,
            give_up,
            rng: StdRng::seed_from_u64(sub_seed(seed, 400)),
        }
    }

    /// Carry out membership changes as the driver hands them over, until it says there
    /// will be no more.
    pub(crate) async fn run(mut self) {
        loop {
            let job = {
                let mut s = lock(&self.shared);
                if s.admin.closed && !s.admin.busy {
                    break;
                }
                s.admin.jobs.pop_front()
            };
            let Some((episode, job)) = job else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut change = MembershipChange {
                what: job.to_string(),
                started: now(),
                completed: None,
                notes: Vec::new(),
            };
            let done = self.carry_out(job, &mut change.notes).await;
            if done {
                change.completed = Some(now());
            } else {
                change.notes.push(format!("gave up at {:?}", self.give_up));
            }
            let mut s = lock(&self.shared);
            s.log.push(format!(
                "{:>8.3}s end #{episode}: {} {}",
                now().as_secs_f64(),
                change.what,
                if done { "done" } else { "NOT DONE" }
            ));
            if !done {
                s.expected_voters = None;
            }
            s.history.membership.push(change);
            s.admin.busy = false;
        }
    }

    async fn carry_out(&mut self, job: Job, notes: &mut Vec<String>) -> bool {
        match job {
            Job::Replace {
                old_host,
                old_id,
                new_host,
                new_id,
            } => {
                if !self.add(new_id, new_host, notes).await {
                    return false;
                }
                self.joined(new_host, new_id);
                if !self.remove(old_id, notes).await {
                    return false;
                }
                self.left(old_host, old_id);
                lock(&self.shared).requests.push(Request::Retire(old_host));
                true
            }
            Job::Rejoin {
                host,
                old_id,
                new_id,
            } => {
                if !self.remove(old_id, notes).await {
                    return false;
                }
                self.left(host, old_id);
                lock(&self.shared)
                    .requests
                    .push(Request::Rewire { host, new_id });
                if !self.add(new_id, host, notes).await {
                    return false;
                }
                self.joined(host, new_id);
                true
            }
        }
    }

    fn joined(&self, host: usize, id: u64) {
        let mut s = lock(&self.shared);
        s.slots[host].member = true;
        if let Some(v) = &mut s.expected_voters {
            v.insert(id);
        }
    }

    fn left(&self, host: usize, id: u64) {
        let mut s = lock(&self.shared);
        s.slots[host].member = false;
        if let Some(v) = &mut s.expected_voters {
            v.remove(&id);
        }
    }

    fn note(notes: &mut Vec<String>, what: String) {
        if notes.len() < MAX_NOTES {
            notes.push(format!("{:.3}s {what}", now().as_secs_f64()));
        }
    }

    /// Make node `id` on `host` a voter: a learner first, caught up, then promoted.
    async fn add(&mut self, id: u64, host: usize, notes: &mut Vec<String>) -> bool {
        let addr = NodeAddr {
            raft_addr: self.quic[host].to_string(),
            api_addr: self.apis[host].to_string(),
        };
        loop {
            if now() >= self.give_up {
                return false;
            }
            let Some((leader, raft)) = leader_raft(&self.shared) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some((voters, nodes)) = committed_membership(&raft) else {
                // A change is in flight or not yet applied: look again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if voters.contains(&id) {
                return true;
            }
            if !nodes.contains(&id) && raft.metrics().borrow().purged.is_none() {
                // Add only once the leader's log is compacted: the new node, empty, must
                // then catch up from a snapshot.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let step = if !nodes.contains(&id) {
                // Blocks until the learner has caught up with the leader's log.
                match tokio::time::timeout(STEP_TIMEOUT, raft.add_learner(id, addr.clone(), true))
                    .await
                {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => format!("add n{id} as a learner via n{leader}: {e}"),
                    Err(_) => {
                        format!("n{id} not caught up within {STEP_TIMEOUT:?} (via n{leader})")
                    }
                }
            } else {
                let mut promoted = voters.clone();
                promoted.insert(id);
                match tokio::time::timeout(STEP_TIMEOUT, raft.change_membership(promoted, false))
                    .await
                {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => format!("promote n{id} via n{leader}: {e}"),
                    Err(_) => format!("promoting n{id} took over {STEP_TIMEOUT:?} (via n{leader})"),
                }
            };
            Self::note(notes, step);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Remove node `id` from the cluster through the API.
    async fn remove(&mut self, id: u64, notes: &mut Vec<String>) -> bool {
        loop {
            if now() >= self.give_up {
                return false;
            }
            if let Some((_, raft)) = leader_raft(&self.shared) {
                if let Some((_, nodes)) = committed_membership(&raft) {
                    if !nodes.contains(&id) {
                        return true;
                    }
                }
            }
            let api = pick_api(&self.shared, &self.apis, &mut self.rng);
            let path = format!("/v1/cluster/nodes/{id}");
            match call(api, Method::DELETE, &path, None).await {
                // Done, or done by an earlier attempt whose answer was lost: confirmed
                // above on the next round.
                Ok((st, _)) if st.is_success() || st == StatusCode::NOT_FOUND => {}
                Ok((st, v)) => Self::note(
                    notes,
                    format!(
                        "remove n{id} via {api}: {st} {}",
                        v["error"]["code"].as_str().unwrap_or("")
                    ),
                ),
                Err(e) => Self::note(notes, format!("remove n{id} via {api}: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The Raft handle of the node that most recently claimed leadership, with its id.
fn leader_raft(shared: &SharedRef) -> Option<(u64, Raft)> {
    let s = lock(shared);
    let (host, _) = s
        .roles
        .iter()
        .filter(|(_, (leader, _))| *leader)
        .max_by_key(|(_, (_, term))| *term)?;
    let id = s.slots[*host].node?;
    Some((id, s.rafts.get(&id)?.clone()))
}

/// The membership `raft` (a leader) has applied, if it is not a joint one: its voters and
/// all its nodes.
fn committed_membership(raft: &Raft) -> Option<(BTreeSet<u64>, BTreeSet<u64>)> {
    let m = raft.metrics().borrow().clone();
    if m.state != openraft::ServerState::Leader {
        return None;
    }
    let stored = &m.membership_config;
    let applied = stored.log_id().map(|l| l.index) <= m.last_applied.map(|l| l.index);
    let membership = stored.membership();
    if !applied || membership.get_joint_config().len() != 1 {
        return None;
    }
    Some((
        membership.voter_ids().collect(),
        membership.nodes().map(|(id, _)| *id).collect(),
    ))
}

/// What [`settle`] found: every member at the leader's last log index, checkpointed.
#[derive(Debug, Clone)]
pub(crate) struct Settled {
    pub index: u64,
    pub voters: Vec<u64>,
    /// (node id, host) of every member, voters and learners.
    pub members: Vec<(u64, usize)>,
}

/// Whether the cluster has settled, from the nodes' reports (see
/// `scenario::NodeReport`): `Err` says what is still missing.
pub(crate) fn settled(shared: &SharedRef) -> Result<Settled, String> {
    let s = lock(shared);
    let (leader, l) = s
        .reports
        .iter()
        .filter(|(_, r)| r.leader)
        .max_by_key(|(_, r)| r.term)
        .ok_or("no leader reports")?;
    let index = l.last_log.ok_or("the leader has an empty log")?;
    let members: BTreeSet<u64> = l.voters.iter().chain(&l.learners).copied().collect();
    let mut out = Vec::new();
    for m in &members {
        let r = s
            .reports
            .get(m)
            .ok_or_else(|| format!("member n{m} reports nothing (leader n{leader})"))?;
        if r.applied != Some(index) || r.snapshot != Some(index) {
            return Err(format!(
                "n{m} applied {:?}, checkpointed {:?}, the leader n{leader}'s log ends at {index}",
                r.applied, r.snapshot
            ));
        }
        out.push((*m, r.host));
    }
    Ok(Settled {
        index,
        voters: l.voters.iter().copied().collect(),
        members: out,
    })
}

/// Read every settled member's checkpoint from its data dir (after the run, when no node
/// holds it open).
pub(crate) fn read_replicas(
    scratch: &Path,
    settled: &Settled,
    expected_voters: Option<Vec<u64>>,
) -> Replicas {
    let nodes = settled
        .members
        .iter()
        .map(|(node, host)| {
            let path = data_dir(scratch, *host, *node)
                .join("raft")
                .join(STATE_DB_FILE);
            let mut r = ReplicaState {
                node: *node,
                host: format!("c{}", host + 1),
                checkpoint_index: None,
                dump_bytes: 0,
                dump_hash: 0,
                finished_tasks: 0,
                last_task_id: 0,
                error: None,
            };
            if let Err(e) = read_checkpoint(&path, &mut r) {
                r.error = Some(format!("{}: {e:#}", path.display()));
            }
            r
        })
        .collect();
    Replicas::Settled {
        index: settled.index,
        voters: settled.voters.clone(),
        expected_voters,
        nodes,
    }
}

fn read_checkpoint(path: &Path, r: &mut ReplicaState) -> anyhow::Result<()> {
    anyhow::ensure!(path.exists(), "no checkpoint store");
    let store = CheckpointStore::open(path)?;
    let reader = store.reader()?;
    let (applied, _, meta) = reader.header_parts()?;
    r.checkpoint_index = applied.map(|l| l.index);
    r.finished_tasks = meta.finished.values().sum();
    r.last_task_id = meta.next_id;
    let mut dump = Vec::new();
    r.dump_bytes = reader.write_dump(&mut dump)?;
    let mut h = std::hash::DefaultHasher::new();
    dump.hash(&mut h);
    r.dump_hash = h.finish();
    Ok(())
}
