//! Mesh peer link frames (work stealing between workers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_fuzz::{codec_round_trip, DEFAULT_MAX_FRAME};
use swarm_proto::peer::PeerMsg;

fuzz_target!(
    init: swarm_fuzz::init("codec_peer_msg"),
    |data: &[u8]| {
        codec_round_trip::<PeerMsg>(data, DEFAULT_MAX_FRAME);
    }
);
