//! Open-loop pacing: each request has an intended start on a fixed schedule, and its latency is
//! measured from that instant (so a target that falls behind cannot hide its queueing).
//!
//! The schedule is kept with a `timerfd` registered with the runtime's reactor ([`Alarm`]), not
//! with tokio's timer: tokio's timer wheel has a 1 ms tick and a sleep ends at the first tick
//! after its deadline, so a request paced by it started up to about a millisecond after its
//! intended instant, and that lateness was counted as the target's latency (measured on the
//! floor server at 1,000/s: p50 1.57 ms, against 0.10 ms for one request at a time). A
//! `timerfd` wakes the runtime's own thread within microseconds of the instant.
//!
//! Before this, a dedicated OS thread slept between instants and spawned each request onto the
//! runtime: two threads woke for every request, and at 5,900 Predicts/s the load generator
//! took about half a core of this two-core machine, beside the mesh it measured. Paced on the
//! runtime, an open-loop run needs one thread (see `main`).

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A high-resolution sleep on the runtime: a monotonic `timerfd` that the reactor watches.
pub struct Alarm {
    fd: AsyncFd<OwnedFd>,
}

impl Alarm {
    /// A disarmed alarm, registered with the current runtime's reactor.
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: `fd` is an open descriptor that the `AsyncFd` takes ownership of: an
        // `OwnedFd` always answers the same descriptor and closes it only when dropped, which
        // happens when the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Returns at `at` or soon after, never before (at once if `at` has passed).
    pub async fn until(&self, at: Instant) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if at <= now {
                return Ok(());
            }
            // Relative to now: `Instant` does not expose its clock reading. An expiry left over
            // from an earlier, abandoned wait only wakes this loop early, and it sets the
            // alarm again.
            self.arm(at - now)?;
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                // Not expired yet (a spurious wake-up): the readiness was cleared; wait again.
                Err(_would_block) => {}
            }
        }
    }

    fn arm(&self, after: Duration) -> io::Result<()> {
        // A zero value disarms a timerfd; a nanosecond is as good as now.
        let after = after.max(Duration::from_nanos(1));
        let value = Timespec {
            tv_sec: after.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: after.subsec_nanos().into(),
        };
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        timerfd_settime(
            self.fd.get_ref(),
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        Ok(())
    }
}

/// Calls `fire(intended)` at each instant `started + k / rate` before `end`, on the current
/// task, waiting on an [`Alarm`] between them; stops early when `stopped()` or when `fire`
/// returns `false`. A late task does not skip instants: it fires the missed ones at once, each
/// with its own intended instant.
pub async fn open_loop(
    rate: u64,
    started: Instant,
    end: Instant,
    stopped: impl Fn() -> bool,
    mut fire: impl FnMut(Instant) -> bool,
) -> io::Result<()> {
    let alarm = Alarm::new()?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for k in 0u64.. {
        let intended = started + interval.mul_f64(k as f64);
        if intended >= end || stopped() {
            break;
        }
        alarm.until(intended).await?;
        if !fire(intended) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn fires_each_instant_on_schedule_and_not_before_it() {
        let fired = runtime().block_on(async {
            let started = Instant::now();
            let end = started + Duration::from_millis(200);
            let mut fired = Vec::new();
            open_loop(
                500,
                started,
                end,
                || false,
                |intended| {
                    fired.push((intended, Instant::now()));
                    true
                },
            )
            .await
            .expect("a timerfd");
            (started, fired)
        });
        let (started, fired) = fired;
        assert_eq!(fired.len(), 100, "500/s for 200 ms");
        for (k, (intended, at)) in fired.iter().enumerate() {
            assert_eq!(
                *intended,
                started + Duration::from_secs_f64(k as f64 / 500.0)
            );
            assert!(at >= intended, "request {k} fired before its instant");
        }
    }

    /// What the `timerfd` is for: waking well inside tokio's 1 ms timer tick. On an idle
    /// runtime most waits end within a fraction of a millisecond (a loaded CI machine may
    /// delay a few; the median is asserted).
    #[test]
    fn an_alarm_wakes_within_a_fraction_of_a_millisecond() {
        let mut late: Vec<Duration> = runtime().block_on(async {
            let alarm = Alarm::new().expect("a timerfd");
            let mut late = Vec::new();
            for _ in 0..50 {
                let at = Instant::now() + Duration::from_micros(300);
                alarm.until(at).await.expect("waits");
                late.push(Instant::now() - at);
            }
            late
        });
        late.sort();
        assert!(
            late[25] < Duration::from_micros(700),
            "median lateness {:?} (tokio's timer would be about 1 ms)",
            late[25]
        );
    }

    #[test]
    fn stops_when_asked_or_when_fire_declines() {
        runtime().block_on(async {
            let started = Instant::now();
            let end = started + Duration::from_secs(60);
            let mut n = 0;
            open_loop(
                1000,
                started,
                end,
                || false,
                |_| {
                    n += 1;
                    n < 5
                },
            )
            .await
            .expect("a timerfd");
            assert_eq!(n, 5);
            let mut calls = 0;
            open_loop(
                1000,
                started,
                end,
                || true,
                |_| {
                    calls += 1;
                    true
                },
            )
            .await
            .expect("a timerfd");
            assert_eq!(calls, 0);
        });
    }
}
