//! What every feature shares when it changes the replicated state or reads it
//! linearizably: [`CommitError`], why a change was not committed (or a read could not be
//! confirmed), and [`linearizable`], the read barrier.
//!
//! The feature modules ([`crate::tasks`], [`crate::memory`], [`crate::swarms`],
//! [`crate::cluster`], [`crate::backup`]) wrap it in their own errors; `http/` maps it to
//! status codes.

use crate::node::Node;
use crate::proposer::ProposeError;

/// Why a change was not committed, or a linearizable read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// This node is not the leader; `leader_api` is the leader's API address, if known.
    #[error("this coordinator is not the leader")]
    NotLeader { leader_api: Option<String> },
    /// Nothing can be committed (or confirmed) now: Raft stopped or failed, too much is
    /// waiting, or the commit timed out. The message says which; clients retry.
    #[error("{0}")]
    Unavailable(String),
    /// The ops take more than one Raft entry holds.
    #[error("{0}")]
    TooLarge(String),
    /// A restore is in progress: the cluster takes no other change until it ends.
    #[error("a restore is in progress; the cluster takes no other change until it ends")]
    Restoring,
}

impl CommitError {
    /// A proposal's failure, naming the leader this node knows when the proposer did not.
    pub(crate) fn from_propose(node: &Node, e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { leader } => CommitError::NotLeader {
                leader_api: leader.or_else(|| node.leader()).map(|(_, n)| n.api_addr),
            },
            ProposeError::Raft(m) => CommitError::Unavailable(format!("could not commit: {m}")),
            e @ (ProposeError::Busy(_) | ProposeError::Timeout(_)) => {
                CommitError::Unavailable(e.to_string())
            }
            e @ ProposeError::TooLarge { .. } => CommitError::TooLarge(e.to_string()),
        }
    }
}

/// Make the next read of the local table linearizable: confirm leadership with a quorum
/// and wait until everything committed before this call is applied here.
pub(crate) async fn linearizable(node: &Node) -> Result<(), CommitError> {
    match node.raft().ensure_linearizable().await {
        Ok(_) => Ok(()),
        Err(openraft::error::RaftError::APIError(
            openraft::error::CheckIsLeaderError::ForwardToLeader(f),
        )) => Err(CommitError::NotLeader {
            leader_api: f
                .leader_node
                .map(|n| n.api_addr)
                .or_else(|| node.leader().map(|(_, n)| n.api_addr)),
        }),
        Err(e) => Err(CommitError::Unavailable(format!(
            "cannot confirm leadership for a linearizable read: {e}"
        ))),
    }
}
