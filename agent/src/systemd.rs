//! systemd's notify protocol (`Type=notify` units): READY=1 once the node is usable,
//! STATUS= lines on the way, STOPPING=1 at shutdown, WATCHDOG=1 while the main loop runs
//! when the unit sets `WatchdogSec=`. Without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("notifying systemd failed: {e}");
    }
}

/// A STATUS= line (`systemctl status` shows it).
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// READY=1, with a status line.
pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping; the dataplane stays in place"),
    ]);
}

/// How often to send WATCHDOG=1: half the unit's watchdog timeout, if it has one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| (timeout / 2).max(Duration::from_millis(100)))
}

/// WATCHDOG=1.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
