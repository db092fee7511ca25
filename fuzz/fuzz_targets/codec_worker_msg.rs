//! Worker → coordinator frames: what a coordinator decodes from any worker (or anything
//! that gets through the TLS handshake with a worker certificate).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_fuzz::{codec_round_trip, DEFAULT_MAX_FRAME};
use swarm_proto::worker::{Hello, WorkerMsg};

fuzz_target!(
    init: swarm_fuzz::init("codec_worker_msg"),
    |data: &[u8]| {
        codec_round_trip::<WorkerMsg>(data, DEFAULT_MAX_FRAME);
        codec_round_trip::<Hello>(data, DEFAULT_MAX_FRAME);
    }
);
