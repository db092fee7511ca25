//! Swarm membership: which workers belong to a swarm, and what the planners know of them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::spec::{format_selector, StageSpec, SwarmSpec};
use crate::{TopologyError, WorkerId};

/// One worker as the planners see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: WorkerId,
    pub labels: BTreeMap<String, String>,
    pub agents: BTreeSet<String>,
    /// Tasks the worker runs at once.
    pub slots: u32,
    /// Tasks running now.
    pub running: u32,
    /// Tasks the worker holds, waiting for one of its slots.
    pub queued_local: u32,
}

impl Member {
    /// A member with no labels, no agents and nothing running.
    pub fn new(id: impl Into<WorkerId>, slots: u32) -> Self {
        Member {
            id: id.into(),
            labels: BTreeMap::new(),
            agents: BTreeSet::new(),
            slots,
            running: 0,
            queued_local: 0,
        }
    }

    pub fn with_label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn with_agent(mut self, agent: impl Into<String>) -> Self {
        self.agents.insert(agent.into());
        self
    }

    pub fn with_load(mut self, running: u32, queued_local: u32) -> Self {
        self.running = running;
        self.queued_local = queued_local;
        self
    }

    /// Slots not running anything.
    pub fn free_slots(&self) -> u32 {
        self.slots.saturating_sub(self.running)
    }

    /// Queued tasks that cannot start here right away: the local queue beyond the free
    /// slots.
    pub fn excess(&self) -> u32 {
        self.queued_local.saturating_sub(self.free_slots())
    }

    /// Carries every label of `selector`.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// Has the stage's agent and carries its labels.
    pub fn can_serve(&self, stage: &StageSpec) -> bool {
        self.agents.contains(&stage.agent) && self.matches(&stage.labels)
    }

    /// The member's load for display.
    pub fn load(&self) -> Load {
        Load {
            running: self.running,
            slots: self.slots,
        }
    }
}

/// Running tasks out of slots, as drawn next to a worker (`w3 [2/4]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub running: u32,
    pub slots: u32,
}

/// Loads of `members`, keyed by id, for rendering.
pub fn loads(members: &[Member]) -> BTreeMap<WorkerId, Load> {
    members.iter().map(|m| (m.id.clone(), m.load())).collect()
}

/// The members of `spec`'s swarm among `all_workers`: those carrying every selector
/// label, sorted by id, one entry per id (the first given wins). No match is an error
/// naming the selector.
pub fn membership(spec: &SwarmSpec, all_workers: &[Member]) -> Result<Vec<Member>, TopologyError> {
    let mut out: Vec<Member> = all_workers
        .iter()
        .filter(|w| w.matches(&spec.selector))
        .cloned()
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|later, earlier| later.id == earlier.id);
    if out.is_empty() {
        if spec.selector.is_empty() {
            return Err(TopologyError::NoWorkers);
        }
        return Err(TopologyError::NoMatchingWorkers {
            selector: format_selector(&spec.selector),
        });
    }
    Ok(out)
}

/// Members sorted by id with duplicate ids removed (first wins): the canonical input of
/// every planner, so that no plan depends on the order it was given its members in.
pub(crate) fn canonical(members: &[Member]) -> Vec<&Member> {
    let mut out: Vec<&Member> = members.iter().collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|later, earlier| later.id == earlier.id);
    out
}

/// Compares `a_num / a_den` with `b_num / b_den` exactly; a zero denominator is an
/// infinite ratio (a worker with no slots is as loaded as can be).
pub(crate) fn cmp_ratio(a_num: u64, a_den: u64, b_num: u64, b_den: u64) -> Ordering {
    match (a_den, b_den) {
        (0, 0) => a_num.cmp(&b_num),
        (0, _) => Ordering::Greater,
        (_, 0) => Ordering::Less,
        _ => (u128::from(a_num) * u128::from(b_den)).cmp(&(u128::from(b_num) * u128::from(a_den))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TopologySpec;

    fn spec(selector: &[(&str, &str)]) -> SwarmSpec {
        SwarmSpec {
            name: "s".into(),
            topology: TopologySpec::Star,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn membership_selects_by_labels_sorted_and_deduplicated() {
        let workers = vec![
            Member::new("w3", 2).with_label("zone", "eu"),
            Member::new("w1", 2)
                .with_label("zone", "eu")
                .with_label("gpu", "1"),
            Member::new("w2", 2).with_label("zone", "us"),
            Member::new("w1", 9).with_label("zone", "eu"),
        ];
        let m = membership(&spec(&[("zone", "eu")]), &workers).unwrap();
        assert_eq!(
            m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["w1", "w3"]
        );
        assert_eq!(m[0].slots, 2, "first entry of a duplicated id wins");
        let m = membership(&spec(&[("zone", "eu"), ("gpu", "1")]), &workers).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(membership(&spec(&[]), &workers).unwrap().len(), 3);
    }

    #[test]
    fn selector_matching_nobody_is_an_error_naming_it() {
        let workers = vec![Member::new("w1", 1).with_label("zone", "eu")];
        let err = membership(&spec(&[("zone", "ap"), ("gpu", "1")]), &workers).unwrap_err();
        assert_eq!(
            err,
            TopologyError::NoMatchingWorkers {
                selector: "gpu=1,zone=ap".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "no worker matches the selector gpu=1,zone=ap"
        );
        assert_eq!(membership(&spec(&[]), &[]), Err(TopologyError::NoWorkers));
    }

    #[test]
    fn capacity_helpers() {
        let m = Member::new("w", 4).with_load(3, 5);
        assert_eq!(m.free_slots(), 1);
        assert_eq!(m.excess(), 4);
        let over = Member::new("w", 2).with_load(5, 1);
        assert_eq!(over.free_slots(), 0);
        assert_eq!(over.excess(), 1);
        let stage = StageSpec::new("coder").with_label("lang", "rust");
        let w = Member::new("w", 1).with_agent("coder");
        assert!(!w.can_serve(&stage));
        assert!(w.clone().with_label("lang", "rust").can_serve(&stage));
        assert!(!Member::new("w", 1)
            .with_label("lang", "rust")
            .can_serve(&stage));
    }

    #[test]
    fn ratios_compare_exactly() {
        assert_eq!(cmp_ratio(1, 3, 2, 6), Ordering::Equal);
        assert_eq!(cmp_ratio(1, 2, 2, 3), Ordering::Less);
        assert_eq!(cmp_ratio(0, 0, 100, 1), Ordering::Greater);
        assert_eq!(cmp_ratio(u64::MAX, 1, u64::MAX - 1, 1), Ordering::Greater);
    }
}
