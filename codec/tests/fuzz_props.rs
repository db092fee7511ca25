//! Hostile bytes through the codec: arbitrary input and mutated valid encodings of the
//! real wire messages (worker ⇄ coordinator, mesh peers) and of every serde shape the
//! codec supports decode to a value or a clean error, never a panic, a hang or an
//! allocation out of proportion to the input. The coverage-guided version of these
//! properties is `fuzz/` (`scripts/fuzz.sh`).

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use swarm_codec::{decode, encode, encode_into, encoded_len, CodecError};
use swarm_proto::peer::PeerMsg;
use swarm_proto::worker::{
    AttemptRef, CoordinatorMsg, FailureKind, Hello, LogPiece, LogTail, Outcome, OutputChunk,
    OutputStream, PatternHit, PeerInfo, TaskAssignment, TaskReport, Usage, WorkerMsg,
};
use swarm_testkit::alloc::largest_allocation;
use swarm_testkit::bytes::{apply, varint, Edit};
use swarm_testkit::config;

/// The frame limit of worker, coordinator and peer streams.
const MAX: usize = 16 << 20;

#[global_allocator]
static ALLOC: swarm_testkit::alloc::Tracking = swarm_testkit::alloc::Tracking;

fn edit() -> impl Strategy<Value = Edit> {
    swarm_testkit::bytes::with_varints(prop_oneof![
        Just(u64::MAX),
        Just(1 << 32),
        Just(1 << 20),
        any::<u64>()
    ])
}

/// Most a decode may allocate at once beyond what its input justifies: serde caps what
/// it pre-allocates for a sequence or map at 1 MiB of elements; a hash map's table is up
/// to about twice that. (postcard passes a map's claimed length on unchecked; sequences
/// get a hint only when the input can hold them. No decoded swarm type has a hash map.)
const PREALLOC_CAP: usize = 4 << 20;

/// Decodes `bytes` as `T` under `limit`: a clean result, and a decoded value re-encodes
/// to bytes that decode to the same encoding. Bounded allocation: no single allocation
/// beyond serde's pre-allocation cap plus a multiple of the input's size.
fn check<T: Serialize + DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<(), TestCaseError> {
    let (res, largest) = largest_allocation(|| decode::<T>(bytes, limit));
    prop_assert!(
        largest <= PREALLOC_CAP + 64 * bytes.len() + 4096,
        "decoding {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
    match res {
        Ok(v) => {
            prop_assert!(bytes.len() <= limit);
            let once = encode(&v).expect("a decoded value encodes");
            let back: T = decode(&once, usize::MAX).expect("its encoding decodes");
            prop_assert_eq!(encode(&back).ok(), Some(once));
        }
        Err(e) => prop_assert!(e.is_malformed(), "{e}"),
    }
    Ok(())
}

/// Decodes `bytes` as a hash map: a clean result within the allocation bound. (A hash
/// map encodes in its random iteration order, so there is no stable re-encoding.)
fn check_hash_map(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (res, largest) =
        largest_allocation(|| decode::<HashMap<u32, Vec<String>>>(bytes, MAX).map(|m| m.len()));
    prop_assert!(
        largest <= PREALLOC_CAP + 64 * bytes.len() + 4096,
        "allocated {}",
        largest
    );
    if let Err(e) = res {
        prop_assert!(e.is_malformed());
    }
    Ok(())
}

// ---- valid values --------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.-]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
    ]
}

fn attempt() -> impl Strategy<Value = AttemptRef> {
    (any::<u64>(), any::<u32>()).prop_map(|(task_id, attempt)| AttemptRef { task_id, attempt })
}

fn failure_kind() -> impl Strategy<Value = FailureKind> {
    prop_oneof![
        Just(FailureKind::Exit),
        Just(FailureKind::Timeout),
        Just(FailureKind::Cancelled),
        Just(FailureKind::UnknownAgent),
        Just(FailureKind::Spawn),
        Just(FailureKind::OutputTooLarge),
        Just(FailureKind::BadPayload),
        Just(FailureKind::Drained),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..32).prop_map(|output| Outcome::Succeeded { output }),
        (failure_kind(), text()).prop_map(|(kind, message)| Outcome::Failed { kind, message }),
    ]
}

