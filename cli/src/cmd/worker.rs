//! `swarm worker`: a worker running tasks for the coordinators.

use std::process::ExitCode;

use std::time::Duration;

use anyhow::{bail, Context as _};

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
        let (Some(token_file), Some(ca)) = (&a.enroll_token_file, &a.ca) else {
            bail!("--enroll-api needs --enroll-token-file and --ca");
        };
        // Without --id the worker enrolls under its host name: a pod's or a
        // container's, unique among the running ones.
        let id = match &a.id {
            Some(id) => id.clone(),
            None => {
                host_name().context("--enroll-api without --id: no host name to enroll under")?
            }
        };
        enroll(
            &enroll_api,
            &super::read_token(token_file)?,
            ca,
            &id,
            &a.certs,
        )
        .await?;
    }
    let id = worker_id(a.id, &a.certs)?;
    if a.slots == 0 {
        bail!("--slots must be at least 1");
    }
    // An enrolled certificate is renewed before it expires, with the same key.
    let renew = match (enroll_api.is_empty(), &a.enroll_token_file, &a.ca) {
        (false, Some(token_file), Some(ca)) => Some(tokio::spawn(renew_enrolled(
            enroll_api.clone(),
            token_file.clone(),
            ca.clone(),
            a.certs.clone(),
        ))),
        _ => None,
    };
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
        log_tail_bytes: a.log_tail_bytes as usize,
    };
    let signals = StopSignals::listen();
    let result = swarm_worker::run_worker(cfg, signals.nth(1), signals.nth(2)).await;
    if let Some(renew) = renew {
        renew.abort();
    }
    result?;
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
    let answer = ask_to_sign(&client, &req, "enroll", Duration::from_secs(5))
        .await
        .context("enrolling with the cluster")?;
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
            let host = host_name().unwrap_or_else(|| "worker".to_string());
            Ok(format!("{prefix}{host}-{}", std::process::id()))
        }
    }
}

/// This machine's (container's, pod's) host name, if it has one.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Send `req` to the enrollment API until a coordinator answers: they may not be up (or
/// led) yet. A refusal (4xx but 429) is final; a retry after a lost answer is safe, as
/// the same key is answered again.
async fn ask_to_sign(
    client: &crate::client::Client,
    req: &swarm_proto::api::EnrollRequest,
    what: &str,
    max_backoff: Duration,
) -> anyhow::Result<swarm_proto::api::EnrollResponse> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.enroll(req).await {
            Ok(a) => return Ok(a),
            Err(e)
                if e.downcast_ref::<crate::client::ApiError>()
                    .is_some_and(|a| (400..500).contains(&a.status) && a.status != 429) =>
            {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "cannot {what} yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// Keep an enrolled certificate valid: once two thirds of the time from its
/// installation to its expiry have passed, ask the cluster to sign the same key again
/// and install the answer; the worker presents it from its next handshake. A refusal
/// (say the certificate was revoked) stops the renewals, logged; the worker runs on
/// until its certificate expires.
async fn renew_enrolled(
    apis: Vec<String>,
    token_file: std::path::PathBuf,
    ca: std::path::PathBuf,
    dir: std::path::PathBuf,
) {
    let role = swarm_transport::Role::Worker;
    let cert = swarm_transport::CertFiles::in_dir(&dir)
        .cert(role)
        .to_path_buf();
    loop {
        let due = match renewal_due(&cert) {
            Ok(Some(due)) => due,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot tell when to renew the certificate; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        if let Ok(wait) = due.duration_since(std::time::SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        match renew_once(&apis, &token_file, &ca, &dir, role).await {
            Ok(info) => tracing::info!(serial = %info.serial, "renewed the enrolled certificate"),
            Err(e) if e.downcast_ref::<crate::client::ApiError>().is_some() => {
                tracing::error!(error = %format!("{e:#}"), "the cluster refused to renew this worker's certificate; it stays valid until it expires");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "renewing the certificate failed; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// When the certificate at `path` is due for renewal: two thirds of the way from its
/// installation (the file's mtime) to its expiry. `None`: not a certificate for one
/// enrolled worker (a pool's), never renewed.
fn renewal_due(path: &std::path::Path) -> anyhow::Result<Option<std::time::SystemTime>> {
    let info = swarm_transport::CertInfo::read(path)?;
    if !matches!(info.subject.name, swarm_transport::CertName::Node(_)) {
        return Ok(None);
    }
    let installed = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the time of {}", path.display()))?;
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(info.not_after_unix.max(0) as u64);
    let life = expiry.duration_since(installed).unwrap_or_default();
    Ok(Some(installed + life * 2 / 3))
}

async fn renew_once(
    apis: &[String],
    token_file: &std::path::Path,
    ca: &std::path::Path,
    dir: &std::path::Path,
    role: swarm_transport::Role,
) -> anyhow::Result<swarm_transport::CertInfo> {
    let files = swarm_transport::CertFiles::in_dir(dir);
    let name = swarm_transport::CertInfo::read(files.cert(role))?
        .subject
        .name;
    let csr = swarm_transport::request_for_existing_key(dir, role, &name)?;
    // Read again each time: the token may have been rotated since the start.
    let token = super::read_token(token_file)?;
    let client = crate::client::Client::new(&apis.join(","), token, Some(ca))?;
    let req = swarm_proto::api::EnrollRequest {
        name: name.to_string(),
        csr,
    };
    let answer = ask_to_sign(&client, &req, "renew", Duration::from_secs(30)).await?;
    swarm_transport::install_renewed(dir, role, &answer.certificate)
}
