//! Hierarchical topology: the coordinator connects to a few leads; every other member
//! is the child of one lead, which relays its dispatches, results and heartbeats.
//!
//! Lead count. Leads run tasks too, so a lead and its `F` children make a group of
//! `F + 1` workers, and `n` members need at least `⌈n / (F + 1)⌉` leads ([`min_leads`]).
//! A fresh plan uses exactly that. A re-plan keeps the surviving leads as long as there
//! are at most one more than that minimum ([`max_leads`]): the one lead of slack means a
//! worker that flaps (joins, leaves, joins) never forces a lead to be demoted and its
//! children moved. 20 workers with fan-out 4 therefore get 4 leads when planned fresh
//! and never more than 5.
//!
//! Stability. Given the previous plan, surviving leads stay leads (unless there are more
//! than [`max_leads`], then those with the fewest children are demoted) and surviving
//! children keep their lead (unless the fan-out shrank below their number). Only
//! workers without a lead move: new members, children of a lost or demoted lead. When
//! a lead is lost and the others lack room, one of its children is promoted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::member::canonical;
use crate::{Member, WorkerId};

/// A worker acting as a lead.
pub type LeadId = WorkerId;

/// Spare leads a re-plan tolerates above [`min_leads`] before demoting one.
pub const LEAD_SLACK: usize = 1;

/// Who leads whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hierarchy {
    /// Largest number of children per lead.
    pub fan_out: u32,
    /// The leads, oldest first. The coordinator connects to exactly these.
    pub leads: Vec<LeadId>,
    /// Every member that is not a lead, with its lead.
    pub parent: BTreeMap<WorkerId, LeadId>,
}

/// How the coordinator reaches a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// Over the coordinator's own connection to it (it is a lead).
    Direct,
    /// Relayed by this lead.
    ViaLead(LeadId),
}

/// A member whose route differs between two plans (`None`: not a member of that plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub worker: WorkerId,
    pub from: Option<Route>,
    pub to: Option<Route>,
}

/// Fewest leads that can relay for `n` members: `⌈n / (fan_out + 1)⌉`.
pub fn min_leads(n: usize, fan_out: u32) -> usize {
    let group = fan_out.max(1) as usize + 1;
    n.div_ceil(group)
}

/// Most leads a re-plan keeps: [`min_leads`] plus [`LEAD_SLACK`], at most `n`.
pub fn max_leads(n: usize, fan_out: u32) -> usize {
    (min_leads(n, fan_out) + LEAD_SLACK).min(n)
}

/// Plans (or re-plans, given `previous`) the hierarchy of `members`. Deterministic: the
/// result depends only on the set of members, their slots, `fan_out` and `previous`.
/// A fan-out of 0 is treated as 1.
///
/// New leads are the best-ranked candidates: most slots first (a lead carries relay
/// work on top of its tasks), then smallest id. Workers needing a lead join the lead
/// with the fewest children, ties going to the older lead.
pub fn plan_hierarchy(members: &[Member], fan_out: u32, previous: Option<&Hierarchy>) -> Hierarchy {
    let fan_out = fan_out.max(1);
    let f = fan_out as usize;
    let members = canonical(members);
    let n = members.len();
    let ids: BTreeSet<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let lo = min_leads(n, fan_out);
    let hi = max_leads(n, fan_out);

    // Surviving leads, in their old order, each with its surviving children.
    let mut leads: Vec<(LeadId, Vec<WorkerId>)> = Vec::new();
    if let Some(prev) = previous {
        for lead in &prev.leads {
            if ids.contains(lead.as_str()) && !leads.iter().any(|(l, _)| l == lead) {
                leads.push((lead.clone(), Vec::new()));
            }
        }
        let lead_ids: BTreeSet<LeadId> = leads.iter().map(|(l, _)| l.clone()).collect();
        for m in members.iter().filter(|m| !lead_ids.contains(&m.id)) {
            let Some(p) = prev.parent.get(&m.id) else {
                continue;
            };
            if let Some((_, kids)) = leads.iter_mut().find(|(l, _)| l == p) {
                if kids.len() < f {
                    kids.push(m.id.clone());
                }
            }
        }
    }

    // Too many leads (the swarm shrank, or the fan-out grew): demote those with the
    // fewest children, the newest first among equals.
    while leads.len() > hi {
        let (idx, _) = leads
            .iter()
            .enumerate()
            .rev()
            .min_by_key(|(_, (_, kids))| kids.len())
            .expect("more leads than hi >= 0 means at least one");
        leads.remove(idx);
    }

    let placed: BTreeSet<&str> = leads
        .iter()
        .flat_map(|(l, kids)| std::iter::once(l.as_str()).chain(kids.iter().map(String::as_str)))
        .collect();
    let mut unplaced: Vec<&Member> = members
        .iter()
        .copied()
        .filter(|m| !placed.contains(m.id.as_str()))
        .collect();

    // Too few leads: promote the best-ranked unplaced workers. There always are some:
    // fewer than `lo` leads with at most `f` children each cannot hold all `n` members.
    while leads.len() < lo {
        let (idx, _) = unplaced
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| b.slots.cmp(&a.slots).then_with(|| a.id.cmp(&b.id)))
            .expect("fewer than min_leads leads leave members unplaced");
        let m = unplaced.remove(idx);
        leads.push((m.id.clone(), Vec::new()));
    }

    // Everyone else joins the lead with the most room. `leads.len() >= lo` guarantees
    // room for all.
    for m in unplaced {
        let (_, kids) = leads
            .iter_mut()
            .filter(|(_, kids)| kids.len() < f)
            .min_by_key(|(_, kids)| kids.len())
            .expect("leads >= min_leads have room for every member");
        kids.push(m.id.clone());
    }

    let mut parent = BTreeMap::new();
    for (lead, kids) in &leads {
        for kid in kids {
            parent.insert(kid.clone(), lead.clone());
        }
    }
    Hierarchy {
        fan_out,
        leads: leads.into_iter().map(|(l, _)| l).collect(),
        parent,
    }
}

