//! Hostile byte streams through the frame decoder: arbitrary bytes and mutated valid
//! streams, cut into pieces of any size, give frames or clean errors, never a panic or a
//! hang; a hostile length prefix (up to 4 GiB) is refused without allocating what it
//! claims; a stream that ends inside a frame is an error. The pure decoder
//! ([`decode_frames`]) is checked against a real `FrameReader` on QUIC streams.
//! The coverage-guided version is `fuzz/` (`scripts/fuzz.sh`).

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use serde::{Deserialize, Serialize};
use swarm_testkit::alloc::largest_allocation;
use swarm_testkit::bytes::{apply, split, Edit};
use swarm_testkit::config;
use swarm_transport::frame::decode_frames;
use swarm_transport::{
    accept, client_config, client_endpoint, codec, dial, init_certs, server_config,
    server_endpoint, FrameError, FrameReader, Identity, Role, DEFAULT_MAX_FRAME,
};

#[global_allocator]
static ALLOC: swarm_testkit::alloc::Tracking = swarm_testkit::alloc::Tracking;

/// Runs `f` on its own thread and fails if it takes longer than `limit`: a decoder that
/// loops on some input fails the test instead of hanging the suite.
fn within<R: Send + 'static>(limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => {
            worker.join().expect("the checked thread");
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("no result within {limit:?}: a hang"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sent nothing and did not panic"),
        },
    }
}

// ---- streams -------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { worker: String, slots: u32 },
    Task { id: u64, payload: Vec<u8> },
    Ack(u64),
    Batch(Vec<(u32, Option<String>)>),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        ("[a-z0-9-]{0,12}", any::<u32>()).prop_map(|(worker, slots)| Msg::Hello { worker, slots }),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(id, payload)| Msg::Task { id, payload }),
        any::<u64>().prop_map(Msg::Ack),
        prop::collection::vec((any::<u32>(), prop::option::of("[a-z]{0,4}")), 0..4)
            .prop_map(Msg::Batch),
    ]
}

fn frame(m: &Msg) -> Vec<u8> {
    let payload = codec::encode(m).unwrap();
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

fn stream(msgs: &[Msg]) -> Vec<u8> {
    msgs.iter().flat_map(frame).collect()
}

/// Byte edits, and a 4-byte big-endian length (the frame header) written over the
/// stream at some point.
fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        swarm_testkit::bytes::plain(),
        (any::<Index>(), hostile_len()).prop_map(|(i, l)| Edit::LengthBe(i, l)),
    ]
}

fn hostile_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(DEFAULT_MAX_FRAME as u32 + 1),
        Just(DEFAULT_MAX_FRAME as u32),
        (DEFAULT_MAX_FRAME as u32 + 1)..=u32::MAX,
        0u32..256,
    ]
}

/// What a decode produced, comparable across splits.
fn summary(out: &[Result<Msg, FrameError>]) -> Vec<Result<Msg, String>> {
    out.iter()
        .map(|r| match r {
            Ok(m) => Ok(m.clone()),
            Err(e) => Err(e.to_string()),
        })
        .collect()
}

