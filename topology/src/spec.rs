//! What a swarm is: a name, a label selector and a topology. These types are stored in
//! Raft log entries (postcard through serde), so they use only plain structs, enums,
//! strings, integers and ordered maps: no untagged or flattened enums, no skipped fields,
//! no `serde_json::Value`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::TopologyError;

/// Longest swarm name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// Name of the swarm tasks target when they name none: a star of all workers.
pub const DEFAULT_SWARM_NAME: &str = "default";

/// Fan-out used when `--fan-out` is not given: each lead relays for up to 8 workers, so
/// one coordinator connection serves 9 workers.
pub const DEFAULT_FAN_OUT: u32 = 8;

/// Mesh degree used when `--max-degree` is not given. A random graph of degree 8 has a
/// diameter of about log₇(n) hops (3 hops for 300 workers) while each worker holds at
/// most 8 peer links.
pub const DEFAULT_MAX_DEGREE: u32 = 8;

/// A named group of workers with a topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmSpec {
    pub name: String,
    pub topology: TopologySpec,
    /// Workers carrying all of these labels are members. Empty: every worker.
    pub selector: BTreeMap<String, String>,
}

impl SwarmSpec {
    /// A validated spec.
    pub fn new(
        name: impl Into<String>,
        topology: TopologySpec,
        selector: BTreeMap<String, String>,
    ) -> Result<Self, TopologyError> {
        let spec = SwarmSpec {
            name: name.into(),
            topology,
            selector,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The swarm a task targets when it names none: a star of every worker.
    pub fn default_swarm() -> Self {
        SwarmSpec {
            name: DEFAULT_SWARM_NAME.to_string(),
            topology: TopologySpec::Star,
            selector: BTreeMap::new(),
        }
    }

    /// Checks the name, the selector and the topology's parameters.
    pub fn validate(&self) -> Result<(), TopologyError> {
        validate_name(&self.name)?;
        for (k, v) in &self.selector {
            validate_label(k, v)?;
        }
        self.topology.validate()
    }
}

/// Which topology, without its parameters. Parses from the names used on the command
/// line (`star`, `hierarchical`, `mesh`, `ring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TopologyKind {
    Star,
    Hierarchical,
    Mesh,
    Ring,
}

impl TopologyKind {
    /// Every valid topology name, in the order shown in help and errors.
    pub const NAMES: [&'static str; 4] = ["star", "hierarchical", "mesh", "ring"];

    /// The command-line / API name.
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyKind::Star => "star",
            TopologyKind::Hierarchical => "hierarchical",
            TopologyKind::Mesh => "mesh",
            TopologyKind::Ring => "ring",
        }
    }
}

impl fmt::Display for TopologyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TopologyKind {
    type Err = TopologyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "star" => Ok(TopologyKind::Star),
            "hierarchical" => Ok(TopologyKind::Hierarchical),
            "mesh" => Ok(TopologyKind::Mesh),
            "ring" => Ok(TopologyKind::Ring),
            _ => Err(TopologyError::UnknownTopology {
                given: s.to_string(),
            }),
        }
    }
}

/// A topology with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopologySpec {
    /// The coordinator dispatches to every member directly.
    Star,
    /// The coordinator talks to leads only; each lead relays for up to `fan_out` members.
    Hierarchical { fan_out: u32 },
    /// Members link to up to `max_degree` peers and steal work from each other.
    Mesh { max_degree: u32 },
    /// A pipeline: a task passes through `stages` in order.
    Ring { stages: Vec<StageSpec> },
}

/// Optional command-line parameters, turned into a [`TopologySpec`] by
/// [`TopologySpec::build`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopologyOptions {
    pub fan_out: Option<u32>,
    pub max_degree: Option<u32>,
    pub stages: Vec<StageSpec>,
}

