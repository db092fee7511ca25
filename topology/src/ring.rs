//! Ring topology: an ordered pipeline. A task passes through the stages in order; stage
//! `i + 1` gets stage `i`'s output as input, and the last stage's output is the task's
//! result. Each stage is assigned one worker that can serve it. When a worker dies only
//! its stages are reassigned ([`repair_ring`]), and a task's [`RingProgress`] resumes at
//! its first uncompleted stage, so completed stages never run again.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::member::{canonical, cmp_ratio};
use crate::spec::{format_selector, StageSpec};
use crate::{Member, TopologyError, WorkerId};

/// Stage `stage` runs on `worker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAssignment {
    pub stage: usize,
    pub worker: WorkerId,
}

/// The ring's stage assignments, in stage order (`order[i].stage == i`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub order: Vec<StageAssignment>,
}

impl Ring {
    /// Number of stages.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The worker serving `stage`.
    pub fn worker_for(&self, stage: usize) -> Option<&WorkerId> {
        self.order.get(stage).map(|a| &a.worker)
    }

    /// The stages `worker` serves, ascending.
    pub fn stages_on(&self, worker: &str) -> Vec<usize> {
        self.order
            .iter()
            .filter(|a| a.worker == worker)
            .map(|a| a.stage)
            .collect()
    }

    /// Every worker serving some stage.
    pub fn workers(&self) -> BTreeSet<&WorkerId> {
        self.order.iter().map(|a| &a.worker).collect()
    }

    /// Stages whose worker differs in `other` (including stages only one of them has).
    pub fn moved_stages(&self, other: &Ring) -> Vec<usize> {
        (0..self.len().max(other.len()))
            .filter(|&i| self.worker_for(i) != other.worker_for(i))
            .collect()
    }
}

/// Assigns every stage a worker that has its agent and labels. The most constrained
/// stages (fewest capable workers) choose first; each takes the capable worker with the
/// fewest stages of this ring so far, then the lowest load (running + locally queued
/// per slot), then the smallest id. Deterministic, independent of member order.
pub fn plan_ring(members: &[Member], stages: &[StageSpec]) -> Result<Ring, TopologyError> {
    assign(members, stages, None)
}

/// Re-plans `previous` for the current `members`: a stage keeps its worker while that
/// worker is a member and can still serve it; only the other stages get a new worker,
/// chosen as in [`plan_ring`].
pub fn repair_ring(
    previous: &Ring,
    members: &[Member],
    stages: &[StageSpec],
) -> Result<Ring, TopologyError> {
    assign(members, stages, Some(previous))
}

fn requirement(stage: &StageSpec) -> String {
    if stage.labels.is_empty() {
        format!("agent {:?}", stage.agent)
    } else {
        format!(
            "agent {:?} on a worker labelled {}",
            stage.agent,
            format_selector(&stage.labels)
        )
    }
}

fn assign(
    members: &[Member],
    stages: &[StageSpec],
    previous: Option<&Ring>,
) -> Result<Ring, TopologyError> {
    if stages.is_empty() {
        return Err(TopologyError::EmptyRing);
    }
    let members = canonical(members);
    if members.is_empty() {
        return Err(TopologyError::NoWorkers);
    }
    let capable: Vec<Vec<&Member>> = stages
        .iter()
        .map(|s| members.iter().copied().filter(|m| m.can_serve(s)).collect())
        .collect();

    let mut chosen: Vec<Option<&Member>> = vec![None; stages.len()];
    let mut assigned: BTreeMap<&str, usize> = BTreeMap::new();
    if let Some(prev) = previous {
        for (i, slot) in chosen.iter_mut().enumerate() {
            let Some(w) = prev.worker_for(i) else {
                continue;
            };
            if let Some(m) = capable[i].iter().find(|m| &m.id == w) {
                *slot = Some(m);
                *assigned.entry(m.id.as_str()).or_default() += 1;
            }
        }
    }

    if let Some(i) = (0..stages.len()).find(|&i| chosen[i].is_none() && capable[i].is_empty()) {
        return Err(TopologyError::EmptyStage {
            stage: i,
            requirement: requirement(&stages[i]),
        });
    }

    let mut open: Vec<usize> = (0..stages.len()).filter(|&i| chosen[i].is_none()).collect();
    open.sort_by_key(|&i| (capable[i].len(), i));
    for i in open {
        let pick = capable[i]
            .iter()
            .copied()
            .min_by(|a, b| {
                let na = assigned.get(a.id.as_str()).copied().unwrap_or(0);
                let nb = assigned.get(b.id.as_str()).copied().unwrap_or(0);
                na.cmp(&nb)
                    .then_with(|| load_cmp(a, b))
                    .then_with(|| a.id.cmp(&b.id))
            })
            .expect("stages without capable workers were rejected above");
        chosen[i] = Some(pick);
        *assigned.entry(pick.id.as_str()).or_default() += 1;
    }

    Ok(Ring {
        order: chosen
            .into_iter()
            .enumerate()
            .map(|(stage, m)| StageAssignment {
                stage,
                worker: m.expect("every stage assigned").id.clone(),
            })
            .collect(),
    })
}

