//! Mesh topology: members hold links to their peers, steal queued work from busy peers
//! and notice lost ones.
//!
//! The peer graph. Small swarms (`n - 1 ≤ max_degree`) are a full mesh. Larger ones get
//! a seeded random graph in which every member has close to `max_degree` peers (never
//! more), built as:
//!
//! 1. a *backbone* cycle through all members in a seeded hash order. The cycle makes the
//!    graph connected by construction, and every later step leaves it alone;
//! 2. the previous plan's links between surviving members (re-plans only), best pair
//!    score first, as long as both ends have room, so that membership changes keep most
//!    links;
//! 3. links by ascending seeded pair score among each member's `2 × max_degree`
//!    best-scoring partners, as long as both ends have room;
//! 4. a repair pass for members still short of the target degree: link two short members,
//!    or split a non-backbone link `x–y` into `u–x` and `u–y` (or `u–x` and `v–y` for two
//!    short members `u`, `v` that are already linked). Splitting keeps `x` and `y` at
//!    their degree and is how a member joining a saturated mesh gets its peers.
//!
//! The result is symmetric, bounded by `max_degree`, connected, and depends only on the
//! member ids, `max_degree`, the seed and the previous plan. Building costs `O(n²)` hash
//! evaluations and `O(n · max_degree)` memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::hash::{hash_str, pair_score};
use crate::member::canonical;
use crate::{Member, TopologyError, WorkerId};

/// The peer graph of a mesh swarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    pub max_degree: u32,
    /// Every member with its peers. Symmetric: `b ∈ peers[a]` ⇔ `a ∈ peers[b]`.
    pub peers: BTreeMap<WorkerId, BTreeSet<WorkerId>>,
}

impl Mesh {
    /// Number of peers of `worker` (0 for a non-member).
    pub fn degree(&self, worker: &str) -> usize {
        self.peers.get(worker).map_or(0, BTreeSet::len)
    }

    /// Every link once, as `(smaller id, larger id)`, sorted.
    pub fn links(&self) -> Vec<(WorkerId, WorkerId)> {
        self.peers
            .iter()
            .flat_map(|(a, ps)| {
                ps.iter()
                    .filter(move |b| a < *b)
                    .map(move |b| (a.clone(), b.clone()))
            })
            .collect()
    }

    /// Whether every member can reach every other over peer links.
    pub fn is_connected(&self) -> bool {
        let Some(start) = self.peers.keys().next() else {
            return true;
        };
        let mut seen: BTreeSet<&WorkerId> = BTreeSet::from([start]);
        let mut queue = VecDeque::from([start]);
        while let Some(w) = queue.pop_front() {
            for p in self.peers.get(w).into_iter().flatten() {
                if seen.insert(p) {
                    queue.push_back(p);
                }
            }
        }
        seen.len() == self.peers.len()
    }
}

