//! Vector collections: recall, deletes, TTL, filters, snapshots, replicas, errors.

use std::collections::BTreeSet;

use super::common::*;
use swarm_memory::synthetic::{gaussian_clusters, recall_at_k};
use swarm_memory::{
    CollectionSpec, Condition, MemoryError, MemoryOp, MemoryStore, MetadataFilter, Metric,
    OpOutcome, PointWrite, Scalar, SearchRequest,
};

fn ids(hits: &[swarm_memory::SearchHit]) -> Vec<String> {
    hits.iter().map(|h| h.id.clone()).collect()
}

/// (recall of `search`, recall of the hnsw_rs reference path) against exact search.
fn recall_for(metric: Metric, n: usize, dim: usize, ef: usize) -> (f64, f64) {
    let data = gaussian_clusters(n, 100, dim, 40, 1.0, 7);
    let mut s = store();
    create(&mut s, "c", dim, metric);
    load(&mut s, "c", &data.base, |_| String::new());
    let mut truth = Vec::new();
    let mut found = Vec::new();
    let mut reference = Vec::new();
    for q in &data.queries {
        let mut req = SearchRequest::new(q.clone(), 10, 0);
        req.ef = Some(ef);
        truth.push(ids(&s.search_exact("c", &req).unwrap()));
        found.push(ids(&s.search("c", &req).unwrap()));
        reference.push(ids(&s.search_via_hnsw_rs("c", &req).unwrap()));
    }
    (
        recall_at_k(&truth, &found, 10),
        recall_at_k(&truth, &reference, 10),
    )
}

#[test]
fn recall_at_10_on_clustered_data_cosine_l2_dot() {
    let cos = recall_for(Metric::Cosine, 1000, 32, 64);
    let l2 = recall_for(Metric::L2, 1000, 32, 64);
    let dot = recall_for(Metric::Dot, 1000, 32, 64);
    eprintln!("recall@10 (flat, hnsw_rs) cosine {cos:?} l2 {l2:?} dot {dot:?}");
    for (name, (flat, reference), floor) in
        [("cosine", cos, 0.95), ("l2", l2, 0.95), ("dot", dot, 0.90)]
    {
        assert!(flat >= floor, "{name} recall {flat}");
        assert!(reference >= floor, "{name} hnsw_rs recall {reference}");
    }
}

/// Above [`swarm_memory::BF16_TRAVERSAL_MIN_DIMENSION`] the graph walk compares bfloat16
/// copies, then ranks the beam by exact distance: recall holds for every metric, and every
/// returned distance is the exact one (bit for bit what exact search returns for that id).
#[test]
fn bf16_walk_keeps_recall_and_returns_exact_distances() {
    let dim = swarm_memory::BF16_TRAVERSAL_MIN_DIMENSION + 44;
    for (metric, floor) in [
        (Metric::Cosine, 0.95),
        (Metric::L2, 0.95),
        (Metric::Dot, 0.90),
    ] {
        let data = gaussian_clusters(1000, 60, dim, 40, 1.0, 31);
        let mut s = store();
        create(&mut s, "c", dim, metric);
        load(&mut s, "c", &data.base, |_| String::new());
        let (mut truth, mut found) = (Vec::new(), Vec::new());
        for q in &data.queries {
            let mut req = SearchRequest::new(q.clone(), 10, 0);
            req.ef = Some(16);
            let hits = s.search("c", &req).unwrap();
            // Exact distances of every point, by id.
            let all = s
                .search_exact("c", &SearchRequest::new(q.clone(), 1000, 0))
                .unwrap();
            for h in &hits {
                let e = all.iter().find(|e| e.id == h.id).unwrap();
                assert_eq!(
                    h.distance.to_bits(),
                    e.distance.to_bits(),
                    "{metric:?} {}",
                    h.id
                );
            }
            assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
            truth.push(ids(&all[..10]));
            found.push(ids(&hits));
        }
        let r = recall_at_k(&truth, &found, 10);
        eprintln!("bf16 walk {metric:?} recall@10 {r:.4}");
        assert!(r >= floor, "{metric:?} recall {r}");
    }
}

