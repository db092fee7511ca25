//! `swarm probe`: liveness and readiness checks for container health checks.

use std::process::ExitCode;

use crate::args::ProbeArgs;

pub async fn run(a: ProbeArgs) -> anyhow::Result<ExitCode> {
    let path = if a.what == "live" {
        "/health"
    } else {
        "/ready"
    };
    let url = format!("{}{path}", a.api.trim_end_matches('/'));
    let http = crate::client::http_client(
        reqwest::Client::builder().timeout(a.timeout),
        a.ca.as_deref(),
        url.starts_with("https://"),
    )?;
    match http.get(&url).send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            println!("{status} {}", body.trim());
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => {
            println!("cannot reach {url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
