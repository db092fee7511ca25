//! `http` agents: one HTTP request per attempt (see [`crate::executor`] for the
//! behaviour, [`crate::agents`] for the keys).

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use swarm_proto::worker::{FailureKind, Outcome, TaskAssignment};

use super::{body_tail, bounded, error_chain, failed, status_message, too_large, Attempt, OnChunk};
use crate::agents::HttpSpec;

/// The task id, on every request.
pub const TASK_ID_HEADER: &str = "x-swarm-task-id";
/// The attempt number, on every request.
pub const ATTEMPT_HEADER: &str = "x-swarm-attempt";
/// The execution id (`<task>.<attempt>.<term>`, as `SWARM_EXECUTION_ID`), on every
/// request.
pub const EXECUTION_ID_HEADER: &str = "x-swarm-execution-id";
/// The task's idempotency key, when it has one.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Runs one attempt: sends the payload as the request's body (none for GET) with the
/// agent's headers plus `X-Swarm-Task-Id`, `X-Swarm-Attempt`, `X-Swarm-Execution-Id` and
/// (when the task has one) `Idempotency-Key`. A 2xx response's body is the output,
/// passed to `on_chunk` piece by piece as it arrives; see [`crate::executor`] for every
/// failure.
pub async fn run(spec: &HttpSpec, attempt: Attempt<'_>, on_chunk: OnChunk<'_>) -> Outcome {
    let Attempt {
        client,
        task,
        max_output_bytes,
        timeout,
        mut cancel,
    } = attempt;
    let request = match build_request(client, spec, task) {
        Ok(r) => r,
        Err(o) => return o,
    };
    let work = exchange(client, request, spec, max_output_bytes, on_chunk);
    match bounded(work, timeout, &mut cancel).await {
        Ok(outcome) | Err(outcome) => outcome,
    }
}

/// The per-attempt headers (the task's identity and idempotency key).
pub(crate) fn attempt_headers(
    task: &TaskAssignment,
) -> Result<Vec<(HeaderName, HeaderValue)>, Outcome> {
    let mut headers = vec![
        (
            HeaderName::from_static(TASK_ID_HEADER),
            HeaderValue::from(task.attempt.task_id),
        ),
        (
            HeaderName::from_static(ATTEMPT_HEADER),
            HeaderValue::from(task.attempt.attempt),
        ),
    ];
    // Digits and dots only: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&task.execution().to_string()) {
        headers.push((HeaderName::from_static(EXECUTION_ID_HEADER), v));
    }
    if let Some(key) = &task.idempotency_key {
        let value = HeaderValue::from_str(key).map_err(|_| {
            failed(
                FailureKind::BadPayload,
                "the task's idempotency key cannot be sent in an HTTP header (visible ASCII \
                 only)"
                    .into(),
            )
        })?;
        headers.push((HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), value));
    }
    Ok(headers)
}

fn build_request(
    client: &reqwest::Client,
    spec: &HttpSpec,
    task: TaskAssignment,
) -> Result<reqwest::Request, Outcome> {
    let mut builder = client
        .request(spec.method.clone(), spec.url.clone())
        .headers(spec.headers.clone());
    for (name, value) in attempt_headers(&task)? {
        builder = builder.header(name, value);
    }
    if spec.method != Method::GET {
        builder = builder.body(task.payload);
    }
    builder.build().map_err(|e| {
        failed(
            FailureKind::Spawn,
            format!(
                "cannot make the request to {}: {}",
                spec.url,
                error_chain(&e)
            ),
        )
    })
}

async fn exchange(
    client: &reqwest::Client,
    request: reqwest::Request,
    spec: &HttpSpec,
    max_output_bytes: u64,
    on_chunk: OnChunk<'_>,
) -> Outcome {
    let mut resp = match client.execute(request).await {
        Ok(r) => r,
        Err(e) => {
            return failed(
                FailureKind::Spawn,
                format!(
                    "cannot reach {}: {}",
                    spec.url,
                    error_chain(&e.without_url())
                ),
            )
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let tail = body_tail(resp).await;
        return failed(FailureKind::Exit, status_message(status, &tail));
    }
    // Announced too large: fail without reading any of it.
    if resp.content_length().is_some_and(|n| n > max_output_bytes) {
        return too_large(max_output_bytes);
    }
    let mut output = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let total = (output.len() as u64).saturating_add(chunk.len() as u64);
                if total > max_output_bytes {
                    // Dropping the response closes the connection: the rest is never read.
                    return too_large(max_output_bytes);
                }
                on_chunk(&chunk);
                output.extend_from_slice(&chunk);
            }
            Ok(None) => return Outcome::Succeeded { output },
            Err(e) => {
                return failed(
                    FailureKind::Exit,
                    format!(
                        "HTTP {status}, but reading the body from {} failed: {}",
                        spec.url,
                        error_chain(&e)
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_proto::worker::AttemptRef;

    fn task() -> TaskAssignment {
        TaskAssignment {
            attempt: AttemptRef {
                task_id: 42,
                attempt: 3,
            },
            agent: "fetch".into(),
            payload: b"body".to_vec(),
            timeout_ms: 0,
            idempotency_key: None,
            patterns: 0,
            swarm: "default".into(),
            term: 7,
        }
    }

    #[test]
    fn attempt_headers_name_the_task() {
        let h = attempt_headers(&task()).unwrap();
        let shown: Vec<(String, String)> = h
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            shown,
            [
                ("x-swarm-task-id".to_owned(), "42".to_owned()),
                ("x-swarm-attempt".to_owned(), "3".to_owned()),
                ("x-swarm-execution-id".to_owned(), "42.3.7".to_owned()),
            ]
        );
        let mut t = task();
        t.idempotency_key = Some("k-1".into());
        let h = attempt_headers(&t).unwrap();
        assert_eq!(h.last().unwrap().0.as_str(), "idempotency-key");
        assert_eq!(h.last().unwrap().1, "k-1");
        // A key that cannot be a header value (from the network: anything) fails cleanly.
        t.idempotency_key = Some("a\r\nInjected: 1".into());
        match attempt_headers(&t) {
            Err(Outcome::Failed {
                kind: FailureKind::BadPayload,
                message,
            }) => assert!(message.contains("idempotency key"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn get_requests_carry_no_body() {
        let client = super::super::build_client().unwrap();
        let mut spec = HttpSpec::new("http://127.0.0.1:9/run".parse().unwrap());
        spec.method = Method::GET;
        let req = build_request(&client, &spec, task()).unwrap();
        assert!(req.body().is_none());
        spec.method = Method::DELETE;
        let req = build_request(&client, &spec, task()).unwrap();
        assert_eq!(req.body().and_then(|b| b.as_bytes()), Some(&b"body"[..]));
    }
}
