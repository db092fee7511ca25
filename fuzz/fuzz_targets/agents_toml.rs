//! The worker's agents file (TOML), through `Agents::parse`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use swarm_worker::Agents;

fuzz_target!(
    init: swarm_fuzz::init("agents_toml"),
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        for path in ["/etc/swarm/agents.toml", "agents.toml", ""] {
            if let Ok(agents) = Agents::parse(text, Path::new(path)) {
                for name in agents.names() {
                    assert!(agents.get(&name).is_some());
                }
            }
        }
    }
);