/// Points written one small op at a time exercise the exactly-scanned tail and the
/// periodic refresh of the graph copy; answers stay exact-quality throughout.
#[test]
fn incremental_writes_search_the_tail_and_refresh_the_copy() {
    let data = gaussian_clusters(700, 20, 16, 10, 1.0, 17);
    let mut s = store();
    create(&mut s, "c", 16, Metric::L2);
    let mut found = Vec::new();
    let mut truth = Vec::new();
    for (b, chunk) in data.base.chunks(37).enumerate() {
        let points = chunk
            .iter()
            .enumerate()
            .map(|(j, v)| point(format!("p{}", b * 37 + j), v.clone(), ""))
            .collect();
        upsert(&mut s, "c", points, 1);
        for q in data.queries.iter().take(5) {
            let req = SearchRequest::new(q.clone(), 10, 2);
            found.push(ids(&s.search("c", &req).unwrap()));
            truth.push(ids(&s.search_exact("c", &req).unwrap()));
        }
    }
    let r = recall_at_k(&truth, &found, 10);
    assert!(r >= 0.97, "recall over incremental writes {r}");
    catch_up(&mut s);
    let g = s.graph_stats("c").unwrap();
    assert_eq!(g.slots, 700);
    assert!(g.copied_slots <= 700 && 700 - g.copied_slots < 128, "{g:?}");
    assert_eq!(
        g.reachable, g.copied_slots,
        "every copied node reachable: {g:?}"
    );
    assert!(g.layer0_edges >= g.copied_slots, "{g:?}");
    // The newest point is found immediately, whether or not the copy covers it yet.
    upsert(&mut s, "c", vec![point("fresh", vec![50.0; 16], "")], 3);
    let hits = s
        .search("c", &SearchRequest::new(vec![50.0; 16], 1, 3))
        .unwrap();
    assert_eq!(hits[0].id, "fresh");
}

/// The big one from the brief (10k × 128); run with `--ignored` in release.
#[test]
#[ignore]
fn recall_at_10_10k_by_128() {
    let (r, reference) = recall_for(Metric::L2, 10_000, 128, 64);
    eprintln!("recall@10 10k x 128 L2 ef=64: {r:.4} (hnsw_rs search: {reference:.4})");
    assert!(r >= 0.95, "{r}");
}

fn unit(dim: usize, i: usize) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[i % dim] = 1.0;
    v
}

#[test]
fn metric_distances_and_ordering() {
    let mut s = store();
    create(&mut s, "cos", 2, Metric::Cosine);
    create(&mut s, "l2", 2, Metric::L2);
    create(&mut s, "dot", 2, Metric::Dot);
    let pts = || {
        vec![
            point("a", vec![1.0, 0.0], ""),
            point("b", vec![0.0, 2.0], ""),
            point("c", vec![3.0, 3.0], ""),
        ]
    };
    for c in ["cos", "l2", "dot"] {
        upsert(&mut s, c, pts(), 5);
    }
    let q = SearchRequest::new(vec![1.0, 0.0], 3, 5);
    let cos = s.search("cos", &q).unwrap();
    assert_eq!(ids(&cos), ["a", "c", "b"]);
    assert!(cos[0].distance.abs() < 1e-6);
    assert!((cos[1].distance - (1.0 - 0.5f32.sqrt())).abs() < 1e-5);
    assert!((cos[2].distance - 1.0).abs() < 1e-6);
    let l2 = s.search("l2", &q).unwrap();
    assert_eq!(ids(&l2), ["a", "b", "c"]);
    assert!((l2[1].distance - 5f32.sqrt()).abs() < 1e-5);
    let dot = s.search("dot", &q).unwrap();
    assert_eq!(ids(&dot), ["c", "a", "b"], "max inner product first");
    assert!((dot[0].distance + 3.0).abs() < 1e-6);
    // Cosine vectors are stored normalised.
    let c = s.get("cos", "c", 5).unwrap().unwrap();
    assert!((c.vector[0] - 0.5f32.sqrt()).abs() < 1e-6);
}

#[test]
fn empty_collection_and_k_larger_than_live() {
    let mut s = store();
    create(&mut s, "c", 4, Metric::L2);
    assert!(s
        .search("c", &SearchRequest::new(vec![0.0; 4], 5, 0))
        .unwrap()
        .is_empty());
    upsert(
        &mut s,
        "c",
        (0..3)
            .map(|i| point(format!("x{i}"), unit(4, i), ""))
            .collect(),
        1,
    );
    assert_eq!(
        s.search("c", &SearchRequest::new(vec![0.0; 4], 10, 0))
            .unwrap()
            .len(),
        3
    );
}