fn load_cmp(a: &Member, b: &Member) -> Ordering {
    cmp_ratio(
        u64::from(a.running) + u64::from(a.queued_local),
        u64::from(a.slots),
        u64::from(b.running) + u64::from(b.queued_local),
        u64::from(b.slots),
    )
}

/// The assignment of the stage after `completed` stages, `None` when all are done.
pub fn next_stage(ring: &Ring, completed: usize) -> Option<&StageAssignment> {
    ring.order.get(completed)
}

/// "Run stage `stage` on `worker` with `input`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageDispatch {
    pub stage: usize,
    pub worker: WorkerId,
    pub input: Vec<u8>,
}

/// How far one task has come through a ring. Stored with the task, so a repaired ring
/// (or a new leader) resumes it where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingProgress {
    /// Number of stages of the ring the task runs through.
    pub stages: usize,
    /// The task's payload: stage 0's input.
    pub input: Vec<u8>,
    /// `outputs[i]` is stage `i`'s output; the completed stages are exactly
    /// `0..outputs.len()`.
    pub outputs: Vec<Vec<u8>>,
}

impl RingProgress {
    pub fn new(stages: usize, input: Vec<u8>) -> Self {
        RingProgress {
            stages,
            input,
            outputs: Vec::new(),
        }
    }

    /// Number of completed stages.
    pub fn completed(&self) -> usize {
        self.outputs.len()
    }

    pub fn last_completed(&self) -> Option<usize> {
        self.outputs.len().checked_sub(1)
    }

    /// The stage to run next, `None` when all are completed.
    pub fn next_stage(&self) -> Option<usize> {
        (self.outputs.len() < self.stages).then_some(self.outputs.len())
    }

    /// The next stage's input: the last completed stage's output, or the payload before
    /// stage 0. `None` when all stages are completed.
    pub fn next_input(&self) -> Option<&[u8]> {
        self.next_stage()?;
        Some(self.outputs.last().unwrap_or(&self.input))
    }

    pub fn is_done(&self) -> bool {
        self.outputs.len() >= self.stages
    }

    /// The task's result: the last stage's output, once every stage completed.
    pub fn result(&self) -> Option<&[u8]> {
        if self.is_done() {
            self.outputs.last().map(Vec::as_slice)
        } else {
            None
        }
    }

    /// Records that `stage` completed with `output`. Only the next stage may complete;
    /// a repeated report of a completed stage (a duplicate, or a stale attempt that
    /// finished after a repair) is rejected and changes nothing. Returns the stage to
    /// run next, `None` when the task is done.
    pub fn advance(
        &mut self,
        stage: usize,
        output: Vec<u8>,
    ) -> Result<Option<usize>, TopologyError> {
        if stage < self.outputs.len() {
            return Err(TopologyError::StageAlreadyCompleted { stage });
        }
        if stage >= self.stages {
            return Err(TopologyError::StageOutOfRange {
                stage,
                stages: self.stages,
            });
        }
        let expected = self.outputs.len();
        if stage != expected {
            return Err(TopologyError::StageOutOfOrder {
                expected,
                got: stage,
            });
        }
        self.outputs.push(output);
        Ok(self.next_stage())
    }

