//! systemd integration: the sd_notify protocol (READY, STATUS, RELOADING, STOPPING, ERRNO) and
//! the watchdog ping, which the session driver's own loop sends (so only a loop that makes
//! progress pings, and an idle daemon wakes only for it and for what is due).
//!
//! Everything here is a no-op without `NOTIFY_SOCKET` / `WATCHDOG_USEC`, so the daemon runs
//! unchanged outside systemd.

use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::status::Status;

/// One notification, owned, on its way to the notifier thread.
enum Note {
    Ready,
    Reloading,
    Stopping,
    Status(StatusText),
    Errno(u32),
    /// Answer once everything before it was sent.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Notifications are sent from one dedicated thread: the sd_notify socket is a blocking
/// datagram socket, and a manager that stops reading it must never stall the session (it
/// did, in a test whose fake manager read lazily). If the queue fills, new notes are dropped.
fn notifier() -> &'static SyncSender<Vec<Note>> {
    static TX: OnceLock<SyncSender<Vec<Note>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Vec<Note>>(64);
        let spawned = std::thread::Builder::new()
            .name("imlinkd-notify".into())
            .spawn(move || {
                while let Ok(notes) = rx.recv() {
                    let mut states = Vec::new();
                    for n in &notes {
                        match n {
                            Note::Ready => states.push(NotifyState::Ready),
                            Note::Reloading => states.push(NotifyState::Reloading),
                            Note::Stopping => states.push(NotifyState::Stopping),
                            Note::Status(s) => states.push(NotifyState::Status(s.as_str())),
                            Note::Errno(e) => states.push(NotifyState::Errno(*e)),
                            Note::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                    if !states.is_empty()
                        && let Err(e) = sd_notify::notify(&states)
                    {
                        tracing::debug!("sd_notify failed: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("could not start the sd_notify thread: {e}");
        }
        tx
    })
}

/// The longest `STATUS=` sent (systemd shows one line; the message is the API's job).
pub const MAX_STATUS_BYTES: usize = 400;

/// A `STATUS=` value that cannot say anything but a status: every control character (each
/// `\n` would start a new sd_notify assignment, such as `WATCHDOG=trigger` or `STOPPING=1`)
/// becomes a space, and it is cut at [`MAX_STATUS_BYTES`] on a character boundary. The only
/// way to build one, so no path can forget it.
pub struct StatusText(String);

impl StatusText {
    pub fn new(text: &str) -> StatusText {
        let mut out = String::with_capacity(text.len().min(MAX_STATUS_BYTES));
        for c in text.chars() {
            let c = if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                ' '
            } else {
                c
            };
            if out.len() + c.len_utf8() > MAX_STATUS_BYTES {
                out.push('…');
                break;
            }
            out.push(c);
        }
        StatusText(out)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn send(notes: Vec<Note>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match notifier().try_send(notes) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            tracing::debug!("the service manager is not reading sd_notify messages; dropping one")
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// Wait (at most `timeout`) until every notification queued so far has been sent: before
/// exiting, so STOPPING/ERRNO are not lost.
pub fn flush(timeout: Duration) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    if notifier().try_send(vec![Note::Flush(tx)]).is_ok() {
        let _ = rx.recv_timeout(timeout);
    }
}

/// READY=1 with the current summary: config valid and the API socket serving.
pub fn ready(status: &str) {
    send(vec![Note::Ready, Note::Status(StatusText::new(status))]);
}

pub fn reloading() {
    send(vec![
        Note::Reloading,
        Note::Status(StatusText::new("reloading the configuration")),
    ]);
}

pub fn stopping() {
    send(vec![
        Note::Stopping,
        Note::Status(StatusText::new("stopping: logging out")),
    ]);
}

/// A fatal start-up error: STATUS= says why, ERRNO= the exit status.
pub fn failed(status: &str, errno: u32) {
    send(vec![
        Note::Status(StatusText::new(status)),
        Note::Errno(errno),
    ]);
    flush(Duration::from_secs(1));
}

pub fn status(text: &str) {
    send(vec![Note::Status(StatusText::new(text))]);
}

/// Keep STATUS= in step with the session's summary line.
pub async fn mirror_status(mut rx: watch::Receiver<Status>) {
    let mut last = String::new();
    loop {
        let summary = rx.borrow_and_update().summary.clone();
        if summary != last {
            status(&summary);
            last = summary;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// systemd's watchdog interval (`WATCHDOG_USEC`, for this process), when it asked for one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Send `WATCHDOG=1`, without ever blocking: the session driver calls this from its loop
/// (so only a loop that makes progress pings). A manager that is not reading its socket
/// loses the ping, and then restarts the service, as it should.
pub fn ping_watchdog() {
    if let Err(e) = send_nonblocking(b"WATCHDOG=1") {
        tracing::debug!("sd_notify WATCHDOG failed: {e}");
    }
}

fn send_nonblocking(msg: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(&path)?,
    };
    sock.send_to_addr(msg, &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_can_never_carry_another_assignment() {
        let s = StatusText::new("retrying: \"busy\nWATCHDOG=trigger\r\nSTOPPING=1\u{2028}x\"");
        assert!(!s.as_str().contains('\n') && !s.as_str().contains('\r'));
        assert!(s.as_str().contains("busy WATCHDOG=trigger  STOPPING=1 x"));
        let long = StatusText::new(&"é".repeat(1000));
        assert!(long.as_str().len() <= MAX_STATUS_BYTES + '…'.len_utf8());
        assert!(long.as_str().ends_with('…'));
    }
}
