//! `GET /v1/backup` and `POST /v1/restore` (leader, not forwarded): the dump streamed
//! out and in (the logic is [`crate::backup`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use tracing::debug;

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

/// How long a refused restore keeps reading (and discarding) the rest of its upload.
const DRAIN_REFUSED: Duration = Duration::from_secs(30);

/// `POST /v1/restore` (leader): seed this empty cluster from a streamed backup.
///
/// A restore refused part way (a cluster that is not empty, a broken backup) reads the
/// rest of the upload for up to [`DRAIN_REFUSED`] before answering: closing the
/// connection under a client still sending would cost it the answer (it sees a broken
/// pipe, not why).
pub(super) async fn restore(
    State(node): State<Arc<Node>>,
    body: Body,
) -> Result<Response, ApiError> {
    let mut stream = body.into_data_stream();
    match backup::restore(&node, &mut stream).await {
        Ok(summary) => Ok((StatusCode::OK, Json(summary)).into_response()),
        Err(e) => {
            let drain = async { while let Some(Ok(_)) = stream.next().await {} };
            if tokio::time::timeout(DRAIN_REFUSED, drain).await.is_err() {
                debug!("refused restore: the client was still sending; closing");
            }
            Err(e.into())
        }
    }
}
