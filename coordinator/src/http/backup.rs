//! `GET /v1/backup` and `POST /v1/restore` (leader, not forwarded): the dump streamed
//! out and in (the logic is [`crate::backup`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::ApiError;
use crate::backup;
use crate::node::Node;

/// `GET /v1/backup` (leader): the whole state, streamed; `x-swarm-backup-index` is the
/// log index it holds everything up to.
pub(super) async fn backup(State(node): State<Arc<Node>>) -> Result<Response, ApiError> {
    let backup::BackupStream { index, chunks } = backup::backup(&node).await?;
    let stream = futures::stream::unfold(chunks, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-swarm-backup-index"),
                index.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /v1/restore` (leader): seed this empty cluster from a streamed backup.
pub(super) async fn restore(
    State(node): State<Arc<Node>>,
    body: Body,
) -> Result<Response, ApiError> {
    let summary = backup::restore(&node, body.into_data_stream()).await?;
    Ok((StatusCode::OK, Json(summary)).into_response())
}