fn worker_msg() -> impl Strategy<Value = WorkerMsg> {
    prop_oneof![
        (
            any::<u32>(),
            text(),
            any::<u32>(),
            prop::collection::btree_map(text(), text(), 0..3),
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(attempt(), 0..3),
            prop::option::of(text()),
        )
            .prop_map(
                |(protocol, worker_id, slots, labels, agents, running, peer_addr)| {
                    WorkerMsg::Hello(Hello {
                        protocol,
                        worker_id,
                        slots,
                        labels,
                        agents,
                        running,
                        peer_addr,
                    })
                }
            ),
        prop::collection::vec(attempt(), 0..4).prop_map(|running| WorkerMsg::Heartbeat { running }),
        (
            attempt(),
            outcome(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(text(), 0..3),
            any::<u64>(),
            prop::collection::vec(text(), 0..3),
            prop::option::of((text(), any::<u64>(), any::<u64>())),
        )
            .prop_map(
                |(attempt, outcome, s, f, patterns_used, offset, pieces, usage)| {
                    WorkerMsg::Finished(TaskReport {
                        attempt,
                        outcome,
                        started_at_ms: s,
                        finished_at_ms: f,
                        patterns_used,
                        log: LogTail {
                            offset,
                            pieces: pieces
                                .into_iter()
                                .map(|t| LogPiece {
                                    stream: OutputStream::Stderr,
                                    data: t.into_bytes(),
                                })
                                .collect(),
                        },
                        usage: usage.map(|(model, p, c)| Usage {
                            model,
                            prompt_tokens: p,
                            completion_tokens: c,
                        }),
                    })
                }
            ),
        (
            attempt(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(attempt, offset, data)| {
                WorkerMsg::Output(OutputChunk {
                    attempt,
                    stream: OutputStream::Tokens,
                    offset,
                    data,
                })
            }),
        (any::<u64>(), text(), any::<u32>()).prop_map(|(request_id, query, k)| {
            WorkerMsg::Retrieve {
                request_id,
                query,
                k,
            }
        }),
        (attempt(), text()).prop_map(|(attempt, from)| WorkerMsg::Stole { attempt, from }),
        text().prop_map(|peer| WorkerMsg::PeerLost { peer }),
        Just(WorkerMsg::Draining),
        any::<bool>().prop_map(|on| WorkerMsg::Drain { on }),
    ]
}

fn assignment() -> impl Strategy<Value = TaskAssignment> {
    (
        attempt(),
        text(),
        prop::collection::vec(any::<u8>(), 0..32),
        any::<u64>(),
        prop::option::of(text()),
        any::<u32>(),
        text(),
        any::<u64>(),
    )
        .prop_map(
            |(attempt, agent, payload, timeout_ms, idempotency_key, patterns, swarm, term)| {
                TaskAssignment {
                    attempt,
                    agent,
                    payload,
                    timeout_ms,
                    idempotency_key,
                    patterns,
                    swarm,
                    term,
                }
            },
        )
}

fn peer_info() -> impl Strategy<Value = PeerInfo> {
    (text(), text()).prop_map(|(worker_id, addr)| PeerInfo { worker_id, addr })
}

fn coordinator_msg() -> impl Strategy<Value = CoordinatorMsg> {
    let hit =
        (text(), text(), any::<f64>(), any::<f64>()).prop_map(|(id, title, c, s)| PatternHit {
            id,
            title,
            description: "d".into(),
            content: "c".into(),
            outcome: "success".into(),
            confidence: c,
            score: s,
        });
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(p, h, m, t)| {
            CoordinatorMsg::Welcome {
                protocol: p,
                heartbeat_interval_ms: h,
                max_output_bytes: m,
                term: t,
            }
        }),
        (text(), text()).prop_map(|(code, message)| CoordinatorMsg::Rejected { code, message }),
        assignment().prop_map(CoordinatorMsg::Run),
        attempt().prop_map(CoordinatorMsg::Cancel),
        attempt().prop_map(CoordinatorMsg::Ack),
        (
            any::<u64>(),
            prop_oneof![
                prop::collection::vec(hit, 0..3).prop_map(Ok),
                text().prop_map(Err)
            ]
        )
            .prop_map(|(request_id, result)| CoordinatorMsg::Retrieved { request_id, result }),
        (prop::option::of(text()), text())
            .prop_map(|(leader, message)| CoordinatorMsg::NotLeader { leader, message }),
        (text(), prop::collection::vec(peer_info(), 0..3))
            .prop_map(|(swarm, peers)| CoordinatorMsg::Peers { swarm, peers }),
        Just(CoordinatorMsg::DrainAck),
        prop::option::of(peer_info()).prop_map(|lead| CoordinatorMsg::Parent { lead }),
        (attempt(), any::<bool>(), any::<u64>())
            .prop_map(|(attempt, on, from)| CoordinatorMsg::Watch { attempt, on, from }),
        any::<bool>().prop_map(|on| CoordinatorMsg::Drain { on }),
    ]
}