/// Plans (or re-plans, given `previous`) the peer graph of `members`. See the module
/// documentation for the construction. A mesh of three or more members needs
/// `max_degree ≥ 2` to be connected.
pub fn plan_mesh(
    members: &[Member],
    max_degree: u32,
    seed: u64,
    previous: Option<&Mesh>,
) -> Result<Mesh, TopologyError> {
    let members = canonical(members);
    let n = members.len();
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    if (n == 2 && max_degree == 0) || (n >= 3 && max_degree < 2) {
        return Err(TopologyError::MeshDegreeTooLow {
            max_degree,
            workers: n,
        });
    }
    let mut g = Graph::new(n, (max_degree as usize).min(n.saturating_sub(1)));

    if n <= max_degree as usize + 1 {
        for a in 0..n {
            for b in a + 1..n {
                g.add(a, b);
            }
        }
        return Ok(g.into_mesh(&ids, max_degree));
    }

    // 1. Backbone cycle (n ≥ 4 here, since n - 1 > max_degree ≥ 2).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (hash_str(seed, ids[i]), ids[i]));
    for (k, &a) in order.iter().enumerate() {
        let b = order[(k + 1) % n];
        g.add(a, b);
        g.backbone.insert(key(a, b));
    }

    // 2. Surviving links of the previous plan.
    if let Some(prev) = previous {
        let index: BTreeMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut kept: Vec<(u64, usize, usize)> = prev
            .links()
            .iter()
            .filter_map(|(a, b)| {
                let (&ia, &ib) = (index.get(a.as_str())?, index.get(b.as_str())?);
                Some((pair_score(seed, a, b), ia.min(ib), ia.max(ib)))
            })
            .collect();
        kept.sort_unstable();
        for (_, a, b) in kept {
            if g.has_room(a) && g.has_room(b) {
                g.add(a, b);
            }
        }
    }

    // 3. Fresh links among each member's best-scoring partners.
    let per_node = 2 * g.target;
    let mut candidates: BTreeSet<(u64, usize, usize)> = BTreeSet::new();
    for a in 0..n {
        let mut scored: Vec<(u64, usize)> = (0..n)
            .filter(|&b| b != a)
            .map(|b| (pair_score(seed, ids[a], ids[b]), b))
            .collect();
        if scored.len() > per_node {
            scored.select_nth_unstable(per_node);
            scored.truncate(per_node);
        }
        for (s, b) in scored {
            candidates.insert((s, a.min(b), a.max(b)));
        }
    }
    for (_, a, b) in candidates {
        if g.has_room(a) && g.has_room(b) && !g.adj[a].contains(&b) {
            g.add(a, b);
        }
    }

    // 4. Repair members short of the target degree.
    g.fill_deficits(|a, b| pair_score(seed, ids[a], ids[b]));

    let mesh = g.into_mesh(&ids, max_degree);
    debug_assert!(mesh.is_connected());
    Ok(mesh)
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// Adjacency over member indices, with the backbone links marked.
struct Graph {
    adj: Vec<BTreeSet<usize>>,
    backbone: BTreeSet<(usize, usize)>,
    target: usize,
}

impl Graph {
    fn new(n: usize, target: usize) -> Self {
        Graph {
            adj: vec![BTreeSet::new(); n],
            backbone: BTreeSet::new(),
            target,
        }
    }

    fn add(&mut self, a: usize, b: usize) {
        self.adj[a].insert(b);
        self.adj[b].insert(a);
    }

    fn remove(&mut self, a: usize, b: usize) {
        self.adj[a].remove(&b);
        self.adj[b].remove(&a);
    }

    fn has_room(&self, a: usize) -> bool {
        self.adj[a].len() < self.target
    }

    /// Links that may be split: every non-backbone link, best score first.
    fn splittable(&self, score: &impl Fn(usize, usize) -> u64) -> Vec<(usize, usize)> {
        let mut out: Vec<(u64, usize, usize)> = self
            .adj
            .iter()
            .enumerate()
            .flat_map(|(a, bs)| bs.iter().filter(move |&&b| a < b).map(move |&b| (a, b)))
            .filter(|e| !self.backbone.contains(e))
            .map(|(a, b)| (score(a, b), a, b))
            .collect();
        out.sort_unstable();
        out.into_iter().map(|(_, a, b)| (a, b)).collect()
    }

    fn fill_deficits(&mut self, score: impl Fn(usize, usize) -> u64) {
        let n = self.adj.len();
        for u in 0..n {
            while self.has_room(u) {
                // Another short member not yet linked to u.
                let partner = (0..n)
                    .filter(|&v| v != u && self.has_room(v) && !self.adj[u].contains(&v))
                    .min_by_key(|&v| (score(u, v), v));
                if let Some(v) = partner {
                    self.add(u, v);
                    continue;
                }
                // Short by two or more: split x–y into u–x, u–y.
                if self.target - self.adj[u].len() >= 2 {
                    let split = self.splittable(&score).into_iter().find(|&(x, y)| {
                        x != u && y != u && !self.adj[u].contains(&x) && !self.adj[u].contains(&y)
                    });
                    if let Some((x, y)) = split {
                        self.remove(x, y);
                        self.add(u, x);
                        self.add(u, y);
                        continue;
                    }
                }
                // Short by one, and so is v (already linked to u): split x–y into u–x, v–y.
                let edges = self.splittable(&score);
                let split = (0..n)
                    .filter(|&v| v != u && self.has_room(v))
                    .find_map(|v| {
                        edges.iter().find_map(|&(x, y)| {
                            let fits = |x: usize, y: usize| {
                                x != u
                                    && x != v
                                    && y != u
                                    && y != v
                                    && !self.adj[u].contains(&x)
                                    && !self.adj[v].contains(&y)
                            };
                            if fits(x, y) {
                                Some((v, x, y))
                            } else if fits(y, x) {
                                Some((v, y, x))
                            } else {
                                None
                            }
                        })
                    });
                match split {
                    Some((v, x, y)) => {
                        self.remove(x, y);
                        self.add(u, x);
                        self.add(v, y);
                    }
                    None => break,
                }
            }
        }
    }

    fn into_mesh(self, ids: &[&str], max_degree: u32) -> Mesh {
        let peers = self
            .adj
            .iter()
            .enumerate()
            .map(|(a, bs)| {
                (
                    ids[a].to_string(),
                    bs.iter().map(|&b| ids[b].to_string()).collect(),
                )
            })
            .collect();
        Mesh { max_degree, peers }
    }
}

/// Limits on work stealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StealPolicy {
    /// Most tasks taken in one steal; 0 disables stealing.
    pub max_batch: u32,
    /// A peer is a victim only with at least this many queued tasks beyond its free
    /// slots (values below 1 count as 1: a peer with nothing waiting is never robbed).
    pub min_excess: u32,
}

