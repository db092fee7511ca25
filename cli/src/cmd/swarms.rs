//! `swarm swarms`: create, list, show and delete swarms.

use std::process::ExitCode;

use super::{parse_labels, status};
use crate::args::SwarmsCmd;

pub async fn run(c: SwarmsCmd) -> anyhow::Result<ExitCode> {
    match c {
        SwarmsCmd::Create {
            api,
            name,
            topology,
            labels,
            max_degree,
            fan_out,
            stages,
            queue_depth,
            allow_empty,
            json,
        } => {
            let req = swarm_proto::api::CreateSwarm {
                name,
                topology,
                labels: parse_labels(&labels)?,
                fan_out,
                max_degree,
                stages: stages.into_iter().collect(),
                queue_depth,
                allow_empty,
            };
            let v = api.client()?.create_swarm(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", status::render_swarm(&v));
            }
        }
        SwarmsCmd::List { api, json } => {
            let l = api.client()?.swarms().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", status::render_swarm_list(&l.swarms));
            }
        }
        SwarmsCmd::Show { api, name, json } => {
            let v = api.client()?.swarm(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", status::render_swarm(&v));
            }
        }
        SwarmsCmd::Delete { api, name } => {
            api.client()?.delete_swarm(&name).await?;
            println!("deleted swarm {name}");
        }
        SwarmsCmd::Budget {
            api,
            name,
            tokens,
            clear: _,
        } => {
            let v = api
                .client()?
                .json(
                    reqwest::Method::PUT,
                    &format!("/v1/swarms/{}/budget", crate::client::seg(&name)),
                    Some(&serde_json::json!({ "tokens": tokens })),
                )
                .await?;
            let v: swarm_proto::api::SwarmUsageView = serde_json::from_value(v)?;
            print!("{}", status::render_usage(std::slice::from_ref(&v)));
        }
        SwarmsCmd::Usage { api, json } => {
            let v = api
                .client()?
                .json(reqwest::Method::GET, "/v1/usage", None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r: swarm_proto::api::UsageReport = serde_json::from_value(v)?;
                print!("{}", status::render_usage(&r.swarms));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
