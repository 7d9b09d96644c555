//! The clocks the session runs on.
//!
//! The machine's time is **boot time** (`CLOCK_BOOTTIME`, in milliseconds): unlike
//! `CLOCK_MONOTONIC` (what tokio's timers use) it keeps counting through suspend, so a kiosk
//! that sleeps overnight wakes up knowing its UserSig's deadline has passed, instead of sending
//! an expired sig. Timers are a `timerfd` on the same clock ([`BootTimer`]): it fires at the
//! right boot-time instant even when a suspend fell in between, and wakes the process only
//! when something is due.
//!
//! The wall clock is read only to judge whether it is plausible and to anchor a sig when the
//! provisioning server sent no `Date`. Deadlines never depend on it within one boot; across
//! a reboot, the cache's server-time offset is applied to it (and ignored while it is
//! implausible). See `docs/login-policy.md`, "Clocks".

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::time::{ClockId as TimeClockId, clock_gettime};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::session::{Millis, Now};

/// Milliseconds on `CLOCK_BOOTTIME`.
pub fn boot_ms() -> Millis {
    match clock_gettime(TimeClockId::CLOCK_BOOTTIME) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec() as u64 / 1_000_000),
        // Never on Linux; fall back to the monotonic clock rather than panic.
        Err(_) => match clock_gettime(TimeClockId::CLOCK_MONOTONIC) {
            Ok(t) => (t.tv_sec() as u64).saturating_mul(1000) + t.tv_nsec() as u64 / 1_000_000,
            Err(_) => 0,
        },
    }
}

/// Unix milliseconds from the wall clock (0 when it reads before 1970).
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): a cached boot-time anchor is only
/// meaningful within the boot that wrote it.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() <= 64)
}

/// The clock the machine runs on: boot time, plus the wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock;

impl Clock {
    pub fn new() -> Clock {
        Clock
    }

    pub fn now(&self) -> Now {
        Now {
            mono: boot_ms(),
            wall: wall_ms().div_euclid(1000),
        }
    }

    /// Unix milliseconds of a boot-time instant (via the current wall clock).
    pub fn wall_ms(&self, mono: Millis) -> i64 {
        wall_ms() - (boot_ms() as i64 - mono as i64)
    }
}

/// The timerfd, owned: its raw fd stays open and the same for as long as this lives.
struct OwnedTimerFd(TimerFd);

impl AsRawFd for OwnedTimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A one-shot timer on `CLOCK_BOOTTIME` that tokio can wait on.
pub struct BootTimer {
    fd: AsyncFd<OwnedTimerFd>,
    armed: Option<Millis>,
}

impl BootTimer {
    pub fn new() -> std::io::Result<BootTimer> {
        let fd = TimerFd::new(
            ClockId::CLOCK_BOOTTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: `OwnedTimerFd` owns the descriptor, so it stays open and refers to the same
        // timer for the whole life of the `AsyncFd`, and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register_with_interest(OwnedTimerFd(fd), Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(BootTimer { fd, armed: None })
    }

    /// Fire at boot-time `at` (or never, with `None`). Re-arming with the same instant is free.
    pub fn arm(&mut self, at: Option<Millis>) -> std::io::Result<()> {
        if at == self.armed {
            return Ok(());
        }
        match at {
            None => self.fd.get_ref().0.unset().map_err(std::io::Error::from)?,
            Some(ms) => {
                // An absolute instant; 0 would mean "disarm", so never less than 1 ns.
                let ts = TimeSpec::from(Duration::from_millis(ms).max(Duration::from_nanos(1)));
                self.fd
                    .get_ref()
                    .0
                    .set(
                        Expiration::OneShot(ts),
                        TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                    )
                    .map_err(std::io::Error::from)?;
            }
        }
        self.armed = at;
        Ok(())
    }

    /// Wait until the armed instant has passed (forever when disarmed).
    pub async fn fired(&mut self) -> std::io::Result<()> {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: reading 8 bytes into a local buffer from a timerfd we own.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 8 {
                self.armed = None;
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_advances_and_is_at_least_monotonic() {
        let a = boot_ms();
        std::thread::sleep(Duration::from_millis(20));
        let b = boot_ms();
        assert!(b >= a + 19, "{a} → {b}");
        let mono = clock_gettime(TimeClockId::CLOCK_MONOTONIC).unwrap();
        assert!(
            b + 1 >= mono.tv_sec() as u64 * 1000,
            "boot time ≥ monotonic time"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_timer_fires_at_the_boot_time_instant_and_can_be_rearmed() {
        let mut t = BootTimer::new().unwrap();
        let start = boot_ms();
        t.arm(Some(start + 10_000)).unwrap();
        // Re-armed earlier: the earlier instant wins.
        t.arm(Some(start + 30)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), t.fired())
            .await
            .expect("fires")
            .unwrap();
        assert!(boot_ms() >= start + 30);
        // Disarmed: never fires.
        t.arm(None).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), t.fired())
                .await
                .is_err()
        );
        // An instant in the past fires at once.
        t.arm(Some(1)).unwrap();
        tokio::time::timeout(Duration::from_secs(1), t.fired())
            .await
            .expect("fires at once")
            .unwrap();
    }
}
