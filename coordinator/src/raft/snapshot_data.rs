//! [`SnapshotData`]: openraft's snapshot bytes as a file on disk, so a snapshot of any
//! size is sent and received in chunks and never held in memory whole.
//!
//! A snapshot the leader offers is a dump ([`super::dump`]) of a checkpoint, written to
//! a file only when something first reads it ([`SnapshotData::deferred`]): openraft asks
//! for the current snapshot at every start, but reads its bytes only to send them to a
//! follower. A snapshot being received is a file from the start
//! ([`SnapshotData::receiving`]).

use std::future::Future as _;
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// Produces the file a deferred snapshot reads from (blocking; opened for reading).
pub type Build = Box<dyn FnOnce() -> io::Result<std::fs::File> + Send>;

enum State {
    /// Not built yet.
    Deferred(Option<Build>),
    /// Being built on the blocking pool.
    Building(JoinHandle<io::Result<std::fs::File>>),
    Ready(tokio::fs::File),
    /// Inline mode: plain file I/O on the calling thread (tokio's files use the blocking
    /// pool, whose timing a deterministic simulation cannot fix).
    Inline(std::fs::File),
    Failed(io::ErrorKind, String),
}

/// A snapshot's bytes in a file. See the module docs.
pub struct SnapshotData {
    state: State,
    /// A seek asked for before the file was ready.
    pending_seek: Option<SeekFrom>,
    /// The file, when it has a known path (received snapshots).
    path: Option<PathBuf>,
    /// Build in place instead of on the blocking pool (deterministic simulations).
    inline: bool,
    /// Told when bytes are written (a snapshot arriving).
    on_write: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData")
            .field("path", &self.path)
            .finish()
    }
}

impl SnapshotData {
    /// A snapshot whose file `build` makes on first use.
    pub fn deferred(build: Build, inline: bool) -> Self {
        SnapshotData {
            state: State::Deferred(Some(build)),
            pending_seek: None,
            path: None,
            inline,
            on_write: None,
        }
    }