impl TopologySpec {
    pub fn kind(&self) -> TopologyKind {
        match self {
            TopologySpec::Star => TopologyKind::Star,
            TopologySpec::Hierarchical { .. } => TopologyKind::Hierarchical,
            TopologySpec::Mesh { .. } => TopologyKind::Mesh,
            TopologySpec::Ring { .. } => TopologyKind::Ring,
        }
    }

    /// Combines a topology name with the options given for it. An option meant for
    /// another topology is an error rather than silently ignored; a missing fan-out or
    /// degree takes its default; a ring without stages is an error.
    pub fn build(kind: TopologyKind, opts: TopologyOptions) -> Result<Self, TopologyError> {
        let not_for = |option: &'static str| TopologyError::OptionNotApplicable {
            option,
            topology: kind.as_str(),
        };
        if opts.fan_out.is_some() && kind != TopologyKind::Hierarchical {
            return Err(not_for("--fan-out"));
        }
        if opts.max_degree.is_some() && kind != TopologyKind::Mesh {
            return Err(not_for("--max-degree"));
        }
        if !opts.stages.is_empty() && kind != TopologyKind::Ring {
            return Err(not_for("--stages"));
        }
        let spec = match kind {
            TopologyKind::Star => TopologySpec::Star,
            TopologyKind::Hierarchical => TopologySpec::Hierarchical {
                fan_out: opts.fan_out.unwrap_or(DEFAULT_FAN_OUT),
            },
            TopologyKind::Mesh => TopologySpec::Mesh {
                max_degree: opts.max_degree.unwrap_or(DEFAULT_MAX_DEGREE),
            },
            TopologyKind::Ring => TopologySpec::Ring {
                stages: opts.stages,
            },
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the parameters: fan-out ≥ 1, max degree ≥ 1, a ring has ≥ 1 stage and
    /// every stage names an agent.
    pub fn validate(&self) -> Result<(), TopologyError> {
        match self {
            TopologySpec::Star => Ok(()),
            TopologySpec::Hierarchical { fan_out } => {
                if *fan_out == 0 {
                    return Err(TopologyError::InvalidFanOut { fan_out: *fan_out });
                }
                Ok(())
            }
            TopologySpec::Mesh { max_degree } => {
                if *max_degree == 0 {
                    return Err(TopologyError::InvalidMaxDegree {
                        max_degree: *max_degree,
                    });
                }
                Ok(())
            }
            TopologySpec::Ring { stages } => {
                if stages.is_empty() {
                    return Err(TopologyError::EmptyRing);
                }
                for (i, stage) in stages.iter().enumerate() {
                    stage.validate(i)?;
                }
                Ok(())
            }
        }
    }
}

/// One ring stage: the agent that runs it and the labels its worker must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub agent: String,
    pub labels: BTreeMap<String, String>,
}

impl StageSpec {
    /// A stage served by any worker that has `agent`.
    pub fn new(agent: impl Into<String>) -> Self {
        StageSpec {
            agent: agent.into(),
            labels: BTreeMap::new(),
        }
    }

    /// Also require the worker to carry label `k=v`.
    pub fn with_label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    fn validate(&self, index: usize) -> Result<(), TopologyError> {
        let bad = |reason: String| TopologyError::InvalidStage {
            stage: index,
            reason,
        };
        if self.agent.trim().is_empty() {
            return Err(bad("the stage names no agent".to_string()));
        }
        if self.agent.contains(['[', ']', ',']) {
            return Err(bad(format!(
                "agent name {:?} contains '[', ']' or ','",
                self.agent
            )));
        }
        for (k, v) in &self.labels {
            validate_label(k, v).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }
}

/// `agent` or `agent[k=v,k2=v2]`.
impl fmt::Display for StageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.agent)?;
        if !self.labels.is_empty() {
            write!(f, "[{}]", format_selector(&self.labels))?;
        }
        Ok(())
    }
}