    /// What to run next on `ring` (the current or a repaired one): the first
    /// uncompleted stage, on the worker the ring assigns it, with the last completed
    /// stage's output as input. `None` when the task is done.
    pub fn resume(&self, ring: &Ring) -> Result<Option<StageDispatch>, TopologyError> {
        if ring.len() != self.stages {
            return Err(TopologyError::RingMismatch {
                ring: ring.len(),
                progress: self.stages,
            });
        }
        let (Some(stage), Some(input)) = (self.next_stage(), self.next_input()) else {
            return Ok(None);
        };
        let a = next_stage(ring, stage).expect("ring length checked");
        Ok(Some(StageDispatch {
            stage,
            worker: a.worker.clone(),
            input: input.to_vec(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages() -> Vec<StageSpec> {
        vec![
            StageSpec::new("coder"),
            StageSpec::new("reviewer").with_label("lang", "rust"),
            StageSpec::new("tester"),
        ]
    }

    fn pool() -> Vec<Member> {
        vec![
            Member::new("w1", 2)
                .with_agent("coder")
                .with_agent("tester"),
            Member::new("w2", 2)
                .with_agent("reviewer")
                .with_label("lang", "rust"),
            Member::new("w3", 2)
                .with_agent("tester")
                .with_agent("coder"),
            Member::new("w4", 2).with_agent("reviewer"),
        ]
    }

    #[test]
    fn each_stage_gets_a_capable_worker_spread_out() {
        let ms = pool();
        let ring = plan_ring(&ms, &stages()).unwrap();
        assert_eq!(ring.len(), 3);
        for (i, a) in ring.order.iter().enumerate() {
            assert_eq!(a.stage, i);
            let m = ms.iter().find(|m| m.id == a.worker).unwrap();
            assert!(m.can_serve(&stages()[i]));
        }
        assert_eq!(ring.worker_for(1).unwrap(), "w2", "only w2 has the label");
        assert_ne!(
            ring.worker_for(0),
            ring.worker_for(2),
            "stages spread over workers"
        );
    }

    #[test]
    fn balancing_prefers_less_loaded_workers() {
        let mut ms = pool();
        ms[0] = ms[0].clone().with_load(2, 3);
        let ring = plan_ring(&ms, &stages()).unwrap();
        // w3 is idle and w1 overloaded, so w3 takes coder (the first of the two equally
        // constrained stages); tester still goes to w1 because spreading stages over
        // workers comes before load.
        assert_eq!(ring.worker_for(0).unwrap(), "w3");
        assert_eq!(ring.worker_for(2).unwrap(), "w1");
        let one = plan_ring(&ms, &[StageSpec::new("coder")]).unwrap();
        assert_eq!(one.worker_for(0).unwrap(), "w3");
    }

    #[test]
    fn bad_input_errors() {
        assert_eq!(plan_ring(&[], &stages()), Err(TopologyError::NoWorkers));
        assert_eq!(plan_ring(&pool(), &[]), Err(TopologyError::EmptyRing));
        let mut st = stages();
        st.push(StageSpec::new("deployer"));
        let err = plan_ring(&pool(), &st).unwrap_err();
        assert_eq!(
            err,
            TopologyError::EmptyStage {
                stage: 3,
                requirement: "agent \"deployer\"".into()
            }
        );
        let no_rust: Vec<Member> = pool().into_iter().filter(|m| m.id != "w2").collect();
        let err = plan_ring(&no_rust, &stages()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no worker can serve ring stage 1 (agent \"reviewer\" on a worker labelled lang=rust)"
        );
    }

    #[test]
    fn repair_moves_only_dead_stages() {
        let mut ms = pool();
        ms.push(Member::new("w5", 2).with_agent("coder"));
        let ring = plan_ring(&ms, &stages()).unwrap();
        let dead = ring.worker_for(0).unwrap().clone();
        let alive: Vec<Member> = ms.iter().filter(|m| m.id != dead).cloned().collect();
        let repaired = repair_ring(&ring, &alive, &stages()).unwrap();
        assert_eq!(ring.moved_stages(&repaired), ring.stages_on(&dead));
        assert_ne!(repaired.worker_for(0).unwrap(), &dead);
        // Nothing gone: nothing moves, even if loads changed.
        let mut busier = ms.clone();
        for m in &mut busier {
            m.running = 2;
        }
        assert_eq!(repair_ring(&ring, &busier, &stages()).unwrap(), ring);
        // The only reviewer dies: the ring cannot be repaired.
        let err = repair_ring(&ring, &pool()[..1], &stages()).unwrap_err();
        assert_eq!(err.code(), "empty_stage");
    }

    #[test]
    fn progress_composes_outputs_and_resumes_after_repair() {
        let ms = pool();
        let ring = plan_ring(&ms, &stages()).unwrap();
        let mut p = RingProgress::new(3, b"spec".to_vec());
        assert_eq!(p.last_completed(), None);
        let d = p.resume(&ring).unwrap().unwrap();
        assert_eq!((d.stage, d.input.as_slice()), (0, &b"spec"[..]));
        assert_eq!(p.advance(0, b"code(spec)".to_vec()), Ok(Some(1)));
        assert_eq!(p.last_completed(), Some(0));

        // Stage 1's worker dies; the repaired ring resumes at stage 1 with stage 0's output.
        let dead = ring.worker_for(1).unwrap().clone();
        let mut alive: Vec<Member> = ms.iter().filter(|m| m.id != dead).cloned().collect();
        alive.push(
            Member::new("w9", 1)
                .with_agent("reviewer")
                .with_label("lang", "rust"),
        );
        let repaired = repair_ring(&ring, &alive, &stages()).unwrap();
        let d = p.resume(&repaired).unwrap().unwrap();
        assert_eq!(d.stage, 1);
        assert_eq!(d.worker, "w9");
        assert_eq!(d.input, b"code(spec)");

        assert_eq!(
            p.advance(0, b"again".to_vec()),
            Err(TopologyError::StageAlreadyCompleted { stage: 0 })
        );
        assert_eq!(
            p.advance(2, b"early".to_vec()),
            Err(TopologyError::StageOutOfOrder {
                expected: 1,
                got: 2
            })
        );
        assert_eq!(p.outputs, vec![b"code(spec)".to_vec()]);
        assert_eq!(p.result(), None);
        assert_eq!(p.advance(1, b"review(code(spec))".to_vec()), Ok(Some(2)));
        assert_eq!(p.advance(2, b"test(review(code(spec)))".to_vec()), Ok(None));
        assert!(p.is_done());
        assert_eq!(p.result(), Some(&b"test(review(code(spec)))"[..]));
        assert_eq!(p.resume(&repaired), Ok(None));
        assert_eq!(p.next_input(), None);
        assert_eq!(
            p.advance(2, b"late duplicate".to_vec()),
            Err(TopologyError::StageAlreadyCompleted { stage: 2 })
        );
        assert_eq!(
            p.advance(3, vec![]),
            Err(TopologyError::StageOutOfRange {
                stage: 3,
                stages: 3
            })
        );
        assert_eq!(
            RingProgress::new(2, vec![]).advance(5, vec![]),
            Err(TopologyError::StageOutOfRange {
                stage: 5,
                stages: 2
            })
        );
        assert_eq!(p.outputs.len(), 3);
        assert_eq!(
            RingProgress::new(2, vec![]).resume(&repaired),
            Err(TopologyError::RingMismatch {
                ring: 3,
                progress: 2
            })
        );
        assert_eq!(next_stage(&repaired, 3), None);
        assert_eq!(next_stage(&repaired, 2).unwrap().stage, 2);
    }
}
