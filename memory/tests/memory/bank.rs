//! ReasoningBank: add, retrieve (scoring, MMR, filters), judge, consolidate, determinism.

use super::common::store_with;
use swarm_memory::{
    beta_confidence, embed_items, ConsolidateParams, HashEmbedder, MemoryError, MemoryOp,
    MemoryStore, NewPattern, OpOutcome, Outcome, RetrieveParams, RuleDistiller, TaskSummary,
};

const DAY: u64 = 24 * 3600 * 1000;

fn bank() -> MemoryStore {
    store_with(|c| c.pattern_dimension = 8)
}

fn v(xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; 8];
    out[..xs.len()].copy_from_slice(xs);
    out
}

fn pat(title: &str, embedding: Vec<f32>, outcome: Outcome) -> NewPattern {
    NewPattern {
        title: title.into(),
        description: format!("about {title}"),
        content: format!("content of {title}"),
        embedding,
        source_task: Some(1),
        outcome,
    }
}

fn add(s: &mut MemoryStore, items: Vec<NewPattern>, now_ms: u64) -> Vec<String> {
    match s.apply(MemoryOp::PatternAdd { items, now_ms }).unwrap() {
        OpOutcome::PatternsAdded { ids } => ids,
        other => panic!("{other:?}"),
    }
}

fn judge(s: &mut MemoryStore, ids: &[&str], outcome: Outcome, now_ms: u64) -> OpOutcome {
    s.apply(MemoryOp::PatternJudge {
        task_id: Some(9),
        item_ids: ids.iter().map(|x| x.to_string()).collect(),
        outcome,
        now_ms,
    })
    .unwrap()
}

fn titles(r: &[swarm_memory::RetrievedItem]) -> Vec<String> {
    r.iter().map(|x| x.item.title.clone()).collect()
}

#[test]
fn add_assigns_sequential_ids_and_prior_confidence() {
    let mut s = bank();
    let ids = add(
        &mut s,
        vec![
            pat("a", v(&[1.0]), Outcome::Success),
            pat("b", v(&[0.0, 1.0]), Outcome::Failure),
        ],
        5,
    );
    assert_eq!(ids, ["pat-000000000001", "pat-000000000002"]);
    let a = s.pattern(&ids[0]).unwrap();
    assert_eq!(a.confidence, 0.5);
    assert_eq!((a.use_count, a.created_ms, a.last_used_ms), (0, 5, None));
    assert_eq!(s.pattern_count(), 2);
    let ids2 = add(
        &mut s,
        vec![pat("c", v(&[0.0, 0.0, 1.0]), Outcome::Success)],
        6,
    );
    assert_eq!(ids2, ["pat-000000000003"]);
    let e = s.pattern_embedding(&ids[0]).unwrap();
    assert_eq!(e.len(), 8);
}

