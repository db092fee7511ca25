//! Named limits through the API: set, list and delete them (`/v1/limits*`). The rules
//! are [`crate::state::limits`]'; the leader's dispatcher applies them
//! ([`crate::admission`]).

use std::collections::BTreeMap;

use swarm_proto::api::{LimitList, LimitView, SetLimit};
use tracing::info;

use crate::commit::CommitError;
use crate::node::Node;
use crate::state::limits::check_name;
use crate::state::{Lane, LimitDef, Limits, LimitsFault, LimitsOp, Op, OpResult, Rate};

/// Why a limits request failed.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("{0}")]
    Invalid(String),
    #[error("no limit named {0:?}")]
    Unknown(String),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("{0}")]
    Internal(String),
}

impl From<LimitsFault> for LimitError {
    fn from(f: LimitsFault) -> Self {
        match f {
            LimitsFault::Invalid(m) => LimitError::Invalid(m),
            LimitsFault::NotFound(n) => LimitError::Unknown(n),
        }
    }
}

/// The definition a `PUT` body asks for.
pub fn to_def(req: &SetLimit) -> Result<LimitDef, LimitError> {
    if req.burst.is_some() && req.rate.is_none() {
        return Err(LimitError::Invalid("`burst` goes with a `rate`".into()));
    }
    let rate = req
        .rate
        .as_deref()
        .map(|r| Rate::parse(r, req.burst.unwrap_or(1)))
        .transpose()
        .map_err(LimitError::Invalid)?;
    Ok(LimitDef {
        concurrency: req.concurrency,
        rate,
    })
}

async fn propose(node: &Node, op: LimitsOp) -> Result<(), LimitError> {
    let results = node
        .propose_client(vec![Op::Limits(op)])
        .await
        .map_err(|e| CommitError::from_propose(node, e))?;
    match results.into_iter().next() {
        Some(OpResult::Limits(r)) => Ok(r?),
        Some(OpResult::Restoring) => Err(CommitError::Restoring.into()),
        other => Err(LimitError::Internal(format!(
            "unexpected limits result {other:?}"
        ))),
    }
}

/// Create or replace limit `name`.
pub(crate) async fn set(node: &Node, name: &str, req: SetLimit) -> Result<LimitView, LimitError> {
    check_name("limit name", name).map_err(LimitError::Invalid)?;
    let def = to_def(&req)?;
    propose(
        node,
        LimitsOp::Set {
            name: name.to_string(),
            def,
        },
    )
    .await?;
    info!(limit = %name, ?def, "limit set");
    get(node, name)
}

/// Remove limit `name`: tasks naming it run unlimited from now on.
pub(crate) async fn delete(node: &Node, name: &str) -> Result<(), LimitError> {
    propose(
        node,
        LimitsOp::Delete {
            name: name.to_string(),
        },
    )
    .await?;
    info!(limit = %name, "limit deleted");
    Ok(())
}

/// Every limit, by name, with what runs and waits under it.
pub(crate) fn list(node: &Node) -> LimitList {
    let (limits, queued) = node.read_table(|t| {
        let mut queued: BTreeMap<Lane, u64> = BTreeMap::new();
        for (_, lanes) in t.run_queue().levels() {
            for (lane, ids) in lanes {
                if lane.key.is_some() || lane.rate_limit.is_some() {
                    *queued.entry(lane.clone()).or_default() += ids.len() as u64;
                }
            }
        }
        (t.limits().clone(), queued)
    });
    let running: Vec<(String, u32)> = {
        let d = node.lock_dispatch();
        d.scheduler
            .admission()
            .running_keys()
            .map(|(k, n)| (k.to_string(), n))
            .collect()
    };
    LimitList {
        limits: limits
            .by_name
            .iter()
            .map(|(name, def)| view(&limits, name, def, &running, &queued))
            .collect(),
    }
}

/// One limit.
pub(crate) fn get(node: &Node, name: &str) -> Result<LimitView, LimitError> {
    list(node)
        .limits
        .into_iter()
        .find(|l| l.name == name)
        .ok_or_else(|| LimitError::Unknown(name.to_string()))
}

/// Whether key `key` is governed by limit `name`'s concurrency.
fn governs(limits: &Limits, name: &str, key: &str) -> bool {
    let own = limits
        .by_name
        .get(key)
        .and_then(|d| d.concurrency)
        .is_some();
    key == name || (!own && key.split_once(':').is_some_and(|(class, _)| class == name))
}

fn view(
    limits: &Limits,
    name: &str,
    def: &LimitDef,
    running: &[(String, u32)],
    queued: &BTreeMap<Lane, u64>,
) -> LimitView {
    let by_key = def.concurrency.is_some();
    LimitView {
        name: name.to_string(),
        concurrency: def.concurrency,
        rate: def.rate.map(|r| r.to_string()),
        burst: def.rate.map(|r| r.burst),
        running: running
            .iter()
            .filter(|(k, _)| by_key && governs(limits, name, k))
            .map(|(k, n)| (k.clone(), *n))
            .collect(),
        queued: queued
            .iter()
            .filter(|(lane, _)| {
                (by_key
                    && lane
                        .key
                        .as_deref()
                        .is_some_and(|k| governs(limits, name, k)))
                    || (def.rate.is_some() && lane.rate_limit.as_deref() == Some(name))
            })
            .map(|(_, n)| n)
            .sum(),
    }
}
