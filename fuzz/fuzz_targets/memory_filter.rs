//! Metadata filters of `POST /v1/memory/{collection}/search` (JSON), and matching them
//! against stored metadata. Input: filter JSON, a NUL byte, metadata JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_memory::MetadataFilter;

fuzz_target!(
    init: swarm_fuzz::init("memory_filter"),
    |data: &[u8]| {
        let mut parts = data.splitn(2, |b| *b == 0);
        let filter = parts.next().unwrap_or_default();
        let metadata = String::from_utf8_lossy(parts.next().unwrap_or_default());
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(filter) else {
            return;
        };
        if let Ok(f) = MetadataFilter::from_json(&value) {
            assert!(f.validate().is_ok());
            let _ = f.matches_json(&metadata);
            // Filters travel inside memory ops (postcard) too.
            let bytes = swarm_codec::encode(&f).expect("a filter encodes");
            let back: MetadataFilter = swarm_codec::decode(&bytes, bytes.len()).expect("decodes");
            assert_eq!(swarm_codec::encode(&back).ok(), Some(bytes));
        }
        // The serde form, as it arrives in an op.
        if let Ok(f) = serde_json::from_slice::<MetadataFilter>(filter) {
            if f.validate().is_ok() {
                let _ = f.matches_json(&metadata);
            }
        }
    }
);
