//! CPU time per request, of the load generator itself and of named processes on this machine,
//! over the measured run only (not the warm-up).
//!
//! A throughput ratio on a small machine depends on who runs out of CPU first, the client or
//! the server, and that moves with whatever else the host runs. CPU time per request does not
//! depend on it as much: it says what each process costs for one call, so a ratio can be
//! explained (e.g. the model server costs twice the floor server per call) rather than only
//! quoted. Read from `/proc/<pid>/task/*/schedstat` (time on a CPU, in nanoseconds, of every
//! thread; a thread that exited during the run takes its time with it, which the services here
//! do not do: their threads live as long as they do). A watched process counts with its child
//! processes, so PostgreSQL is its postmaster's pid.

use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;

use mesh_testkit::procs::children_of;

/// `NAME=PID[,PID…]`: a process (or several) whose CPU time, with that of its child processes
/// (e.g. PostgreSQL's backends under the postmaster), is reported under `NAME`.
#[derive(Clone, Debug)]
pub struct Watched {
    /// The name in the report.
    pub name: String,
    /// Its processes.
    pub pids: Vec<u32>,
}

impl FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pids) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID[,PID...], got {s:?}"))?;
        if name.is_empty() {
            return Err(format!("the name before '=' is empty in {s:?}"));
        }
        let pids = pids
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("{p:?} is not a process id (in {s:?})"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.to_owned(),
            pids,
        })
    }
}

/// Nanoseconds on a CPU of every thread of process `pid` so far.
pub fn process_ns(pid: &str) -> io::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended between the listing and the read has nothing left to count.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        let on_cpu = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("schedstat: {stat:?}"))
            })?;
        total += on_cpu;
    }
    Ok(total)
}

/// Nanoseconds on a CPU so far of process `pid` and of its children alive now (a child that
/// ended takes its time with it; one that started during a run brings all of its own, which
/// that run spent).
fn with_children_ns(pid: u32) -> io::Result<u64> {
    let own = process_ns(&pid.to_string())?;
    let children: u64 = children_of(pid)
        .into_iter()
        .filter_map(|child| process_ns(&child.to_string()).ok())
        .sum();
    Ok(own + children)
}

/// CPU time so far of the load generator and of each watched process (`None`: it could not be
/// read, e.g. it exited).
pub struct Snapshot {
    own: Option<u64>,
    watched: Vec<(String, Option<u64>)>,
}

impl Snapshot {
    /// Reads them all now.
    pub fn take(watched: &[Watched]) -> Self {
        Self {
            own: process_ns("self").ok(),
            watched: watched
                .iter()
                .map(|w| {
                    let sum = w
                        .pids
                        .iter()
                        .map(|&pid| with_children_ns(pid))
                        .sum::<io::Result<u64>>()
                        .ok();
                    (w.name.clone(), sum)
                })
                .collect(),
        }
    }

    /// Microseconds of CPU per request between `self` and `later`, for `requests` requests:
    /// the client's under `client`, each watched process under its name, and their sum under
    /// `total` (only when every figure could be read). Empty for no requests.
    pub fn per_request(&self, later: &Self, requests: u64) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        if requests == 0 {
            return out;
        }
        let per = |a: Option<u64>, b: Option<u64>| {
            a.zip(b)
                .map(|(a, b)| b.saturating_sub(a) as f64 / 1e3 / requests as f64)
        };
        let mut complete = true;
        let mut total = 0.0;
        let pairs = std::iter::once(("client", self.own, later.own)).chain(
            self.watched
                .iter()
                .zip(&later.watched)
                .map(|((name, a), (_, b))| (name.as_str(), *a, *b)),
        );
        for (name, a, b) in pairs {
            match per(a, b) {
                Some(us) => {
                    total += us;
                    out.insert(name.to_owned(), us);
                }
                None => complete = false,
            }
        }
        if complete {
            out.insert("total".to_owned(), total);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_process_is_a_name_and_its_pids() {
        let w: Watched = "postgres=10,11, 12".parse().expect("parses");
        assert_eq!(w.name, "postgres");
        assert_eq!(w.pids, vec![10, 11, 12]);
        for bad in ["postgres", "=10", "gateway=", "gateway=abc", "gateway=1,,2"] {
            assert!(bad.parse::<Watched>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_clients_own_cpu_is_counted_per_request() {
        let before = Snapshot::take(&[]);
        let start = process_ns("self").expect("own schedstat");
        // Spin until this process has had 20 ms more on a CPU (bounded by the wall clock).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while process_ns("self").expect("own schedstat") < start + 20_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "20 ms of CPU never came"
            );
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let after = Snapshot::take(&[]);
        let per = before.per_request(&after, 10);
        let client = per["client"];
        // At least 20 ms over 10 requests: at least 2,000 us each, in microseconds.
        assert!(client >= 2_000.0, "client {client} us per request");
        // Not nanoseconds (2,000,000 each): the loop stops soon after 20 ms, and the other tests
        // of this binary that run beside it spend far less than 480 ms.
        assert!(
            client < 50_000.0,
            "client {client}: not microseconds per request"
        );
        assert_eq!(per["total"], client);
        assert!(before.per_request(&after, 0).is_empty());
    }

    #[test]
    fn a_watched_process_counts_its_children() {
        // A parent that only waits, and a child of it that spins for about two seconds.
        let mut parent = std::process::Command::new("bash")
            .args([
                "-c",
                "(end=$((SECONDS + 2)); while [ $SECONDS -lt $end ]; do :; done) & wait",
            ])
            .spawn()
            .expect("bash");
        let watched = Watched {
            name: "parent".into(),
            pids: vec![parent.id()],
        };
        let before = Snapshot::take(std::slice::from_ref(&watched));
        // Until the parent's figure shows 20 ms: only its spinning child can give it that.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let counted = loop {
            let now = Snapshot::take(std::slice::from_ref(&watched));
            let us = before.per_request(&now, 1).get("parent").copied();
            if us.is_some_and(|us| us >= 20_000.0) || std::time::Instant::now() > deadline {
                break us;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let _ = parent.wait();
        assert!(
            counted.is_some_and(|us| us >= 20_000.0),
            "the spinning child's CPU was not counted under its parent: {counted:?} us"
        );
    }

    #[test]
    fn a_process_that_cannot_be_read_leaves_no_total() {
        let gone = Watched {
            name: "gone".into(),
            // Above the kernel's largest pid (4194304), so never a live process.
            pids: vec![u32::MAX],
        };
        let before = Snapshot::take(std::slice::from_ref(&gone));
        let after = Snapshot::take(std::slice::from_ref(&gone));
        let per = before.per_request(&after, 5);
        assert!(per.contains_key("client"));
        assert!(!per.contains_key("gone"));
        assert!(
            !per.contains_key("total"),
            "a total that leaves a process out: {per:?}"
        );
    }
}
