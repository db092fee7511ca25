//! What `swarm status` draws and `GET /v1/swarms/{name}` returns. [`TopologyView`] is a
//! JSON document (it is never binary-encoded or stored); [`TopologyView::render_text`]
//! draws it, so the CLI can draw what it fetched over HTTP.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::hierarchy::children_of;
use crate::plan::TopologyPlan;
use crate::spec::{format_selector, SwarmSpec, TopologySpec};
use crate::{Load, WorkerId};

/// A swarm's topology with per-worker load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyView {
    pub name: String,
    pub selector: BTreeMap<String, String>,
    /// Every member, sorted by id.
    pub workers: Vec<WorkerView>,
    /// The workers the coordinator connects to directly, sorted by id.
    pub coordinator_links: Vec<WorkerId>,
    pub layout: LayoutView,
}

/// One member and its load (`None` when unknown, e.g. not connected right now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: WorkerId,
    pub load: Option<Load>,
}

/// The shape of the topology. JSON: an object whose `topology` field names the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "topology", rename_all = "snake_case")]
pub enum LayoutView {
    Star,
    Hierarchical {
        fan_out: u32,
        leads: Vec<LeadView>,
    },
    Mesh {
        max_degree: u32,
        links: usize,
        connected: bool,
        peers: Vec<PeerView>,
    },
    Ring {
        stages: Vec<RingStageView>,
    },
}

/// A lead and the members it relays for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadView {
    pub id: WorkerId,
    pub children: Vec<WorkerId>,
}

/// A mesh member and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub id: WorkerId,
    pub degree: usize,
    pub peers: Vec<WorkerId>,
}

/// A ring stage and the worker serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStageView {
    pub stage: usize,
    pub agent: String,
    pub labels: BTreeMap<String, String>,
    pub worker: WorkerId,
}

/// Describes `plan` (of the swarm `spec`) with the given loads. The plan decides the
/// shape; the spec supplies the name, the selector and the ring's stage names.
pub fn view(
    spec: &SwarmSpec,
    plan: &TopologyPlan,
    loads: &BTreeMap<WorkerId, Load>,
) -> TopologyView {
    let workers = plan
        .members()
        .into_iter()
        .map(|id| WorkerView {
            load: loads.get(&id).copied(),
            id,
        })
        .collect();
    let layout = match plan {
        TopologyPlan::Star { .. } => LayoutView::Star,
        TopologyPlan::Hierarchical(h) => LayoutView::Hierarchical {
            fan_out: h.fan_out,
            leads: h
                .leads
                .iter()
                .map(|l| LeadView {
                    id: l.clone(),
                    children: children_of(h, l),
                })
                .collect(),
        },
        TopologyPlan::Mesh(m) => LayoutView::Mesh {
            max_degree: m.max_degree,
            links: m.links().len(),
            connected: m.is_connected(),
            peers: m
                .peers
                .iter()
                .map(|(id, ps)| PeerView {
                    id: id.clone(),
                    degree: ps.len(),
                    peers: ps.iter().cloned().collect(),
                })
                .collect(),
        },
        TopologyPlan::Ring(r) => {
            let specs = match &spec.topology {
                TopologySpec::Ring { stages } => stages.as_slice(),
                _ => &[],
            };
            LayoutView::Ring {
                stages: r
                    .order
                    .iter()
                    .map(|a| {
                        let s = specs.get(a.stage);
                        RingStageView {
                            stage: a.stage,
                            agent: s
                                .map_or_else(|| format!("stage{}", a.stage), |s| s.agent.clone()),
                            labels: s.map(|s| s.labels.clone()).unwrap_or_default(),
                            worker: a.worker.clone(),
                        }
                    })
                    .collect(),
            }
        }
    };
    TopologyView {
        name: spec.name.clone(),
        selector: spec.selector.clone(),
        workers,
        coordinator_links: plan.coordinator_links().into_iter().collect(),
        layout,
    }
}

/// Draws `plan` for a terminal; see [`TopologyView::render_text`].
pub fn render_text(
    spec: &SwarmSpec,
    plan: &TopologyPlan,
    loads: &BTreeMap<WorkerId, Load>,
) -> String {
    view(spec, plan, loads).render_text()
}

