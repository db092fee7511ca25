//! Every op variant, every outcome variant and a snapshot survive the workspace codec
//! (`swarm-codec`, postcard) — the encoding the coordinator uses for Raft entries and
//! snapshots.

use serde::de::DeserializeOwned;
use serde::Serialize;
use swarm_memory::{
    CollectionSpec, ConsolidateParams, ConsolidationReport, MemoryOp, MemoryStore, MergeRecord,
    Metric, NewPattern, OpOutcome, Outcome, PointWrite, StoreSnapshot,
};

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let bytes = swarm_codec::encode(value).unwrap();
    let back: T = swarm_codec::decode(&bytes, bytes.len()).unwrap();
    assert_eq!(&back, value);
    // The crate's own helpers agree with the codec.
    assert_eq!(swarm_memory::encode_value(value).unwrap(), bytes);
    assert_eq!(
        &swarm_memory::decode_value::<T>(&bytes, bytes.len()).unwrap(),
        value
    );
}

/// Fails to compile when a variant is added without extending `all_ops`.
fn covered(op: &MemoryOp) -> usize {
    match op {
        MemoryOp::CreateCollection { .. } => 0,
        MemoryOp::DropCollection { .. } => 1,
        MemoryOp::Upsert { .. } => 2,
        MemoryOp::Delete { .. } => 3,
        MemoryOp::ExpireSweep { .. } => 4,
        MemoryOp::RebuildIndex { .. } => 5,
        MemoryOp::PatternAdd { .. } => 6,
        MemoryOp::PatternJudge { .. } => 7,
        MemoryOp::PatternDelete { .. } => 8,
        MemoryOp::Consolidate { .. } => 9,
        MemoryOp::FinishRebuild { .. } => 10,
        MemoryOp::AdvanceIndex { .. } => 11,
        MemoryOp::DistillQueue { .. } => 12,
        MemoryOp::DistillDone { .. } => 13,
    }
}

fn all_ops() -> Vec<MemoryOp> {
    vec![
        MemoryOp::CreateCollection {
            name: "docs".into(),
            spec: CollectionSpec::new(3, Metric::Dot),
            now_ms: 1,
        },
        MemoryOp::DropCollection {
            name: "docs".into(),
            now_ms: 2,
        },
        MemoryOp::Upsert {
            collection: "docs".into(),
            points: vec![
                PointWrite {
                    id: "a".into(),
                    vector: vec![1.5, -0.0, f32::MIN_POSITIVE],
                    metadata: r#"{"k":"v","n":[1,2.5,null]}"#.into(),
                    ttl_ms: Some(60_000),
                },
                PointWrite {
                    id: "b".into(),
                    vector: vec![0.0; 3],
                    metadata: String::new(),
                    ttl_ms: None,
                },
            ],
            now_ms: u64::MAX,
        },
        MemoryOp::Delete {
            collection: "docs".into(),
            ids: vec!["a".into(), "zz".into()],
            now_ms: 4,
        },
        MemoryOp::ExpireSweep { now_ms: 5 },
        MemoryOp::RebuildIndex {
            collection: "docs".into(),
            now_ms: 6,
        },
        MemoryOp::PatternAdd {
            items: vec![NewPattern {
                title: "t".into(),
                description: "d".into(),
                content: "c\nmulti-line ✓".into(),
                embedding: vec![0.25; 4],
                source_task: Some(77),
                outcome: Outcome::Failure,
            }],
            now_ms: 7,
        },
        MemoryOp::PatternJudge {
            task_id: None,
            item_ids: vec!["pat-000000000001".into()],
            outcome: Outcome::Success,
            now_ms: 8,
        },
        MemoryOp::PatternDelete {
            ids: vec![],
            now_ms: 9,
        },
        MemoryOp::Consolidate {
            params: ConsolidateParams::default(),
            now_ms: 10,
        },
        MemoryOp::FinishRebuild {
            collection: Some("docs".into()),
            generation: 3,
            now_ms: 11,
        },
        MemoryOp::AdvanceIndex {
            collection: None,
            generation: 1,
            slots: 4096,
            now_ms: 12,
        },
        MemoryOp::DistillQueue {
            task_id: 9,
            attempt: 2,
            now_ms: 13,
        },
        MemoryOp::DistillDone {
            task_id: 9,
            items: vec![],
            now_ms: 14,
        },
    ]
}