/// Parses `agent` or `agent[k=v,k2=v2]`.
impl FromStr for StageSpec {
    type Err = TopologyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = |reason: &str| TopologyError::InvalidStage {
            stage: 0,
            reason: format!("{s:?}: {reason}"),
        };
        let (agent, labels) = match s.find('[') {
            None => (s, BTreeMap::new()),
            Some(open) => {
                let Some(inner) = s[open + 1..].strip_suffix(']') else {
                    return Err(bad("expected agent[k=v,...]"));
                };
                let labels = parse_labels(inner).map_err(|e| bad(&e.to_string()))?;
                (s[..open].trim(), labels)
            }
        };
        let stage = StageSpec {
            agent: agent.to_string(),
            labels,
        };
        stage.validate(0)?;
        Ok(stage)
    }
}

/// Parses a stage list such as `coder, reviewer[lang=rust], tester`: stages separated by
/// commas outside brackets, in pipeline order. Errors name the stage's position.
pub fn parse_stages(s: &str) -> Result<Vec<StageSpec>, TopologyError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    if parts.iter().all(|p| p.trim().is_empty()) {
        return Err(TopologyError::EmptyRing);
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse::<StageSpec>().map_err(|e| match e {
                TopologyError::InvalidStage { reason, .. } => {
                    TopologyError::InvalidStage { stage: i, reason }
                }
                other => other,
            })
        })
        .collect()
}

/// Parses `k=v,k2=v2` (empty string: no labels). Keys must be non-empty.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, TopologyError> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(TopologyError::InvalidLabel {
                given: item.to_string(),
                reason: "must be key=value".to_string(),
            });
        };
        validate_label(k.trim(), v.trim())?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// `k=v,k2=v2`, or `(all workers)` for an empty selector.
