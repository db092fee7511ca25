//! The length-delimited frame decoder of every QUIC stream (`FrameReader`), fed a hostile
//! byte stream in pieces of any size.
//!
//! Input: `kind` (which message type the stream carries), `step` (largest piece), `max`
//! (0: the default frame limit; otherwise a small limit, so oversize frames are common),
//! then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use swarm_fuzz::{pieces, DEFAULT_MAX_FRAME};
use swarm_proto::peer::PeerMsg;
use swarm_proto::worker::{CoordinatorMsg, WorkerMsg};
use swarm_transport::frame::decode_frames;
use swarm_transport::FrameError;

fn run<T: Serialize + DeserializeOwned>(stream: &[u8], step: u8, max: usize) {
    let chunks = pieces(stream, step, stream.len() as u8);
    let split = decode_frames::<T>(chunks.iter().copied(), max);
    let whole = decode_frames::<T>([stream], max);
    // However the stream is cut, the same frames come out.
    assert_eq!(split.len(), whole.len(), "frame count depends on the split");
    let mut consumed = 0usize;
    for (a, b) in split.iter().zip(&whole) {
        match (a, b) {
            (Ok(x), Ok(y)) => {
                assert_eq!(swarm_codec::encode(x).ok(), swarm_codec::encode(y).ok());
                consumed += 4 + swarm_codec::encode(x).map_or(0, |v| v.len());
            }
            (Err(x), Err(y)) => {
                assert!(x.is_malformed() && y.is_malformed(), "{x}");
                assert_eq!(x.to_string(), y.to_string());
                if let FrameError::TooLarge { len, max: m } = x {
                    assert!(*len > *m);
                }
            }
            _ => panic!(
                "split and whole stream disagree: {:?} vs {:?}",
                a.as_ref().err(),
                b.as_ref().err()
            ),
        }
    }
    assert!(consumed <= stream.len());
}

fuzz_target!(
    init: swarm_fuzz::init("frame_decoder"),
    |data: &[u8]| {
        let [kind, step, max, stream @ ..] = data else {
            return;
        };
        let max = match *max {
            0 => DEFAULT_MAX_FRAME,
            m => usize::from(m) * 8,
        };
        match kind % 3 {
            0 => run::<WorkerMsg>(stream, *step, max),
            1 => run::<CoordinatorMsg>(stream, *step, max),
            _ => run::<PeerMsg>(stream, *step, max),
        }
    }
);
