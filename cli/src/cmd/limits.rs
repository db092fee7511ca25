//! `swarm limits`: set, list and delete concurrency and rate limits.

use std::process::ExitCode;

use swarm_proto::api::{LimitView, SetLimit};

use crate::args::LimitsCmd;

pub async fn run(c: LimitsCmd) -> anyhow::Result<ExitCode> {
    match c {
        LimitsCmd::Set {
            api,
            name,
            concurrency,
            rate,
            burst,
            json,
        } => {
            let req = SetLimit {
                concurrency,
                rate,
                burst,
            };
            let v = api.client()?.set_limit(&name, &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_list(std::slice::from_ref(&v)));
            }
        }
        LimitsCmd::List { api, json } => {
            let l = api.client()?.limits().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", render_list(&l.limits));
            }
        }
        LimitsCmd::Delete { api, name } => {
            api.client()?.delete_limit(&name).await?;
            println!("deleted limit {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every limit, a row each.
pub fn render_list(list: &[LimitView]) -> String {
    let mut rows = vec![vec![
        "LIMIT".to_string(),
        "CONCURRENCY".into(),
        "RATE".into(),
        "BURST".into(),
        "RUNNING".into(),
        "QUEUED".into(),
    ]];
    for v in list {
        let running: u32 = v.running.values().sum();
        rows.push(vec![
            v.name.clone(),
            v.concurrency.map_or("-".into(), |c| format!("{c} per key")),
            v.rate.clone().unwrap_or_else(|| "-".into()),
            v.burst.map_or("-".into(), |b| b.to_string()),
            format!("{running} in {} keys", v.running.len()),
            v.queued.to_string(),
        ]);
    }
    let mut out = String::new();
    super::status::table(&mut out, &rows);
    out
}
