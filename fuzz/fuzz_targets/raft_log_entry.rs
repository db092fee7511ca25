//! Values of the Raft log database (`raft-log.redb`), decoded as `log_store.rs` decodes
//! them: entries (`decode_entry`, private, is exactly this decode plus an index check)
//! and the vote, committed and purged records (`load_mem`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openraft::{LogId, Vote};
use swarm_coordinator::limits::{ENTRY_DECODE_LIMIT, RECORD_DECODE_LIMIT};
use swarm_coordinator::raft::types::Entry;
use swarm_fuzz::codec_round_trip;

fuzz_target!(
    init: swarm_fuzz::init("raft_log_entry"),
    |data: &[u8]| {
        let Some((tag, body)) = data.split_first() else {
            return;
        };
        match tag % 4 {
            0 => {
                if codec_round_trip::<Entry>(body, ENTRY_DECODE_LIMIT) {
                    let e: Entry = swarm_codec::decode(body, ENTRY_DECODE_LIMIT).unwrap();
                    // What the state machine looks at before applying it.
                    if let openraft::EntryPayload::Normal(cmd) = &e.payload {
                        let _ = cmd.touches_memory();
                        for op in &cmd.ops {
                            let _ = op.size_hint();
                        }
                    }
                    let _ = e.to_string();
                }
            }
            1 => {
                codec_round_trip::<Vote<u64>>(body, RECORD_DECODE_LIMIT);
            }
            2 => {
                codec_round_trip::<Option<LogId<u64>>>(body, RECORD_DECODE_LIMIT);
            }
            _ => {
                codec_round_trip::<LogId<u64>>(body, RECORD_DECODE_LIMIT);
            }
        }
    }
);
