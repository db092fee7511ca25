//! A small client for the coordinator's HTTP API, used by every CLI command that talks
//! to a running cluster.

use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use swarm_proto::api::{ErrorBody, StatusView, SubmitResponse, SubmitTask, TaskList, TaskView};

/// An API error with its stable code, so callers can branch on it.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// Talks to one coordinator's API.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: String) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            anyhow::bail!("--api must be an http:// or https:// URL, got {base:?}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("build HTTP client")?;
        Ok(Client { base, token, http })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the swarm API at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("read API response")?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => anyhow!(ApiError {
                    status: status.as_u16(),
                    code: b.error.code,
                    message: b.error.message
                }),
                Err(_) => anyhow!("API answered {status}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected API response ({status})"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn submit(
        &self,
        task: &SubmitTask,
        wait: Option<&str>,
    ) -> anyhow::Result<SubmitResponse> {
        let mut req = self.http.post(self.url("/v1/tasks")).json(task);
        if let Some(w) = wait {
            req = req.query(&[("wait", w)]);
        }
        self.send(req).await
    }

    pub async fn task(&self, id: u64, wait: Option<&str>) -> anyhow::Result<TaskView> {
        let mut req = self.http.get(self.url(&format!("/v1/tasks/{id}")));
        if let Some(w) = wait {
            req = req.query(&[("wait", w)]);
        }
        self.send(req).await
    }

    pub async fn list(
        &self,
        state: Option<&str>,
        after: u64,
        limit: usize,
    ) -> anyhow::Result<TaskList> {
        let mut q = vec![("after", after.to_string()), ("limit", limit.to_string())];
        if let Some(s) = state {
            q.push(("state", s.to_string()));
        }
        self.send(self.http.get(self.url("/v1/tasks")).query(&q))
            .await
    }

    pub async fn cancel(&self, id: u64) -> anyhow::Result<TaskView> {
        self.send(self.http.post(self.url(&format!("/v1/tasks/{id}/cancel"))))
            .await
    }

    pub async fn status(&self) -> anyhow::Result<StatusView> {
        self.send(self.http.get(self.url("/v1/status"))).await
    }
}
