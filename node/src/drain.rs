//! The one shutdown primitive handed to every task of the agent: stopping
//! (listeners stop accepting, the watch ends) is separate from cutting open
//! connections, so a shutdown can let connections finish for a while.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shutdown signals plus the tracker of every task that must end before
/// shutdown returns.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    stop: CancellationToken,
    cut: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the agent stops: listeners stop accepting, background
    /// loops end. Open connections keep going.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Cancelled when open connections must close.
    pub fn cut_token(&self) -> &CancellationToken {
        &self.cut
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Stops everything, gives open connections up to `grace` to finish,
    /// then cuts the rest and waits for every tracked task.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open_tasks = self.tracker.len(),
                grace_secs = grace.as_secs_f64(),
                "closing connections still open after the grace period"
            );
            self.cut.cancel();
            self.tracker.wait().await;
        }
    }
}