impl Default for StealPolicy {
    fn default() -> Self {
        StealPolicy {
            max_batch: 8,
            min_excess: 1,
        }
    }
}

/// "Take `count` queued tasks from `victim`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Steal {
    pub victim: WorkerId,
    pub count: u32,
}

/// What an idle `thief` (free slots, empty local queue) takes from its `peers`: from the
/// peer with the most queued work beyond its free slots (ties: the more loaded peer,
/// then the smaller id), half of that excess rounded up, at most the thief's free slots
/// and the policy's batch. `None` if the thief is not idle or no peer has excess.
pub fn steal_decision(thief: &Member, peers: &[Member], policy: &StealPolicy) -> Option<Steal> {
    if thief.queued_local > 0 || thief.free_slots() == 0 || policy.max_batch == 0 {
        return None;
    }
    let min_excess = policy.min_excess.max(1);
    let victim = peers
        .iter()
        .filter(|p| p.id != thief.id && p.queued_local > 0 && p.excess() >= min_excess)
        .min_by(|a, b| {
            b.excess()
                .cmp(&a.excess())
                .then_with(|| {
                    crate::member::cmp_ratio(
                        u64::from(b.running),
                        u64::from(b.slots),
                        u64::from(a.running),
                        u64::from(a.slots),
                    )
                })
                .then_with(|| a.id.cmp(&b.id))
        })?;
    let count = victim
        .excess()
        .div_ceil(2)
        .min(thief.free_slots())
        .min(policy.max_batch);
    Some(Steal {
        victim: victim.id.clone(),
        count,
    })
}

