//! Coordinator → worker frames: what a worker decodes from its coordinator (or a lead
//! relaying for it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_fuzz::{codec_round_trip, DEFAULT_MAX_FRAME};
use swarm_proto::worker::{CoordinatorMsg, TaskAssignment};

fuzz_target!(
    init: swarm_fuzz::init("codec_coordinator_msg"),
    |data: &[u8]| {
        if codec_round_trip::<CoordinatorMsg>(data, DEFAULT_MAX_FRAME) {
            if let Ok(CoordinatorMsg::Run(t)) = swarm_codec::decode(data, DEFAULT_MAX_FRAME) {
                let _ = t.execution().to_string();
            }
        }
        codec_round_trip::<TaskAssignment>(data, DEFAULT_MAX_FRAME);
    }
);
