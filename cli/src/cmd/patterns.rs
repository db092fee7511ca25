//! `swarm patterns`: the ReasoningBank.

use std::process::ExitCode;

use crate::args::PatternsCmd;

pub async fn run(c: PatternsCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    use serde_json::json;
    let (api, method, path, body) = match c {
        PatternsCmd::Add {
            api,
            title,
            description,
            content,
            outcome,
        } => (
            api,
            Method::POST,
            "/v1/patterns",
            Some(
                json!({"items": [{"title": title, "description": description, "content": content, "outcome": outcome}]}),
            ),
        ),
        PatternsCmd::Retrieve { api, query, k } => (
            api,
            Method::POST,
            "/v1/patterns/retrieve",
            Some(json!({"query": query, "k": k})),
        ),
        PatternsCmd::List { api } => (api, Method::GET, "/v1/patterns", None),
        PatternsCmd::Judge {
            api,
            outcome,
            task,
            ids,
        } => (
            api,
            Method::POST,
            "/v1/patterns/judge",
            Some(json!({"item_ids": ids, "outcome": outcome, "task_id": task})),
        ),
        PatternsCmd::Consolidate { api } => (
            api,
            Method::POST,
            "/v1/patterns/consolidate",
            Some(json!({})),
        ),
    };
    let v = api.client()?.json(method, path, body.as_ref()).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
