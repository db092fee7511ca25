//! `swarm cluster`: the coordinator cluster's members, adding and removing nodes.

use std::process::ExitCode;

use super::status;
use crate::args::ClusterCmd;

pub async fn run(c: ClusterCmd) -> anyhow::Result<ExitCode> {
    let (view, json) = match c {
        ClusterCmd::Status { api, json } => (api.client()?.cluster().await?, json),
        ClusterCmd::Add {
            api,
            id,
            raft,
            node_api,
            learner,
        } => {
            let add = swarm_proto::api::AddNode {
                id,
                raft_addr: raft,
                api_addr: node_api,
                voter: !learner,
                pattern_dimension: None,
            };
            (api.client()?.add_node(&add).await?, false)
        }
        ClusterCmd::Remove { api, id } => (api.client()?.remove_node(id).await?, false),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", status::render_cluster(&view));
    }
    Ok(ExitCode::SUCCESS)
}
