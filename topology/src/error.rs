//! The one error type of the crate.

use thiserror::Error;

/// Everything that can be wrong with a swarm definition, its membership or a plan.
///
/// Messages are meant for a human at a terminal; [`TopologyError::code`] is the stable
/// machine-readable name (for API error bodies).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopologyError {
    #[error("invalid swarm name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },

    #[error("unknown topology {given:?}: expected one of {}", crate::spec::TopologyKind::NAMES.join(", "))]
    UnknownTopology { given: String },

    #[error("fan-out must be at least 1 (got {fan_out})")]
    InvalidFanOut { fan_out: u32 },

    #[error("mesh max degree must be at least 1 (got {max_degree})")]
    InvalidMaxDegree { max_degree: u32 },

    #[error("a ring needs at least one stage")]
    EmptyRing,

    #[error("invalid ring stage {stage}: {reason}")]
    InvalidStage { stage: usize, reason: String },

    #[error("invalid label {given:?}: {reason}")]
    InvalidLabel { given: String, reason: String },

    #[error("{option} does not apply to a {topology} topology")]
    OptionNotApplicable {
        option: &'static str,
        topology: &'static str,
    },

    #[error("no worker matches the selector {selector}")]
    NoMatchingWorkers { selector: String },

    #[error("the swarm has no workers")]
    NoWorkers,

    #[error("no worker can serve ring stage {stage} ({requirement})")]
    EmptyStage { stage: usize, requirement: String },

    #[error(
        "a mesh of {workers} workers cannot be connected with max degree {max_degree} \
         (needs at least 2)"
    )]
    MeshDegreeTooLow { max_degree: u32, workers: usize },

    #[error("ring has {ring} stages but the task's progress has {progress}")]
    RingMismatch { ring: usize, progress: usize },

    #[error("ring stage {stage} is already completed")]
    StageAlreadyCompleted { stage: usize },

    #[error("ring stage {got} reported out of order: stage {expected} is next")]
    StageOutOfOrder { expected: usize, got: usize },

    #[error("ring stage {stage} does not exist: the ring has {stages} stages")]
    StageOutOfRange { stage: usize, stages: usize },
}

impl TopologyError {
    /// Stable snake_case name of the error, for API bodies and tests.
    pub fn code(&self) -> &'static str {
        match self {
            TopologyError::InvalidName { .. } => "invalid_swarm_name",
            TopologyError::UnknownTopology { .. } => "unknown_topology",
            TopologyError::InvalidFanOut { .. } => "invalid_fan_out",
            TopologyError::InvalidMaxDegree { .. } => "invalid_max_degree",
            TopologyError::EmptyRing => "empty_ring",
            TopologyError::InvalidStage { .. } => "invalid_stage",
            TopologyError::InvalidLabel { .. } => "invalid_label",
            TopologyError::OptionNotApplicable { .. } => "option_not_applicable",
            TopologyError::NoMatchingWorkers { .. } => "no_matching_workers",
            TopologyError::NoWorkers => "no_workers",
            TopologyError::EmptyStage { .. } => "empty_stage",
            TopologyError::MeshDegreeTooLow { .. } => "mesh_degree_too_low",
            TopologyError::RingMismatch { .. } => "ring_mismatch",
            TopologyError::StageAlreadyCompleted { .. } => "stage_already_completed",
            TopologyError::StageOutOfOrder { .. } => "stage_out_of_order",
            TopologyError::StageOutOfRange { .. } => "stage_out_of_range",
        }
    }
}