impl TopologyView {
    /// The topology name (`star`, `hierarchical`, `mesh`, `ring`).
    pub fn topology(&self) -> &'static str {
        match self.layout {
            LayoutView::Star => "star",
            LayoutView::Hierarchical { .. } => "hierarchical",
            LayoutView::Mesh { .. } => "mesh",
            LayoutView::Ring { .. } => "ring",
        }
    }

    /// A header line, then a star or hierarchy as a tree under `coordinator`, a ring as
    /// its stage cycle (`coder(w1 [0/2]) → reviewer(w2 [1/2]) → ↺`), a mesh as one line
    /// per member with its degree and peers. Loads show as `[running/slots]`, `[?]`
    /// when unknown.
    pub fn render_text(&self) -> String {
        let loads: BTreeMap<&str, Option<Load>> = self
            .workers
            .iter()
            .map(|w| (w.id.as_str(), w.load))
            .collect();
        let label = |id: &str| -> String {
            match loads.get(id).copied().flatten() {
                Some(l) => format!("{id} [{}/{}]", l.running, l.slots),
                None => format!("{id} [?]"),
            }
        };
        let mut out = String::new();
        let shape = match &self.layout {
            LayoutView::Star => "star".to_string(),
            LayoutView::Hierarchical { fan_out, .. } => format!("hierarchical (fan-out {fan_out})"),
            LayoutView::Mesh { max_degree, .. } => format!("mesh (max degree {max_degree})"),
            LayoutView::Ring { stages } => format!("ring ({} stages)", stages.len()),
        };
        let _ = writeln!(
            out,
            "swarm {}: {shape}, selector {}, {} workers, {} coordinator links",
            self.name,
            format_selector(&self.selector),
            self.workers.len(),
            self.coordinator_links.len()
        );
        match &self.layout {
            LayoutView::Star => {
                out.push_str("coordinator\n");
                let ids: Vec<&str> = self.workers.iter().map(|w| w.id.as_str()).collect();
                for (i, id) in ids.iter().enumerate() {
                    let last = i + 1 == ids.len();
                    let _ = writeln!(out, "{}{}", if last { "└─ " } else { "├─ " }, label(id));
                }
            }
            LayoutView::Hierarchical { leads, .. } => {
                out.push_str("coordinator\n");
                for (i, lead) in leads.iter().enumerate() {
                    let last = i + 1 == leads.len();
                    let _ = writeln!(
                        out,
                        "{}{} lead",
                        if last { "└─ " } else { "├─ " },
                        label(&lead.id)
                    );
                    let indent = if last { "   " } else { "│  " };
                    for (j, kid) in lead.children.iter().enumerate() {
                        let last_kid = j + 1 == lead.children.len();
                        let _ = writeln!(
                            out,
                            "{indent}{}{}",
                            if last_kid { "└─ " } else { "├─ " },
                            label(kid)
                        );
                    }
                }
            }
            LayoutView::Mesh {
                links,
                connected,
                peers,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "{links} peer links, {}",
                    if *connected {
                        "connected"
                    } else {
                        "NOT connected"
                    }
                );
                let labels: Vec<String> = peers.iter().map(|p| label(&p.id)).collect();
                let width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
                for (p, l) in peers.iter().zip(&labels) {
                    let pad = width - l.chars().count();
                    let _ = writeln!(
                        out,
                        "{l}{:pad$}  degree {}: {}",
                        "",
                        p.degree,
                        p.peers.join(" ")
                    );
                }
            }
            LayoutView::Ring { stages } => {
                let mut line: Vec<String> = stages
                    .iter()
                    .map(|s| format!("{}({})", s.agent, label(&s.worker)))
                    .collect();
                line.push("↺".to_string());
                let _ = writeln!(out, "{}", line.join(" → "));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hierarchy::Hierarchy;
    use crate::mesh::Mesh;
    use crate::ring::{Ring, StageAssignment};
    use crate::spec::StageSpec;
    use std::collections::BTreeSet;

    fn spec(name: &str, topology: TopologySpec) -> SwarmSpec {
        SwarmSpec {
            name: name.into(),
            topology,
            selector: BTreeMap::new(),
        }
    }

    fn loads(items: &[(&str, u32, u32)]) -> BTreeMap<WorkerId, Load> {
        items
            .iter()
            .map(|(id, running, slots)| {
                (
                    id.to_string(),
                    Load {
                        running: *running,
                        slots: *slots,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn hierarchy_draws_as_a_tree() {
        let h = Hierarchy {
            fan_out: 2,
            leads: vec!["w1".into(), "w2".into()],
            parent: [("w3", "w1"), ("w4", "w1"), ("w5", "w2")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        let mut s = spec("build", TopologySpec::Hierarchical { fan_out: 2 });
        s.selector.insert("zone".into(), "eu".into());
        let text = render_text(
            &s,
            &TopologyPlan::Hierarchical(h),
            &loads(&[("w1", 1, 4), ("w2", 0, 4), ("w3", 2, 4), ("w4", 4, 4)]),
        );
        assert_eq!(
            text,
            "swarm build: hierarchical (fan-out 2), selector zone=eu, 5 workers, 2 coordinator links\n\
             coordinator\n\
             ├─ w1 [1/4] lead\n\
             │  ├─ w3 [2/4]\n\
             │  └─ w4 [4/4]\n\
             └─ w2 [0/4] lead\n\
             \u{20}  └─ w5 [?]\n"
        );
    }

    #[test]
    fn ring_draws_as_a_cycle() {
        let s = spec(
            "review",
            TopologySpec::Ring {
                stages: vec![
                    StageSpec::new("coder"),
                    StageSpec::new("reviewer"),
                    StageSpec::new("tester"),
                ],
            },
        );
        let ring = Ring {
            order: ["w1", "w2", "w3"]
                .iter()
                .enumerate()
                .map(|(stage, w)| StageAssignment {
                    stage,
                    worker: w.to_string(),
                })
                .collect(),
        };
        let text = render_text(
            &s,
            &TopologyPlan::Ring(ring),
            &loads(&[("w1", 0, 2), ("w2", 1, 2), ("w3", 0, 2)]),
        );
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "coder(w1 [0/2]) → reviewer(w2 [1/2]) → tester(w3 [0/2]) → ↺"
        );
        assert!(
            text.starts_with("swarm review: ring (3 stages), selector (all workers), 3 workers")
        );
    }

    #[test]
    fn mesh_draws_degrees_and_star_draws_a_flat_tree() {
        let peers: BTreeMap<WorkerId, BTreeSet<WorkerId>> =
            [("a", vec!["b", "c"]), ("b", vec!["a"]), ("c", vec!["a"])]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
                .collect();
        let mesh = Mesh {
            max_degree: 2,
            peers,
        };
        let text = render_text(
            &spec("pool", TopologySpec::Mesh { max_degree: 2 }),
            &TopologyPlan::Mesh(mesh),
            &loads(&[("a", 10, 12), ("b", 0, 1)]),
        );
        assert_eq!(
            text.lines().skip(1).collect::<Vec<_>>(),
            [
                "2 peer links, connected",
                "a [10/12]  degree 2: b c",
                "b [0/1]    degree 1: a",
                "c [?]      degree 1: a",
            ]
        );
        let star = render_text(
            &spec("default", TopologySpec::Star),
            &TopologyPlan::Star {
                workers: vec!["a".into(), "b".into()],
            },
            &loads(&[("a", 1, 2), ("b", 0, 1)]),
        );
        assert_eq!(
            star.lines().skip(1).collect::<Vec<_>>(),
            ["coordinator", "├─ a [1/2]", "└─ b [0/1]"]
        );
    }

    #[test]
    fn view_is_json_with_a_topology_tag() {
        let s = spec("pool", TopologySpec::Hierarchical { fan_out: 1 });
        let h = Hierarchy {
            fan_out: 1,
            leads: vec!["a".into()],
            parent: [("b".to_string(), "a".to_string())].into_iter().collect(),
        };
        let v = view(&s, &TopologyPlan::Hierarchical(h), &loads(&[("a", 1, 2)]));
        assert_eq!(v.topology(), "hierarchical");
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["layout"]["topology"], "hierarchical");
        assert_eq!(json["layout"]["leads"][0]["children"][0], "b");
        assert_eq!(json["coordinator_links"], serde_json::json!(["a"]));
        assert_eq!(json["workers"][0]["load"]["running"], 1);
        assert!(json["workers"][1]["load"].is_null());
        let back: TopologyView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
        assert_eq!(
            back.render_text(),
            render_text(
                &s,
                &TopologyPlan::Hierarchical(Hierarchy {
                    fan_out: 1,
                    leads: vec!["a".into()],
                    parent: [("b".to_string(), "a".to_string())].into_iter().collect(),
                }),
                &loads(&[("a", 1, 2)])
            )
        );
    }
}
