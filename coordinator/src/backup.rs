//! `swarm backup` / `swarm restore`: a consistent copy of a running cluster's state (tasks
//! and memory) in one file, and seeding a new, empty cluster from it.
//!
//! File format: `magic "SWBACKUP" | version u32 LE | data_len u64 LE | data | checksum u64
//! LE`, where `data` is [`crate::state::encode_replica`] output (what Raft snapshots hold)
//! and the checksum is FNV-1a 64 over `data`.
//!
//! A backup is taken on the leader after a linearizable barrier, under the replica's read
//! lock, so it holds every write acknowledged before the request and is one consistent
//! cut. A restore is one Raft op ([`Op::Restore`]) applied by every replica of the new
//! cluster, refused unless the cluster is empty.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{linearizable, ApiError};
use crate::node::Node;
use crate::state::{decode_replica, Op, OpResult};

const MAGIC: &[u8; 8] = b"SWBACKUP";
const VERSION: u32 = 1;
/// Largest state a restore accepts: it travels as one Raft entry.
pub const MAX_RESTORE_BYTES: usize = 32 << 20;

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Wrap replica bytes in the backup file format.
pub fn encode_file(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 28);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&fnv1a(data).to_le_bytes());
    out
}

/// The replica bytes inside a backup file, after checking its framing and checksum.
pub fn decode_file(file: &[u8]) -> Result<&[u8], String> {
    if file.len() < 28 || &file[..8] != MAGIC {
        return Err("not a swarm backup (bad magic)".into());
    }
    let version = u32::from_le_bytes(file[8..12].try_into().map_err(|_| "short header")?);
    if version != VERSION {
        return Err(format!(
            "backup format version {version}, this build reads {VERSION}"
        ));
    }
    let len = u64::from_le_bytes(file[12..20].try_into().map_err(|_| "short header")?) as usize;
    if file.len() != 20usize.saturating_add(len).saturating_add(8) {
        return Err(format!(
            "truncated or padded backup: header says {len} bytes of state, file has {}",
            file.len().saturating_sub(28)
        ));
    }
    let data = &file[20..20 + len];
    let sum = u64::from_le_bytes(file[20 + len..].try_into().map_err(|_| "short trailer")?);
    if sum != fnv1a(data) {
        return Err("backup checksum mismatch: the file is corrupt".into());
    }
    Ok(data)
}

/// `GET /v1/backup` (leader): the whole state as one file.
pub(crate) async fn backup(State(node): State<Arc<Node>>) -> Result<Response, ApiError> {
    linearizable(&node).await?;
    let table = node.table.clone();
    let (applied, data) = tokio::task::spawn_blocking(move || table.encode_replica())
        .await
        .map_err(|e| ApiError::Internal(format!("backup task: {e}")))?
        .map_err(|e| ApiError::Internal(format!("encoding the backup: {e:#}")))?;
    let file = encode_file(&data);
    let index = applied.map_or(0, |l| l.index);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-swarm-backup-index"),
                index.to_string(),
            ),
        ],
        file,
    )
        .into_response())
}

/// `POST /v1/restore` (leader): seed this empty cluster from a backup file.
pub(crate) async fn restore(
    State(node): State<Arc<Node>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let data = decode_file(&body).map_err(ApiError::BadRequest)?;
    if data.len() > MAX_RESTORE_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "the backup holds {} bytes of state; a restore takes at most {MAX_RESTORE_BYTES}",
            data.len()
        )));
    }
    // Check it decodes before it takes a log entry.
    decode_replica(data)
        .map_err(|e| ApiError::BadRequest(format!("not a usable backup: {e:#}")))?;
    let r = node
        .propose(vec![Op::Restore {
            data: data.to_vec(),
        }])
        .await
        .map_err(|e| ApiError::from_propose(&node, e))?;
    match r.into_iter().next() {
        Some(OpResult::Restored(Ok(summary))) => {
            Ok((StatusCode::OK, Json(summary)).into_response())
        }
        Some(OpResult::Restored(Err(reason))) => Err(ApiError::Conflict(reason)),
        other => Err(ApiError::Internal(format!(
            "unexpected restore result {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_corruption() {
        let f = encode_file(b"state bytes");
        assert_eq!(decode_file(&f).unwrap(), b"state bytes");
        let mut bad = f.clone();
        bad[22] ^= 1;
        assert!(decode_file(&bad).unwrap_err().contains("checksum"));
        assert!(decode_file(&f[..f.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        assert!(decode_file(b"garbage").unwrap_err().contains("magic"));
        let mut v2 = f.clone();
        v2[8] = 9;
        assert!(decode_file(&v2).unwrap_err().contains("version"));
    }
}
