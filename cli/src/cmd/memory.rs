//! `swarm memory`: vector memory collections and their points.

use std::process::ExitCode;

use anyhow::{bail, Context};

use super::ms;
use crate::args::MemoryCmd;
use crate::client;

pub async fn run(c: MemoryCmd) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    use serde_json::json;
    let seg = client::seg;
    let (api, method, path, body) = match c {
        MemoryCmd::Create {
            api,
            name,
            dimension,
            metric,
        } => (
            api,
            Method::PUT,
            format!("/v1/memory/{}", seg(&name)),
            Some(json!({"dimension": dimension, "metric": metric})),
        ),
        MemoryCmd::List { api } => (api, Method::GET, "/v1/memory".to_string(), None),
        MemoryCmd::Info { api, name } => {
            (api, Method::GET, format!("/v1/memory/{}", seg(&name)), None)
        }
        MemoryCmd::Upsert {
            api,
            name,
            id,
            vector,
            text,
            metadata,
            ttl,
            file,
        } => {
            let body = match file {
                Some(f) => parse_json_arg(
                    "the points file",
                    &std::fs::read_to_string(&f)
                        .with_context(|| format!("read {}", f.display()))?,
                )?,
                None => {
                    let mut p = query_body(vector, text)?;
                    p.insert("id".into(), json!(id));
                    if let Some(m) = metadata {
                        p.insert("metadata".into(), parse_json_arg("--metadata", &m)?);
                    }
                    if let Some(t) = ttl {
                        p.insert("ttl_ms".into(), json!(ms(t)));
                    }
                    json!({"points": [p]})
                }
            };
            (
                api,
                Method::POST,
                format!("/v1/memory/{}/points", seg(&name)),
                Some(body),
            )
        }
        MemoryCmd::Search {
            api,
            name,
            vector,
            text,
            k,
            ef,
            filter,
            exact,
        } => {
            let mut q = query_body(vector, text)?;
            q.insert("k".into(), json!(k));
            q.insert("exact".into(), json!(exact));
            if let Some(ef) = ef {
                q.insert("ef".into(), json!(ef));
            }
            if let Some(f) = filter {
                q.insert("filter".into(), parse_json_arg("--filter", &f)?);
            }
            (
                api,
                Method::POST,
                format!("/v1/memory/{}/search", seg(&name)),
                Some(serde_json::Value::Object(q)),
            )
        }
        MemoryCmd::Delete { api, name, ids } => (
            api,
            Method::POST,
            format!("/v1/memory/{}/delete", seg(&name)),
            Some(json!({ "ids": ids })),
        ),
        MemoryCmd::Drop { api, name } => (
            api,
            Method::DELETE,
            format!("/v1/memory/{}", seg(&name)),
            None,
        ),
    };
    let v = api.client()?.json(method, &path, body.as_ref()).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

fn parse_vector(s: &str) -> anyhow::Result<Vec<f32>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .with_context(|| format!("vector component {x:?} is not a number"))
        })
        .collect()
}

fn parse_json_arg(what: &str, s: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(s).with_context(|| format!("{what} is not valid JSON"))
}

fn query_body(
    vector: Option<String>,
    text: Option<String>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    match (vector, text) {
        (Some(v), None) => {
            m.insert("vector".into(), serde_json::json!(parse_vector(&v)?));
        }
        (None, Some(t)) => {
            m.insert("text".into(), serde_json::Value::String(t));
        }
        _ => bail!("give --vector or --text"),
    }
    Ok(m)
}
