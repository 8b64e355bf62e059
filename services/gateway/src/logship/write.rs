//! The spool's writer thread: every record that arrived while the previous `fdatasync` ran is
//! appended and synced at once (group commit), within the spool's bound.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::{Entry, NotKept, Shared, ShipMetrics, MAX_CONTEXTS};
use crate::spool::Spool;

/// The writer thread: group commit until every sender is gone.
pub(super) fn write_loop(
    mut spool: Spool,
    mut receiver: mpsc::Receiver<Entry>,
    shared: &Shared,
    metrics: &ShipMetrics,
    max_bytes: u64,
) {
    // Whether the last write failed: a full disk fails every group, logged once per episode.
    let mut failing = false;
    while let Some(first) = receiver.blocking_recv() {
        let mut group = vec![first];
        while group.len() < 4096 {
            match receiver.try_recv() {
                Ok(entry) => group.push(entry),
                Err(_) => break,
            }
        }
        let mut pending = spool.end() - shared.cursor.load(Ordering::Acquire);
        let mut kept = Vec::with_capacity(group.len());
        for entry in group {
            let size = Spool::frame_len(entry.payload.len());
            if pending + size > max_bytes {
                metrics.dropped.with_label_values(&["full"]).inc();
                let _ = entry.done.send(Err(NotKept::Full));
            } else {
                pending += size;
                kept.push(entry);
            }
        }
        if kept.is_empty() {
            continue;
        }
        let timer = metrics.sync_seconds.start_timer();
        let payloads: Vec<&[u8]> = kept.iter().map(|e| e.payload.as_slice()).collect();
        match spool.append(&payloads) {
            Ok(offsets) => {
                timer.observe_duration();
                let count = kept.len() as u64;
                if let Ok(mut contexts) = shared.contexts.lock() {
                    for (offset, entry) in offsets.iter().zip(&kept) {
                        contexts.push_back((*offset, entry.context.clone()));
                    }
                    while contexts.len() > MAX_CONTEXTS {
                        contexts.pop_front();
                    }
                }
                shared.end.store(spool.end(), Ordering::Release);
                metrics.appended.inc_by(count);
                metrics.pending_records.add(count as i64);
                metrics
                    .pending_bytes
                    .set((spool.end() - shared.cursor.load(Ordering::Acquire)) as i64);
                shared.wake.notify_one();
                for entry in kept {
                    let _ = entry.done.send(Ok(()));
                }
            }
            Err(e) => {
                timer.stop_and_discard();
                refuse(kept, &e, metrics, !std::mem::replace(&mut failing, true));
                continue;
            }
        }
        if std::mem::replace(&mut failing, false) {
            tracing::info!("spool writes succeed again; records are kept");
        }
    }
    shared.closed.store(true, Ordering::Release);
    shared.wake.notify_one();
}

/// Answers each of `kept` that it was not kept after the write failed with `error`, and counts
/// them. Logged at error for the first failure of a run of them (a full disk fails every group).
fn refuse(kept: Vec<Entry>, error: &std::io::Error, metrics: &ShipMetrics, first: bool) {
    if first {
        tracing::error!(%error, records = kept.len(), "spool write failed; records not kept (until a write succeeds again, further failures are logged at debug)");
    } else {
        tracing::debug!(%error, records = kept.len(), "spool write failed; records not kept");
    }
    metrics
        .dropped
        .with_label_values(&["io_error"])
        .inc_by(kept.len() as u64);
    for entry in kept {
        let _ = entry.done.send(Err(NotKept::Io(error.to_string())));
    }
}
