//! Signals to the child processes the harness started: only PIDs this process spawned and has
//! not reaped.

use std::process::Child;
use std::time::{Duration, Instant};

pub(crate) fn stop_child(child: &mut Child, signal: i32) {
    if let Ok(None) = child.try_wait() {
        // The PID is ours: we spawned it and have not reaped it.
        let pid = child.id() as libc::pid_t;
        // SAFETY: not needed; libc::kill is a plain syscall wrapper on a PID we own.
        unsafe_kill(pid, signal);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends SIGTERM to a child this process spawned and has not reaped yet (no `kill` program
/// needed: a minimal Debian has none); does nothing once it has exited.
pub fn sigterm(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        unsafe_kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

#[allow(unsafe_code)]
pub(crate) fn unsafe_kill(pid: libc::pid_t, signal: i32) {
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}
