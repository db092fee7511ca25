//! `swarm up`: a local swarm, one coordinator and N workers in this process.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use swarm_coordinator::CoordinatorConfig;

use super::read_token;
use crate::args::UpArgs;
use crate::signals::StopSignals;

/// Run it until Ctrl-C.
pub async fn run(a: UpArgs) -> anyhow::Result<ExitCode> {
    if a.workers == 0 || a.slots == 0 {
        bail!("--workers and --slots must be at least 1");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("create {}", a.data_dir.display()))?;
    let certs = a.data_dir.join("certs");
    if !certs.join("ca.pem").exists() {
        swarm_transport::init_certs(&certs, &[], false)?;
    }
    let token_file = a.data_dir.join("api-token");
    let token = ensure_token(&token_file)?;
    let secret_file = a.data_dir.join("callback-secret");
    let mut cfg = CoordinatorConfig::single_node(
        a.data_dir.join("coordinator"),
        certs.clone(),
        a.listen,
        a.api_listen,
        token,
    );
    cfg.callback_secret = Some(ensure_token(&secret_file)?);
    let coord = swarm_coordinator::start(cfg).await?;
    let quic = coord.quic_addr;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for i in 1..=a.workers {
        let wcfg = swarm_worker::WorkerConfig {
            coordinators: vec![format!("127.0.0.1:{}", quic.port())],
            server_name: Some("localhost".into()),
            certs_dir: certs.clone(),
            worker_id: format!("local-{i}"),
            slots: a.slots,
            labels: BTreeMap::new(),
            agents_file: a.agents.clone(),
            peer_listen: None,
            peer_advertise: None,
            peer_server_name: None,
            drain_timeout: Duration::ZERO,
            log_tail_bytes: swarm_worker::DEFAULT_LOG_TAIL_BYTES,
        };
        let mut rx = stop_rx.clone();
        workers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            // The coordinator stops with the workers: nothing to drain towards.
            if let Err(e) = swarm_worker::run_worker(wcfg, std::future::pending(), stop).await {
                eprintln!("worker local-{i}: {e:#}");
            }
        }));
    }
    let api = format!("http://{}", coord.api_addr);
    println!(
        "swarm is up: 1 coordinator, {} workers with {} slots each",
        a.workers, a.slots
    );
    println!("  API      {api}   (token in {})", token_file.display());
    println!("  QUIC     {quic}");
    println!("  metrics  {api}/metrics");
    println!(
        "  callbacks signed with the secret in {}",
        secret_file.display()
    );
    println!("  web UI   {api}/ui/   (paste the token once)");
    println!();
    println!("try, from this directory:");
    println!("  swarm status");
    println!("  swarm submit --agent echo --payload '{{\"hello\":\"swarm\"}}' --wait");
    println!(
        "  curl -H \"Authorization: Bearer $(cat {})\" {api}/v1/status",
        token_file.display()
    );
    println!("stop with Ctrl-C");
    StopSignals::listen().nth(1).await;
    println!("stopping");
    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    coord.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Generate a random API token file if missing; return the token.
fn ensure_token(path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        return read_token(path);
    }
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, token.as_bytes())?;
    Ok(token)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
