//! The memory store's snapshot bytes (`MemoryStore::restore_bytes`), which a replica
//! decodes from a checkpoint, a Raft snapshot or a restored backup.
//!
//! Input: `mode`, then bytes. Mode 0: the bytes as stored. Modes 1, 2, 3: the bytes are
//! the payload of a format 3, 4 or 5 snapshot, with header and checksum made right.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_fuzz::memory_snapshot;
use swarm_memory::MemoryStore;

fuzz_target!(
    init: swarm_fuzz::init("memory_snapshot"),
    |data: &[u8]| {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        let bytes = match mode % 4 {
            0 => rest.to_vec(),
            m => memory_snapshot(2 + u32::from(m), rest),
        };
        if let Some(Ok(store)) = swarm_fuzz::guard(|| MemoryStore::restore_bytes(&bytes)) {
            // A restored store is usable and snapshots again.
            let again = store.snapshot_bytes().expect("a restored store snapshots");
            let back = MemoryStore::restore_bytes(&again).expect("its snapshot restores");
            assert_eq!(back.snapshot_bytes().expect("snapshot"), again);
            let _ = store.list_collections();
            let _ = store.pattern_count();
        }
    }
);
