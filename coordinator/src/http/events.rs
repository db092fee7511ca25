//! `GET /v1/events` (the cluster's changes as Server-Sent Events; the logic is
//! [`crate::events`]) and `GET /v1/whoami` (what the caller's token may do, for pages
//! that show only the actions it allows).
//!
//! Events: `status` (the `/v1/status` view, first and whenever it changed), `tasks` (a
//! batch of task changes: `{"tasks": [{"id", "state", "agent", "swarm", "attempt",
//! "worker", "error"}]}`) and `reset` (changes were lost: read the lists again). Ids are
//! opaque; a client sends the last one back as `Last-Event-ID` (or `?last_event_id=`). A
//! follower relays the leader's stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Query, Request, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiError;
use crate::access::Principal;
use crate::events::Item;
use crate::node::Node;

/// How often an idle event stream (this one, a task's) sends a comment, so proxies and
/// clients see it alive.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The query of an event stream: `last_event_id` as an alternative to the
/// `Last-Event-ID` header (which wins).
#[derive(Debug, serde::Deserialize)]
pub(super) struct EventsQuery {
    last_event_id: Option<String>,
}

impl EventsQuery {
    /// Where the client resumes from, if it says.
    pub(super) fn last_event_id(self, headers: &HeaderMap) -> Option<String> {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or(self.last_event_id)
            .filter(|v| !v.is_empty())
    }
}

/// `GET /v1/events`
pub(super) async fn events(
    State(node): State<Arc<Node>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    if !node.is_leader() {
        return super::forward::relay_stream(&node, req).await;
    }
    let last = q.last_event_id(&headers);
    let swarms = p.swarms.clone();
    let rx = crate::events::follow(node.clone(), last, move |swarm| {
        swarms.as_ref().is_none_or(|s| s.iter().any(|n| n == swarm))
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let (item, id) = rx.recv().await?;
        let ev = match item {
            Item::Status(json) => Event::default().event("status").data(&*json),
            Item::Tasks(changes) => Event::default()
                .event("tasks")
                .data(json!({ "tasks": changes }).to_string()),
            Item::Reset => Event::default().event("reset").data("{}"),
        };
        Some((Ok::<_, Infallible>(ev.id(id)), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// `GET /v1/whoami`: the caller's token name, scope and swarms (`null`: all).
pub(super) async fn whoami(Extension(p): Extension<Principal>) -> Json<serde_json::Value> {
    Json(json!({
        "name": p.name,
        "scope": p.scope,
        "swarms": p.swarms,
    }))
}
