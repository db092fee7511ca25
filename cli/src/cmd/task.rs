//! `swarm submit` and `swarm task`: submit tasks and graphs, show, list, retry, approve,
//! reject and cancel them.

use std::process::ExitCode;

use anyhow::Context;
use swarm_proto::api::{SubmitGraph, SubmitGraphResponse, SubmitTask, TaskState, TaskView};

use super::{ms, parse_labels};
use crate::args::{SubmitArgs, TaskCmd};
use crate::client::ListQuery;

/// `swarm submit`, optionally waiting for the result.
pub async fn submit(a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let client = a.api.client()?;
    let mut task = SubmitTask {
        agent: a.agent,
        priority: a.priority,
        timeout_ms: a.timeout.map(ms),
        max_attempts: a.max_attempts,
        idempotency_key: a.idempotency_key,
        labels: parse_labels(&a.labels)?,
        patterns: a.patterns,
        swarm: a.swarm,
        retain_ms: a.retain.map(ms),
        depends_on: a.depends_on,
        concurrency_key: a.concurrency_key,
        rate_limit: a.rate_limit,
        requires_approval: a.requires_approval || a.approval_timeout.is_some(),
        approval_timeout_ms: a.approval_timeout.map(ms),
        callback_url: a.callback_url,
        ..Default::default()
    };
    if let Some(p) = a.payload {
        task.payload = Some(serde_json::from_str(&p).unwrap_or(serde_json::Value::String(p)));
    } else if let Some(f) = a.payload_file {
        use base64::Engine as _;
        let bytes = if f.as_os_str() == "-" {
            use std::io::Read;
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("read payload from stdin")?;
            b
        } else {
            std::fs::read(&f).with_context(|| format!("read payload file {}", f.display()))?
        };
        task.payload_base64 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    let resp = client.submit(&task, a.wait.as_deref()).await?;
    if a.follow {
        if !a.json {
            eprintln!("task {}", resp.id);
        }
        let end = super::logs::follow(&client, resp.id).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&end)?);
        } else {
            print_end(&end);
        }
        return Ok(exit_for(&end));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    }
    let Some(view) = resp.task else {
        if !a.json {
            println!(
                "{}{}",
                resp.id,
                if resp.duplicate {
                    " (existing task with this idempotency key)"
                } else {
                    ""
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    if !a.json {
        print_result(&view);
    }
    Ok(exit_for(&view))
}

fn print_result(t: &TaskView) {
    match t.state {
        TaskState::Succeeded => {
            if let Some(o) = &t.output {
                match o.as_text() {
                    Some(text) => println!("{text}"),
                    None => println!("({} bytes of binary output; use --json)", o.bytes.len()),
                }
            }
        }
        st if st.is_final() => {
            eprintln!(
                "task {} {}: {}",
                t.id,
                st.as_str(),
                t.error.as_deref().unwrap_or("no error recorded")
            );
        }
        st => eprintln!("task {} still {} when the wait ended", t.id, st.as_str()),
    }
}

/// After a followed task's output: say how it ended, unless it succeeded (its output was
/// shown as it came).
pub(crate) fn print_end(t: &TaskView) {
    if t.state != TaskState::Succeeded {
        print_result(t);
    }
}

pub(crate) fn exit_for(t: &TaskView) -> ExitCode {
    match t.state {
        TaskState::Succeeded => ExitCode::SUCCESS,
        st if st.is_final() => ExitCode::from(3),
        _ => ExitCode::from(4),
    }
}

/// `swarm task graph|get|list|retry|approve|reject|cancel|logs`.
pub async fn run(cmd: TaskCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCmd::Logs { api, id, follow } => super::logs::run(&api.client()?, id, follow).await,
        TaskCmd::Graph { api, file, json } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("read the graph from stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("read graph file {}", file.display()))?
            };
            let graph: SubmitGraph = serde_json::from_str(&text)
                .with_context(|| format!("graph file {}", file.display()))?;
            let body = serde_json::to_value(&graph)?;
            let r = api
                .client()?
                .json(reqwest::Method::POST, "/v1/graphs", Some(&body))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(ExitCode::SUCCESS);
            }
            let r: SubmitGraphResponse = serde_json::from_value(r)?;
            for s in &graph.steps {
                if let Some(id) = r.steps.get(&s.name) {
                    println!("{:<24} {id}", s.name);
                }
            }
            if r.duplicate {
                println!("(existing tasks: every step's idempotency key was known)");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Get { api, id, wait } => {
            let t = api.client()?.task(id, wait.as_deref()).await?;
            println!("{}", serde_json::to_string_pretty(&t)?);
            Ok(if wait.is_some() {
                exit_for(&t)
            } else {
                ExitCode::SUCCESS
            })
        }
        TaskCmd::List {
            api,
            state,
            limit,
            after,
            desc,
            filter,
        } => {
            let labels = filter_labels(&filter.labels)?;
            let query = ListQuery {
                limit,
                after,
                desc,
                state,
                agent: filter.agent,
                swarm: filter.swarm,
                labels,
                text: filter.text,
            };
            let list = api.client()?.list(&query).await?;
            println!(
                "{:<10} {:<14} {:<16} {:>8}  ERROR",
                "ID", "STATE", "AGENT", "ATTEMPTS"
            );
            for t in &list.tasks {
                println!(
                    "{:<10} {:<14} {:<16} {:>8}  {}",
                    t.id,
                    t.state.as_str(),
                    t.agent,
                    t.attempts.len(),
                    t.error.as_deref().unwrap_or("")
                );
            }
            if let Some(next) = list.next_after {
                // With filters a page may be short, or empty, before the end.
                let order = if query.desc { " --desc" } else { "" };
                let filtered = query.state.is_some()
                    || query.agent.is_some()
                    || query.swarm.is_some()
                    || !query.labels.is_empty()
                    || query.text.is_some();
                let same = if filtered {
                    " and the same filters"
                } else {
                    ""
                };
                println!("(more: --after {next}{order}{same})");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Retry {
            api,
            id,
            state,
            filter,
            after,
            limit,
        } => {
            let client = api.client()?;
            match (id, state) {
                (Some(id), None) => {
                    let t = client.retry(id).await?;
                    println!("task {} is {} again", t.id, t.state.as_str());
                }
                (None, Some(state)) => {
                    let labels = filter_labels(&filter.labels)?;
                    let mut body = serde_json::json!({ "state": state, "limit": limit });
                    for (k, v) in [
                        ("agent", filter.agent),
                        ("swarm", filter.swarm),
                        ("text", filter.text),
                    ] {
                        if let Some(v) = v {
                            body[k] = v.into();
                        }
                    }
                    if !labels.is_empty() {
                        body["label"] = labels.join(",").into();
                    }
                    if let Some(a) = after {
                        body["after"] = a.into();
                    }
                    let r = client
                        .json(reqwest::Method::POST, "/v1/tasks/retry", Some(&body))
                        .await?;
                    let ids: Vec<String> = r["retried"]
                        .as_array()
                        .map(|a| a.iter().map(|v| v.to_string()).collect())
                        .unwrap_or_default();
                    println!(
                        "{} task{} queued again{}{}",
                        ids.len(),
                        if ids.len() == 1 { "" } else { "s" },
                        if ids.is_empty() { "" } else { ": " },
                        ids.join(" ")
                    );
                    if let Some(next) = r["next_after"].as_u64() {
                        println!("(more may match: add --after {next})");
                    }
                }
                _ => anyhow::bail!(
                    "name a task (swarm task retry ID) or a filter (--state failed|dead_lettered), not both"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Approve { api, id, comment } => {
            let t = api.client()?.decide(id, true, comment).await?;
            println!("task {} approved: {}", t.id, t.state.as_str());
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Reject { api, id, comment } => {
            let t = api.client()?.decide(id, false, comment).await?;
            println!(
                "task {} rejected: {} ({})",
                t.id,
                t.state.as_str(),
                t.error.as_deref().unwrap_or("")
            );
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Cancel { api, id } => {
            let t = api.client()?.cancel(id).await?;
            println!("task {} is {}", t.id, t.state.as_str());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `--label` filters as the API takes them (each one `k=v`, none holding a comma,
/// since the API reads them comma-separated); checked here for a clear message, and by
/// the API too.
fn filter_labels(labels: &[String]) -> anyhow::Result<Vec<String>> {
    parse_labels(labels)?;
    if let Some(l) = labels.iter().find(|l| l.contains(',')) {
        anyhow::bail!("label {l:?}: a label filter cannot hold a comma (repeat --label for more)");
    }
    Ok(labels.iter().filter(|l| !l.is_empty()).cloned().collect())
}