/// The workers the coordinator connects to directly: the leads.
pub fn coordinator_links(h: &Hierarchy) -> BTreeSet<WorkerId> {
    h.leads.iter().cloned().collect()
}

/// How the coordinator reaches `worker`; `None` if it is not a member.
pub fn route_to(h: &Hierarchy, worker: &str) -> Option<Route> {
    if h.leads.iter().any(|l| l == worker) {
        return Some(Route::Direct);
    }
    h.parent.get(worker).map(|l| Route::ViaLead(l.clone()))
}

/// The members `lead` relays for, sorted by id (empty for a non-lead).
pub fn children_of(h: &Hierarchy, lead: &str) -> Vec<WorkerId> {
    h.parent
        .iter()
        .filter(|(_, l)| l.as_str() == lead)
        .map(|(w, _)| w.clone())
        .collect()
}

/// Every member whose route differs between `old` and `new`, sorted by id: who must be
/// told to re-parent, who became a lead, who joined or left.
pub fn route_changes(old: &Hierarchy, new: &Hierarchy) -> Vec<RouteChange> {
    let all: BTreeSet<&WorkerId> = old.members().chain(new.members()).collect();
    all.into_iter()
        .filter_map(|w| {
            let from = route_to(old, w);
            let to = route_to(new, w);
            (from != to).then(|| RouteChange {
                worker: w.clone(),
                from,
                to,
            })
        })
        .collect()
}

