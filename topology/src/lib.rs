//! Swarm topologies as pure routing rules.
//!
//! A swarm is a named group of workers (selected by labels) with a topology:
//!
//! * **star** — the coordinator dispatches to every member directly;
//! * **hierarchical** — the coordinator connects only to leads, each relaying for up to
//!   `fan_out` members ([`plan_hierarchy`], [`route_to`]);
//! * **mesh** — members link to a bounded set of peers and steal queued work from busy
//!   ones ([`plan_mesh`], [`steal_decision`], [`lost_peers`]);
//! * **ring** — a pipeline of stages, each served by a capable worker, with per-task
//!   progress that survives repairs ([`plan_ring`], [`repair_ring`], [`RingProgress`]).
//!
//! Everything here is a plain function of (spec, membership, previous plan): no sockets,
//! no async, no clocks (times are parameters), no hash-map iteration order, and only
//! seeded randomness with a fixed hash, so every coordinator computes the same plan.
//! The stored types ([`SwarmSpec`], [`TopologyPlan`] and its parts, [`RingProgress`])
//! serialize with postcard through serde; [`TopologyView`] is the JSON/terminal view.

mod error;
mod hash;
pub mod hierarchy;
mod member;
pub mod mesh;
mod plan;
mod render;
pub mod ring;
pub mod spec;

/// A worker's stable id (its `Hello::worker_id`).
pub type WorkerId = String;

pub use error::TopologyError;
pub use hierarchy::{
    children_of, coordinator_links, max_leads, min_leads, plan_hierarchy, route_changes, route_to,
    Hierarchy, LeadId, Route, RouteChange,
};
pub use member::{loads, membership, Load, Member};
pub use mesh::{lost_peers, plan_mesh, steal_decision, Mesh, Steal, StealPolicy};
pub use plan::{plan, TopologyPlan};
pub use render::{
    render_text, view, LayoutView, LeadView, PeerView, RingStageView, TopologyView, WorkerView,
};
pub use ring::{
    next_stage, plan_ring, repair_ring, Ring, RingProgress, StageAssignment, StageDispatch,
};
pub use spec::{
    format_selector, parse_labels, parse_stages, validate_name, StageSpec, SwarmSpec, TopologyKind,
    TopologyOptions, TopologySpec, DEFAULT_FAN_OUT, DEFAULT_MAX_DEGREE, DEFAULT_SWARM_NAME,
    MAX_NAME_LEN,
};
