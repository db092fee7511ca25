//! `swarm coordinator`: one node of the Raft-replicated coordinator cluster.

use std::process::ExitCode;

use anyhow::{bail, Context};
use swarm_coordinator::memory::{
    DistillMode, EmbedderConfig, HttpEmbedderSettings, LlmDistillSettings,
};
use swarm_coordinator::raft::types::NodeAddr;
use swarm_coordinator::scheduler::SchedulerConfig;
use swarm_coordinator::{CoordinatorConfig, Limits, TaskDefaults};

use super::{ms, read_token};
use crate::args::CoordinatorArgs;
use crate::signals::StopSignals;

/// Run the node until a stop signal (or until a cluster refuses it for good).
pub async fn run(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let embedder = embedder_config(&a)?;
    let token = match (a.token, &a.token_file) {
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(f)) => read_token(f)?,
        _ => bail!("the coordinator needs an API token: --token, --token-file, SWARM_TOKEN or SWARM_TOKEN_FILE"),
    };
    let peers = a
        .peers
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| parse_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if peers.iter().any(|(id, _)| *id == a.id) {
        bail!("--peer lists this node's own id {}", a.id);
    }
    if a.default_max_attempts == 0 {
        bail!("--default-max-attempts must be at least 1");
    }
    if a.heartbeat_interval.is_zero() || a.lease <= a.heartbeat_interval {
        bail!("--lease must be longer than --heartbeat-interval (and both non-zero)");
    }
    // A payload or an output travels in one op, which must fit one Raft entry.
    let max_op = swarm_coordinator::limits::MAX_OP_BYTES as u64 - (64 << 10);
    for (flag, v) in [
        ("--max-payload-bytes", a.max_payload_bytes),
        ("--max-output-bytes", a.max_output_bytes),
        ("--max-log-tail-bytes", a.max_log_tail_bytes),
    ] {
        if v > max_op {
            bail!(
                "{flag} is at most {max_op} (one Raft entry holds {} bytes), got {v}",
                swarm_coordinator::limits::ENTRY_BUDGET
            );
        }
    }
    if a.snapshot_bytes < 1 << 20 {
        bail!(
            "--snapshot-bytes must be at least 1 MiB, got {}",
            a.snapshot_bytes
        );
    }
    let cfg = CoordinatorConfig {
        node_id: a.id,
        data_dir: a.data_dir,
        certs_dir: a.certs,
        listen: a.listen,
        advertise: a.advertise,
        api_listen: a.api_listen,
        api_advertise: a.api_advertise,
        api_token: token,
        bootstrap: a.bootstrap,
        peers,
        limits: Limits {
            queue_limit: a.queue_limit,
            max_payload_bytes: a.max_payload_bytes,
            max_output_bytes: a.max_output_bytes,
            max_log_tail_bytes: a.max_log_tail_bytes,
            ..Limits::default()
        },
        defaults: TaskDefaults {
            timeout_ms: ms(a.default_timeout),
            max_attempts: a.default_max_attempts,
        },
        heartbeat_interval_ms: ms(a.heartbeat_interval),
        scheduler: SchedulerConfig {
            lease_ms: ms(a.lease),
            heartbeat_ms: ms(a.heartbeat_interval),
            backoff_base_ms: ms(a.retry_backoff),
            backoff_max_ms: ms(a.retry_backoff_max),
            ..SchedulerConfig::default()
        },
        snapshot_every: a.snapshot_every.max(1),
        snapshot_bytes: a.snapshot_bytes,
        retain_finished: a.retain_finished,
        distill: match a.distill.as_str() {
            "rules" => DistillMode::Rules,
            "off" => DistillMode::Off,
            "llm" => DistillMode::Llm(LlmDistillSettings {
                base_url: a.llm_url.clone().context("--distill llm needs --llm-url")?,
                model: a.llm_model.clone(),
                api_key: api_key_from_env("--llm-api-key-env", a.llm_api_key_env.as_deref())?,
                concurrency: a.llm_concurrency as usize,
            }),
            _ => DistillMode::AgentItems,
        },
        embedder,
        api: swarm_coordinator::ApiEdges {
            tls: match a.api_tls.as_str() {
                "on" => true,
                "off" => false,
                // Beyond loopback, the API and its token travel over a network.
                _ => !a.api_listen.ip().is_loopback(),
            },
            max_connections: a.api_max_connections,
            header_timeout: a.api_header_timeout,
            metrics_auth: a.metrics_auth,
        },
        enroll: match (a.enroll_ca_key, a.enroll_token_file) {
            (Some(ca_key), Some(token_file)) => Some(swarm_coordinator::node::EnrollConfig {
                ca_key,
                token: super::read_token(&token_file)?,
                prefix: a.enroll_prefix,
                validity: a.enroll_validity,
            }),
            (None, None) => None,
            _ => bail!("--enroll-ca-key and --enroll-token-file go together"),
        },
        callback_secret: match &a.callback_secret_file {
            Some(f) => Some(super::read_token(f)?),
            None => None,
        },
        callback_allow: swarm_coordinator::callbacks::AllowList::parse(
            a.callback_allow.iter().filter(|s| !s.is_empty()),
        )
        .map_err(|e| anyhow::anyhow!("--callback-allow: {e}"))?,
    };
    let join: Vec<String> = a.join.into_iter().filter(|j| !j.is_empty()).collect();
    let signals = StopSignals::listen();
    let handle = swarm_coordinator::start(cfg).await?;
    // A renewed certificate (`swarm certs renew`) is presented from the next handshake.
    let _reload = handle.spawn_cert_reload(std::time::Duration::from_secs(10));
    println!(
        "coordinator {} serving API on {} and QUIC on {}",
        a.id, handle.api_addr, handle.quic_addr
    );
    let (stop_join, stop_join_rx) = tokio::sync::watch::channel(false);
    let mut joining = None;
    if !join.is_empty() && !handle.node().raft().is_initialized().await? {
        let cfg = handle.node().config();
        let add = swarm_proto::api::AddNode {
            id: cfg.node_id,
            raft_addr: cfg.advertise.clone(),
            api_addr: cfg.api_advertise.clone(),
            voter: true,
            pattern_dimension: Some(cfg.embedder.dimension()),
        };
        // Over HTTPS the members verify this node's certificate and it theirs.
        let http = if cfg.api.tls {
            let id = swarm_transport::Identity::load(
                &cfg.certs_dir,
                swarm_transport::Role::Coordinator,
            )?;
            reqwest::Client::builder()
                .use_preconfigured_tls(swarm_transport::https_client_config(
                    &id,
                    swarm_transport::Role::Coordinator,
                )?)
                .build()?
        } else {
            reqwest::Client::new()
        };
        joining = Some(tokio::spawn(swarm_coordinator::cluster::join(
            http,
            join,
            cfg.api_token.clone(),
            add,
            stop_join_rx,
        )));
    }
    // A join the cluster refuses for good (another embedder) ends the process.
    let refused = async {
        match joining {
            Some(task) => match task.await {
                Ok(Err(why)) => why,
                _ => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = signals.nth(1) => None,
        why = refused => Some(why),
    };
    let _ = stop_join.send(true);
    if outcome.is_none() {
        // A leader hands leadership to a caught-up voter first, so the cluster does not
        // wait out an election timeout; a second signal skips that.
        tokio::select! {
            _ = handle.hand_off_leadership() => {}
            () = signals.nth(2) => tracing::info!("second stop signal: leaving without a leadership hand-off"),
        }
    }
    handle.shutdown().await;
    if let Some(why) = outcome {
        eprintln!("swarm coordinator: {why}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The embedder the `--embedder*` flags describe; bad combinations are errors.
fn embedder_config(a: &CoordinatorArgs) -> anyhow::Result<EmbedderConfig> {
    if a.embedder != "http" {
        for (given, flag) in [
            (a.embedder_url.is_some(), "--embedder-url"),
            (a.embedder_dimension.is_some(), "--embedder-dimension"),
            (a.embedder_api_key_env.is_some(), "--embedder-api-key-env"),
        ] {
            if given {
                bail!(
                    "{flag} is only used with --embedder http (the embedder is `{}`)",
                    a.embedder
                );
            }
        }
        return Ok(EmbedderConfig::Hash);
    }
    let base_url = match a.embedder_url.as_deref().map(str::trim) {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => bail!("--embedder http needs --embedder-url (or SWARM_EMBEDDER_URL): the base URL of an OpenAI-compatible embeddings endpoint"),
    };
    if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
        bail!("--embedder-url must be an http:// or https:// URL, got {base_url:?}");
    }
    let dimension = match a.embedder_dimension {
        Some(d) if d > 0 => d,
        Some(_) => bail!("--embedder-dimension must be greater than 0"),
        None => bail!("--embedder http needs --embedder-dimension (or SWARM_EMBEDDER_DIMENSION): the dimension of the model's vectors"),
    };
    if a.embedder_model.trim().is_empty() {
        bail!("--embedder-model must not be empty");
    }
    if a.embedder_timeout.is_zero() {
        bail!("--embedder-timeout must be greater than 0");
    }
    let api_key = api_key_from_env("--embedder-api-key-env", a.embedder_api_key_env.as_deref())?;
    Ok(EmbedderConfig::Http(HttpEmbedderSettings {
        base_url,
        model: a.embedder_model.clone(),
        api_key,
        dimension,
        timeout: a.embedder_timeout,
    }))
}

/// The bearer token in the environment variable `var` names (given by `flag`), if any.
fn api_key_from_env(flag: &str, var: Option<&str>) -> anyhow::Result<Option<String>> {
    let Some(var) = var.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
        Ok(_) => bail!("{flag} names {var}, which is empty"),
        Err(std::env::VarError::NotPresent) => bail!("{flag} names {var}, which is not set"),
        Err(std::env::VarError::NotUnicode(_)) => {
            bail!("{flag} names {var}, which is not valid UTF-8")
        }
    }
}

fn parse_peer(s: &str) -> anyhow::Result<(u64, NodeAddr)> {
    let err = || format!("--peer {s:?} must be ID=RAFT_HOST:PORT,API_HOST:PORT");
    let (id, addrs) = s.split_once('=').with_context(err)?;
    let (raft, api) = addrs.split_once(',').with_context(err)?;
    let id: u64 = id.trim().parse().with_context(err)?;
    Ok((
        id,
        NodeAddr {
            raft_addr: raft.trim().into(),
            api_addr: api.trim().into(),
        },
    ))
}
