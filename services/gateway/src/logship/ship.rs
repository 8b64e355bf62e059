//! The shipping task: reads the spool in order and sends one batch at a time to the logger,
//! retrying each until the logger commits it, then frees delivered segments and records the
//! cursor. A batch the logger refuses is split until the refused records are alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::logger::{PredictionRecord, RecordRequest};
use mesh_runtime::Bulkhead;
use prost::Message as _;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{Shared, ShipConfig, ShipMetrics};
use crate::client::LoggerDownstream;
use crate::spool::{self, Frame, Reader};

/// The shipping task: in order, one batch at a time, each retried until the logger commits it.
pub(super) async fn ship_loop(
    mut reader: Reader,
    logger: LoggerDownstream,
    bulkhead: Bulkhead,
    config: ShipConfig,
    metrics: ShipMetrics,
    shared: Arc<Shared>,
) {
    let mut last_was_full = false;
    let mut progress = Progress {
        released_before: reader.segment_start(),
        cursor_failing: false,
    };
    loop {
        let end = shared.end.load(Ordering::Acquire);
        if reader.position() >= end {
            if shared.closed.load(Ordering::Acquire)
                && reader.position() >= shared.end.load(Ordering::Acquire)
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), shared.wake.notified()).await;
            continue;
        }
        if !last_was_full && !shared.closed.load(Ordering::Acquire) {
            // Let a partial batch fill a little.
            tokio::time::sleep(config.flush_interval).await;
        }
        let end = shared.end.load(Ordering::Acquire);
        let Some((returned, frames)) = read_batch(reader, end, config.batch_size).await else {
            return;
        };
        reader = returned;
        let Some(frames) = frames else {
            continue;
        };
        last_was_full = frames.len() == config.batch_size;
        let records = decode(&frames, &metrics);
        if let Some(first) = records.first() {
            metrics.oldest.delivering(first.time_unix_micros);
        }
        let served: Vec<i64> = records.iter().map(|r| r.time_unix_micros).collect();
        let position = reader.position();
        let contexts = take_contexts(&shared, position);
        let count = frames.len() as u64;
        deliver(
            &logger, &bulkhead, &config, &metrics, &shared, records, contexts,
        )
        .await;
        let segment = reader.segment_start();
        advance(&shared, &metrics, position, segment, &mut progress).await;
        metrics.oldest.delivered();
        observe_delays(&metrics, &served);
        metrics.delivered.inc_by(count);
        metrics.pending_records.sub(count as i64);
        metrics
            .pending_bytes
            .set((shared.end.load(Ordering::Acquire) - position) as i64);
    }
}

/// Reads up to `max` frames before `end` on a blocking thread. `None` if the reader panicked
/// (shipping stops); otherwise the reader back, and the frames, or `None` after a read error or
/// an unreadable stretch (logged, retried after a pause).
async fn read_batch(
    mut reader: Reader,
    end: u64,
    max: usize,
) -> Option<(Reader, Option<Vec<Frame>>)> {
    let read = tokio::task::spawn_blocking(move || {
        let result = reader.read(end, max);
        (reader, result)
    })
    .await;
    let (reader, result) = match read {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(error = %e, "spool reader panicked; shipping stops");
            return None;
        }
    };
    let (frames, skipped) = match result {
        Ok(read) => read,
        Err(e) => {
            tracing::error!(error = %e, "reading the spool failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Some((reader, None));
        }
    };
    if skipped > 0 {
        tracing::error!(bytes = skipped, "corrupt data in the spool skipped");
    }
    if frames.is_empty() {
        if reader.position() < end {
            tracing::error!(
                position = reader.position(),
                end,
                "unreadable record in the spool; waiting"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        return Some((reader, None));
    }
    Some((reader, Some(frames)))
}

/// Observes, for each record just committed, how long after its serving that was.
fn observe_delays(metrics: &ShipMetrics, served: &[i64]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    for micros in served {
        let delay = now.saturating_sub(*micros).max(0) as f64 / 1e6;
        metrics.delivery_delay.observe(delay);
    }
}

/// The records in `frames`; one that does not decode is counted as dropped.
fn decode(frames: &[Frame], metrics: &ShipMetrics) -> Vec<PredictionRecord> {
    let mut records = Vec::with_capacity(frames.len());
    for frame in frames {
        match PredictionRecord::decode(frame.payload.as_slice()) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::error!(offset = frame.offset, error = %e, "undecodable spool record dropped");
                metrics.dropped.with_label_values(&["corrupt"]).inc();
            }
        }
    }
    records
}

/// What the shipper has recorded of its progress.
struct Progress {
    /// Segments before this start have been released (deleted) already.
    released_before: u64,
    /// The last attempt to record the cursor failed (logged once, not per batch).
    cursor_failing: bool,
}

