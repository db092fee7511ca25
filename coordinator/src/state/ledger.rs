//! What LLM agents spent, replicated like the tasks: tokens by swarm, agent and model,
//! and the token budget of each swarm that has one.
//!
//! Usage arrives with attempt reports ([`super::Op::Report`]) and is counted when the
//! report is recorded, so a replayed or stale report counts nothing. A swarm whose budget
//! is spent gets no new attempt of its *token-using* agents: those that have reported
//! tokens in that swarm before (the coordinator knows agents only by what they report; a
//! new `llm` agent runs until its first report shows what it spends). Their tasks wait in
//! the queue, shown as held, until the budget is raised or cleared; other agents of the
//! swarm run on.
//!
//! Stored whole by every checkpoint (`ledger` key) and every dump (a `Ledger` record,
//! dump format 4; older checkpoints and dumps read as empty).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarm_proto::api::{AgentUsageView, SwarmUsageView, UsageReport};
use swarm_proto::worker::Usage;

/// Most (swarm, agent, model) rows kept; usage of a new row past it is counted under
/// model `(other)`.
pub const MAX_ROWS: usize = 10_000;
/// Longest model name kept (longer ones are cut).
const MAX_MODEL: usize = 128;

/// Tokens counted for one (agent, model) in one swarm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    /// Attempts that reported usage.
    pub attempts: u64,
}

impl Tokens {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Usage and budgets; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// swarm → (agent, model) → tokens.
    pub usage: BTreeMap<String, BTreeMap<(String, String), Tokens>>,
    /// swarm → most tokens its agents may spend in all.
    pub budgets: BTreeMap<String, u64>,
}

/// A change to the budgets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerOp {
    /// Set (`Some`) or clear (`None`) a swarm's token budget.
    Budget { swarm: String, tokens: Option<u64> },
}

impl Ledger {
    /// Count `usage` of `agent` in `swarm`.
    pub fn record(&mut self, swarm: &str, agent: &str, usage: &Usage) {
        let rows: usize = self.usage.values().map(BTreeMap::len).sum();
        let mut model: String = usage.model.chars().take(MAX_MODEL).collect();
        let by = self.usage.entry(swarm.to_string()).or_default();
        if rows >= MAX_ROWS && !by.contains_key(&(agent.to_string(), model.clone())) {
            model = "(other)".to_string();
        }
        let t = by.entry((agent.to_string(), model)).or_default();
        t.prompt = t.prompt.saturating_add(usage.prompt_tokens);
        t.completion = t.completion.saturating_add(usage.completion_tokens);
        t.attempts = t.attempts.saturating_add(1);
    }

    pub fn apply(&mut self, op: &LedgerOp) {
        match op {
            LedgerOp::Budget { swarm, tokens } => match tokens {
                Some(t) => {
                    self.budgets.insert(swarm.clone(), *t);
                }
                None => {
                    self.budgets.remove(swarm);
                }
            },
        }
    }

    /// Tokens spent in `swarm`.
    pub fn spent(&self, swarm: &str) -> u64 {
        self.usage
            .get(swarm)
            .map_or(0, |by| by.values().map(Tokens::total).sum())
    }

    /// Whether `swarm` has a budget and has spent it.
    pub fn exhausted(&self, swarm: &str) -> bool {
        self.budgets
            .get(swarm)
            .is_some_and(|b| self.spent(swarm) >= *b)
    }

    /// Whether a new attempt of `agent` in `swarm` waits for budget: the swarm's budget
    /// is spent and the agent has spent tokens there.
    pub fn holds(&self, swarm: &str, agent: &str) -> bool {
        !self.budgets.is_empty()
            && self.exhausted(swarm)
            && self
                .usage
                .get(swarm)
                .is_some_and(|by| by.keys().any(|(a, _)| a == agent))
    }

    /// Why a task of `agent` in `swarm` waits, if it does.
    pub fn hold_reason(&self, swarm: &str, agent: &str) -> Option<String> {
        self.holds(swarm, agent).then(|| {
            format!(
                "token budget of swarm {swarm} spent: {} of {} tokens (raise it with `swarm swarms budget {swarm} --tokens N`)",
                self.spent(swarm),
                self.budgets.get(swarm).copied().unwrap_or_default()
            )
        })
    }

    /// The API view: every swarm with usage or a budget.
    pub fn report(&self) -> UsageReport {
        let mut names: Vec<&String> = self.usage.keys().chain(self.budgets.keys()).collect();
        names.sort();
        names.dedup();
        let swarms = names
            .into_iter()
            .map(|s| {
                let agents = self
                    .usage
                    .get(s)
                    .map(|by| {
                        by.iter()
                            .map(|((agent, model), t)| AgentUsageView {
                                agent: agent.clone(),
                                model: model.clone(),
                                prompt_tokens: t.prompt,
                                completion_tokens: t.completion,
                                attempts: t.attempts,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                SwarmUsageView {
                    swarm: s.clone(),
                    tokens: self.spent(s),
                    budget: self.budgets.get(s).copied(),
                    exhausted: self.exhausted(s),
                    agents,
                }
            })
            .collect();
        UsageReport { swarms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(model: &str, p: u64, c: u64) -> Usage {
        Usage {
            model: model.into(),
            prompt_tokens: p,
            completion_tokens: c,
        }
    }

    #[test]
    fn a_spent_budget_holds_only_the_swarms_token_using_agents() {
        let mut l = Ledger::default();
        l.record("s", "writer", &usage("m", 60, 30));
        l.record("other", "writer", &usage("m", 500, 0));
        assert!(!l.holds("s", "writer"), "no budget yet");
        l.apply(&LedgerOp::Budget {
            swarm: "s".into(),
            tokens: Some(100),
        });
        assert_eq!(l.spent("s"), 90);
        assert!(!l.exhausted("s"));
        l.record("s", "writer", &usage("m", 5, 5));
        assert!(l.exhausted("s"));
        assert!(l.holds("s", "writer"));
        assert!(l.hold_reason("s", "writer").unwrap().contains("100 of 100"));
        assert!(!l.holds("s", "echo"), "agents that spend no tokens run on");
        assert!(!l.holds("other", "writer"), "other swarms are not held");
        l.apply(&LedgerOp::Budget {
            swarm: "s".into(),
            tokens: Some(1000),
        });
        assert!(!l.holds("s", "writer"));
        l.apply(&LedgerOp::Budget {
            swarm: "s".into(),
            tokens: None,
        });
        let r = l.report();
        assert_eq!(r.swarms.len(), 2);
        assert_eq!(r.swarms[1].swarm, "s");
        assert_eq!(r.swarms[1].tokens, 100);
        assert_eq!(r.swarms[1].agents[0].attempts, 2);
    }

    #[test]
    fn rows_are_bounded() {
        let mut l = Ledger::default();
        for i in 0..MAX_ROWS + 50 {
            l.record("s", "a", &usage(&format!("m{i}"), 1, 1));
        }
        let rows: usize = l.usage.values().map(BTreeMap::len).sum();
        assert_eq!(rows, MAX_ROWS + 1);
        assert_eq!(l.spent("s"), 2 * (MAX_ROWS as u64 + 50));
    }
}
