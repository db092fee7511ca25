//! `swarm task logs ID [-f]` and the `--follow` of `swarm submit`: a task's output, as
//! its attempts stored it or live from its event stream.
//!
//! Output goes where the agent wrote it: stdout, an `llm` agent's tokens and an `http`
//! agent's body to stdout, stderr to stderr; notes about attempts and gaps go to stderr.
//! A stream that breaks (a failover, a restarted node) is resumed from the last event's
//! id, so nothing is shown twice.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt as _;
use serde_json::Value;
use swarm_proto::api::TaskView;

use crate::client::Client;
use crate::sse::{SseEvent, SseParser};

/// How long a broken stream is retried before giving up.
const RESUME_FOR: Duration = Duration::from_secs(60);

/// `swarm task logs`.
pub async fn run(client: &Client, id: u64, live: bool) -> anyhow::Result<ExitCode> {
    if live {
        let end = follow(client, id).await?;
        super::task::print_end(&end);
        return Ok(super::task::exit_for(&end));
    }
    let logs = client.logs(id).await?;
    let many = logs.attempts.len() > 1;
    for a in &logs.attempts {
        if many || a.offset > 0 || a.running {
            eprintln!(
                "== attempt {} on {}{}{}",
                a.attempt,
                a.worker,
                if a.running {
                    " (running: follow with -f)"
                } else {
                    ""
                },
                if a.offset > 0 {
                    format!(" ({} earlier bytes not kept)", a.offset)
                } else {
                    String::new()
                }
            );
        }
        for p in &a.pieces {
            write_piece(&p.stream, p.text.as_bytes());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Show task `id`'s output live until it is final; returns the final task.
pub async fn follow(client: &Client, id: u64) -> anyhow::Result<TaskView> {
    let mut last_id: Option<String> = None;
    let mut broken_since: Option<tokio::time::Instant> = None;
    loop {
        match stream_once(client, id, &mut last_id).await {
            Ok(Some(end)) => return Ok(end),
            Ok(None) => {}
            Err(e) if broken_since.is_some_and(|t| t.elapsed() > RESUME_FOR) => {
                return Err(e.context(format!("following task {id}")))
            }
            Err(e) => {
                if let Some(api) = e.downcast_ref::<crate::client::ApiError>() {
                    // A refusal (no such task, a token that may not read it) is final.
                    if api.status < 500 {
                        return Err(e);
                    }
                }
                tracing::debug!(error = %e, "event stream broke; resuming");
            }
        }
        broken_since.get_or_insert_with(tokio::time::Instant::now);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Read one connection's stream; `Some(task)` at its `end` event, `None` when it ended
/// without one (resume). `last_id` keeps the newest event id seen.
async fn stream_once(
    client: &Client,
    id: u64,
    last_id: &mut Option<String>,
) -> anyhow::Result<Option<TaskView>> {
    let resp = client.events(id, last_id.as_deref()).await?;
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(piece) = body.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "event stream interrupted");
                return Ok(None);
            }
        };
        for ev in parser.push(&piece) {
            if let Some(i) = &ev.id {
                *last_id = Some(i.clone());
            }
            if let Some(end) = show(&ev)? {
                return Ok(Some(end));
            }
        }
    }
    Ok(None)
}

/// Print one event; the final task at `end`.
fn show(ev: &SseEvent) -> anyhow::Result<Option<TaskView>> {
    let v: Value = match serde_json::from_str(&ev.data) {
        Ok(v) => v,
        Err(_) if ev.data.is_empty() => return Ok(None),
        Err(e) => bail!("bad event data {:?}: {e}", ev.data),
    };
    match ev.event.as_str() {
        "output" => {
            let stream = v["stream"].as_str().unwrap_or("stdout");
            if let Some(text) = v["text"].as_str() {
                write_piece(stream, text.as_bytes());
            } else if let Some(b64) = v["data"].as_str() {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .context("bad base64 output")?;
                write_piece(stream, &bytes);
            }
        }
        "attempt" => {
            let n = v["attempt"].as_u64().unwrap_or(0);
            match v["event"].as_str() {
                Some("started") if n > 1 => {
                    eprintln!("== attempt {n} on {}", v["worker"].as_str().unwrap_or("?"))
                }
                Some("ended") if v["outcome"] != "succeeded" => eprintln!(
                    "== attempt {n} {}{}",
                    v["outcome"].as_str().unwrap_or("ended"),
                    v["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                _ => {}
            }
        }
        "gap" => eprintln!(
            "== {} bytes of output not shown ({})",
            match (v["from"].as_u64(), v["to"].as_u64()) {
                (Some(f), Some(t)) => t.saturating_sub(f).to_string(),
                _ => "some".to_string(),
            },
            v["reason"].as_str().unwrap_or("gap")
        ),
        "end" => {
            let task: TaskView = serde_json::from_value(v).context("bad end event")?;
            return Ok(Some(task));
        }
        _ => {}
    }
    Ok(None)
}

fn write_piece(stream: &str, bytes: &[u8]) {
    if stream == "stderr" {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(bytes);
        let _ = e.flush();
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(bytes);
        let _ = o.flush();
    }
}
