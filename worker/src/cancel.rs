//! A one-shot, clonable cancellation signal (a tiny stand-in for a cancellation token).

use tokio::sync::watch;

/// The sending side: [`CancelHandle::cancel`] wakes every [`CancelToken`] of the pair.
#[derive(Debug, Clone)]
pub struct CancelHandle {
    tx: std::sync::Arc<watch::Sender<bool>>,
}

/// The receiving side, handed to whatever should stop when cancelled.
///
/// Dropping every [`CancelHandle`] does *not* cancel: the token then never fires.
#[derive(Debug, Clone)]
pub struct CancelToken {
    rx: watch::Receiver<bool>,
}

/// A connected handle/token pair.
pub fn cancel_pair() -> (CancelHandle, CancelToken) {
    let (tx, rx) = watch::channel(false);
    (
        CancelHandle {
            tx: std::sync::Arc::new(tx),
        },
        CancelToken { rx },
    )
}

impl CancelHandle {
    /// Signals cancellation. Idempotent.
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`CancelHandle::cancel`] has been called.
    pub fn is_cancelled(&self) -> bool {
        *self.tx.borrow()
    }
}

impl CancelToken {
    /// A token that is never cancelled.
    pub fn never() -> Self {
        cancel_pair().1
    }

    /// Whether cancellation has been signalled.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once cancellation is signalled (immediately if it already was).
    pub async fn cancelled(&mut self) {
        if self.rx.wait_for(|c| *c).await.is_err() {
            // Every handle is gone without cancelling: wait forever.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_once_cancelled() {
        let (h, mut t) = cancel_pair();
        let mut t2 = t.clone();
        assert!(!t.is_cancelled());
        h.cancel();
        t.cancelled().await;
        t2.cancelled().await;
        assert!(t.is_cancelled() && h.is_cancelled());
    }

    #[tokio::test]
    async fn dropped_handle_never_fires() {
        let (h, mut t) = cancel_pair();
        drop(h);
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), t.cancelled()).await;
        assert!(r.is_err());
        assert!(!t.is_cancelled());
    }
}