/// Records that everything before `position` is delivered: frees the segments before
/// `segment` (the reader's current one) if it moved on, then writes the cursor. Freeing comes
/// first and does not depend on the cursor: on a full disk the cursor cannot be written, and
/// the delivered segments are the space that would let it be. A cursor left behind the first
/// segment is read on the next start as "from the first segment".
async fn advance(
    shared: &Shared,
    metrics: &ShipMetrics,
    position: u64,
    segment: u64,
    progress: &mut Progress,
) {
    shared.cursor.store(position, Ordering::Release);
    let (dir, disk) = (shared.dir.clone(), shared.disk.clone());
    // Listing the directory for segments to delete is only needed once the reader has moved on
    // to a new segment.
    let release = (segment > progress.released_before).then_some(segment);
    let done = tokio::task::spawn_blocking(move || {
        let freed = release.map(|keep_from| spool::release(&dir, keep_from));
        (freed, spool::cursor::write(&*disk, &dir, position))
    })
    .await;
    let (freed, recorded) = match done {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!(error = %e, "recording the spool cursor panicked");
            return;
        }
    };
    match (release, freed) {
        (Some(keep_from), Some(Ok(_))) => progress.released_before = keep_from,
        (_, Some(Err(e))) => {
            tracing::error!(error = %e, "freeing delivered spool segments failed; retried at the next batch")
        }
        _ => {}
    }
    match recorded {
        Ok(()) if progress.cursor_failing => {
            progress.cursor_failing = false;
            tracing::info!("spool cursor recorded again");
        }
        Ok(()) => {}
        Err(e) => {
            metrics.cursor_errors.with_label_values(&["write"]).inc();
            if !std::mem::replace(&mut progress.cursor_failing, true) {
                tracing::error!(error = %e, "recording the spool cursor failed; delivery goes on (after a restart, records since the last recorded cursor are delivered again and stored once)");
            }
        }
    }
}

/// Trace contexts of the records before `position`.
fn take_contexts(shared: &Shared, position: u64) -> Vec<opentelemetry::Context> {
    let Ok(mut contexts) = shared.contexts.lock() else {
        return Vec::new();
    };
    let mut taken = Vec::new();
    while contexts
        .front()
        .is_some_and(|(offset, _)| *offset < position)
    {
        if let Some((_, context)) = contexts.pop_front() {
            taken.push(context);
        }
    }
    taken
}

/// Delivers `records`: each piece is sent until the logger commits it; a piece it refuses is
/// split in halves, sent in order, down to single records; a single record refused is dropped
/// (logged with its prediction id, counted as `refused`). One bad record never costs the rest
/// of its batch.
async fn deliver(
    logger: &LoggerDownstream,
    bulkhead: &Bulkhead,
    config: &ShipConfig,
    metrics: &ShipMetrics,
    shared: &Shared,
    records: Vec<PredictionRecord>,
    contexts: Vec<opentelemetry::Context>,
) {
    use opentelemetry::trace::TraceContextExt as _;
    if records.is_empty() {
        return;
    }
    let span = tracing::info_span!(
        "log.ship",
        otel.name = "ship prediction records",
        records = records.len()
    );
    let mut contexts = contexts.iter();
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first.clone());
    }
    for cx in contexts {
        span.add_link(cx.span().span_context().clone());
    }
    async {
        // A stack: the next piece to send is on top, so halves are pushed second half first.
        let mut pieces = vec![records];
        while let Some(mut piece) = pieces.pop() {
            let Err(refusal) = send(logger, bulkhead, config, shared, &piece).await else {
                continue;
            };
            if piece.len() > 1 {
                tracing::warn!(error = %refusal.message(), records = piece.len(), "the logger refused a batch; sending it in halves to find the refused records");
                let second = piece.split_off(piece.len() / 2);
                pieces.push(second);
                pieces.push(piece);
                continue;
            }
            for record in piece {
                tracing::error!(prediction_id = %record.prediction_id, error = %refusal.message(), "the logger refused a prediction record on its own; dropped");
                metrics.dropped.with_label_values(&["refused"]).inc();
            }
        }
    }
    .instrument(span)
    .await
}

/// Whether the logger's refusal is of these records themselves (sending them again would be
/// refused again), as opposed to a failure that passes.
fn is_refusal(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::InvalidArgument | tonic::Code::OutOfRange)
}

/// Sends `records` until the logger commits them (`Ok`) or refuses them (`Err`), retrying
/// every other failure with capped, jittered back-off.
async fn send(
    logger: &LoggerDownstream,
    bulkhead: &Bulkhead,
    config: &ShipConfig,
    shared: &Shared,
    records: &[PredictionRecord],
) -> Result<(), tonic::Status> {
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let request = RecordRequest {
            records: records.to_vec(),
        };
        match logger.record(request, config.call_timeout, bulkhead).await {
            Ok(_) => {
                if shared.delivery_succeeded() {
                    tracing::info!(
                        attempt,
                        "prediction log reachable again; delivering the spool"
                    );
                }
                return Ok(());
            }
            Err(status) if is_refusal(status.code()) => return Err(status),
            Err(status) => {
                if shared.delivery_failed() || attempt.is_multiple_of(20) {
                    tracing::warn!(code = ?status.code(), error = %status.message(), attempt, records = records.len(), "delivering prediction records failed; they stay in the spool");
                }
                let pause = rand::random_range(backoff / 2..=backoff);
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
