//! Property tests of the planners over random memberships and histories.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::subsequence;

use swarm_topology::{
    children_of, coordinator_links, lost_peers, max_leads, membership, min_leads, plan_hierarchy,
    plan_mesh, plan_ring, repair_ring, route_to, steal_decision, Hierarchy, Member, Mesh,
    RingProgress, Route, StageSpec, StealPolicy, SwarmSpec, TopologyError, TopologyKind,
    TopologySpec, WorkerId,
};

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i:03}")).collect()
}

/// `n` members with the given slot counts (cycled).
fn members(n: usize, slots: &[u32]) -> Vec<Member> {
    ids(n)
        .into_iter()
        .enumerate()
        .map(|(i, id)| Member::new(id, slots[i % slots.len()]))
        .collect()
}

fn shuffled(ms: &[Member], seed: u64) -> Vec<Member> {
    // A seeded Fisher–Yates shuffle, enough to check order independence.
    let mut out = ms.to_vec();
    let mut x = seed | 1;
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

/// Every member has exactly one route; leads have at most `fan_out` children; parents
/// are leads.
fn check_hierarchy(h: &Hierarchy, ms: &[Member]) {
    let member_ids: BTreeSet<&String> = ms.iter().map(|m| &m.id).collect();
    let mut listed = BTreeSet::new();
    for w in h.members() {
        assert!(listed.insert(w), "{w} appears twice");
    }
    assert_eq!(listed, member_ids);
    for m in ms {
        match route_to(h, &m.id) {
            Some(Route::Direct) => assert!(h.leads.contains(&m.id)),
            Some(Route::ViaLead(l)) => {
                assert!(h.leads.contains(&l));
                assert!(!h.leads.contains(&m.id));
            }
            None => panic!("{} has no route", m.id),
        }
    }
    for l in &h.leads {
        assert!(children_of(h, l).len() <= h.fan_out as usize);
    }
    assert_eq!(coordinator_links(h).len(), h.leads.len());
}

fn check_mesh(mesh: &Mesh, ms: &[Member], max_degree: u32) {
    assert_eq!(mesh.peers.len(), ms.len());
    for (a, ps) in &mesh.peers {
        assert!(ps.len() <= max_degree as usize);
        assert!(!ps.contains(a));
        for b in ps {
            assert!(
                mesh.peers.get(b).is_some_and(|bp| bp.contains(a)),
                "{a}-{b} asymmetric"
            );
        }
    }
    assert!(mesh.is_connected());
}

#[derive(Debug, Clone)]
enum Change {
    Join(u32),
    Leave(usize),
    LoseLead(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (1u32..9).prop_map(Change::Join),
        any::<usize>().prop_map(Change::Leave),
        any::<usize>().prop_map(Change::LoseLead),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn hierarchy_fresh_plan(n in 0usize..120, fan_out in 1u32..10, slots in prop::collection::vec(1u32..9, 1..5), seed in any::<u64>()) {
        let ms = members(n, &slots);
        let h = plan_hierarchy(&ms, fan_out, None);
        check_hierarchy(&h, &ms);
        prop_assert_eq!(h.leads.len(), min_leads(n, fan_out));
        prop_assert_eq!(plan_hierarchy(&shuffled(&ms, seed), fan_out, None), h.clone());
        // Children are spread evenly.
        let sizes: Vec<usize> = h.leads.iter().map(|l| children_of(&h, l).len()).collect();
        if let (Some(lo), Some(hi)) = (sizes.iter().min(), sizes.iter().max()) {
            prop_assert!(hi - lo <= 1, "{:?}", sizes);
        }
    }

    #[test]
    fn hierarchy_losing_a_lead_keeps_other_children(n in 1usize..100, fan_out in 1u32..8, pick in any::<usize>()) {
        let ms = members(n, &[4]);
        let h = plan_hierarchy(&ms, fan_out, None);
        let lost = h.leads[pick % h.leads.len()].clone();
        let rest: Vec<Member> = ms.iter().filter(|m| m.id != lost).cloned().collect();
        let h2 = plan_hierarchy(&rest, fan_out, Some(&h));
        check_hierarchy(&h2, &rest);
        for l in h.leads.iter().filter(|l| **l != lost) {
            prop_assert!(h2.leads.contains(l), "surviving lead {} demoted", l);
            for kid in children_of(&h, l) {
                prop_assert_eq!(h2.parent.get(&kid), Some(l), "child {} of surviving lead moved", kid);
            }
        }
        prop_assert!(h2.leads.len() >= min_leads(rest.len(), fan_out));
        prop_assert!(h2.leads.len() <= max_leads(rest.len(), fan_out));
    }

    #[test]
    fn hierarchy_under_churn(start in 0usize..40, fan_out in 1u32..7, changes in prop::collection::vec(change(), 1..25)) {
        let mut ms = members(start, &[2, 4, 8]);
        let mut h = plan_hierarchy(&ms, fan_out, None);
        let mut next_id = start;
        for c in changes {
            match c {
                Change::Join(slots) => {
                    ms.push(Member::new(format!("n{next_id:03}"), slots));
                    next_id += 1;
                }
                Change::Leave(i) if !ms.is_empty() => { ms.remove(i % ms.len()); }
                Change::LoseLead(i) if !h.leads.is_empty() => {
                    let lead = h.leads[i % h.leads.len()].clone();
                    ms.retain(|m| m.id != lead);
                }
                _ => {}
            }
            let h2 = plan_hierarchy(&ms, fan_out, Some(&h));
            check_hierarchy(&h2, &ms);
            let n = ms.len();
            prop_assert!(h2.leads.len() >= min_leads(n, fan_out));
            prop_assert!(h2.leads.len() <= max_leads(n, fan_out));
            // Surviving leads are demoted only when there are too many of them, and only
            // as many as needed.
            let alive: BTreeSet<&String> = ms.iter().map(|m| &m.id).collect();
            let surviving: Vec<&String> = h.leads.iter().filter(|l| alive.contains(l)).collect();
            let demoted = surviving.iter().filter(|l| !h2.leads.contains(l)).count();
            prop_assert_eq!(demoted, surviving.len().saturating_sub(max_leads(n, fan_out)));
            // A surviving child of a lead that stayed lead keeps it.
            for (kid, lead) in &h.parent {
                if alive.contains(kid) && h2.leads.contains(lead) {
                    prop_assert_eq!(h2.parent.get(kid), Some(lead));
                }
            }
            // 20 workers with fan-out 4 never need more than 5 coordinator links.
            if n == 20 && fan_out == 4 {
                prop_assert!(coordinator_links(&h2).len() <= 5);
            }
            h = h2;
        }
    }

    #[test]
    fn mesh_fresh_plan(n in 0usize..70, max_degree in 2u32..9, seed in any::<u64>()) {
        let ms = members(n, &[4]);
        let mesh = plan_mesh(&ms, max_degree, seed, None).unwrap();
        check_mesh(&mesh, &ms, max_degree);
        prop_assert_eq!(&plan_mesh(&shuffled(&ms, seed), max_degree, seed, None).unwrap(), &mesh);
        let target = (max_degree as usize).min(n.saturating_sub(1));
        if n > 0 && n - 1 <= max_degree as usize {
            prop_assert!(ms.iter().all(|m| mesh.degree(&m.id) == n - 1), "not a full mesh");
        }
        // Regular-ish: at most one member short of the target degree, by one.
        let short: Vec<usize> = ms.iter().map(|m| mesh.degree(&m.id)).filter(|&d| d < target).collect();
        prop_assert!(short.len() <= 1 && short.iter().all(|&d| d + 1 == target), "short: {:?}", short);
    }

    #[test]
    fn mesh_replan_under_churn(n in 3usize..50, max_degree in 2u32..7, seed in any::<u64>(), leave in subsequence((0..50usize).collect::<Vec<_>>(), 0..6), join in 0usize..4) {
        let ms = members(n, &[4]);
        let before = plan_mesh(&ms, max_degree, seed, None).unwrap();
        let gone: BTreeSet<String> = leave.iter().filter(|&&i| i < n).map(|i| format!("w{i:03}")).collect();
        let mut now: Vec<Member> = ms.iter().filter(|m| !gone.contains(&m.id)).cloned().collect();
        now.extend((0..join).map(|i| Member::new(format!("x{i}"), 4)));
        let after = plan_mesh(&now, max_degree, seed, Some(&before)).unwrap();
        check_mesh(&after, &now, max_degree);
        prop_assert_eq!(&plan_mesh(&now, max_degree, seed, Some(&before)).unwrap(), &after);
        // Most links between surviving members survive: each departure or arrival costs
        // a bounded number of them.
        let old: BTreeSet<(WorkerId, WorkerId)> = before.links().into_iter()
            .filter(|(a, b)| !gone.contains(a) && !gone.contains(b)).collect();
        let new: BTreeSet<(WorkerId, WorkerId)> = after.links().into_iter().collect();
        let dropped = old.difference(&new).count();
        let churn = gone.len() + join;
        prop_assert!(dropped <= churn * (max_degree as usize + 2), "dropped {} links for {} changes", dropped, churn);
    }

    #[test]
    fn steal_rules(
        thief in (1u32..8, 0u32..8, 0u32..3),
        peers in prop::collection::vec((1u32..8, 0u32..10, 0u32..12), 0..8),
        max_batch in 0u32..6,
        min_excess in 0u32..4,
    ) {
        let thief = Member::new("thief", thief.0).with_load(thief.1, thief.2);
        let peers: Vec<Member> = peers.iter().enumerate()
            .map(|(i, &(s, r, q))| Member::new(format!("p{i}"), s).with_load(r, q))
            .collect();
        let policy = StealPolicy { max_batch, min_excess };
        let best = peers.iter().map(Member::excess).max().unwrap_or(0);
        match steal_decision(&thief, &peers, &policy) {
            Some(s) => {
                prop_assert!(thief.free_slots() > 0 && thief.queued_local == 0, "thief not idle");
                let v = peers.iter().find(|p| p.id == s.victim).unwrap();
                prop_assert!(v.queued_local > 0);
                prop_assert_eq!(v.excess(), best);
                prop_assert!(v.excess() >= min_excess.max(1));
                prop_assert!(s.count >= 1);
                prop_assert!(s.count <= thief.free_slots() && s.count <= max_batch);
                prop_assert!(s.count <= v.excess().div_ceil(2));
                prop_assert!(s.count <= v.queued_local);
            }
            None => {
                let idle = thief.free_slots() > 0 && thief.queued_local == 0;
                prop_assert!(!idle || max_batch == 0 || best < min_excess.max(1));
            }
        }
    }

    #[test]
    fn lost_peers_rule(seen in prop::collection::btree_map("[a-e]{1,2}", 0u64..10_000, 0..10), now in 0u64..12_000, timeout in 0u64..5_000) {
        let lost = lost_peers(&seen, now, timeout);
        for (id, &t) in &seen {
            prop_assert_eq!(lost.contains(id), now > t && now - t > timeout);
        }
    }

    #[test]
    fn ring_assignment_and_repair(
        caps in prop::collection::vec((prop::collection::btree_set(0usize..4, 0..4), any::<bool>(), 1u32..4, 0u32..4), 1..10),
        stage_agents in prop::collection::vec((0usize..4, any::<bool>()), 1..6),
        dead in subsequence((0..10usize).collect::<Vec<_>>(), 0..4),
    ) {
        let agent = |i: usize| ["coder", "reviewer", "tester", "writer"][i].to_string();
        let ms: Vec<Member> = caps.iter().enumerate().map(|(i, (agents, gpu, slots, running))| {
            let mut m = Member::new(format!("w{i}"), *slots).with_load(*running, 0);
            m.agents = agents.iter().map(|&a| agent(a)).collect();
            if *gpu { m.labels.insert("gpu".into(), "1".into()); }
            m
        }).collect();
        let stages: Vec<StageSpec> = stage_agents.iter().map(|&(a, gpu)| {
            let s = StageSpec::new(agent(a));
            if gpu { s.with_label("gpu", "1") } else { s }
        }).collect();
        let servable = |ms: &[Member], s: &StageSpec| ms.iter().any(|m| m.can_serve(s));
        match plan_ring(&ms, &stages) {
            Err(TopologyError::EmptyStage { stage, .. }) => {
                prop_assert!(!servable(&ms, &stages[stage]));
                prop_assert!(stages[..stage].iter().all(|s| servable(&ms, s)));
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
            Ok(ring) => {
                prop_assert_eq!(ring.len(), stages.len());
                for (i, a) in ring.order.iter().enumerate() {
                    prop_assert_eq!(a.stage, i);
                    let m = ms.iter().find(|m| m.id == a.worker).unwrap();
                    prop_assert!(m.can_serve(&stages[i]));
                }
                // Stages spread: a worker gets a second stage only if every worker able
                // to serve that stage has one already.
                for w in ring.workers() {
                    let on = ring.stages_on(w);
                    if on.len() >= 2 {
                        let spread = on.iter().any(|&i| {
                            ms.iter().filter(|m| m.can_serve(&stages[i]))
                                .all(|m| !ring.stages_on(&m.id).is_empty())
                        });
                        prop_assert!(spread, "{} serves {:?} while a capable worker is unused", w, on);
                    }
                }
                let alive: Vec<Member> = ms.iter().enumerate()
                    .filter(|(i, _)| !dead.contains(i)).map(|(_, m)| m.clone()).collect();
                let gone: BTreeSet<String> = dead.iter().map(|i| format!("w{i}")).collect();
                match repair_ring(&ring, &alive, &stages) {
                    Ok(fixed) => {
                        for (i, stage) in stages.iter().enumerate() {
                            let old = ring.worker_for(i).unwrap();
                            let new = fixed.worker_for(i).unwrap();
                            if gone.contains(old) {
                                prop_assert_ne!(old, new);
                            } else {
                                prop_assert_eq!(old, new, "live stage {} moved", i);
                            }
                            prop_assert!(alive.iter().any(|m| &m.id == new && m.can_serve(stage)));
                        }
                    }
                    Err(TopologyError::NoWorkers) => prop_assert!(alive.is_empty()),
                    Err(TopologyError::EmptyStage { stage, .. }) => {
                        prop_assert!(gone.contains(ring.worker_for(stage).unwrap()));
                        prop_assert!(!servable(&alive, &stages[stage]));
                    }
                    Err(e) => prop_assert!(false, "unexpected error {}", e),
                }
            }
        }
    }

    /// Runs tasks through a ring whose workers die at random points. Every stage's
    /// input is the previous stage's output, no completed stage runs again, and the
    /// result is the composition of all stages.
    #[test]
    fn ring_progress_resumes_without_rerunning(
        stage_count in 1usize..6,
        workers in 2usize..6,
        deaths in prop::collection::vec(any::<bool>(), 0..30),
        duplicate in prop::collection::vec(any::<bool>(), 0..30),
        payload in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let stages: Vec<StageSpec> = (0..stage_count).map(|_| StageSpec::new("step")).collect();
        let mut pool: Vec<Member> = (0..workers).map(|i| Member::new(format!("w{i}"), 1).with_agent("step")).collect();
        let mut ring = plan_ring(&pool, &stages).unwrap();
        let mut progress = RingProgress::new(stage_count, payload.clone());
        // Stage i appends i to its input.
        let run = |stage: usize, input: &[u8]| { let mut o = input.to_vec(); o.push(stage as u8); o };
        let mut completed_runs = vec![0usize; stage_count];
        let mut step = 0usize;
        let mut spare = 0usize;
        while let Some(d) = progress.resume(&ring).unwrap() {
            prop_assert_eq!(d.stage, progress.completed(), "resumed at the wrong stage");
            prop_assert_eq!(ring.worker_for(d.stage), Some(&d.worker));
            let expected: Vec<u8> = (0..d.stage).fold(payload.clone(), |acc, i| run(i, &acc));
            prop_assert_eq!(&d.input, &expected);
            let output = run(d.stage, &d.input);
            if deaths.get(step).copied().unwrap_or(false) {
                // The stage's worker dies before reporting: replace it and repair.
                pool.retain(|m| m.id != d.worker);
                pool.push(Member::new(format!("spare{spare}"), 1).with_agent("step"));
                spare += 1;
                let fixed = repair_ring(&ring, &pool, &stages).unwrap();
                prop_assert!(ring.moved_stages(&fixed).contains(&d.stage));
                ring = fixed;
            } else {
                progress.advance(d.stage, output.clone()).unwrap();
                completed_runs[d.stage] += 1;
                if duplicate.get(step).copied().unwrap_or(false) {
                    prop_assert_eq!(
                        progress.advance(d.stage, output),
                        Err(TopologyError::StageAlreadyCompleted { stage: d.stage })
                    );
                }
            }
            step += 1;
        }
        prop_assert!(completed_runs.iter().all(|&c| c == 1), "{:?}", completed_runs);
        let expected: Vec<u8> = (0..stage_count).fold(payload.clone(), |acc, i| run(i, &acc));
        prop_assert_eq!(progress.result(), Some(expected.as_slice()));
    }

    #[test]
    fn unknown_topology_names_are_rejected(s in "[a-z]{0,12}") {
        let names = TopologyKind::NAMES;
        match s.parse::<TopologyKind>() {
            Ok(k) => prop_assert!(names.contains(&k.as_str()) && k.as_str() == s),
            Err(e) => {
                prop_assert!(!names.contains(&s.as_str()));
                let msg = e.to_string();
                for n in names { prop_assert!(msg.contains(n)); }
            }
        }
    }
}

#[test]
fn twenty_workers_fan_out_four_hold_at_most_five_coordinator_links() {
    let ms = members(20, &[4]);
    let mut h = plan_hierarchy(&ms, 4, None);
    assert_eq!(coordinator_links(&h).len(), 4);
    // Every single-lead loss followed by a replacement keeps it at ≤ 5.
    for round in 0..10 {
        let lead = h.leads[round % h.leads.len()].clone();
        let mut next: Vec<Member> = h
            .members()
            .filter(|w| **w != lead)
            .map(|w| Member::new(w.clone(), 4))
            .collect();
        next.push(Member::new(format!("r{round}"), 4));
        h = plan_hierarchy(&next, 4, Some(&h));
        check_hierarchy(&h, &next);
        assert!(coordinator_links(&h).len() <= 5);
    }
}

#[test]
fn bad_input_errors() {
    let err = "pipeline".parse::<TopologyKind>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown topology \"pipeline\": expected one of star, hierarchical, mesh, ring"
    );

    let ring = TopologySpec::Ring {
        stages: vec![StageSpec::new("coder")],
    };
    assert_eq!(
        plan_ring(&[], &[StageSpec::new("coder")]),
        Err(TopologyError::NoWorkers)
    );
    let spec = SwarmSpec::new("r", ring, BTreeMap::new()).unwrap();
    assert_eq!(
        swarm_topology::plan(&spec, &[], 0, None),
        Err(TopologyError::NoWorkers)
    );
    assert_eq!(
        TopologySpec::Ring { stages: vec![] }.validate(),
        Err(TopologyError::EmptyRing)
    );

    let spec = SwarmSpec::new(
        "gpus",
        TopologySpec::Star,
        [("gpu".to_string(), "h100".to_string())]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let all = vec![Member::new("w1", 2).with_label("gpu", "a10")];
    let err = membership(&spec, &all).unwrap_err();
    assert_eq!(err.code(), "no_matching_workers");
    assert_eq!(err.to_string(), "no worker matches the selector gpu=h100");
}
