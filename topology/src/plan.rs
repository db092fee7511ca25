//! One entry point over the four planners.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::hierarchy::{coordinator_links, plan_hierarchy, route_to, Hierarchy, Route};
use crate::member::canonical;
use crate::mesh::{plan_mesh, Mesh};
use crate::ring::{plan_ring, repair_ring, Ring};
use crate::spec::{SwarmSpec, TopologyKind, TopologySpec};
use crate::{Member, TopologyError, WorkerId};

/// A swarm's current layout over its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopologyPlan {
    /// The coordinator connects to every member.
    Star {
        workers: Vec<WorkerId>,
    },
    Hierarchical(Hierarchy),
    Mesh(Mesh),
    Ring(Ring),
}

/// Plans `spec`'s topology over `members` (as returned by
/// [`membership`](crate::membership)). Given the `previous` plan of the same topology,
/// re-plans stably: a hierarchy keeps its leads and parents, a mesh its links, a ring
/// its surviving stage workers. `seed` only matters for a mesh.
///
/// A ring needs members (error `NoWorkers`) and a capable worker for every stage
/// (`EmptyStage`); the other topologies accept an empty member list and plan an empty
/// layout.
pub fn plan(
    spec: &SwarmSpec,
    members: &[Member],
    seed: u64,
    previous: Option<&TopologyPlan>,
) -> Result<TopologyPlan, TopologyError> {
    spec.topology.validate()?;
    Ok(match (&spec.topology, previous) {
        (TopologySpec::Star, _) => TopologyPlan::Star {
            workers: canonical(members)
                .into_iter()
                .map(|m| m.id.clone())
                .collect(),
        },
        (TopologySpec::Hierarchical { fan_out }, prev) => {
            let prev = match prev {
                Some(TopologyPlan::Hierarchical(h)) => Some(h),
                _ => None,
            };
            TopologyPlan::Hierarchical(plan_hierarchy(members, *fan_out, prev))
        }
        (TopologySpec::Mesh { max_degree }, prev) => {
            let prev = match prev {
                Some(TopologyPlan::Mesh(m)) => Some(m),
                _ => None,
            };
            TopologyPlan::Mesh(plan_mesh(members, *max_degree, seed, prev)?)
        }
        (TopologySpec::Ring { stages }, Some(TopologyPlan::Ring(prev))) => {
            TopologyPlan::Ring(repair_ring(prev, members, stages)?)
        }
        (TopologySpec::Ring { stages }, _) => TopologyPlan::Ring(plan_ring(members, stages)?),
    })
}

impl TopologyPlan {
    pub fn kind(&self) -> TopologyKind {
        match self {
            TopologyPlan::Star { .. } => TopologyKind::Star,
            TopologyPlan::Hierarchical(_) => TopologyKind::Hierarchical,
            TopologyPlan::Mesh(_) => TopologyKind::Mesh,
            TopologyPlan::Ring(_) => TopologyKind::Ring,
        }
    }

    /// Every worker in the plan, sorted by id.
    pub fn members(&self) -> BTreeSet<WorkerId> {
        match self {
            TopologyPlan::Star { workers } => workers.iter().cloned().collect(),
            TopologyPlan::Hierarchical(h) => h.members().cloned().collect(),
            TopologyPlan::Mesh(m) => m.peers.keys().cloned().collect(),
            TopologyPlan::Ring(r) => r.workers().into_iter().cloned().collect(),
        }
    }

    /// The workers the coordinator connects to: the leads of a hierarchy, every member
    /// otherwise.
    pub fn coordinator_links(&self) -> BTreeSet<WorkerId> {
        match self {
            TopologyPlan::Hierarchical(h) => coordinator_links(h),
            other => other.members(),
        }
    }

    /// How the coordinator reaches `worker`: through a lead in a hierarchy, directly
    /// otherwise. `None` if the worker is not in the plan.
    pub fn route_to(&self, worker: &str) -> Option<Route> {
        match self {
            TopologyPlan::Hierarchical(h) => route_to(h, worker),
            other => other.members().contains(worker).then_some(Route::Direct),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::StageSpec;
    use std::collections::BTreeMap;

    fn spec(topology: TopologySpec) -> SwarmSpec {
        SwarmSpec {
            name: "s".into(),
            topology,
            selector: BTreeMap::new(),
        }
    }

    fn workers(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member::new(format!("w{i:02}"), 2).with_agent("a"))
            .collect()
    }

    #[test]
    fn star_links_everyone_directly() {
        let p = plan(&spec(TopologySpec::Star), &workers(3), 0, None).unwrap();
        assert_eq!(p.kind(), TopologyKind::Star);
        assert_eq!(p.coordinator_links().len(), 3);
        assert_eq!(p.route_to("w01"), Some(Route::Direct));
        assert_eq!(p.route_to("zz"), None);
    }

    #[test]
    fn hierarchical_links_only_leads_and_replans_stably() {
        let s = spec(TopologySpec::Hierarchical { fan_out: 4 });
        let ms = workers(20);
        let p = plan(&s, &ms, 0, None).unwrap();
        assert_eq!(p.coordinator_links().len(), 4);
        assert_eq!(p.members().len(), 20);
        let TopologyPlan::Hierarchical(h) = &p else {
            panic!("wrong plan kind")
        };
        let child = h.parent.keys().next().unwrap();
        assert_eq!(
            p.route_to(child),
            Some(Route::ViaLead(h.parent[child].clone()))
        );
        let lost = &h.leads[0];
        let rest: Vec<Member> = ms.iter().filter(|m| &m.id != lost).cloned().collect();
        let p2 = plan(&s, &rest, 0, Some(&p)).unwrap();
        let TopologyPlan::Hierarchical(h2) = &p2 else {
            panic!("wrong plan kind")
        };
        assert_eq!(h2.leads[..3], h.leads[1..]);
    }

    #[test]
    fn ring_replans_by_repair_and_mesh_uses_the_seed() {
        let s = spec(TopologySpec::Ring {
            stages: vec![StageSpec::new("a"), StageSpec::new("a")],
        });
        let ms = workers(4);
        let p = plan(&s, &ms, 0, None).unwrap();
        let TopologyPlan::Ring(r) = &p else {
            panic!("wrong plan kind")
        };
        let keep = r.worker_for(1).unwrap().clone();
        let rest: Vec<Member> = ms
            .iter()
            .filter(|m| &m.id != r.worker_for(0).unwrap())
            .cloned()
            .collect();
        let TopologyPlan::Ring(r2) = plan(&s, &rest, 0, Some(&p)).unwrap() else {
            panic!("wrong plan kind")
        };
        assert_eq!(r2.worker_for(1), Some(&keep));
        assert_eq!(plan(&s, &[], 0, None), Err(TopologyError::NoWorkers));

        let m = spec(TopologySpec::Mesh { max_degree: 3 });
        let ms = workers(30);
        assert_eq!(
            plan(&m, &ms, 5, None).unwrap(),
            plan(&m, &ms, 5, None).unwrap()
        );
        assert_ne!(
            plan(&m, &ms, 5, None).unwrap(),
            plan(&m, &ms, 6, None).unwrap()
        );
        assert_eq!(
            plan(&m, &ms, 5, None).unwrap().coordinator_links().len(),
            30
        );
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let s = spec(TopologySpec::Hierarchical { fan_out: 0 });
        assert_eq!(
            plan(&s, &workers(2), 0, None),
            Err(TopologyError::InvalidFanOut { fan_out: 0 })
        );
    }
}