impl Hierarchy {
    /// Every member: leads first (oldest first), then children by id.
    pub fn members(&self) -> impl Iterator<Item = &WorkerId> + '_ {
        self.leads.iter().chain(self.parent.keys())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.leads.len() + self.parent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("w{i:02}"), 4)).collect()
    }

    fn check(h: &Hierarchy, members: &[Member]) {
        let mut seen = BTreeSet::new();
        for w in h.members() {
            assert!(seen.insert(w.clone()), "{w} listed twice");
        }
        let ids: BTreeSet<WorkerId> = members.iter().map(|m| m.id.clone()).collect();
        assert_eq!(seen, ids);
        for lead in &h.leads {
            assert!(children_of(h, lead).len() <= h.fan_out as usize);
        }
        for l in h.parent.values() {
            assert!(h.leads.contains(l));
        }
    }

    #[test]
    fn twenty_workers_fan_out_four() {
        let ms = workers(20);
        let h = plan_hierarchy(&ms, 4, None);
        check(&h, &ms);
        assert_eq!(h.leads.len(), 4);
        assert!(coordinator_links(&h).len() <= 5);
        for lead in &h.leads {
            assert_eq!(children_of(&h, lead).len(), 4);
        }
        for m in &ms {
            match route_to(&h, &m.id).unwrap() {
                Route::Direct => assert!(h.leads.contains(&m.id)),
                Route::ViaLead(l) => assert_eq!(h.parent[&m.id], l),
            }
        }
        assert_eq!(route_to(&h, "nobody"), None);
    }

    #[test]
    fn small_and_empty_swarms() {
        let h = plan_hierarchy(&[], 4, None);
        assert!(h.is_empty());
        assert_eq!(h.len(), 0);
        let one = workers(1);
        let h = plan_hierarchy(&one, 4, None);
        assert_eq!(h.leads, ["w00"]);
        assert!(h.parent.is_empty());
        let h = plan_hierarchy(&workers(5), 4, None);
        assert_eq!(h.leads.len(), 1);
        let h = plan_hierarchy(&workers(6), 0, None);
        assert_eq!(h.fan_out, 1, "fan-out 0 is treated as 1");
        assert_eq!(h.leads.len(), 3);
    }

    #[test]
    fn leads_prefer_more_slots() {
        let mut ms = workers(10);
        ms[7].slots = 16;
        ms[3].slots = 8;
        let h = plan_hierarchy(&ms, 3, None);
        assert_eq!(h.leads, ["w07", "w03", "w00"]);
    }

    #[test]
    fn lost_lead_with_no_room_elsewhere_promotes_one_of_its_children() {
        let ms = workers(20);
        let h = plan_hierarchy(&ms, 4, None);
        let lost = h.leads[1].clone();
        let orphans = children_of(&h, &lost);
        let rest: Vec<Member> = ms.iter().filter(|m| m.id != lost).cloned().collect();
        let h2 = plan_hierarchy(&rest, 4, Some(&h));
        check(&h2, &rest);
        // 19 workers need 4 leads; the other 3 are full, so an orphan is promoted and
        // the remaining orphans follow it.
        assert_eq!(h2.leads.len(), 4);
        let promoted = h2.leads.last().unwrap();
        assert!(orphans.contains(promoted));
        for o in orphans.iter().filter(|o| *o != promoted) {
            assert_eq!(&h2.parent[o], promoted);
        }
        for lead in h.leads.iter().filter(|l| **l != lost) {
            assert_eq!(children_of(&h2, lead), children_of(&h, lead));
        }
        let changes = route_changes(&h, &h2);
        let moved: BTreeSet<&str> = changes.iter().map(|c| c.worker.as_str()).collect();
        let expected: BTreeSet<&str> = orphans
            .iter()
            .map(String::as_str)
            .chain([lost.as_str()])
            .collect();
        assert_eq!(moved, expected);
        assert!(changes
            .iter()
            .any(|c| c.worker == lost && c.from == Some(Route::Direct) && c.to.is_none()));
    }

    #[test]
    fn lost_lead_with_room_elsewhere_reparents_its_children() {
        let ms = workers(16); // 4 leads, 12 children, fan-out 4
        let h = plan_hierarchy(&ms, 4, None);
        assert_eq!(h.leads.len(), 4);
        let lost = h.leads[0].clone();
        let rest: Vec<Member> = ms.iter().filter(|m| m.id != lost).cloned().collect();
        let h2 = plan_hierarchy(&rest, 4, Some(&h));
        check(&h2, &rest);
        assert_eq!(h2.leads, h.leads[1..].to_vec(), "no promotion needed");
        for lead in &h2.leads {
            for kid in children_of(&h, lead) {
                assert_eq!(&h2.parent[&kid], lead);
            }
        }
    }

    #[test]
    fn flapping_worker_moves_nobody_else() {
        let ms = workers(10); // fan-out 4: 2 full leads
        let h = plan_hierarchy(&ms, 4, None);
        let mut more = ms.clone();
        more.push(Member::new("w99", 4));
        let h2 = plan_hierarchy(&more, 4, Some(&h));
        check(&h2, &more);
        assert_eq!(h2.leads.len(), 3);
        assert_eq!(
            route_changes(&h, &h2),
            vec![RouteChange {
                worker: "w99".into(),
                from: None,
                to: Some(Route::Direct)
            }]
        );
        // A child leaves: 10 members, 3 leads is within the slack, nothing moves.
        let fewer: Vec<Member> = more.iter().filter(|m| m.id != "w05").cloned().collect();
        let h3 = plan_hierarchy(&fewer, 4, Some(&h2));
        check(&h3, &fewer);
        assert_eq!(h3.leads, h2.leads);
        assert_eq!(route_changes(&h2, &h3).len(), 1);
    }

    #[test]
    fn shrinking_demotes_the_emptiest_lead() {
        let ms = workers(20);
        let h = plan_hierarchy(&ms, 4, None);
        // Keep only the leads and the children of the first lead: 4 + 4 = 8 members need
        // 2 leads, at most 3 are kept.
        let keep: BTreeSet<WorkerId> = h
            .leads
            .iter()
            .cloned()
            .chain(children_of(&h, &h.leads[0]))
            .collect();
        let rest: Vec<Member> = ms
            .iter()
            .filter(|m| keep.contains(&m.id))
            .cloned()
            .collect();
        let h2 = plan_hierarchy(&rest, 4, Some(&h));
        check(&h2, &rest);
        assert_eq!(h2.leads.len(), 3);
        assert_eq!(h2.leads[0], h.leads[0]);
        assert_eq!(children_of(&h2, &h.leads[0]), children_of(&h, &h.leads[0]));
        assert!(
            !h2.leads.contains(&h.leads[3]),
            "newest childless lead demoted"
        );
    }

    #[test]
    fn shrinking_fan_out_trims_children() {
        let ms = workers(12);
        let h = plan_hierarchy(&ms, 5, None);
        let h2 = plan_hierarchy(&ms, 2, Some(&h));
        check(&h2, &ms);
        assert_eq!(h2.fan_out, 2);
        assert!(h2.leads.len() >= min_leads(12, 2));
        assert!(h2.leads.starts_with(&h.leads));
    }

    #[test]
    fn bounds() {
        assert_eq!(min_leads(20, 4), 4);
        assert_eq!(max_leads(20, 4), 5);
        assert_eq!(min_leads(21, 4), 5);
        assert_eq!(min_leads(0, 4), 0);
        assert_eq!(max_leads(1, 4), 1);
        assert_eq!(min_leads(7, 0), 4);
    }
}