#[test]
fn every_op_variant_roundtrips() {
    let ops = all_ops();
    let mut kinds: Vec<usize> = ops.iter().map(covered).collect();
    kinds.dedup();
    assert_eq!(
        kinds,
        (0..14).collect::<Vec<_>>(),
        "one of each variant, in order"
    );
    for op in &ops {
        roundtrip(op);
    }
    roundtrip(&ops);
}

#[test]
fn every_outcome_variant_roundtrips() {
    let outcomes = vec![
        OpOutcome::CollectionCreated { name: "x".into() },
        OpOutcome::CollectionDropped {
            name: "x".into(),
            points: 3,
        },
        OpOutcome::Upserted {
            inserted: 1,
            replaced: 2,
            expired: 3,
            rebuilt: true,
        },
        OpOutcome::Deleted {
            deleted: 1,
            missing: vec!["m".into()],
            expired: 0,
            rebuilt: false,
        },
        OpOutcome::Swept { expired: 9 },
        OpOutcome::Rebuilt {
            live: 5,
            tombstones_removed: 6,
        },
        OpOutcome::PatternsAdded {
            ids: vec!["pat-000000000001".into()],
        },
        OpOutcome::Judged {
            updated: vec!["a".into()],
            missing: vec![],
        },
        OpOutcome::PatternsDeleted {
            deleted: 1,
            missing: vec![],
        },
        OpOutcome::Consolidated(ConsolidationReport {
            merged: vec![MergeRecord {
                kept: "a".into(),
                removed: "b".into(),
                similarity: 0.97,
            }],
            contradictions: vec![("a".into(), "c".into())],
            pruned: vec!["d".into()],
        }),
        OpOutcome::IndexAdvanced { advanced: true },
        OpOutcome::DistillQueued {
            queued: true,
            waiting: 3,
        },
        OpOutcome::Distilled {
            found: true,
            ids: vec!["pat-000000000002".into()],
            refused: Some("bad".into()),
        },
    ];
    for o in &outcomes {
        roundtrip(o);
    }
}

#[test]
fn snapshot_roundtrips_and_restores() {
    let mut s = super::common::store_with(|c| c.pattern_dimension = 4);
    for op in all_ops() {
        // Some ops fail on this state (e.g. zero vector is fine for dot, pattern ids may be
        // missing); failures must not matter for the round trip.
        let _ = s.apply(op);
    }
    super::common::create(&mut s, "docs2", 3, Metric::Cosine);
    super::common::upsert(
        &mut s,
        "docs2",
        vec![super::common::point(
            "p",
            vec![1.0, 2.0, 2.0],
            r#"{"a":{"b":[1]}}"#,
        )],
        20,
    );
    assert_eq!(s.pattern_count(), 1);
    let snap = s.snapshot();
    roundtrip(&snap);
    let bytes = swarm_codec::encode(&snap).unwrap();
    let back: StoreSnapshot = swarm_codec::decode(&bytes, bytes.len()).unwrap();
    let restored = MemoryStore::from_snapshot(back).unwrap();
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(
        restored.snapshot_bytes().unwrap(),
        s.snapshot_bytes().unwrap()
    );
    assert_eq!(
        restored.get("docs2", "p", 20).unwrap(),
        s.get("docs2", "p", 20).unwrap()
    );
    assert_eq!(snap.format_version(), swarm_memory::SNAPSHOT_FORMAT_VERSION);
}
