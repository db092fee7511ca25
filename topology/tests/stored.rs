//! The stored types survive the Raft log's encoding (the workspace codec, `swarm-codec`).

use serde::{de::DeserializeOwned, Serialize};

use swarm_topology::{
    plan, Member, RingProgress, StageSpec, SwarmSpec, TopologyPlan, TopologySpec,
};

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let bytes = swarm_codec::encode(value).expect("encodes");
    let back: T = swarm_codec::decode(&bytes, bytes.len()).expect("decodes");
    assert_eq!(&back, value);
}

#[test]
fn specs_plans_and_progress_roundtrip_through_the_codec() {
    let workers: Vec<Member> = (0..12)
        .map(|i| {
            Member::new(format!("w{i}"), 2)
                .with_agent("coder")
                .with_agent("tester")
                .with_label("zone", "eu")
        })
        .collect();
    let topologies = [
        TopologySpec::Star,
        TopologySpec::Hierarchical { fan_out: 3 },
        TopologySpec::Mesh { max_degree: 4 },
        TopologySpec::Ring {
            stages: vec![
                StageSpec::new("coder").with_label("zone", "eu"),
                StageSpec::new("tester"),
            ],
        },
    ];
    for topology in topologies {
        let spec = SwarmSpec::new(
            "s-1",
            topology,
            [("zone".to_string(), "eu".to_string())]
                .into_iter()
                .collect(),
        )
        .unwrap();
        roundtrip(&spec);
        let p: TopologyPlan = plan(&spec, &workers, 99, None).unwrap();
        roundtrip(&p);
    }
    let mut progress = RingProgress::new(3, b"input".to_vec());
    progress.advance(0, b"out0".to_vec()).unwrap();
    roundtrip(&progress);
    roundtrip(&workers[0]);
}
