//! Leadership hand-off when a leader stops (Raft thesis §3.10, "leadership transfer"), so a
//! rolling update or a scale-down does not leave the cluster without a leader for an
//! election timeout.
//!
//! openraft 0.9 has no transfer call; the hand-off is built from what it has:
//!
//! 1. The leader stops serving as one ([`Node::is_leader`] turns false): the API answers
//!    `not_leader`, dispatch stops, new worker sessions are turned away, and worker
//!    reports are left unacknowledged for the next leader. It keeps its worker sessions
//!    until another node leads, then turns them to it (`NotLeader` naming it).
//! 2. It picks the voter whose log it knows to match furthest (`replication` in its
//!    metrics; [`pick_target`]).
//! 3. It waits, at most [`CATCH_UP_TIMEOUT`], until that voter's matching log id is its
//!    own last log entry.
//! 4. Right after an election it first waits until its own vote is older than the
//!    leader lease (openraft 0.9 refuses vote requests before that). It sends the voter
//!    [`RaftRequest::TimeoutNow`](crate::raft::network::RaftRequest)
//!    on the Raft channel (coordinator certificates only). The voter checks that it
//!    follows exactly this leadership and holds the leader's last entry, then calls
//!    `raft.trigger().elect()`: its vote request reaches the other voters with a log as
//!    long as any, so it wins at once in the usual case.
//! 5. The old leader waits, at most [`NEW_LEADER_TIMEOUT`], to see another leader.
//!
//! Each step is logged. If one fails or times out the node stops anyway, and the cluster
//! elects a leader after an election timeout, as it would have without a hand-off. A
//! single-voter cluster has nobody to hand over to.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Duration;

use openraft::{LogId, ServerState};
use tracing::{info, warn};

use crate::node::Node;
use crate::raft::network::{QuicRaftNetwork, TimeoutNowRequest};
use crate::raft::types::NodeId;

/// Longest wait for the chosen voter's log to catch up with the leader's.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the chosen voter's answer to `TimeoutNow`.
pub const TIMEOUT_NOW_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for another node to lead once the voter started its election.
pub const NEW_LEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// How a hand-off ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// This node is not the leader: there is nothing to hand over.
    NotLeader,
    /// This node is the only voter: there is nobody to hand over to.
    OnlyVoter,
    /// `leader` leads now, after `target` was told to start an election (the two differ
    /// only if another voter won that election).
    Done { target: NodeId, leader: NodeId },
    /// A step failed or timed out: the cluster elects a leader by itself.
    Failed(String),
}

/// The voter other than `me` whose log the leader knows to match furthest (`matched`,
/// from the leader's replication metrics; a voter missing there or with nothing matched
/// comes last), the lowest id among equals; `None` when there is no other voter.
pub fn pick_target(
    me: NodeId,
    voters: impl IntoIterator<Item = NodeId>,
    matched: &BTreeMap<NodeId, Option<LogId<NodeId>>>,
) -> Option<NodeId> {
    voters.into_iter().filter(|v| *v != me).max_by_key(|v| {
        let index = matched.get(v).copied().flatten().map(|l| l.index);
        (index, Reverse(*v))
    })
}