fn peer_msg() -> impl Strategy<Value = PeerMsg> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(protocol, worker_id)| PeerMsg::Hello {
            protocol,
            worker_id
        }),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(running, queued, slots)| {
            PeerMsg::Load {
                running,
                queued,
                slots,
            }
        }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(request_id, max)| PeerMsg::Steal { request_id, max }),
        (any::<u64>(), prop::collection::vec(assignment(), 0..3)).prop_map(
            |(request_id, assignments)| PeerMsg::Given {
                request_id,
                assignments
            }
        ),
    ]
}

/// Every serde shape the codec is used with, in one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Newtype(u128),
    Tuple(i8, i16, i32, i64, i128),
    Struct {
        f: f32,
        d: f64,
        b: bool,
        c: char,
        s: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        opt: Option<Box<Shape>>,
        seq: Vec<Vec<u16>>,
        map: BTreeMap<String, u64>,
        arr: [u8; 3],
        pair: (u8, String),
        res: Result<u32, String>,
    },
}

fn shape() -> impl Strategy<Value = Shape> {
    let leaf = prop_oneof![
        Just(Shape::Unit),
        any::<u128>().prop_map(Shape::Newtype),
        any::<(i8, i16, i32, i64, i128)>().prop_map(|(a, b, c, d, e)| Shape::Tuple(a, b, c, d, e)),
    ];
    leaf.prop_recursive(3, 8, 2, |inner| {
        (
            any::<f32>(),
            any::<f64>(),
            any::<bool>(),
            any::<char>(),
            text(),
            prop::collection::vec(any::<u8>(), 0..16),
            prop::option::of(inner),
            prop::collection::vec(prop::collection::vec(any::<u16>(), 0..4), 0..3),
            prop::collection::btree_map(text(), any::<u64>(), 0..3),
            any::<[u8; 3]>(),
            any::<Result<u32, String>>(),
        )
            .prop_map(
                |(f, d, b, c, s, bytes, opt, seq, map, arr, res)| Shape::Struct {
                    f,
                    d,
                    b,
                    c,
                    s: s.clone(),
                    bytes,
                    opt: opt.map(Box::new),
                    seq,
                    map,
                    arr,
                    pair: (arr[0], s),
                    res,
                },
            )
    })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_decode_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check::<WorkerMsg>(&bytes, MAX)?;
        check::<CoordinatorMsg>(&bytes, MAX)?;
        check::<PeerMsg>(&bytes, MAX)?;
        check::<Hello>(&bytes, MAX)?;
        check::<Shape>(&bytes, MAX)?;
        check_hash_map(&bytes)?;
    }

    #[test]
    fn mutated_worker_messages_decode_cleanly(
        msg in worker_msg(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut bytes = encode(&msg).unwrap();
        if edits.is_empty() {
            prop_assert_eq!(decode::<WorkerMsg>(&bytes, MAX).unwrap(), msg);
        }
        apply(&mut bytes, &edits);
        check::<WorkerMsg>(&bytes, MAX)?;
    }

    #[test]
    fn mutated_coordinator_messages_decode_cleanly(
        msg in coordinator_msg(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut bytes = encode(&msg).unwrap();
        if edits.is_empty() {
            // Compared as bytes: pattern scores may be NaN.
            let back = decode::<CoordinatorMsg>(&bytes, MAX).unwrap();
            prop_assert_eq!(encode(&back).unwrap(), bytes.clone());
        }
        apply(&mut bytes, &edits);
        check::<CoordinatorMsg>(&bytes, MAX)?;
    }

    #[test]
    fn mutated_peer_messages_decode_cleanly(
        msg in peer_msg(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut bytes = encode(&msg).unwrap();
        if edits.is_empty() {
            prop_assert_eq!(decode::<PeerMsg>(&bytes, MAX).unwrap(), msg);
        }
        apply(&mut bytes, &edits);
        check::<PeerMsg>(&bytes, MAX)?;
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn mutated_shapes_decode_cleanly(
        value in shape(),
        edits in prop::collection::vec(edit(), 0..4),
    ) {
        let mut bytes = encode(&value).unwrap();
        prop_assert_eq!(encoded_len(&value).unwrap(), bytes.len());
        let mut appended = vec![0xa5];
        encode_into(&value, &mut appended).unwrap();
        prop_assert_eq!(&appended[1..], &bytes[..]);
        if edits.is_empty() {
            let back: Shape = decode(&bytes, bytes.len()).unwrap();
            prop_assert_eq!(encode(&back).unwrap(), bytes.clone());
        }
        apply(&mut bytes, &edits);
        check::<Shape>(&bytes, MAX)?;
        check_hash_map(&bytes)?;
    }

    #[test]
    fn limits_and_trailing_bytes_are_enforced(
        value in shape(),
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let bytes = encode(&value).unwrap();
        if !bytes.is_empty() {
            let too_large = matches!(
                decode::<Shape>(&bytes, bytes.len() - 1),
                Err(CodecError::TooLarge { len, limit }) if len == bytes.len() && limit == len - 1
            );
            prop_assert!(too_large);
        }
        let mut long = bytes.clone();
        long.extend_from_slice(&extra);
        let trailing = matches!(
            decode::<Shape>(&long, MAX),
            Err(CodecError::Trailing(n)) if n == extra.len()
        );
        prop_assert!(trailing);
    }

    #[test]
    fn lying_lengths_allocate_nothing_they_claim(
        claim in prop_oneof![Just(u64::MAX), Just(1u64 << 32), Just(1u64 << 40), (1u64 << 16)..u64::MAX],
        prefix in 0usize..3,
        tail in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        // A length prefix claiming far more than follows, at the start of a sequence
        // field (after `prefix` variant/field bytes of zero).
        let mut bytes = vec![0u8; prefix];
        bytes.extend_from_slice(&varint(claim));
        bytes.extend_from_slice(&tail);
        for f in [
            |b: &[u8]| decode::<Vec<u8>>(b, MAX).is_err(),
            |b: &[u8]| decode::<String>(b, MAX).is_err(),
            |b: &[u8]| decode::<Vec<u64>>(b, MAX).is_err(),
            |b: &[u8]| decode::<Vec<String>>(b, MAX).is_err(),
            |b: &[u8]| decode::<BTreeMap<u32, u32>>(b, MAX).is_err(),
            |b: &[u8]| decode::<WorkerMsg>(b, MAX).is_err(),
            |b: &[u8]| decode::<CoordinatorMsg>(b, MAX).is_err(),
        ] {
            let (is_err, largest) = largest_allocation(|| f(&bytes));
            prop_assert!(
                largest <= 64 * bytes.len() + 4096,
                "allocated {} for {} bytes",
                largest,
                bytes.len()
            );
            // Rejected unless the claim happens to fit what follows.
            prop_assert!(is_err || claim <= tail.len() as u64 || prefix > 0);
        }
        // A hash map is pre-allocated for what its prefix claims, up to serde's cap (no
        // swarm type decodes one; this pins the bound).
        let (_, largest) = largest_allocation(|| decode::<HashMap<u32, u32>>(&bytes, MAX));
        prop_assert!(largest <= PREALLOC_CAP, "allocated {}", largest);
    }
}