#[test]
fn judge_updates_counts_confidence_and_last_used() {
    let mut s = bank();
    let ids = add(
        &mut s,
        vec![
            pat("a", v(&[1.0]), Outcome::Success),
            pat("b", v(&[0.0, 1.0]), Outcome::Success),
        ],
        5,
    );
    let (a, b) = (ids[0].as_str(), ids[1].as_str());
    let out = judge(&mut s, &[a, a, b, "pat-404"], Outcome::Success, 100);
    assert_eq!(
        out,
        OpOutcome::Judged {
            updated: vec![a.to_string(), b.to_string()],
            missing: vec!["pat-404".into()]
        }
    );
    judge(&mut s, &[a], Outcome::Success, 200);
    judge(&mut s, &[a], Outcome::Failure, 150);
    let ia = s.pattern(a).unwrap();
    assert_eq!(
        (ia.use_count, ia.success_count, ia.failure_count),
        (3, 2, 1)
    );
    assert!((ia.confidence - 3.0 / 5.0).abs() < 1e-12);
    assert_eq!(ia.confidence, beta_confidence(2, 1, 1.0, 1.0));
    assert_eq!(
        ia.last_used_ms,
        Some(200),
        "last-used never moves backwards"
    );
    let ib = s.pattern(b).unwrap();
    assert!((ib.confidence - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn retrieve_blends_similarity_confidence_and_recency() {
    let mut s = bank();
    let ids = add(
        &mut s,
        vec![
            pat("exact", v(&[1.0]), Outcome::Success),
            pat("close-proven", v(&[1.0, 0.15]), Outcome::Success),
            pat("unrelated", v(&[0.0, 0.0, 1.0]), Outcome::Success),
            pat("opposite", v(&[-1.0]), Outcome::Success),
        ],
        0,
    );
    for t in 0..10 {
        judge(&mut s, &[&ids[1]], Outcome::Success, t);
    }
    let q = v(&[1.0]);
    let pure = RetrieveParams {
        w_similarity: 1.0,
        w_recency: 0.0,
        w_confidence: 0.0,
        mmr_lambda: 1.0,
        ..Default::default()
    };
    let r = s.retrieve(&q, 4, 10, &pure).unwrap();
    assert_eq!(
        titles(&r),
        ["exact", "close-proven", "unrelated"],
        "min_similarity 0 drops the opposite item"
    );
    assert!((r[0].similarity - 1.0).abs() < 1e-6);
    assert!(r[2].similarity.abs() < 1e-6);
    // Confidence can lift a slightly less similar but proven item to the top.
    let conf = RetrieveParams {
        w_similarity: 0.75,
        w_recency: 0.0,
        w_confidence: 0.25,
        mmr_lambda: 1.0,
        ..Default::default()
    };
    let r = s.retrieve(&q, 2, 10, &conf).unwrap();
    assert_eq!(titles(&r), ["close-proven", "exact"]);
    let expected = 0.75 * r[0].similarity + 0.25 * beta_confidence(10, 0, 1.0, 1.0);
    assert!((r[0].score - expected).abs() < 1e-9);
    // Recency: the proven item was used at t<=9; the other was created at 0. Far in the
    // future both have decayed; with a huge recency weight the recently used one wins.
    let rec = RetrieveParams {
        w_similarity: 0.0,
        w_recency: 1.0,
        w_confidence: 0.0,
        recency_half_life_ms: DAY,
        mmr_lambda: 1.0,
        ..Default::default()
    };
    let r = s.retrieve(&q, 1, 3 * DAY, &rec).unwrap();
    assert_eq!(titles(&r), ["close-proven"]);
    assert!((r[0].recency - 0.5f64.powf((3 * DAY - 9) as f64 / DAY as f64)).abs() < 1e-9);
    // Thresholds.
    let strict = RetrieveParams {
        min_similarity: 0.995,
        ..Default::default()
    };
    assert_eq!(titles(&s.retrieve(&q, 4, 10, &strict).unwrap()), ["exact"]);
    let min_score = RetrieveParams {
        min_score: 10.0,
        ..Default::default()
    };
    assert!(s.retrieve(&q, 4, 10, &min_score).unwrap().is_empty());
}

#[test]
fn mmr_diversifies_near_duplicates() {
    let mut s = bank();
    add(
        &mut s,
        vec![
            pat("a", v(&[1.0, 0.3]), Outcome::Success),
            pat("a-twin", v(&[1.0, 0.31]), Outcome::Success),
            pat("b", v(&[1.0, -0.6, 0.4]), Outcome::Success),
        ],
        0,
    );
    let q = v(&[1.0]);
    let relevance = RetrieveParams {
        mmr_lambda: 1.0,
        ..Default::default()
    };
    assert_eq!(
        titles(&s.retrieve(&q, 3, 0, &relevance).unwrap()),
        ["a", "a-twin", "b"]
    );
    let diverse = RetrieveParams {
        mmr_lambda: 0.5,
        ..Default::default()
    };
    let r = s.retrieve(&q, 3, 0, &diverse).unwrap();
    assert_eq!(titles(&r), ["a", "b", "a-twin"]);
    assert!(r[1].mmr_score > r[2].mmr_score);
    assert_eq!(titles(&s.retrieve(&q, 2, 0, &diverse).unwrap()), ["a", "b"]);
}

#[test]
fn retrieve_is_a_pure_read_and_filters_by_outcome() {
    let mut s = bank();
    add(
        &mut s,
        vec![
            pat("win", v(&[1.0, 0.1]), Outcome::Success),
            pat("lose", v(&[1.0, 0.0]), Outcome::Failure),
        ],
        0,
    );
    let before = s.snapshot_bytes().unwrap();
    let all = s
        .retrieve(&v(&[1.0]), 2, 50, &RetrieveParams::default())
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        before,
        s.snapshot_bytes().unwrap(),
        "retrieve does not mutate"
    );
    let only = RetrieveParams {
        outcome: Some(Outcome::Success),
        ..Default::default()
    };
    assert_eq!(
        titles(&s.retrieve(&v(&[1.0]), 2, 50, &only).unwrap()),
        ["win"]
    );
    let only = RetrieveParams {
        outcome: Some(Outcome::Failure),
        ..Default::default()
    };
    assert_eq!(
        titles(&s.retrieve(&v(&[1.0]), 2, 50, &only).unwrap()),
        ["lose"]
    );
}

#[test]
fn retrieve_and_add_reject_bad_input() {
    let mut s = bank();
    let code = |r: Result<Vec<swarm_memory::RetrievedItem>, MemoryError>| r.unwrap_err().code();
    let p = RetrieveParams::default();
    assert_eq!(code(s.retrieve(&[1.0; 3], 1, 0, &p)), "dimension_mismatch");
    assert_eq!(code(s.retrieve(&[0.0; 8], 1, 0, &p)), "invalid_vector");
    assert_eq!(code(s.retrieve(&v(&[1.0]), 0, 0, &p)), "invalid_k");
    assert_eq!(code(s.retrieve(&v(&[1.0]), 5000, 0, &p)), "invalid_k");
    for bad in [
        RetrieveParams {
            mmr_lambda: 1.5,
            ..Default::default()
        },
        RetrieveParams {
            w_recency: -1.0,
            ..Default::default()
        },
        RetrieveParams {
            w_similarity: f64::NAN,
            ..Default::default()
        },
        RetrieveParams {
            recency_half_life_ms: 0,
            ..Default::default()
        },
        RetrieveParams {
            candidates: Some(0),
            ..Default::default()
        },
    ] {
        assert_eq!(code(s.retrieve(&v(&[1.0]), 1, 0, &bad)), "invalid_params");
    }
    let add_err = |s: &mut MemoryStore, p: NewPattern| {
        s.apply(MemoryOp::PatternAdd {
            items: vec![p],
            now_ms: 0,
        })
        .unwrap_err()
        .code()
    };
    assert_eq!(
        add_err(&mut s, pat("", v(&[1.0]), Outcome::Success)),
        "invalid_pattern"
    );
    let mut p = pat("t", v(&[1.0]), Outcome::Success);
    p.content = " ".into();
    assert_eq!(add_err(&mut s, p), "invalid_pattern");
    let mut p = pat("t", v(&[1.0]), Outcome::Success);
    p.content = "x".repeat(20_000);
    assert_eq!(add_err(&mut s, p), "invalid_pattern");
    assert_eq!(
        add_err(&mut s, pat("t", vec![1.0; 4], Outcome::Success)),
        "dimension_mismatch"
    );
    assert_eq!(
        add_err(&mut s, pat("t", vec![f32::NAN; 8], Outcome::Success)),
        "invalid_vector"
    );
    assert_eq!(s.pattern_count(), 0);
    let bad = MemoryOp::Consolidate {
        params: ConsolidateParams {
            duplicate_similarity: 1.5,
            ..Default::default()
        },
        now_ms: 0,
    };
    assert_eq!(s.apply(bad).unwrap_err().code(), "invalid_params");
}

fn consolidation_fixture(s: &mut MemoryStore) -> Vec<String> {
    let ids = add(
        s,
        vec![
            pat("dup-1", v(&[1.0, 0.02]), Outcome::Success),
            pat("dup-2", v(&[1.0, 0.0]), Outcome::Success),
            pat("dup-3", v(&[1.0, 0.0, 0.03]), Outcome::Success),
            pat("contra", v(&[0.95, 0.3]), Outcome::Failure),
            pat("stale", v(&[0.0, 0.0, 0.0, 1.0]), Outcome::Success),
            pat("fresh", v(&[0.0, 0.0, 0.0, 0.0, 1.0]), Outcome::Success),
            pat(
                "stale-proven",
                v(&[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),
                Outcome::Success,
            ),
        ],
        0,
    );
    // dup-2 is the best evidenced of the duplicates.
    judge(s, &[&ids[1], &ids[1 + 5]], Outcome::Success, 10);
    judge(s, &[&ids[1]], Outcome::Success, 20);
    judge(s, &[&ids[0]], Outcome::Failure, 30);
    judge(s, &[&ids[6]], Outcome::Success, 40);
    judge(s, &[&ids[6]], Outcome::Success, 41);
    // fresh and contra are used recently.
    judge(s, &[&ids[5], &ids[3]], Outcome::Failure, 40 * DAY);
    ids
}

#[test]
fn consolidate_merges_flags_and_prunes() {
    let mut s = bank();
    let ids = consolidation_fixture(&mut s);
    let out = s
        .apply(MemoryOp::Consolidate {
            params: ConsolidateParams::default(),
            now_ms: 45 * DAY,
        })
        .unwrap();
    let OpOutcome::Consolidated(report) = out else {
        panic!("{out:?}")
    };
    // The three duplicates collapse into dup-2 (best evidenced).
    let removed: Vec<&str> = report.merged.iter().map(|m| m.removed.as_str()).collect();
    assert_eq!(report.merged.len(), 2, "{report:?}");
    assert!(report.merged.iter().all(|m| m.kept == ids[1]));
    assert!(removed.contains(&ids[0].as_str()) && removed.contains(&ids[2].as_str()));
    let kept = s.pattern(&ids[1]).unwrap();
    assert_eq!(
        (kept.success_count, kept.failure_count, kept.use_count),
        (2, 1, 3)
    );
    assert_eq!(kept.merged_count, 2);
    assert!((kept.confidence - 3.0 / 5.0).abs() < 1e-12);
    assert_eq!(kept.last_used_ms, Some(30));
    // The similar failure item contradicts the survivor.
    assert_eq!(
        report.contradictions,
        vec![(ids[1].clone(), ids[3].clone())]
    );
    assert_eq!(
        s.pattern(&ids[3]).unwrap().contradicts,
        vec![ids[1].clone()]
    );
    assert_eq!(kept.contradicts, vec![ids[3].clone()]);
    // stale (never used, 45 days idle) is pruned; stale-proven (confidence 0.75), fresh and
    // contra (used recently) survive; the merged survivor is old but well evidenced (0.6 > 0.5).
    assert_eq!(report.pruned, vec![ids[4].clone()]);
    assert!(s.pattern(&ids[4]).is_none());
    assert!(s.pattern(&ids[5]).is_some() && s.pattern(&ids[6]).is_some());
    assert_eq!(s.pattern_count(), 4);
    assert!(s.pattern(&ids[3]).is_some());
    // Removed items never come back from retrieve.
    let r = s
        .retrieve(
            &v(&[1.0]),
            10,
            45 * DAY,
            &RetrieveParams {
                min_similarity: -1.0,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(r.len(), 4);
    assert!(r
        .iter()
        .all(|x| x.item.id != ids[0] && x.item.id != ids[2] && x.item.id != ids[4]));
    // Idempotent: nothing left to merge or flag.
    let out = s
        .apply(MemoryOp::Consolidate {
            params: ConsolidateParams::default(),
            now_ms: 45 * DAY,
        })
        .unwrap();
    assert_eq!(out, OpOutcome::Consolidated(Default::default()));
}

#[test]
fn consolidation_and_bank_state_are_deterministic_across_replicas() {
    let mut a = bank();
    let mut b = bank();
    consolidation_fixture(&mut a);
    consolidation_fixture(&mut b);
    let op = MemoryOp::Consolidate {
        params: ConsolidateParams::default(),
        now_ms: 45 * DAY,
    };
    assert_eq!(a.apply(op.clone()).unwrap(), b.apply(op).unwrap());
    let snap = a.snapshot_bytes().unwrap();
    assert_eq!(snap, b.snapshot_bytes().unwrap());
    let c = MemoryStore::restore_bytes(&snap).unwrap();
    assert_eq!(c.snapshot_bytes().unwrap(), snap);
    let q = v(&[1.0, 0.5, 0.2]);
    let p = RetrieveParams::default();
    assert_eq!(
        a.retrieve(&q, 3, 50 * DAY, &p).unwrap(),
        c.retrieve(&q, 3, 50 * DAY, &p).unwrap()
    );
    let out = a
        .apply(MemoryOp::PatternDelete {
            ids: vec!["pat-000000000002".into(), "x".into()],
            now_ms: 1,
        })
        .unwrap();
    assert_eq!(
        out,
        OpOutcome::PatternsDeleted {
            deleted: 1,
            missing: vec!["x".into()]
        }
    );
    assert!(
        a.patterns().all(|i| i.contradicts.is_empty()),
        "dangling contradictions cleaned"
    );
}

#[test]
fn hash_embedded_patterns_retrieve_the_relevant_lesson() {
    let mut s = MemoryStore::new(Default::default()).unwrap();
    let e = HashEmbedder::default();
    let tasks = [
        (
            1,
            "cargo build of the rust workspace",
            Outcome::Failure,
            Some("error: linker `cc` not found"),
        ),
        (
            2,
            "resize png thumbnails for the gallery",
            Outcome::Success,
            None,
        ),
        (
            3,
            "fetch exchange rates from the pricing api",
            Outcome::Failure,
            Some("request timed out after 30s"),
        ),
        (
            4,
            "summarise the quarterly sales report",
            Outcome::Success,
            None,
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for (id, summary, outcome, err) in tasks {
        let t = TaskSummary {
            task_id: id,
            agent: "worker".into(),
            payload_summary: summary.into(),
            outcome,
            error: err.map(str::to_string),
            result: None,
        };
        let items = RuleDistiller.distill_sync(&t);
        let pats = rt.block_on(embed_items(&e, &items)).unwrap();
        s.apply(MemoryOp::PatternAdd {
            items: pats,
            now_ms: id,
        })
        .unwrap();
    }
    let q = e.embed_one("build the rust workspace with cargo");
    let r = s.retrieve(&q, 2, 10, &RetrieveParams::default()).unwrap();
    assert_eq!(r[0].item.source_task, Some(1), "{:?}", titles(&r));
    assert!(r[0].item.content.contains("not_found") || r[0].item.title.contains("not_found"));
    let q = e.embed_one("pricing api timed out");
    let r = s.retrieve(&q, 1, 10, &RetrieveParams::default()).unwrap();
    assert_eq!(r[0].item.source_task, Some(3));
}

/// Distilling every finished task (`--distill rules`) must not grow the bank forever:
/// past `max_patterns` the least valuable tenth goes, the same on every replica, and the
/// ones in use stay.
#[test]
fn the_bank_is_bounded_and_evicts_the_unused_first() {
    let mut s = store_with(|c| {
        c.pattern_dimension = 8;
        c.max_patterns = 100;
    });
    let mut twin = store_with(|c| {
        c.pattern_dimension = 8;
        c.max_patterns = 100;
    });
    let first = add(&mut s, vec![pat("keep me", v(&[1.0]), Outcome::Success)], 1);
    add(
        &mut twin,
        vec![pat("keep me", v(&[1.0]), Outcome::Success)],
        1,
    );
    for round in 0..30u64 {
        let items: Vec<NewPattern> = (0..10)
            .map(|i| {
                let x = (round * 10 + i) as f32;
                pat(
                    &format!("p{round}-{i}"),
                    v(&[x.sin(), x.cos(), 0.5]),
                    Outcome::Success,
                )
            })
            .collect();
        add(&mut s, items.clone(), 10 + round);
        add(&mut twin, items, 10 + round);
        // The first pattern keeps being used.
        judge(&mut s, &[first[0].as_str()], Outcome::Success, 10 + round);
        judge(
            &mut twin,
            &[first[0].as_str()],
            Outcome::Success,
            10 + round,
        );
        assert!(
            s.pattern_count() <= 100,
            "round {round}: {}",
            s.pattern_count()
        );
    }
    assert!(
        s.pattern(&first[0]).is_some(),
        "a pattern in use is not evicted"
    );
    // Identical replicas evict identically.
    assert_eq!(s.snapshot_bytes().unwrap(), twin.snapshot_bytes().unwrap());
    // The oldest unused ones went.
    assert!(s.pattern("pat-000000000002").is_none());
}
