//! [`ApiError`]: every refusal of the API, with a stable code and HTTP status, answered
//! as JSON `{"error": {"code", "message"}}`; and the mapping of each domain module's
//! errors into it.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use swarm_proto::api::{ErrorBody, ErrorDetail};

use crate::access::AccessError;
use crate::backup::BackupError;
use crate::cluster::ClusterError;
use crate::commit::CommitError;
use crate::flow_limits::LimitError;
use crate::memory::{EmbedError, MemError};
use crate::schedules::ScheduleError;
use crate::state::{MemoryFault, SwarmFault};
use crate::swarms::SwarmError;
use crate::tasks::TaskError;
use crate::workers::WorkerError;

/// Why a request failed; each variant has a stable code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Valid credentials that do not allow this (the message names the scope or swarm).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("queue full: {limit} unfinished tasks; retry later")]
    QueueFull { limit: u64 },
    #[error("this coordinator is not the leader")]
    NotLeader { leader_api: Option<String> },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A refused request with its own stable code (memory, ReasoningBank and swarm
    /// errors).
    #[error("{message}")]
    Coded {
        status: StatusCode,
        code: String,
        message: String,
    },
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Coded { code, .. } => code,
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Coded { status, .. } => *status,
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotLeader { .. } | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn coded(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Coded {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let leader_api = match &self {
            ApiError::NotLeader { leader_api } => leader_api.clone(),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
                leader_api,
            },
        };
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::InvalidJson(r.body_text())
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::NotLeader { leader_api } => ApiError::NotLeader { leader_api },
            CommitError::Unavailable(m) => ApiError::Unavailable(m),
            CommitError::TooLarge(m) => ApiError::PayloadTooLarge(m),
            e @ CommitError::Restoring => ApiError::coded(
                StatusCode::SERVICE_UNAVAILABLE,
                "restore_in_progress",
                e.to_string(),
            ),
        }
    }
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Invalid(m) => ApiError::BadRequest(m),
            TaskError::TooLarge(m) => ApiError::PayloadTooLarge(m),
            TaskError::QueueFull { limit } => ApiError::QueueFull { limit },
            e @ TaskError::Unknown(_) => ApiError::NotFound(e.to_string()),
            e @ TaskError::Expired(_) => {
                ApiError::coded(StatusCode::NOT_FOUND, "task_expired", e.to_string())
            }
            TaskError::Swarm(e) => e.into(),
            TaskError::Conflict(m) => ApiError::Conflict(m),
            TaskError::Unavailable(m) => ApiError::Unavailable(m),
            TaskError::Commit(e) => e.into(),
            TaskError::Flow(f) => ApiError::Coded {
                status: match f.code.as_str() {
                    "unknown_parent" | "unknown_limit" => StatusCode::NOT_FOUND,
                    "dependency_failed"
                    | "graph_conflict"
                    | "too_many_children"
                    | "not_awaiting_approval" => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                },
                code: f.code,
                message: f.message,
            },
            TaskError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::Invalid(m) => {
                ApiError::coded(StatusCode::BAD_REQUEST, "invalid_schedule", m)
            }
            ScheduleError::Task(e) => e.into(),
            e @ ScheduleError::Unknown(_) => {
                ApiError::coded(StatusCode::NOT_FOUND, "unknown_schedule", e.to_string())
            }
            ScheduleError::Fault(f) => {
                let status = match f.code.as_str() {
                    "unknown_schedule" | "unknown_swarm" => StatusCode::NOT_FOUND,
                    "schedule_exists" | "too_many_schedules" | "no_restore" => StatusCode::CONFLICT,
                    "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError::coded(status, f.code, f.message)
            }
            ScheduleError::Commit(e) => e.into(),
            ScheduleError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::Invalid(m) => ApiError::coded(StatusCode::BAD_REQUEST, "invalid_limit", m),
            e @ LimitError::Unknown(_) => {
                ApiError::coded(StatusCode::NOT_FOUND, "unknown_limit", e.to_string())
            }
            LimitError::Commit(e) => e.into(),
            LimitError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// The status of a refused swarm op, by its code.
fn swarm_fault(f: SwarmFault) -> ApiError {
    let status = match f.code.as_str() {
        "unknown_swarm" => StatusCode::NOT_FOUND,
        "swarm_exists" | "swarm_busy" | "default_swarm" => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::coded(status, f.code, f.message)
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Invalid(m) => ApiError::BadRequest(m),
            AccessError::Unauthorized(m) => ApiError::Unauthorized(m),
            AccessError::Fault(f) => {
                let status = match f.code.as_str() {
                    "not_found" => StatusCode::NOT_FOUND,
                    "conflict" => StatusCode::CONFLICT,
                    "revoked" => StatusCode::FORBIDDEN,
                    "limit" => StatusCode::INSUFFICIENT_STORAGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                ApiError::coded(status, f.code, f.message)
            }
            AccessError::Commit(e) => e.into(),
            AccessError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<SwarmError> for ApiError {
    fn from(e: SwarmError) -> Self {
        match e {
            e @ SwarmError::Unknown(_) => {
                ApiError::coded(StatusCode::NOT_FOUND, "unknown_swarm", e.to_string())
            }
            SwarmError::Invalid { code, message } => {
                ApiError::coded(StatusCode::BAD_REQUEST, code, message)
            }
            SwarmError::Unplaceable { code, message } => {
                ApiError::coded(StatusCode::CONFLICT, code, message)
            }
            SwarmError::Fault(f) => swarm_fault(f),
            SwarmError::Commit(e) => e.into(),
            SwarmError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// The status of a refused memory op, by its code.
fn memory_fault(f: MemoryFault) -> ApiError {
    let status = match f.code.as_str() {
        "unknown_collection" | "unknown_pattern" => StatusCode::NOT_FOUND,
        "collection_exists" => StatusCode::CONFLICT,
        "metadata_too_large" | "batch_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::coded(status, f.code, f.message)
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> Self {
        let status = match e {
            EmbedError::Unavailable(_) => StatusCode::BAD_GATEWAY,
            EmbedError::DimensionMismatch(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::coded(status, e.code(), e.message())
    }
}

impl From<MemError> for ApiError {
    fn from(e: MemError) -> Self {
        match e {
            MemError::Invalid(m) => ApiError::BadRequest(m),
            MemError::Fault(f) => memory_fault(f),
            MemError::Embed(e) => e.into(),
            MemError::Unavailable(m) => ApiError::Unavailable(m),
            MemError::Commit(e) => e.into(),
            MemError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Invalid(m) => ApiError::BadRequest(m),
            e @ ClusterError::UnknownNode(_) => ApiError::NotFound(e.to_string()),
            ClusterError::Conflict(m) => ApiError::Conflict(m),
            ClusterError::DimensionMismatch(m) => {
                ApiError::coded(StatusCode::CONFLICT, "embedder_dimension_mismatch", m)
            }
            ClusterError::Commit(e) => e.into(),
        }
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Invalid(m) => ApiError::BadRequest(m),
            BackupError::TooLarge(m) => ApiError::PayloadTooLarge(m),
            BackupError::Refused(m) => ApiError::Conflict(m),
            BackupError::Unavailable(m) => ApiError::Unavailable(m),
            BackupError::Commit(e) => e.into(),
            BackupError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        match e {
            e @ WorkerError::Unknown(_) => ApiError::NotFound(e.to_string()),
            e @ WorkerError::TooOld { .. } => {
                ApiError::coded(StatusCode::CONFLICT, "worker_protocol", e.to_string())
            }
            e @ WorkerError::Stopping(_) => {
                ApiError::coded(StatusCode::CONFLICT, "worker_stopping", e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes, statuses and messages the domain errors had as `ApiError`s before they
    /// had types of their own.
    #[test]
    fn domain_errors_keep_their_codes_statuses_and_messages() {
        let check = |e: ApiError, status: StatusCode, code: &str, message: &str| {
            assert_eq!(
                (e.status(), e.code(), e.to_string().as_str()),
                (status, code, message)
            );
        };
        check(
            CommitError::Restoring.into(),
            StatusCode::SERVICE_UNAVAILABLE,
            "restore_in_progress",
            "a restore is in progress; the cluster takes no other change until it ends",
        );
        check(
            CommitError::NotLeader { leader_api: None }.into(),
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            "this coordinator is not the leader",
        );
        check(
            CommitError::TooLarge("big".into()).into(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "big",
        );
        check(
            TaskError::Expired(7).into(),
            StatusCode::NOT_FOUND,
            "task_expired",
            "task 7 finished and was purged when its retention ended \
             (`retain_ms` at submit, default --retain-finished)",
        );
        check(
            TaskError::Unknown(7).into(),
            StatusCode::NOT_FOUND,
            "not_found",
            "no task 7",
        );
        check(
            TaskError::QueueFull { limit: 3 }.into(),
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            "queue full: 3 unfinished tasks; retry later",
        );
        check(
            TaskError::Swarm(SwarmError::Unknown("s".into())).into(),
            StatusCode::NOT_FOUND,
            "unknown_swarm",
            "no swarm named \"s\"",
        );
        let fault = |code: &str| {
            SwarmError::Fault(SwarmFault {
                code: code.into(),
                message: "m".into(),
            })
        };
        check(
            fault("swarm_busy").into(),
            StatusCode::CONFLICT,
            "swarm_busy",
            "m",
        );
        check(
            fault("unknown_swarm").into(),
            StatusCode::NOT_FOUND,
            "unknown_swarm",
            "m",
        );
        check(fault("other").into(), StatusCode::BAD_REQUEST, "other", "m");
        check(
            SwarmError::Unplaceable {
                code: "no_workers".into(),
                message: "m".into(),
            }
            .into(),
            StatusCode::CONFLICT,
            "no_workers",
            "m",
        );
        let mem = |code: &str| {
            MemError::Fault(MemoryFault {
                code: code.into(),
                message: "m".into(),
            })
        };
        check(
            mem("unknown_pattern").into(),
            StatusCode::NOT_FOUND,
            "unknown_pattern",
            "m",
        );
        check(
            mem("collection_exists").into(),
            StatusCode::CONFLICT,
            "collection_exists",
            "m",
        );
        check(
            mem("batch_too_large").into(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            "m",
        );
        check(
            MemError::Embed(EmbedError::Unavailable("down".into())).into(),
            StatusCode::BAD_GATEWAY,
            "embedder_unavailable",
            "down",
        );
        check(
            MemError::Embed(EmbedError::DimensionMismatch("d".into())).into(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "embedder_dimension_mismatch",
            "d",
        );
        check(
            ClusterError::UnknownNode(4).into(),
            StatusCode::NOT_FOUND,
            "not_found",
            "no node 4 in the cluster",
        );
        check(
            ClusterError::DimensionMismatch("d".into()).into(),
            StatusCode::CONFLICT,
            "embedder_dimension_mismatch",
            "d",
        );
        check(
            WorkerError::Unknown("w9".into()).into(),
            StatusCode::NOT_FOUND,
            "not_found",
            "no worker \"w9\" is connected",
        );
        check(
            WorkerError::TooOld {
                id: "w1".into(),
                protocol: 6,
            }
            .into(),
            StatusCode::CONFLICT,
            "worker_protocol",
            "worker w1 speaks protocol 6; remote drain needs 7",
        );
        check(
            WorkerError::Stopping("w1".into()).into(),
            StatusCode::CONFLICT,
            "worker_stopping",
            "worker w1 is being stopped: it leaves once what it runs has ended, and cannot be resumed",
        );
        check(
            BackupError::Refused("not empty".into()).into(),
            StatusCode::CONFLICT,
            "conflict",
            "not empty",
        );
    }
}
