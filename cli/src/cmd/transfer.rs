//! `swarm backup` and `swarm restore`: the state of a cluster streamed to a file and back,
//! with progress on stderr, in bounded memory at any size.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use swarm_coordinator::raft::dump::DumpParser;

use crate::client::Client;

/// Progress on stderr, at most once a second (and at the end).
struct Progress {
    what: &'static str,
    total: Option<u64>,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Self {
        let now = std::time::Instant::now();
        Progress {
            what,
            total,
            started: now,
            last: now,
        }
    }

    fn update(&mut self, done: u64, force: bool) {
        if !force && self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = std::time::Instant::now();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = mib(done) / secs;
        match self.total {
            Some(t) if t > 0 => eprintln!(
                "{}: {:.1} of {:.1} MiB ({:.0}%), {rate:.1} MiB/s",
                self.what,
                mib(done),
                mib(t),
                done as f64 * 100.0 / t as f64
            ),
            _ => eprintln!("{}: {:.1} MiB, {rate:.1} MiB/s", self.what, mib(done)),
        }
    }
}

/// `swarm backup`: stream the backup into a temp file next to `out`, check it whole
/// (framing, counts, checksum), fsync, then rename: a broken stream never leaves a file
/// that looks like a backup.
pub async fn backup(client: &Client, out: &Path) -> anyhow::Result<ExitCode> {
    let tmp = out.with_extension("tmp");
    let file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("create {}", tmp.display()))?;
    let mut writer = CheckedWriter {
        file: tokio::io::BufWriter::with_capacity(1 << 20, file),
        parser: DumpParser::new(),
        error: None,
    };
    let mut progress = Progress::new("backup", None);
    let result = client
        .backup_into(&mut writer, |n| progress.update(n, false))
        .await;
    let (bytes, index) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    progress.update(bytes, true);
    let checked = match writer.error.take() {
        Some(e) => Err(anyhow!("the backup stream is not a valid backup: {e}")),
        None => writer
            .parser
            .finish()
            .map_err(|e| anyhow!("the backup stream is not a valid backup: {e}")),
    };
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    use tokio::io::AsyncWriteExt as _;
    writer.file.flush().await?;
    writer.file.get_mut().sync_all().await?;
    drop(writer);
    std::fs::rename(&tmp, out).with_context(|| format!("rename to {}", out.display()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    println!(
        "wrote {bytes} bytes to {} (state at log index {index})",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a backup stream to a file while checking it record by record.
struct CheckedWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    parser: DumpParser,
    error: Option<String>,
}

impl tokio::io::AsyncWrite for CheckedWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let n = match std::pin::Pin::new(&mut this.file).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        if this.error.is_none() {
            let checked = this.parser.push(&buf[..n]).and_then(|()| {
                while this.parser.next_record()?.is_some() {}
                Ok(())
            });
            if let Err(e) = checked {
                this.error = Some(e.to_string());
            }
        }
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// `swarm restore`: stream a backup file to the leader, with progress.
pub async fn restore(client: &Client, from: &Path) -> anyhow::Result<ExitCode> {
    let total = std::fs::metadata(from)
        .with_context(|| format!("read {}", from.display()))?
        .len();
    let progress = Arc::new(Mutex::new(Progress::new("restore", Some(total))));
    let report = {
        let progress = progress.clone();
        move |sent: u64| {
            if let Ok(mut p) = progress.lock() {
                p.update(sent, sent == total);
            }
        }
    };
    let v = client.restore_from(from, report).await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}