/// Deleted and replaced points are never returned, on both the over-fetch path (few
/// tombstones) and the in-search filter path (many tombstones).
#[test]
fn deleted_and_replaced_ids_never_returned() {
    let data = gaussian_clusters(800, 0, 16, 20, 1.0, 11);
    for n_delete in [20usize, 300] {
        let mut s = store_with(|c| c.rebuild_min_tombstones = 100_000);
        create(&mut s, "c", 16, Metric::L2);
        load(&mut s, "c", &data.base, |i| format!(r#"{{"i":{i}}}"#));
        let deleted: Vec<String> = (0..n_delete).map(|i| format!("p{}", i * 2)).collect();
        let out = s
            .apply(MemoryOp::Delete {
                collection: "c".into(),
                ids: deleted
                    .iter()
                    .cloned()
                    .chain(["nope".to_string()])
                    .collect(),
                now_ms: 20,
            })
            .unwrap();
        let OpOutcome::Deleted {
            deleted: n,
            missing,
            ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(n as usize, n_delete);
        assert_eq!(missing, ["nope"]);
        // Replace p1 with a far-away vector.
        upsert(
            &mut s,
            "c",
            vec![point("p1", vec![100.0; 16], r#"{"moved":true}"#)],
            21,
        );
        let info = s.collection_info("c").unwrap();
        assert_eq!(info.live, 800 - n_delete);
        assert_eq!(info.tombstones, n_delete + 1);
        let dead: BTreeSet<String> = deleted.iter().cloned().collect();
        // Query at each deleted vector: it must not come back, and k results still do.
        for i in 0..n_delete.min(60) {
            let hits = s
                .search("c", &SearchRequest::new(data.base[i * 2].clone(), 10, 30))
                .unwrap();
            assert_eq!(hits.len(), 10);
            assert!(
                hits.iter().all(|h| !dead.contains(&h.id)),
                "deleted id returned"
            );
            assert!(hits.iter().all(|h| h.id != "p1"));
            let exact = s
                .search_exact("c", &SearchRequest::new(data.base[i * 2].clone(), 10, 30))
                .unwrap();
            assert!(exact.iter().all(|h| !dead.contains(&h.id)));
        }
        let moved = s
            .search("c", &SearchRequest::new(vec![100.0; 16], 1, 30))
            .unwrap();
        assert_eq!(moved[0].id, "p1");
        assert_eq!(moved[0].metadata, r#"{"moved":true}"#);
        assert!(s.get("c", "p0", 30).unwrap().is_none());
    }
}

#[test]
fn upsert_same_vector_updates_in_place() {
    let mut s = store();
    create(&mut s, "c", 3, Metric::Cosine);
    upsert(
        &mut s,
        "c",
        vec![point("a", vec![1.0, 2.0, 3.0], r#"{"v":1}"#)],
        1,
    );
    let out = upsert(
        &mut s,
        "c",
        vec![point("a", vec![1.0, 2.0, 3.0], r#"{"v":2}"#)],
        2,
    );
    assert_eq!(
        out,
        OpOutcome::Upserted {
            inserted: 0,
            replaced: 1,
            expired: 0,
            rebuilt: false
        }
    );
    assert_eq!(s.collection_info("c").unwrap().tombstones, 0);
    let p = s.get("c", "a", 3).unwrap().unwrap();
    assert_eq!(p.metadata, r#"{"v":2}"#);
    assert_eq!(p.updated_ms, 2);
}

#[test]
fn ttl_expiry_follows_caller_time() {
    let mut s = store();
    create(&mut s, "c", 4, Metric::L2);
    let mut pts: Vec<PointWrite> = (0..4)
        .map(|i| point(format!("x{i}"), unit(4, i), ""))
        .collect();
    pts[0].ttl_ms = Some(1_000);
    pts[1].ttl_ms = Some(5_000);
    upsert(&mut s, "c", pts, 10_000);
    let q = |now| SearchRequest::new(unit(4, 0), 4, now);
    assert_eq!(s.search("c", &q(10_999)).unwrap()[0].id, "x0");
    let later = s.search("c", &q(11_000)).unwrap();
    assert_eq!(later.len(), 3);
    assert!(later.iter().all(|h| h.id != "x0"));
    assert!(s.get("c", "x0", 11_000).unwrap().is_none());
    assert!(s.get("c", "x0", 10_500).unwrap().is_some());
    assert_eq!(s.search_exact("c", &q(20_000)).unwrap().len(), 2);
    // Reads never sweep; a write sweeps what expired at its own now_ms.
    assert_eq!(s.collection_info("c").unwrap().live, 4);
    let out = upsert(&mut s, "c", vec![point("y", unit(4, 2), "")], 12_000);
    assert!(
        matches!(
            out,
            OpOutcome::Upserted {
                expired: 1,
                inserted: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(s.collection_info("c").unwrap().live, 4);
    let out = s.apply(MemoryOp::ExpireSweep { now_ms: 15_000 }).unwrap();
    assert_eq!(out, OpOutcome::Swept { expired: 1 });
    assert_eq!(s.collection_info("c").unwrap().live, 3);
    // Re-upserting an expired id counts as an insert.
    let mut p = point("x0", unit(4, 0), "");
    p.ttl_ms = Some(1);
    upsert(&mut s, "c", vec![p], 16_000);
    assert!(s.get("c", "x0", 16_000).unwrap().is_some());
    assert!(s.get("c", "x0", 16_001).unwrap().is_none());
}

#[test]
fn filtered_search_returns_only_matches_and_finds_k() {
    let data = gaussian_clusters(1000, 20, 16, 10, 1.0, 3);
    let mut s = store();
    create(&mut s, "c", 16, Metric::Cosine);
    load(&mut s, "c", &data.base, |i| {
        format!(
            r#"{{"color":{},"even":{},"tag":"{}"}}"#,
            i % 10,
            i % 2 == 0,
            if i < 3 { "rare" } else { "common" }
        )
    });
    let mut total_recall = 0.0;
    for q in &data.queries {
        let mut req = SearchRequest::new(q.clone(), 10, 0);
        req.filter = Some(MetadataFilter::all_of(vec![
            Condition::Eq {
                field: "color".into(),
                value: Scalar::Int(3),
            },
            Condition::In {
                field: "even".into(),
                values: vec![Scalar::Bool(false)],
            },
        ]));
        let hits = s.search("c", &req).unwrap();
        assert_eq!(hits.len(), 10, "finds k when enough match");
        for h in &hits {
            let m: serde_json::Value = serde_json::from_str(&h.metadata).unwrap();
            assert_eq!(m["color"], 3);
            assert_eq!(m["even"], false);
        }
        let exact = s.search_exact("c", &req).unwrap();
        total_recall += recall_at_k(&[ids(&exact)], &[ids(&hits)], 10);
        // A filter matching only three points returns exactly those three.
        let mut rare = SearchRequest::new(q.clone(), 10, 0);
        rare.filter = Some(MetadataFilter::from_json(&serde_json::json!({"tag": "rare"})).unwrap());
        let hits = s.search("c", &rare).unwrap();
        let got: BTreeSet<String> = ids(&hits).into_iter().collect();
        assert_eq!(
            got,
            ["p0", "p1", "p2"].iter().map(|x| x.to_string()).collect()
        );
        // A filter matching nothing returns nothing.
        let mut none = SearchRequest::new(q.clone(), 10, 0);
        none.filter = Some(MetadataFilter::eq("color", Scalar::Str("3".into())));
        assert!(s.search("c", &none).unwrap().is_empty());
    }
    let recall = total_recall / data.queries.len() as f64;
    assert!(recall >= 0.95, "filtered recall {recall}");
}

#[test]
fn rebuild_drops_tombstones_past_threshold() {
    let data = gaussian_clusters(400, 10, 8, 5, 1.0, 5);
    let mut s = store_with(|c| {
        c.rebuild_min_tombstones = 50;
        c.rebuild_tombstone_ratio = 0.25;
    });
    create(&mut s, "c", 8, Metric::L2);
    load(&mut s, "c", &data.base, |_| String::new());
    let del = |from: usize, to: usize| MemoryOp::Delete {
        collection: "c".into(),
        ids: (from..to).map(|i| format!("p{i}")).collect(),
        now_ms: 50,
    };
    // 60 tombstones vs 340 live: 60 < 0.25 × 340 = 85, no rebuild yet.
    let out = s.apply(del(0, 60)).unwrap();
    assert!(matches!(out, OpOutcome::Deleted { rebuilt: false, .. }));
    assert_eq!(s.collection_info("c").unwrap().tombstones, 60);
    // 90 vs 310: 90 > 77.5 ⇒ rebuild.
    let out = s.apply(del(60, 90)).unwrap();
    assert!(
        matches!(out, OpOutcome::Deleted { rebuilt: true, .. }),
        "{out:?}"
    );
    let info = s.collection_info("c").unwrap();
    assert_eq!((info.live, info.tombstones, info.generation), (310, 0, 1));
    for q in &data.queries {
        let req = SearchRequest::new(q.clone(), 10, 60);
        assert_eq!(
            ids(&s.search("c", &req).unwrap()),
            ids(&s.search_exact("c", &req).unwrap())
        );
    }
    let out = s
        .apply(MemoryOp::RebuildIndex {
            collection: "c".into(),
            now_ms: 70,
        })
        .unwrap();
    assert_eq!(
        out,
        OpOutcome::Rebuilt {
            live: 310,
            tombstones_removed: 0
        }
    );
    assert_eq!(s.collection_info("c").unwrap().generation, 2);
}

/// A collection above [`swarm_memory::INLINE_REBUILD_MAX_POINTS`] rebuilds on a thread
/// of its own: the write that crossed the threshold returns at once, searches and writes
/// go on against the current graph, a snapshot taken meanwhile restores into a replica
/// that carries the same rebuild, and `FinishRebuild` swaps in identical graphs on both —
/// keeping the writes made meanwhile (inserted into the new graph) and the deletes
/// (tombstones in it).
#[test]
fn large_rebuilds_run_in_the_background_and_swap_in_at_one_op() {
    let n = swarm_memory::INLINE_REBUILD_MAX_POINTS * 3;
    let data = gaussian_clusters(n + 200, 20, 8, 20, 1.0, 11);
    let mut s = store_with(|c| {
        c.rebuild_min_tombstones = 50;
        c.rebuild_tombstone_ratio = 0.25;
    });
    create(&mut s, "c", 8, Metric::L2);
    load(&mut s, "c", &data.base[..n], |_| String::new());
    // 1000 tombstones vs 2000 live: a rebuild of 2000 points, in the background.
    let out = s
        .apply(MemoryOp::Delete {
            collection: "c".into(),
            ids: (0..1000).map(|i| format!("p{i}")).collect(),
            now_ms: 50,
        })
        .unwrap();
    assert!(
        matches!(out, OpOutcome::Deleted { rebuilt: true, .. }),
        "{out:?}"
    );
    let info = s.collection_info("c").unwrap();
    assert!(info.rebuilding);
    assert_eq!(
        (info.live, info.tombstones, info.generation),
        (2000, 1000, 0)
    );
    // Meanwhile: new points, deletes of points the rebuild keeps, and searches.
    let extra: Vec<PointWrite> = data.base[n..]
        .iter()
        .enumerate()
        .map(|(i, v)| point(format!("x{i}"), v.clone(), ""))
        .collect();
    s.apply(MemoryOp::Upsert {
        collection: "c".into(),
        points: extra,
        now_ms: 60,
    })
    .unwrap();
    s.apply(MemoryOp::Delete {
        collection: "c".into(),
        ids: (1000..1100).map(|i| format!("p{i}")).collect(),
        now_ms: 61,
    })
    .unwrap();
    let check = |s: &MemoryStore| {
        for q in data.queries.iter().take(20) {
            let req = SearchRequest::new(q.clone(), 10, 70);
            let found = ids(&s.search("c", &req).unwrap());
            let exact = ids(&s.search_exact("c", &req).unwrap());
            assert!(recall_at_k(&[exact], &[found], 10) >= 0.9);
        }
    };
    check(&s);
    // A replica loaded from a snapshot taken now carries the same rebuild.
    let bytes = s.snapshot_bytes().unwrap();
    let mut r = MemoryStore::restore_bytes(&bytes).unwrap();
    assert!(r.collection_info("c").unwrap().rebuilding);
    assert_eq!(r.snapshot_bytes().unwrap(), bytes);
    // A stale finish (another generation) changes nothing.
    let stale = MemoryOp::FinishRebuild {
        collection: Some("c".into()),
        generation: 7,
        now_ms: 80,
    };
    s.apply(stale.clone()).unwrap();
    assert!(s.collection_info("c").unwrap().rebuilding);
    // The leader sees its build finish and proposes the swap; both apply it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s.ready_rebuilds().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(s.ready_rebuilds(), vec![(Some("c".to_string()), 0)]);
    let finish = MemoryOp::FinishRebuild {
        collection: Some("c".into()),
        generation: 0,
        now_ms: 90,
    };
    for store in [&mut s, &mut r] {
        let out = store.apply(finish.clone()).unwrap();
        assert_eq!(
            out,
            OpOutcome::Rebuilt {
                live: 2100,
                tombstones_removed: 1000
            }
        );
        let info = store.collection_info("c").unwrap();
        assert!(!info.rebuilding);
        // The 100 kept points deleted meanwhile are the new graph's only tombstones.
        assert_eq!(
            (info.live, info.tombstones, info.generation),
            (2100, 100, 1)
        );
        check(store);
        // Applying it again is a no-op.
        store.apply(finish.clone()).unwrap();
        assert_eq!(store.collection_info("c").unwrap().generation, 1);
    }
    assert_eq!(s.snapshot_bytes().unwrap(), r.snapshot_bytes().unwrap());
    assert!(s.ready_rebuilds().is_empty());
    // And the swapped-in graph restores identically too.
    let again = MemoryStore::restore_bytes(&s.snapshot_bytes().unwrap()).unwrap();
    assert_eq!(again.snapshot_bytes().unwrap(), s.snapshot_bytes().unwrap());
}

/// An upsert only appends its points: the collection's indexer inserts them into the
/// graph on its own thread. Until an op names a graph copy, searches scan the new points
/// exactly (so they are exact); `AdvanceIndex` moves every replica to the same copy, and
/// is a no-op for a stale generation, a point past the last slot, or a slot count that is
/// not a copy point. A snapshot taken while points wait for the indexer restores
/// byte-identically and converges to the same searches.
#[test]
fn upserts_leave_indexing_to_a_thread_and_copies_move_at_ops() {
    let data = gaussian_clusters(3000, 20, 24, 20, 1.0, 5);
    let mut a = store();
    create(&mut a, "c", 24, Metric::L2);
    let write = MemoryOp::Upsert {
        collection: "c".into(),
        points: data
            .base
            .iter()
            .enumerate()
            .map(|(i, v)| point(format!("p{i}"), v.clone(), ""))
            .collect(),
        now_ms: 5,
    };
    a.apply(write.clone()).unwrap();
    let snap = a.snapshot_bytes().unwrap();
    let g = a.graph_stats("c").unwrap();
    assert_eq!((g.slots, g.copied_slots), (3000, 0), "no copy named yet");
    for q in data.queries.iter().take(5) {
        let req = SearchRequest::new(q.clone(), 10, 6);
        assert_eq!(
            a.search("c", &req).unwrap(),
            a.search_exact("c", &req).unwrap()
        );
    }
    // Not copy points, or stale: nothing moves.
    for (generation, slots) in [(0, 200), (0, 4096), (1, 128)] {
        let out = a
            .apply(MemoryOp::AdvanceIndex {
                collection: Some("c".into()),
                generation,
                slots,
                now_ms: 7,
            })
            .unwrap();
        assert_eq!(out, OpOutcome::IndexAdvanced { advanced: false });
    }
    assert_eq!(a.snapshot_bytes().unwrap(), snap);
    let named = catch_up(&mut a);
    assert!(!named.is_empty());
    let g = a.graph_stats("c").unwrap();
    assert_eq!((g.indexed, g.copied_slots), (3000, 2944), "{g:?}");
    assert_eq!(a.collection_info("c").unwrap().unindexed, 0);
    // A replica applying the same ops, and one restored from the early snapshot that then
    // applies the rest, search the same copy once their indexers have caught up.
    let mut b = store();
    create(&mut b, "c", 24, Metric::L2);
    b.apply(write).unwrap();
    let mut r = MemoryStore::restore_bytes(&snap).unwrap();
    assert_eq!(r.snapshot_bytes().unwrap(), snap);
    for op in &named {
        b.apply(op.clone()).unwrap();
        r.apply(op.clone()).unwrap();
    }
    b.wait_indexing();
    r.wait_indexing();
    assert_eq!(b.snapshot_bytes().unwrap(), a.snapshot_bytes().unwrap());
    assert_eq!(r.snapshot_bytes().unwrap(), a.snapshot_bytes().unwrap());
    for q in &data.queries {
        let mut req = SearchRequest::new(q.clone(), 10, 8);
        req.ef = Some(16);
        let hits = a.search("c", &req).unwrap();
        assert_eq!(hits, b.search("c", &req).unwrap());
        assert_eq!(hits, r.search("c", &req).unwrap());
    }
}

/// A snapshot of format 3 (before rebuilds could be under way) still loads.
#[test]
fn format_3_snapshots_still_load() {
    let data = gaussian_clusters(300, 10, 8, 5, 1.0, 3);
    let mut s = store();
    create(&mut s, "c", 8, Metric::L2);
    load(&mut s, "c", &data.base, |_| String::new());
    let now = s.snapshot_bytes().unwrap();
    // Format 5 is format 3 plus two trailing lists, rebuilds and the distillation outbox,
    // both empty here (a zero byte each), and the version: the header's u32 at 8 and the
    // payload's first varint.
    let mut payload = now[28..now.len() - 2].to_vec();
    assert_eq!((payload[0], &now[now.len() - 2..]), (5, &[0u8, 0][..]));
    payload[0] = 3;
    let mut v3 = b"SWMEMSNP".to_vec();
    v3.extend_from_slice(&3u32.to_le_bytes());
    v3.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &payload {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    v3.extend_from_slice(&h.to_le_bytes());
    v3.extend_from_slice(&payload);
    let loaded = MemoryStore::restore_bytes(&v3).unwrap();
    assert_eq!(loaded.snapshot_bytes().unwrap(), now);
}

/// Ops exercising every write path, for replica and snapshot tests.
fn scripted_ops(data: &[Vec<f32>]) -> Vec<MemoryOp> {
    let dim = data[0].len();
    let mut ops = vec![MemoryOp::CreateCollection {
        name: "docs".into(),
        spec: CollectionSpec::new(dim, Metric::Cosine),
        now_ms: 1,
    }];
    for (b, chunk) in data.chunks(200).enumerate() {
        ops.push(MemoryOp::Upsert {
            collection: "docs".into(),
            points: chunk
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    let i = b * 200 + j;
                    PointWrite {
                        id: format!("d{i}"),
                        vector: v.clone(),
                        metadata: format!(r#"{{"shard":{}, "n": {i}}}"#, i % 4),
                        ttl_ms: if i % 17 == 0 { Some(500) } else { None },
                    }
                })
                .collect(),
            now_ms: 100 + b as u64,
        });
    }
    ops.push(MemoryOp::Delete {
        collection: "docs".into(),
        ids: (0..data.len())
            .step_by(7)
            .map(|i| format!("d{i}"))
            .collect(),
        now_ms: 300,
    });
    ops.push(MemoryOp::Upsert {
        collection: "docs".into(),
        points: (0..30)
            .map(|i| {
                point(
                    format!("d{}", i * 3 + 1),
                    data[i * 5 + 2].clone(),
                    r#"{"replaced":true}"#,
                )
            })
            .collect(),
        now_ms: 700,
    });
    ops
}

#[test]
fn replicas_converge_and_snapshot_restore_answers_identically() {
    replicas_converge(16);
}

/// The same at a dimension whose search walks the bfloat16 copy, which a restored or
/// rebuilt collection re-derives.
#[test]
fn replicas_converge_and_restore_identically_with_the_bf16_walk() {
    replicas_converge(swarm_memory::BF16_TRAVERSAL_MIN_DIMENSION + 44);
}

fn replicas_converge(dim: usize) {
    let data = gaussian_clusters(600, 30, dim, 15, 1.0, 21);
    let ops = scripted_ops(&data.base);
    let mut a = store_with(|c| c.rebuild_min_tombstones = 100);
    let mut b = store_with(|c| c.rebuild_min_tombstones = 100);
    for op in &ops {
        let ra = a.apply(op.clone());
        let rb = b.apply(op.clone());
        assert_eq!(ra, rb);
        ra.unwrap();
    }
    // The leader's indexer takes graph copies and names them; the follower applies the
    // same ops, and its own indexer takes the same copies.
    for op in catch_up(&mut a) {
        b.apply(op).unwrap();
    }
    b.wait_indexing();
    // A failing op fails identically and changes nothing.
    let before = a.snapshot_bytes().unwrap();
    let bad = MemoryOp::Upsert {
        collection: "docs".into(),
        points: vec![
            point("ok", data.base[0].clone(), ""),
            point("bad", vec![f32::NAN; dim], ""),
        ],
        now_ms: 800,
    };
    assert_eq!(a.apply(bad.clone()).unwrap_err().code(), "invalid_vector");
    assert_eq!(b.apply(bad).unwrap_err().code(), "invalid_vector");
    assert_eq!(
        before,
        a.snapshot_bytes().unwrap(),
        "failed op left state unchanged"
    );
    assert_eq!(
        before,
        b.snapshot_bytes().unwrap(),
        "replicas have identical snapshots"
    );

    let c = MemoryStore::restore_bytes(&before).unwrap();
    // Until its indexer has re-inserted the slots up to the copy in use, a restored
    // replica scans exactly; then it searches the same copy as the others.
    c.wait_indexing();
    assert_eq!(
        c.snapshot_bytes().unwrap(),
        before,
        "restore round-trips byte-exactly"
    );
    assert_eq!(a.list_collections(), c.list_collections());
    for q in &data.queries {
        for filter in [None, Some(MetadataFilter::eq("shard", Scalar::Int(1)))] {
            let mut req = SearchRequest::new(q.clone(), 10, 800);
            req.filter = filter;
            let ha = a.search("docs", &req).unwrap();
            assert_eq!(ha, b.search("docs", &req).unwrap());
            assert_eq!(
                ha,
                c.search("docs", &req).unwrap(),
                "restored replica answers identically"
            );
            let exact = a.search_exact("docs", &req).unwrap();
            assert_eq!(exact, c.search_exact("docs", &req).unwrap());
            assert!(recall_at_k(&[ids(&exact)], &[ids(&ha)], 10) >= 0.8);
        }
    }
    // Applying the same further ops keeps all three in lockstep.
    let more = MemoryOp::Delete {
        collection: "docs".into(),
        ids: vec!["d2".into(), "d3".into()],
        now_ms: 900,
    };
    let mut c = c;
    for s in [&mut a, &mut b, &mut c] {
        s.apply(more.clone()).unwrap();
    }
    let snap = a.snapshot_bytes().unwrap();
    assert_eq!(snap, b.snapshot_bytes().unwrap());
    assert_eq!(snap, c.snapshot_bytes().unwrap());
}

#[test]
fn restore_rejects_corrupt_snapshots() {
    let mut s = store();
    create(&mut s, "c", 4, Metric::L2);
    upsert(
        &mut s,
        "c",
        (0..5)
            .map(|i| point(format!("x{i}"), unit(4, i), r#"{"a":1}"#))
            .collect(),
        1,
    );
    let bytes = s.snapshot_bytes().unwrap();
    let code = |b: &[u8]| MemoryStore::restore_bytes(b).unwrap_err().code();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    assert_eq!(code(&flipped), "invalid_snapshot");
    assert_eq!(code(&bytes[..bytes.len() - 1]), "invalid_snapshot");
    assert_eq!(
        code(b"not a snapshot at all, definitely"),
        "invalid_snapshot"
    );
    assert_eq!(code(&[]), "invalid_snapshot");
    let mut version = bytes.clone();
    version[8] = 99;
    assert_eq!(code(&version), "invalid_snapshot");
}

#[test]
fn bad_input_gives_clear_errors() {
    let mut s = store_with(|c| c.max_metadata_bytes = 64);
    create(&mut s, "c", 3, Metric::Cosine);
    let code = |r: Result<OpOutcome, MemoryError>| r.unwrap_err().code();
    let up = |points: Vec<PointWrite>| MemoryOp::Upsert {
        collection: "c".into(),
        points,
        now_ms: 1,
    };
    let create_op = |name: &str, spec: CollectionSpec| MemoryOp::CreateCollection {
        name: name.into(),
        spec,
        now_ms: 1,
    };

    assert_eq!(
        code(s.apply(create_op("c", CollectionSpec::new(3, Metric::L2)))),
        "collection_exists"
    );
    assert_eq!(
        code(s.apply(create_op("bad name", CollectionSpec::new(3, Metric::L2)))),
        "invalid_collection_name"
    );
    assert_eq!(
        code(s.apply(create_op("_patterns", CollectionSpec::new(3, Metric::L2)))),
        "invalid_collection_name"
    );
    assert_eq!(
        code(s.apply(create_op("z", CollectionSpec::new(0, Metric::L2)))),
        "invalid_dimension"
    );
    assert_eq!(
        code(s.apply(create_op("z", CollectionSpec::new(1 << 20, Metric::L2)))),
        "invalid_dimension"
    );
    let mut spec = CollectionSpec::new(3, Metric::L2);
    spec.m = 1000;
    assert_eq!(code(s.apply(create_op("z", spec))), "invalid_params");
    assert_eq!(
        code(s.apply(MemoryOp::DropCollection {
            name: "nope".into(),
            now_ms: 1
        })),
        "unknown_collection"
    );
    assert_eq!(
        code(s.apply(MemoryOp::Upsert {
            collection: "nope".into(),
            points: vec![],
            now_ms: 1
        })),
        "unknown_collection"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0, 2.0], "")]))),
        "dimension_mismatch"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0, f32::NAN, 0.0], "")]))),
        "invalid_vector"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0, f32::INFINITY, 0.0], "")]))),
        "invalid_vector"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![0.0; 3], "")]))),
        "invalid_vector"
    );
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(100));
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0; 3], &big)]))),
        "metadata_too_large"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0; 3], "[1,2]")]))),
        "invalid_metadata"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a", vec![1.0; 3], "{nope")]))),
        "invalid_metadata"
    );
    assert_eq!(
        code(s.apply(up(vec![point("", vec![1.0; 3], "")]))),
        "invalid_id"
    );
    assert_eq!(
        code(s.apply(up(vec![point("a\n", vec![1.0; 3], "")]))),
        "invalid_id"
    );
    assert_eq!(
        code(s.apply(up(vec![
            point("a", vec![1.0; 3], ""),
            point("a", vec![2.0; 3], "")
        ]))),
        "duplicate_id"
    );
    let mut p = point("a", vec![1.0; 3], "");
    p.ttl_ms = Some(0);
    assert_eq!(code(s.apply(up(vec![p]))), "invalid_ttl");
    let many: Vec<PointWrite> = (0..10_001)
        .map(|i| point(format!("m{i}"), vec![1.0; 3], ""))
        .collect();
    assert_eq!(code(s.apply(up(many))), "batch_too_large");
    assert_eq!(s.collection_info("c").unwrap().live, 0, "nothing applied");

    let q = |k: usize| SearchRequest::new(vec![1.0, 0.0, 0.0], k, 0);
    let serr = |r: Result<Vec<swarm_memory::SearchHit>, MemoryError>| r.unwrap_err().code();
    assert_eq!(serr(s.search("c", &q(0))), "invalid_k");
    assert_eq!(serr(s.search("c", &q(1_000_000))), "invalid_k");
    assert_eq!(serr(s.search("nope", &q(1))), "unknown_collection");
    assert_eq!(
        serr(s.search("c", &SearchRequest::new(vec![1.0], 1, 0))),
        "dimension_mismatch"
    );
    assert_eq!(
        serr(s.search("c", &SearchRequest::new(vec![0.0; 3], 1, 0))),
        "invalid_vector"
    );
    let mut r = q(1);
    r.ef = Some(0);
    assert_eq!(serr(s.search("c", &r)), "invalid_ef");
    let mut r = q(1);
    r.filter = Some(MetadataFilter::eq("", Scalar::Null));
    assert_eq!(serr(s.search("c", &r)), "invalid_filter");

    // Every error has a distinct, documented code.
    let all: BTreeSet<&str> = MemoryError::ALL_CODES.iter().copied().collect();
    assert_eq!(all.len(), MemoryError::ALL_CODES.len());
    assert!(!MemoryError::UnknownCollection("x".into())
        .to_string()
        .is_empty());
    assert!(MemoryError::InvalidK { k: 0, max: 1 }.is_client_error());
    assert!(!MemoryError::Embedding("x".into()).is_client_error());
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MemoryStore>();
}

#[test]
fn validate_checks_without_applying() {
    let mut s = store();
    create(&mut s, "c", 2, Metric::L2);
    let op = MemoryOp::Upsert {
        collection: "c".into(),
        points: vec![point("a", vec![1.0, 2.0], "")],
        now_ms: 1,
    };
    s.validate(&op).unwrap();
    assert_eq!(s.collection_info("c").unwrap().live, 0);
    let bad = MemoryOp::Upsert {
        collection: "c".into(),
        points: vec![point("a", vec![1.0], "")],
        now_ms: 1,
    };
    assert_eq!(s.validate(&bad).unwrap_err().code(), "dimension_mismatch");
    assert_eq!(op.now_ms(), 1);
    assert_eq!(op.kind(), "upsert");
    let out = s
        .apply(MemoryOp::DropCollection {
            name: "c".into(),
            now_ms: 2,
        })
        .unwrap();
    assert_eq!(
        out,
        OpOutcome::CollectionDropped {
            name: "c".into(),
            points: 0
        }
    );
    assert!(s.list_collections().is_empty());
}
