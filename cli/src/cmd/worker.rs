//! `swarm worker`: a worker running tasks for the coordinators.

use std::process::ExitCode;

use anyhow::bail;

use super::parse_labels;
use crate::args::WorkerArgs;
use crate::signals::StopSignals;

/// Run the worker until a stop signal (the first drains it).
pub async fn run(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    let enroll_api: Vec<String> = a
        .enroll_api
        .iter()
        .filter(|u| !u.is_empty())
        .cloned()
        .collect();
    let files = swarm_transport::CertFiles::in_dir(&a.certs);
    if !enroll_api.is_empty() && !files.cert(swarm_transport::Role::Worker).exists() {
        let (Some(id), Some(token_file), Some(ca)) = (&a.id, &a.enroll_token_file, &a.ca) else {
            bail!("--enroll-api needs --id, --enroll-token-file and --ca");
        };
        enroll(
            &enroll_api,
            &super::read_token(token_file)?,
            ca,
            id,
            &a.certs,
        )
        .await?;
    }
    let id = worker_id(a.id, &a.certs)?;
    if a.slots == 0 {
        bail!("--slots must be at least 1");
    }
    let cfg = swarm_worker::WorkerConfig {
        coordinators: a
            .coordinator
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect(),
        server_name: a.server_name,
        certs_dir: a.certs,
        worker_id: id,
        slots: a.slots,
        labels: parse_labels(&a.labels)?,
        agents_file: a.agents,
        peer_listen: a.peer_listen,
        peer_advertise: a.peer_advertise,
        peer_server_name: a.peer_server_name,
        drain_timeout: a.drain_timeout,
    };
    let signals = StopSignals::listen();
    swarm_worker::run_worker(cfg, signals.nth(1), signals.nth(2)).await?;
    Ok(ExitCode::SUCCESS)
}

/// Get a certificate for `id` from the cluster: a new key whose signing request goes to
/// the enrollment API; the answer is checked against the key and the CA, then
/// installed in `dir` (the key never leaves this machine).
async fn enroll(
    apis: &[String],
    token: &str,
    ca: &std::path::Path,
    id: &str,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let role = swarm_transport::Role::Worker;
    let name = swarm_transport::CertName::parse(id)
        .map_err(anyhow::Error::msg)
        .context("--id")?;
    let (key, csr) = swarm_transport::new_key_and_request(role, &name)?;
    let client = crate::client::Client::new(&apis.join(","), token.to_string(), Some(ca))?;
    let req = swarm_proto::api::EnrollRequest {
        name: id.to_string(),
        csr,
    };
    // The coordinators may not be up (or led) yet: try until one answers. A refusal is
    // final; a retry after a lost answer is safe, as the same key is answered again.
    let mut backoff = std::time::Duration::from_millis(200);
    let answer = loop {
        match client.enroll(&req).await {
            Ok(a) => break a,
            Err(e)
                if e.downcast_ref::<crate::client::ApiError>()
                    .is_some_and(|a| (400..500).contains(&a.status) && a.status != 429) =>
            {
                return Err(e.context("enrolling with the cluster"));
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot enroll yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    };
    let ca_pem =
        std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
    swarm_transport::install_enrolled(dir, role, &ca_pem, &answer.certificate, &key)?;
    tracing::info!(worker = id, serial = %answer.serial, dir = %dir.display(), "enrolled: certificate installed");
    Ok(())
}

/// The worker's id: the name its certificate gives; with a pool certificate `--id`, or
/// else the pool's prefix followed by `HOSTNAME-PID`. An `--id` the certificate does not
/// allow is refused here, before the coordinators refuse it.
fn worker_id(given: Option<String>, certs: &std::path::Path) -> anyhow::Result<String> {
    let files = swarm_transport::CertFiles::in_dir(certs);
    let name = swarm_transport::CertInfo::read(files.cert(swarm_transport::Role::Worker))
        .map(|info| info.subject.name);
    match (given, name) {
        (Some(id), Ok(name)) if !name.allows(&id) => bail!(
            "--id {id} is not the worker its certificate names ({name}): the coordinators would refuse it"
        ),
        (Some(id), _) => Ok(id),
        (None, Ok(swarm_transport::CertName::Node(name))) => Ok(name),
        (None, name) => {
            let prefix = match name {
                Ok(swarm_transport::CertName::Pool(prefix)) => prefix,
                _ => String::new(),
            };
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            let host = if host.is_empty() {
                "worker".to_string()
            } else {
                host
            };
            Ok(format!("{prefix}{host}-{}", std::process::id()))
        }
    }
}
