//! The HTTP API (axum): `/v1/*` behind a bearer token, plus `/health`, `/ready` and
//! `/metrics` for orchestrators and Prometheus.
//!
//! The only module that knows axum (and HTTP statuses): each file here turns requests
//! into calls of a domain module ([`crate::tasks`], [`crate::cluster`],
//! [`crate::memory`], [`crate::swarms`], [`crate::schedules`], [`crate::backup`], [`crate::status`],
//! [`crate::workers`]) and their answers and errors into responses. The domain modules
//! never call back into it.
//!
//! Every error is JSON `{"error": {"code", "message"}}` with a stable `code`
//! ([`ApiError::code`]); bad JSON, oversize bodies and unknown fields are errors, never
//! panics, and a refused submit changes nothing.
//!
//! * `error.rs` — [`ApiError`] and the mapping of every domain error into it;
//! * `auth.rs` — who the caller is (tokens, coordinator certificates) and what each
//!   route needs ([`auth::RULES`]);
//! * `forward.rs` — `leader_only` (followers forward to the leader, marked
//!   [`FORWARDED_BY`]) and `leader_here` (streams: followers name the leader);
//! * `tasks.rs`, `status.rs`, `cluster.rs`, `memory.rs`, `swarms.rs`, `schedules.rs`,
//!   `backup.rs`, `access.rs` — the handlers of each resource.

mod access;
mod auth;
mod backup;
mod cluster;
mod error;
mod events;
mod forward;
mod limits;
mod listen;
mod live;
mod memory;
mod schedules;
mod status;
mod swarms;
mod tasks;
mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware;
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::sync::watch;

pub use auth::{rule_for, Rule, Swarms, RULES};
pub use axum::serve::Listener;
pub use error::ApiError;
pub use forward::FORWARDED_BY;
pub use listen::{serve_edges, Edges, PeerCert};

use crate::node::Node;

