//! Stop signals for the long-running commands (`up`, `coordinator`, `worker`).

/// SIGTERM and Ctrl-C (SIGINT), counted from the moment [`StopSignals::listen`] is
/// called: the first asks for a graceful stop (a worker drains, a leading coordinator
/// hands leadership over), the second for an immediate one.
pub struct StopSignals {
    count: tokio::sync::watch::Receiver<u32>,
}

impl StopSignals {
    pub fn listen() -> StopSignals {
        let (tx, count) = tokio::sync::watch::channel(0u32);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            Some(()) = term.recv() => {}
                            Some(()) = int.recv() => {}
                            else => return,
                        }
                        tx.send_modify(|n| *n += 1);
                    }
                });
                return StopSignals { count };
            }
        }
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                tx.send_modify(|n| *n += 1);
            }
        });
        StopSignals { count }
    }

    /// Completes once `n` signals have arrived.
    pub async fn nth(&self, n: u32) {
        let mut count = self.count.clone();
        if count.wait_for(|c| *c >= n).await.is_err() {
            // No more signals can come.
            std::future::pending::<()>().await;
        }
    }
}