/// Hand leadership over to a caught-up voter, if this node leads (see the module docs).
/// Afterwards the node no longer serves as leader whatever the outcome: call it only
/// when stopping.
pub async fn hand_off(node: &Node, network: &QuicRaftNetwork) -> Handoff {
    let me = node.id();
    let m = node.raft().metrics().borrow().clone();
    if m.state != ServerState::Leader {
        info!(
            node = me,
            "leadership hand-off: not the leader, nothing to hand over"
        );
        return Handoff::NotLeader;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    let matched = m.replication.clone().unwrap_or_default();
    let Some(target) = pick_target(me, voters, &matched) else {
        info!(
            node = me,
            "leadership hand-off: the only voter, nobody to hand over to"
        );
        return Handoff::OnlyVoter;
    };
    node.begin_handoff();
    info!(
        node = me,
        target,
        term = m.current_term,
        last_log_index = ?m.last_log_index,
        target_matched = ?matched.get(&target).copied().flatten().map(|l| l.index),
        "leadership hand-off: stopped taking writes; waiting for the target's log to catch up"
    );
    let outcome = transfer(node, network, target).await;
    match &outcome {
        Handoff::Done { target, leader } if target == leader => {
            info!(node = me, to = leader, "leadership hand-off: done")
        }
        Handoff::Done { target, leader } => info!(
            node = me,
            target,
            to = leader,
            "leadership hand-off: done, another voter won the election"
        ),
        Handoff::Failed(why) => warn!(
            node = me,
            target, "leadership hand-off failed, the cluster elects on its own: {why}"
        ),
        Handoff::NotLeader | Handoff::OnlyVoter => {}
    }
    outcome
}

async fn transfer(node: &Node, network: &QuicRaftNetwork, target: NodeId) -> Handoff {
    let me = node.id();
    let mut metrics = node.raft().metrics();

    // The target holds every entry of the leader's log.
    let caught_up = tokio::time::timeout(
        CATCH_UP_TIMEOUT,
        metrics.wait_for(|m| {
            m.state != ServerState::Leader
                || m.replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten())
                    .map(|l| l.index)
                    == m.last_log_index
        }),
    )
    .await
    .map(|r| r.map(|m| m.clone()));
    let m = match caught_up {
        Ok(Ok(m)) => m,
        Ok(Err(_)) => return Handoff::Failed("Raft stopped".into()),
        Err(_) => {
            let m = node.raft().metrics().borrow().clone();
            return Handoff::Failed(format!(
                "node {target} did not catch up within {CATCH_UP_TIMEOUT:?} (matched {:?}, last log {:?})",
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten())
                    .map(|l| l.index),
                m.last_log_index
            ));
        }
    };
    if m.state != ServerState::Leader {
        return Handoff::Failed(format!(
            "lost leadership while waiting (now {:?}, leader {:?})",
            m.state, m.current_leader
        ));
    }
    let last_log_id = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&target).copied().flatten());
    let Some(addr) = m.membership_config.membership().get_node(&target).cloned() else {
        return Handoff::Failed(format!("node {target} has no address in the membership"));
    };
    // openraft 0.9 refuses a vote request while the voter's committed vote is younger
    // than the leader lease (`election_timeout_max`); this leader's own vote dates from
    // its election, so right after one the target's election would find no vote here
    // and fail (and this node would win the next term itself). Let it age first.
    if let Some(led) = node.leading_for() {
        let lease = Duration::from_millis(crate::raft::ELECTION_TIMEOUT_MAX_MS + 50);
        if led < lease {
            info!(node = me, wait = ?(lease - led), "leadership hand-off: waiting for this leader's vote to age past the leader lease");
            tokio::time::sleep(lease - led).await;
        }
    }
    info!(
        node = me,
        target,
        last_log_index = ?last_log_id.map(|l| l.index),
        "leadership hand-off: target caught up; sending TimeoutNow"
    );

    let req = TimeoutNowRequest {
        vote: m.vote,
        last_log_id,
    };
    if let Err(e) = network
        .timeout_now(target, &addr, req, TIMEOUT_NOW_TIMEOUT)
        .await
    {
        return Handoff::Failed(format!("TimeoutNow to node {target}: {e}"));
    }
    info!(
        node = me,
        target, "leadership hand-off: target is starting an election; waiting for a new leader"
    );

    let elected = tokio::time::timeout(
        NEW_LEADER_TIMEOUT,
        metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != me)),
    )
    .await
    .map(|r| r.map(|m| m.current_leader));
    match elected {
        Ok(Ok(leader)) => match leader {
            Some(leader) => Handoff::Done { target, leader },
            None => Handoff::Failed("no leader after the election".into()),
        },
        Ok(Err(_)) => Handoff::Failed("Raft stopped".into()),
        Err(_) => Handoff::Failed(format!(
            "no other leader within {NEW_LEADER_TIMEOUT:?} after TimeoutNow"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(1, 1), index))
    }

    #[test]
    fn the_furthest_matched_voter_is_picked_never_the_leader() {
        let matched: BTreeMap<NodeId, Option<LogId<NodeId>>> = [
            (2, log(10)),
            (3, log(12)),
            (4, log(12)),
            (5, None),
            (9, log(99)),
        ]
        .into();
        // 9 is a learner (not a voter): never picked, however far it matches.
        assert_eq!(pick_target(1, [1, 2, 3, 4, 5], &matched), Some(3));
        assert_eq!(pick_target(3, [1, 2, 3, 4, 5], &matched), Some(4));
        // A voter the leader knows nothing about comes last, but still counts.
        assert_eq!(pick_target(1, [1, 5], &matched), Some(5));
        assert_eq!(pick_target(1, [1, 6, 5], &matched), Some(5), "lowest id");
        assert_eq!(pick_target(1, [1], &matched), None, "the only voter");
        assert_eq!(pick_target(1, [], &matched), None);
    }
}