/// Build the router. `/v1/*` requires `Authorization: Bearer <token>`.
pub fn router(node: Arc<Node>) -> Router {
    let body_limit = node.body_limit();
    // Handlers that need the leader; on a follower the request is forwarded.
    let lead = || middleware::from_fn_with_state(node.clone(), forward::leader_only);
    // Streamed handlers run on the leader only; elsewhere the client is sent there.
    let here = || middleware::from_fn_with_state(node.clone(), forward::leader_here);
    let v1 = Router::new()
        .route(
            "/tasks",
            post(tasks::submit.layer(lead())).get(tasks::list_tasks.layer(lead())),
        )
        .route("/tasks/batch", post(tasks::submit_batch.layer(lead())))
        .route("/graphs", post(tasks::submit_graph.layer(lead())))
        .route("/tasks/{id}", get(tasks::get_task.layer(lead())))
        .route("/tasks/{id}/cancel", post(tasks::cancel_task.layer(lead())))
        .route("/tasks/{id}/retry", post(tasks::retry_task.layer(lead())))
        .route(
            "/tasks/{id}/approve",
            post(tasks::approve_task.layer(lead())),
        )
        .route("/tasks/{id}/reject", post(tasks::reject_task.layer(lead())))
        .route("/tasks/retry", post(tasks::retry_tasks.layer(lead())))
        .route("/tasks/{id}/events", get(live::events))
        .route("/tasks/{id}/logs", get(live::logs))
        .route("/workers", get(status::workers.layer(lead())))
        .route(
            "/workers/{id}/drain",
            post(status::drain_worker.layer(lead())),
        )
        .route(
            "/workers/{id}/resume",
            post(status::resume_worker.layer(lead())),
        )
        .route("/cluster/nodes", post(cluster::add_node.layer(lead())))
        .route(
            "/cluster/nodes/{id}",
            delete(cluster::remove_node.layer(lead())),
        )
        // Status and cluster views forward by themselves (and answer locally without a
        // leader); memory reads are served by this node's replica.
        .route("/status", get(status::status))
        .route("/events", get(events::events))
        .route("/whoami", get(events::whoami))
        .route("/node", get(cluster::get_node))
        .route("/cluster", get(cluster::get_cluster))
        .route("/memory", get(memory::list_collections))
        .route(
            "/memory/{collection}",
            get(memory::get_collection)
                .put(memory::create_collection.layer(lead()))
                .delete(memory::drop_collection.layer(lead())),
        )
        .route(
            "/memory/{collection}/points",
            post(memory::upsert.layer(lead())),
        )
        .route(
            "/memory/{collection}/delete",
            post(memory::delete_points.layer(lead())),
        )
        .route("/memory/{collection}/search", post(memory::search))
        .route(
            "/patterns",
            get(memory::list_patterns).post(memory::add_patterns.layer(lead())),
        )
        .route("/patterns/retrieve", post(memory::retrieve))
        .route("/patterns/judge", post(memory::judge.layer(lead())))
        .route(
            "/swarms",
            get(swarms::list.layer(lead())).post(swarms::create.layer(lead())),
        )
        .route(
            "/swarms/{name}",
            get(swarms::get.layer(lead())).delete(swarms::delete.layer(lead())),
        )
        .route(
            "/swarms/{name}/budget",
            axum::routing::put(swarms::set_budget.layer(lead())),
        )
        .route("/usage", get(swarms::usage.layer(lead())))
        .route(
            "/schedules",
            get(schedules::list.layer(lead())).post(schedules::create.layer(lead())),
        )
        .route(
            "/schedules/{name}",
            get(schedules::get.layer(lead())).delete(schedules::delete.layer(lead())),
        )
        .route(
            "/schedules/{name}/pause",
            post(schedules::pause.layer(lead())),
        )
        .route(
            "/schedules/{name}/resume",
            post(schedules::resume.layer(lead())),
        )
        .route("/limits", get(limits::list.layer(lead())))
        .route(
            "/limits/{name}",
            get(limits::get.layer(lead()))
                .put(limits::set.layer(lead()))
                .delete(limits::delete.layer(lead())),
        )
        .route("/backup", get(backup::backup.layer(here())))
        .route(
            "/restore",
            post(
                backup::restore
                    .layer(here())
                    .layer(DefaultBodyLimit::disable()),
            ),
        )
        .route(
            "/patterns/consolidate",
            post(memory::consolidate.layer(lead())),
        )
        .route(
            "/tokens",
            get(access::list_tokens).post(access::create_token.layer(lead())),
        )
        .route(
            "/tokens/{token}",
            delete(access::revoke_token.layer(lead())),
        )
        .route(
            "/certs/revoked",
            get(access::list_revoked).post(access::revoke_cert.layer(lead())),
        )
        .route("/certs/enroll", post(access::enroll.layer(lead())))
        .layer(middleware::from_fn_with_state(
            node.clone(),
            auth::require_token,
        ));
    // `/metrics` names workers, swarms and agents: behind the token when asked to be.
    let metrics = if node.config().api.metrics_auth {
        get(status::metrics_text.layer(middleware::from_fn_with_state(
            node.clone(),
            auth::require_token,
        )))
    } else {
        get(status::metrics_text)
    };
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .route("/metrics", metrics)
        // The dashboard's static page (no token: it holds no data; every API call it
        // makes carries the token the user gives it).
        .merge(ui::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(node)
}

/// Serve the API of `node` on `listener` until `shutdown` changes (or is dropped), with
/// the node's TLS, connection cap and header timeout (see [`listen`]). The router and
/// TLS configuration are built now; the returned future serves them.
pub fn serve<L>(
    listener: L,
    node: Arc<Node>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<impl Future<Output = std::io::Result<()>> + Send>
where
    L: Listener<Addr = SocketAddr>,
{
    let api = node.config().api;
    let tls = if api.tls {
        let tls = swarm_transport::https_server_config(node.identity())?;
        Some(Arc::new(tls))
    } else {
        None
    };
    let edges = Edges {
        tls,
        max_connections: api.max_connections,
        header_timeout: api.header_timeout,
    };
    let app = router(node);
    Ok(serve_edges(listener, app, edges, shutdown))
}
