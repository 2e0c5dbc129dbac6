//! systemd service notifications for `Type=notify` units: `READY=1` once a
//! process serves, and `WATCHDOG=1` pings at half the unit's `WatchdogSec=`
//! so systemd restarts a process whose runtime stopped making progress.
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells the service manager that startup is finished, with a status line
/// `systemctl status` shows. A failure is logged, never fatal: a unit
/// without `Type=notify` must still run.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!(error = %e, "cannot notify systemd (READY=1)");
    }
}

/// Tells the service manager that shutdown has begun.
pub fn stopping() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Stopping]) {
        tracing::debug!(error = %e, "cannot notify systemd (STOPPING=1)");
    }
}

/// Pings the watchdog from the async runtime at half of `WATCHDOG_USEC`
/// until `stop`: a wedged runtime misses pings and systemd restarts the
/// process. Does nothing when the unit has no `WatchdogSec=`.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (period / 2).max(Duration::from_millis(10));
    tracing::info!(watchdog = ?period, ping_every = ?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                        tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                    }
                }
            }
        }
    });
}