/// Peers not heard from for more than `timeout_ms` at `now_ms`, sorted by id. A
/// timestamp ahead of `now_ms` counts as just seen.
pub fn lost_peers(
    last_seen: &BTreeMap<WorkerId, u64>,
    now_ms: u64,
    timeout_ms: u64,
) -> Vec<WorkerId> {
    last_seen
        .iter()
        .filter(|(_, &seen)| now_ms.saturating_sub(seen) > timeout_ms)
        .map(|(id, _)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("w{i:03}"), 4)).collect()
    }

    fn check(mesh: &Mesh, members: &[Member], max_degree: u32) {
        assert_eq!(mesh.peers.len(), members.len());
        for (a, ps) in &mesh.peers {
            assert!(
                ps.len() <= max_degree as usize,
                "{a} has degree {}",
                ps.len()
            );
            assert!(!ps.contains(a), "{a} is its own peer");
            for b in ps {
                assert!(mesh.peers[b].contains(a), "{a}–{b} not symmetric");
            }
        }
        assert!(mesh.is_connected());
    }

    #[test]
    fn small_swarm_is_a_full_mesh() {
        let ms = workers(5);
        let mesh = plan_mesh(&ms, 4, 1, None).unwrap();
        check(&mesh, &ms, 4);
        for m in &ms {
            assert_eq!(mesh.degree(&m.id), 4);
        }
        assert_eq!(mesh.links().len(), 10);
        let two = plan_mesh(&workers(2), 1, 1, None).unwrap();
        assert_eq!(two.links(), vec![("w000".to_string(), "w001".to_string())]);
        let one = plan_mesh(&workers(1), 3, 1, None).unwrap();
        assert_eq!(one.degree("w000"), 0);
        assert!(one.is_connected());
        assert!(plan_mesh(&[], 3, 1, None).unwrap().peers.is_empty());
    }

    #[test]
    fn large_swarm_is_bounded_regular_and_connected() {
        let ms = workers(60);
        for seed in 0..5 {
            let mesh = plan_mesh(&ms, 6, seed, None).unwrap();
            check(&mesh, &ms, 6);
            let short = ms.iter().filter(|m| mesh.degree(&m.id) < 6).count();
            assert_eq!(
                short, 0,
                "seed {seed}: 60 × 6 is even, every member gets 6 peers"
            );
        }
        // Odd degree sum: exactly one member is one short.
        let ms = workers(31);
        let mesh = plan_mesh(&ms, 5, 9, None).unwrap();
        check(&mesh, &ms, 5);
        let degrees: Vec<usize> = ms.iter().map(|m| mesh.degree(&m.id)).collect();
        assert_eq!(degrees.iter().filter(|&&d| d == 4).count(), 1);
        assert_eq!(degrees.iter().filter(|&&d| d == 5).count(), 30);
    }

    #[test]
    fn deterministic_per_seed_and_independent_of_input_order() {
        let ms = workers(40);
        let a = plan_mesh(&ms, 5, 42, None).unwrap();
        let mut rev = ms.clone();
        rev.reverse();
        assert_eq!(plan_mesh(&rev, 5, 42, None).unwrap(), a);
        assert_ne!(plan_mesh(&ms, 5, 43, None).unwrap(), a);
    }

    #[test]
    fn degree_two_is_a_ring() {
        let ms = workers(12);
        let mesh = plan_mesh(&ms, 2, 3, None).unwrap();
        check(&mesh, &ms, 2);
        assert!(ms.iter().all(|m| mesh.degree(&m.id) == 2));
    }

    #[test]
    fn degree_one_cannot_connect_three() {
        assert_eq!(
            plan_mesh(&workers(3), 1, 0, None),
            Err(TopologyError::MeshDegreeTooLow {
                max_degree: 1,
                workers: 3
            })
        );
    }

    #[test]
    fn replan_keeps_most_links() {
        let ms = workers(50);
        let before = plan_mesh(&ms, 6, 7, None).unwrap();
        // One member leaves.
        let gone = "w017";
        let rest: Vec<Member> = ms.iter().filter(|m| m.id != gone).cloned().collect();
        let after = plan_mesh(&rest, 6, 7, Some(&before)).unwrap();
        check(&after, &rest, 6);
        let old: BTreeSet<_> = before
            .links()
            .into_iter()
            .filter(|(a, b)| a != gone && b != gone)
            .collect();
        let new: BTreeSet<_> = after.links().into_iter().collect();
        let dropped = old.difference(&new).count();
        assert!(dropped <= 6, "{dropped} surviving links dropped");
        // One member joins a saturated mesh: it gets a full set of peers, by splitting.
        let mut more = ms.clone();
        more.push(Member::new("w999", 4));
        let grown = plan_mesh(&more, 6, 7, Some(&before)).unwrap();
        check(&grown, &more, 6);
        assert_eq!(grown.degree("w999"), 6);
        let kept = before
            .links()
            .into_iter()
            .filter(|l| grown.links().contains(l))
            .count();
        assert!(
            kept + 6 >= before.links().len(),
            "kept {kept} of {}",
            before.links().len()
        );
    }

    fn busy(id: &str, slots: u32, running: u32, queued: u32) -> Member {
        Member::new(id, slots).with_load(running, queued)
    }

    #[test]
    fn idle_worker_steals_half_the_largest_excess() {
        let thief = busy("t", 4, 0, 0);
        let peers = vec![
            busy("a", 2, 2, 3),
            busy("b", 2, 2, 6),
            busy("c", 4, 1, 2), // queued 2, but 3 free slots: no excess
        ];
        let s = steal_decision(&thief, &peers, &StealPolicy::default()).unwrap();
        assert_eq!(
            s,
            Steal {
                victim: "b".into(),
                count: 3
            }
        );
        // Capped by the thief's free slots and by the batch size.
        let small = busy("t", 4, 3, 0);
        assert_eq!(
            steal_decision(&small, &peers, &StealPolicy::default())
                .unwrap()
                .count,
            1
        );
        let policy = StealPolicy {
            max_batch: 2,
            min_excess: 1,
        };
        assert_eq!(steal_decision(&thief, &peers, &policy).unwrap().count, 2);
        // An excess of one is taken whole.
        let s = steal_decision(&thief, &[busy("a", 1, 1, 1)], &StealPolicy::default()).unwrap();
        assert_eq!(s.count, 1);
    }

    #[test]
    fn never_steals_when_not_idle_or_nothing_is_queued() {
        let peers = vec![busy("a", 2, 2, 0), busy("b", 2, 1, 1)];
        let thief = busy("t", 4, 0, 0);
        assert_eq!(
            steal_decision(&thief, &peers, &StealPolicy::default()),
            None
        );
        let loaded = vec![busy("a", 2, 2, 5)];
        assert_eq!(
            steal_decision(&busy("t", 4, 4, 0), &loaded, &StealPolicy::default()),
            None
        );
        assert_eq!(
            steal_decision(&busy("t", 4, 0, 1), &loaded, &StealPolicy::default()),
            None
        );
        assert_eq!(
            steal_decision(
                &thief,
                &loaded,
                &StealPolicy {
                    max_batch: 0,
                    min_excess: 1
                }
            ),
            None
        );
        assert_eq!(
            steal_decision(
                &thief,
                &loaded,
                &StealPolicy {
                    max_batch: 8,
                    min_excess: 6
                }
            ),
            None
        );
        // A thief never robs itself even if listed among its peers.
        let me = busy("t", 4, 0, 0);
        assert_eq!(
            steal_decision(&me, std::slice::from_ref(&me), &StealPolicy::default()),
            None
        );
    }

    #[test]
    fn steal_ties_go_to_the_more_loaded_then_smaller_id() {
        let thief = busy("t", 4, 0, 0);
        let peers = vec![busy("b", 2, 2, 4), busy("a", 4, 2, 6), busy("c", 2, 2, 4)];
        // Excess: b 4, a 4 (6 queued, 2 free), c 4. a is at half load, b and c are full.
        let s = steal_decision(&thief, &peers, &StealPolicy::default()).unwrap();
        assert_eq!(s.victim, "b");
        let mut rev = peers.clone();
        rev.reverse();
        assert_eq!(
            steal_decision(&thief, &rev, &StealPolicy::default()).unwrap(),
            s
        );
    }

    #[test]
    fn lost_peers_past_the_timeout() {
        let seen: BTreeMap<WorkerId, u64> =
            [("a", 1_000), ("b", 4_000), ("c", 9_000), ("d", 5_000)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(lost_peers(&seen, 6_000, 1_000), ["a", "b"]);
        assert_eq!(lost_peers(&seen, 6_000, 5_000), Vec::<String>::new());
        assert_eq!(lost_peers(&seen, 6_001, 5_000), ["a"]);
    }
}