/// The decoder's contract on any stream: every error is a framing error, only the last
/// result may be a non-`Malformed` error, a refused length really is over the limit, and
/// the frames do not depend on how the stream was cut.
fn check_stream(bytes: &[u8], cuts: &[Index], max: usize) -> Result<(), TestCaseError> {
    let pieces = split(bytes, cuts);
    let (out, largest) = largest_allocation(|| decode_frames::<Msg>(pieces.iter().copied(), max));
    // The buffer grows with what arrived, never with what a header claims.
    prop_assert!(
        largest <= 64 * bytes.len() + 4096,
        "{} bytes in, {} allocated at once",
        bytes.len(),
        largest
    );
    for (i, r) in out.iter().enumerate() {
        if let Err(e) = r {
            prop_assert!(e.is_malformed(), "{e}");
            match e {
                FrameError::Malformed(_) => {}
                FrameError::TooLarge { len, max: m } => {
                    prop_assert_eq!(*m, max);
                    prop_assert!(*len > max);
                    prop_assert_eq!(i, out.len() - 1, "decoding went on after {}", e);
                }
                FrameError::Truncated { expected, got } => {
                    prop_assert!(got < expected);
                    prop_assert_eq!(i, out.len() - 1, "decoding went on after {}", e);
                }
                other => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }
    let whole = decode_frames::<Msg>([bytes], max);
    prop_assert_eq!(summary(&out), summary(&whole));
    Ok(())
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn valid_streams_decode_whole_however_cut(
        msgs in prop::collection::vec(msg(), 0..8),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let bytes = stream(&msgs);
        let pieces = split(&bytes, &cuts);
        let out = decode_frames::<Msg>(pieces.iter().copied(), DEFAULT_MAX_FRAME);
        prop_assert_eq!(summary(&out), msgs.into_iter().map(Ok).collect::<Vec<_>>());
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_truncated(
        msgs in prop::collection::vec(msg(), 1..4),
        cut in any::<Index>(),
    ) {
        let bytes = stream(&msgs);
        let ends: Vec<usize> = msgs
            .iter()
            .scan(0, |at, m| {
                *at += frame(m).len();
                Some(*at)
            })
            .collect();
        let at = cut.index(bytes.len());
        prop_assume!(!ends.contains(&at) && at > 0);
        let out = decode_frames::<Msg>([&bytes[..at]], DEFAULT_MAX_FRAME);
        let last = out.last().expect("a result");
        let truncated = matches!(last, Err(FrameError::Truncated { got, expected }) if *got < *expected);
        prop_assert!(truncated, "{:?}", last);
    }
}

#[test]
fn hostile_streams_decode_cleanly_and_promptly() {
    // The whole property runs under a deadline: a decoder that loops fails, not hangs.
    within(Duration::from_secs(120), || {
        let mut runner = TestRunner::new(Config {
            cases: 5000,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..128),
                (
                    prop::collection::vec(msg(), 0..6),
                    prop::collection::vec(edit(), 1..5)
                )
                    .prop_map(|(msgs, edits)| {
                        let mut bytes = stream(&msgs);
                        apply(&mut bytes, &edits);
                        bytes
                    }),
            ],
            prop::collection::vec(any::<Index>(), 0..8),
            prop_oneof![Just(DEFAULT_MAX_FRAME), 0usize..64],
        );
        runner
            .run(&strategy, |(bytes, cuts, max)| {
                check_stream(&bytes, &cuts, max)
            })
            .unwrap();
    });
}

#[test]
fn hostile_length_prefixes_are_refused_without_allocating() {
    within(Duration::from_secs(60), || {
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            (DEFAULT_MAX_FRAME as u32 + 1)..=u32::MAX,
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<Index>(), 0..4),
        );
        runner
            .run(&strategy, |(len, tail, cuts)| {
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.extend_from_slice(&tail);
                let pieces = split(&bytes, &cuts);
                let (out, largest) =
                    largest_allocation(|| decode_frames::<Msg>(pieces, DEFAULT_MAX_FRAME));
                prop_assert!(largest < 64 * 1024, "allocated {} for a {}-byte claim", largest, len);
                let refused = matches!(
                    out.as_slice(),
                    [Err(FrameError::TooLarge { len: l, max })] if *l == len as usize && *max == DEFAULT_MAX_FRAME
                );
                prop_assert!(refused, "{:?}", out);
                Ok(())
            })
            .unwrap();
        // 4 GiB - 1, the largest the header can say, in one piece and byte by byte.
        let claim = u32::MAX.to_be_bytes();
        let (out, largest) =
            largest_allocation(|| decode_frames::<Msg>(claim.chunks(1), DEFAULT_MAX_FRAME));
        assert!(largest < 4096, "allocated {largest}");
        assert!(matches!(
            out.as_slice(),
            [Err(FrameError::TooLarge { len, .. })] if *len == u32::MAX as usize
        ));
    });
}

// ---- the real reader -----------------------------------------------------------------

/// The same hostile streams through a real `FrameReader` on QUIC streams (one connection,
/// a stream per case) give exactly what [`decode_frames`] gives, each within a deadline.
#[test]
fn a_real_frame_reader_agrees_with_the_decoder() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    init_certs(dir.path(), &[], false).unwrap();
    let server_id = Identity::load(dir.path(), Role::Coordinator).unwrap();
    let client_id = Identity::load(dir.path(), Role::Worker).unwrap();
    const ALPN: &[u8] = b"swarm-test/1";

    let (conn, server_conn) = rt.block_on(async {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sep = server_endpoint(any, server_config(&server_id, &[ALPN]).unwrap()).unwrap();
        let addr = sep.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let incoming = sep.accept().await.expect("an incoming connection");
            let acc = accept(incoming).await.unwrap();
            (acc, sep)
        });
        let cep = client_endpoint(any).unwrap();
        let dialed = dial(
            &cep,
            &client_config(&client_id, ALPN, Role::Coordinator).unwrap(),
            addr,
            "localhost",
        )
        .await
        .unwrap();
        let (acc, sep) = server.await.unwrap();
        ((dialed, cep), (acc, sep))
    });

    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..96),
            (
                prop::collection::vec(msg(), 0..5),
                prop::collection::vec(edit(), 0..4)
            )
                .prop_map(|(msgs, edits)| {
                    let mut bytes = stream(&msgs);
                    apply(&mut bytes, &edits);
                    bytes
                }),
        ],
        prop::collection::vec(any::<Index>(), 0..4),
    );
    let result = runner.run(&strategy, |(bytes, cuts)| {
        let expected = summary(&decode_frames::<Msg>([&bytes[..]], DEFAULT_MAX_FRAME));
        let got = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), async {
                let (mut send, _recv) = conn.0.conn.open_bi().await.unwrap();
                for piece in split(&bytes, &cuts) {
                    send.write_all(piece).await.unwrap();
                }
                send.finish().unwrap();
                let (_w, r) = server_conn.0.accept_stream().await.unwrap();
                let mut reader = FrameReader::new(r.into_inner());
                let mut got = Vec::new();
                loop {
                    match reader.recv::<Msg>().await {
                        Ok(Some(m)) => got.push(Ok(m)),
                        Ok(None) => break,
                        Err(e @ FrameError::Malformed(_)) => got.push(Err(e.to_string())),
                        Err(e) => {
                            got.push(Err(e.to_string()));
                            break;
                        }
                    }
                }
                got
            })
            .await
            .expect("the reader hung on a finished stream")
        });
        prop_assert_eq!(got, expected);
        Ok(())
    });
    rt.block_on(async {
        conn.0.conn.close(0u32.into(), b"done");
        conn.1.wait_idle().await;
        server_conn.1.close(0u32.into(), b"done");
    });
    result.unwrap();
}
