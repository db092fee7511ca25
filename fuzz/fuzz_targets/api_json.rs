//! HTTP JSON bodies: the request bodies the coordinator deserializes (`SubmitTask`,
//! `SubmitBatch`, `AddNode`, `CreateSwarm`), the replies the CLI deserializes, and the
//! small text parsers of query strings and swarm definitions.
//!
//! Input: a selector byte, then the body.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use swarm_proto::api::{
    AddNode, CreateSwarm, ErrorBody, NodeStatus, StatusView, SubmitBatch, SubmitResponse,
    SubmitTask, SwarmList, TaskList, TaskState, TaskView,
};

/// Parses `body`; a parsed value serializes, and its JSON parses again to the same JSON.
fn json<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let once = serde_json::to_string(&v).expect("a parsed body serializes");
    let back: T = serde_json::from_str(&once).expect("its JSON parses again");
    let twice = serde_json::to_string(&back).expect("serializes");
    assert_eq!(once, twice, "JSON round trip is not stable");
    Some(v)
}

fuzz_target!(
    init: swarm_fuzz::init("api_json"),
    |data: &[u8]| {
        let Some((tag, body)) = data.split_first() else {
            return;
        };
        let text = std::str::from_utf8(body).ok();
        match tag % 15 {
            0 => {
                if let Some(t) = json::<SubmitTask>(body) {
                    let _ = t.payload_bytes();
                }
            }
            1 => {
                if let Some(b) = json::<SubmitBatch>(body) {
                    for t in &b.tasks {
                        let _ = t.payload_bytes();
                    }
                }
            }
            2 => {
                json::<AddNode>(body);
            }
            3 => {
                if let Some(s) = json::<CreateSwarm>(body) {
                    let _ = swarm_topology::TopologyKind::from_str(&s.topology);
                    for st in &s.stages {
                        let _ = swarm_topology::StageSpec::from_str(st);
                    }
                }
            }
            4 => {
                json::<TaskView>(body);
            }
            5 => {
                json::<TaskList>(body);
            }
            6 => {
                json::<ErrorBody>(body);
            }
            7 => {
                json::<SwarmList>(body);
            }
            8 => {
                if let Some(s) = text {
                    if let Ok(d) = swarm_coordinator::tasks::parse_duration(s) {
                        assert!(d.as_secs_f64() <= 1e9 + 1.0);
                    }
                }
            }
            9 => {
                if let Some(s) = text {
                    if let Some(st) = TaskState::parse(s) {
                        assert_eq!(st.as_str(), s);
                    }
                }
            }
            10 => {
                json::<StatusView>(body);
            }
            11 => {
                json::<NodeStatus>(body);
            }
            12 => {
                json::<SubmitResponse>(body);
            }
            13 => {
                if let Some(s) = text {
                    if let Ok(stages) = swarm_topology::parse_stages(s) {
                        // A parsed stage prints as something that parses to itself.
                        for st in stages {
                            let again = swarm_topology::StageSpec::from_str(&st.to_string());
                            assert_eq!(again.ok(), Some(st));
                        }
                    }
                }
            }
            _ => {
                if let Some(s) = text {
                    let _ = swarm_topology::parse_labels(s);
                }
            }
        }
    }
);