    /// A new, empty file at `path` for a snapshot being received.
    pub async fn receiving(path: &Path, inline: bool) -> io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        let state = if inline {
            State::Inline(options.open(path)?)
        } else {
            State::Ready(tokio::fs::OpenOptions::from(options).open(path).await?)
        };
        Ok(SnapshotData {
            state,
            pending_seek: None,
            path: Some(path.to_path_buf()),
            inline,
            on_write: None,
        })
    }

    /// Call `f` whenever bytes are written to this snapshot (each chunk that arrives).
    pub fn on_write(mut self, f: std::sync::Arc<dyn Fn() + Send + Sync>) -> Self {
        self.on_write = Some(f);
        self
    }

    /// Where a received snapshot is.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Flush what was written and fsync it (a received snapshot, before it is read back).
    pub async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if let State::Inline(f) = &mut self.state {
            return f.sync_all();
        }
        let file = std::future::poll_fn(|cx| self.poll_ready(cx).map_ok(|_| ())).await;
        file?;
        if let State::Ready(f) = &mut self.state {
            f.flush().await?;
            f.sync_all().await?;
        }
        Ok(())
    }

    /// Inline mode: the plain file, built first if needed (any seek asked for before it
    /// existed is applied).
    fn inline_file(&mut self) -> Option<io::Result<&mut std::fs::File>> {
        use std::io::Seek as _;
        if let State::Deferred(build) = &mut self.state {
            if self.inline {
                self.state = match build.take().map(|b| b()) {
                    Some(Ok(f)) => State::Inline(f),
                    Some(Err(e)) => State::Failed(e.kind(), e.to_string()),
                    None => State::Failed(io::ErrorKind::Other, "snapshot build lost".into()),
                };
            }
        }
        match &mut self.state {
            State::Inline(f) => {
                if let Some(pos) = self.pending_seek.take() {
                    if let Err(e) = f.seek(pos) {
                        return Some(Err(e));
                    }
                }
                Some(Ok(f))
            }
            State::Failed(kind, msg) if self.inline => {
                Some(Err(io::Error::new(*kind, msg.clone())))
            }
            _ => None,
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio::fs::File>> {
        loop {
            match &mut self.state {
                State::Ready(_) => break,
                // Inline files are served by `inline_file`, never through here.
                State::Inline(_) => {
                    return Poll::Ready(Err(io::Error::other(
                        "an inline snapshot file polled as async",
                    )))
                }
                State::Failed(kind, msg) => {
                    return Poll::Ready(Err(io::Error::new(*kind, msg.clone())))
                }
                State::Deferred(build) => {
                    let Some(build) = build.take() else {
                        self.state =
                            State::Failed(io::ErrorKind::Other, "snapshot build lost".into());
                        continue;
                    };
                    self.state = State::Building(tokio::task::spawn_blocking(build));
                }
                State::Building(job) => {
                    let done = match Pin::new(job).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    self.state = match done {
                        Ok(Ok(f)) => State::Ready(tokio::fs::File::from_std(f)),
                        Ok(Err(e)) => State::Failed(e.kind(), e.to_string()),
                        Err(e) => {
                            State::Failed(io::ErrorKind::Other, format!("snapshot build: {e}"))
                        }
                    };
                }
            }
        }
        let State::Ready(file) = &mut self.state else {
            return Poll::Ready(Err(io::Error::other("snapshot file not ready")));
        };
        if let Some(pos) = self.pending_seek.take() {
            if let Err(e) = Pin::new(&mut *file).start_seek(pos) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(file))
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(file) = this.inline_file() {
            use std::io::Read as _;
            let n = file?.read(buf.initialize_unfilled())?;
            buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        let had_seek = this.pending_seek.is_some();
        match this.poll_ready(cx) {
            Poll::Ready(Ok(file)) => {
                if had_seek {
                    // Finish the seek queued before the file existed.
                    match Pin::new(&mut *file).poll_complete(cx) {
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Pin::new(file).poll_read(cx, buf)
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(f) = &this.on_write {
            f();
        }
        if let Some(file) = this.inline_file() {
            use std::io::Write as _;
            return Poll::Ready(file.and_then(|f| f.write(buf)));
        }
        match this.poll_ready(cx) {
            Poll::Ready(Ok(file)) => Pin::new(file).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(file) = this.inline_file() {
            use std::io::Write as _;
            return Poll::Ready(file.and_then(|f| f.flush()));
        }
        match this.poll_ready(cx) {
            Poll::Ready(Ok(file)) => Pin::new(file).poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(file) = this.inline_file() {
            use std::io::Write as _;
            return Poll::Ready(file.and_then(|f| f.flush()));
        }
        match this.poll_ready(cx) {
            Poll::Ready(Ok(file)) => Pin::new(file).poll_shutdown(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.state {
            State::Ready(file) => Pin::new(file).start_seek(position),
            _ => {
                this.pending_seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        if let Some(file) = this.inline_file() {
            use std::io::Seek as _;
            return Poll::Ready(file.and_then(|f| f.stream_position()));
        }
        match this.poll_ready(cx) {
            Poll::Ready(Ok(file)) => Pin::new(file).poll_complete(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_deferred_file_is_built_on_first_use_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dump");
        let built = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let make = |inline| {
            let (path, built) = (path.clone(), built.clone());
            SnapshotData::deferred(
                Box::new(move || {
                    built.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::fs::write(&path, b"0123456789")?;
                    std::fs::File::open(&path)
                }),
                inline,
            )
        };
        drop(make(false));
        assert_eq!(built.load(std::sync::atomic::Ordering::SeqCst), 0);
        for inline in [false, true] {
            let mut s = make(inline);
            assert_eq!(s.seek(SeekFrom::End(0)).await.unwrap(), 10);
            s.seek(SeekFrom::Start(4)).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert_eq!(out, "456789");
        }
        assert_eq!(built.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_received_file_takes_writes_at_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        for inline in [false, true] {
            let mut s = SnapshotData::receiving(&path, inline).await.unwrap();
            s.write_all(b"abc").await.unwrap();
            s.seek(SeekFrom::Start(1)).await.unwrap();
            s.write_all(b"XY").await.unwrap();
            s.sync().await.unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"aXY");
            assert_eq!(s.path(), Some(path.as_path()));
        }
    }

    #[tokio::test]
    async fn a_failed_build_is_an_error_every_time() {
        let mut s = SnapshotData::deferred(
            Box::new(|| Err(io::Error::new(io::ErrorKind::NotFound, "gone"))),
            false,
        );
        let mut b = Vec::new();
        assert!(s.read_to_end(&mut b).await.is_err());
        assert!(s.seek(SeekFrom::End(0)).await.is_err());
    }
}
