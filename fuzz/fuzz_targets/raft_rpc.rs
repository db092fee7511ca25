//! Raft RPC frames between coordinators: requests a follower decodes (append entries with
//! whole log entries, votes, snapshot chunks) and the answers a leader decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_coordinator::limits::RAFT_MAX_FRAME;
use swarm_coordinator::raft::network::{RaftRequest, RaftResponse};
use swarm_fuzz::codec_round_trip;

fuzz_target!(
    init: swarm_fuzz::init("raft_rpc"),
    |data: &[u8]| {
        let Some((tag, body)) = data.split_first() else {
            return;
        };
        if tag % 2 == 0 {
            codec_round_trip::<RaftRequest>(body, RAFT_MAX_FRAME);
        } else {
            codec_round_trip::<RaftResponse>(body, RAFT_MAX_FRAME);
        }
    }
);