pub fn format_selector(selector: &BTreeMap<String, String>) -> String {
    if selector.is_empty() {
        return "(all workers)".to_string();
    }
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A swarm name is 1 to 63 characters from `a-z`, `0-9`, `-` and `_`.
pub fn validate_name(name: &str) -> Result<(), TopologyError> {
    let bad = |reason: String| TopologyError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("the name is empty".to_string()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "{} characters, at most {MAX_NAME_LEN} allowed",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(bad(format!(
            "character {c:?} not allowed (use a-z, 0-9, '-' and '_')"
        )));
    }
    Ok(())
}

fn validate_label(k: &str, v: &str) -> Result<(), TopologyError> {
    let bad = |reason: &str| TopologyError::InvalidLabel {
        given: format!("{k}={v}"),
        reason: reason.to_string(),
    };
    if k.is_empty() {
        return Err(bad("the key is empty"));
    }
    if k.contains(['=', ',', '[', ']']) || v.contains([',', '[', ']']) {
        return Err(bad(
            "keys and values may not contain ',', '[' or ']' (nor '=' in a key)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_names_parse_and_unknown_lists_valid_ones() {
        assert_eq!("star".parse::<TopologyKind>(), Ok(TopologyKind::Star));
        assert_eq!(" Mesh ".parse::<TopologyKind>(), Ok(TopologyKind::Mesh));
        for name in TopologyKind::NAMES {
            assert_eq!(name.parse::<TopologyKind>().unwrap().as_str(), name);
        }
        let err = "tree".parse::<TopologyKind>().unwrap_err();
        assert_eq!(err.code(), "unknown_topology");
        assert_eq!(
            err.to_string(),
            "unknown topology \"tree\": expected one of star, hierarchical, mesh, ring"
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("build-farm_2").is_ok());
        assert!(validate_name(&"a".repeat(63)).is_ok());
        for bad in ["", "Build", "a b", "x/y", "é", &"a".repeat(64)] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_swarm_name", "{bad:?}");
        }
        assert!(validate_name("").unwrap_err().to_string().contains("empty"));
        assert!(validate_name(&"a".repeat(64))
            .unwrap_err()
            .to_string()
            .contains("64 characters"));
    }

    #[test]
    fn parameters_are_validated() {
        assert_eq!(
            TopologySpec::Hierarchical { fan_out: 0 }.validate(),
            Err(TopologyError::InvalidFanOut { fan_out: 0 })
        );
        assert_eq!(
            TopologySpec::Mesh { max_degree: 0 }.validate(),
            Err(TopologyError::InvalidMaxDegree { max_degree: 0 })
        );
        assert_eq!(
            TopologySpec::Ring { stages: vec![] }.validate(),
            Err(TopologyError::EmptyRing)
        );
        assert_eq!(
            TopologySpec::Ring {
                stages: vec![StageSpec::new("coder"), StageSpec::new(" ")]
            }
            .validate()
            .unwrap_err()
            .code(),
            "invalid_stage"
        );
        assert!(TopologySpec::Hierarchical { fan_out: 1 }.validate().is_ok());
        let spec = SwarmSpec::new("ok", TopologySpec::Star, BTreeMap::new()).unwrap();
        assert_eq!(spec.topology.kind(), TopologyKind::Star);
        assert!(SwarmSpec::new("Bad!", TopologySpec::Star, BTreeMap::new()).is_err());
        assert!(SwarmSpec::default_swarm().validate().is_ok());
    }

    #[test]
    fn build_applies_defaults_and_rejects_foreign_options() {
        assert_eq!(
            TopologySpec::build(TopologyKind::Hierarchical, TopologyOptions::default()),
            Ok(TopologySpec::Hierarchical {
                fan_out: DEFAULT_FAN_OUT
            })
        );
        assert_eq!(
            TopologySpec::build(
                TopologyKind::Mesh,
                TopologyOptions {
                    max_degree: Some(3),
                    ..Default::default()
                }
            ),
            Ok(TopologySpec::Mesh { max_degree: 3 })
        );
        let err = TopologySpec::build(
            TopologyKind::Star,
            TopologyOptions {
                fan_out: Some(4),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--fan-out does not apply to a star topology"
        );
        assert_eq!(
            TopologySpec::build(TopologyKind::Ring, TopologyOptions::default()),
            Err(TopologyError::EmptyRing)
        );
        assert_eq!(
            TopologySpec::build(
                TopologyKind::Hierarchical,
                TopologyOptions {
                    fan_out: Some(0),
                    ..Default::default()
                }
            ),
            Err(TopologyError::InvalidFanOut { fan_out: 0 })
        );
    }

    #[test]
    fn stages_parse_with_labels() {
        let stages = parse_stages("coder, reviewer[lang=rust,tier=gpu] ,tester").unwrap();
        assert_eq!(
            stages,
            vec![
                StageSpec::new("coder"),
                StageSpec::new("reviewer")
                    .with_label("lang", "rust")
                    .with_label("tier", "gpu"),
                StageSpec::new("tester"),
            ]
        );
        assert_eq!(stages[1].to_string(), "reviewer[lang=rust,tier=gpu]");
        assert_eq!(
            parse_stages(
                &stages
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Ok(stages)
        );
        assert_eq!(parse_stages(" "), Err(TopologyError::EmptyRing));
        let err = parse_stages("coder,,tester").unwrap_err();
        assert!(
            matches!(err, TopologyError::InvalidStage { stage: 1, .. }),
            "{err}"
        );
        let err = parse_stages("coder,reviewer[lang]").unwrap_err();
        assert!(
            matches!(err, TopologyError::InvalidStage { stage: 1, .. }),
            "{err}"
        );
        assert!(parse_stages("coder[a=b").is_err());
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_labels("").unwrap(), BTreeMap::new());
        let l = parse_labels("zone=eu, gpu=1").unwrap();
        assert_eq!(format_selector(&l), "gpu=1,zone=eu");
        assert_eq!(parse_labels("=x").unwrap_err().code(), "invalid_label");
        assert_eq!(parse_labels("novalue").unwrap_err().code(), "invalid_label");
        assert_eq!(format_selector(&BTreeMap::new()), "(all workers)");
    }
}
