//! Installing a Raft snapshot sent by the leader: `CheckpointStore::build_from_dump` (as
//! `sm_store::install_now` calls it) on a dump, then `load()` of the new checkpoint (live
//! tasks into the task table, the memory store from its snapshot bytes).
//!
//! Input: the dump's records (u32 LE length, body); preamble, end record, counts and
//! checksum are made right around them (the parser's own checks of those are fuzzed by
//! `backup_restore`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use swarm_coordinator::raft::checkpoint::CheckpointStore;
use swarm_fuzz::framed_dump;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("swarm-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fuzz_target!(
    init: swarm_fuzz::init("raft_snapshot"),
    |data: &[u8]| {
        let dump = framed_dump(data);
        let path = scratch().join("install.redb");
        if let Ok((store, header)) = CheckpointStore::build_from_dump(&path, &dump[..]) {
            if let Some(Ok(loaded)) = swarm_fuzz::guard(|| store.load()) {
                assert_eq!(loaded.applied, header.applied);
            }
            drop(store);
        }
        let _ = std::fs::remove_file(&path);
    }
);
