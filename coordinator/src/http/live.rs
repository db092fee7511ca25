//! `/v1/tasks/{id}/events` (a task's live events as Server-Sent Events) and
//! `/v1/tasks/{id}/logs` (the log tails stored with its attempts); the logic is
//! [`crate::live`].
//!
//! Events: `state`, `attempt` (started or ended), `output`, `gap` and, last, `end` with
//! the final task; each carries `id: <attempt>:<offset>`, what a client sends back as
//! `Last-Event-ID` to resume. A follower relays the leader's stream as it comes (it
//! holds nothing of it); when leadership moves the stream ends without `end`, and the
//! client resumes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::json;
use swarm_proto::api::{AttemptLog, LogPieceView, TaskLogs};
use swarm_proto::TaskId;

use super::auth::check_swarm;
use super::events::{EventsQuery, KEEP_ALIVE};
use super::ApiError;
use crate::access::Principal;
use crate::live::{Cursor, Item};
use crate::node::Node;
use crate::tasks;

/// `GET /v1/tasks/{id}/events`
pub(super) async fn events(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let id = tasks::parse_id(&id)?;
    // The task must exist, and be this token's to see.
    let task = tasks::get(&node, id, None).await?;
    check_swarm(&p, &task.swarm)?;
    if !node.is_leader() {
        return super::forward::relay_stream(&node, req).await;
    }
    let cursor = match q.last_event_id(&headers).as_deref() {
        None => Cursor::default(),
        Some(v) => match Cursor::parse_id(v) {
            Some((attempt, offset)) => Cursor::resume(attempt, offset),
            None => {
                return Err(ApiError::BadRequest(format!(
                    "bad Last-Event-ID {v:?}: expected <attempt>:<offset>, as the stream's ids"
                )))
            }
        },
    };
    let rx = crate::live::follow(node.clone(), id, cursor);
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        let (item, pos) = rx.recv().await?;
        Some((Ok::<_, Infallible>(sse_event(id, item, &pos)), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// One item as an SSE event. Output is text when it is UTF-8, else base64 (`encoding`).
fn sse_event(task: TaskId, item: Item, pos: &str) -> Event {
    let (name, data) = match item {
        Item::State {
            state,
            attempt,
            worker,
        } => (
            "state",
            json!({"task": task, "state": state, "attempt": attempt, "worker": worker}),
        ),
        Item::AttemptStarted {
            attempt,
            stage,
            worker,
        } => (
            "attempt",
            json!({"task": task, "attempt": attempt, "event": "started", "stage": stage, "worker": worker}),
        ),
        Item::AttemptEnded {
            attempt,
            outcome,
            error,
            output_bytes,
        } => (
            "attempt",
            json!({"task": task, "attempt": attempt, "event": "ended", "outcome": outcome,
                   "error": error, "output_bytes": output_bytes}),
        ),
        Item::Output {
            attempt,
            stream,
            offset,
            data,
        } => {
            let mut v = json!({"task": task, "attempt": attempt, "stream": stream.as_str(),
                               "offset": offset, "len": data.len()});
            match String::from_utf8(data) {
                Ok(text) => v["text"] = json!(text),
                Err(e) => {
                    v["data"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()));
                    v["encoding"] = json!("base64");
                }
            }
            ("output", v)
        }
        Item::Gap {
            attempt,
            from,
            to,
            reason,
        } => (
            "gap",
            json!({"task": task, "attempt": attempt, "from": from, "to": to, "reason": reason}),
        ),
        Item::End { task } => ("end", json!(task)),
    };
    Event::default().event(name).id(pos).data(data.to_string())
}

/// `GET /v1/tasks/{id}/logs`: every attempt's stored log tail.
pub(super) async fn logs(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = tasks::parse_id(&id)?;
    let view = tasks::get(&node, id, None).await?;
    check_swarm(&p, &view.swarm)?;
    let Some(task) = crate::live::read_task(&node, id) else {
        return Err(ApiError::from(tasks::TaskError::Unknown(id)));
    };
    let attempts = task
        .attempts
        .iter()
        .map(|a| {
            let log = a.log();
            AttemptLog {
                attempt: a.number,
                stage: a.stage,
                worker: a.worker.clone(),
                running: a.end.is_none(),
                offset: log.map_or(0, |l| l.offset),
                output_bytes: log.map_or(0, |l| l.end()),
                pieces: log
                    .map(|l| {
                        l.pieces
                            .iter()
                            .map(|p| LogPieceView {
                                stream: p.stream.as_str().to_string(),
                                text: String::from_utf8_lossy(&p.data).into_owned(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    Ok((
        StatusCode::OK,
        Json(TaskLogs {
            id,
            state: task.state,
            attempts,
        }),
    )
        .into_response())
}
