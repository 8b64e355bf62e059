//! The shipping task: reads the spool in order and sends one batch at a time to the logger,
//! retrying each until the logger commits it, then records the cursor and frees delivered
//! segments.

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
    // Segments before this start have been released (deleted) already.
    let mut released_before = reader.segment_start();
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
        let position = reader.position();
        let contexts = take_contexts(&shared, position);
        let count = frames.len() as u64;
        deliver(
            &logger, &bulkhead, &config, &metrics, &shared, records, contexts,
        )
        .await;
        let segment = reader.segment_start();
        released_before = advance(&shared, position, segment, released_before).await;
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

/// Records that everything before `position` is delivered, and deletes the segments before
/// `segment` (the reader's current one) if it moved past `released_before`. Returns the start
/// before which segments are now released.
async fn advance(shared: &Shared, position: u64, segment: u64, released_before: u64) -> u64 {
    shared.cursor.store(position, Ordering::Release);
    let dir = shared.dir.clone();
    // Listing the directory for segments to delete is only needed once the reader has moved on
    // to a new segment.
    let release = (segment > released_before).then_some(segment);
    match tokio::task::spawn_blocking(move || spool::commit(&dir, position, release)).await {
        Ok(Ok(())) => release.unwrap_or(released_before),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "recording the spool cursor failed (records may be delivered twice; the logger stores them once)");
            released_before
        }
        Err(e) => {
            tracing::error!(error = %e, "recording the spool cursor panicked");
            released_before
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

/// Sends `records` until the logger commits them (or refuses them as invalid).
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
    let count = records.len();
    let span = tracing::info_span!(
        "log.ship",
        otel.name = "ship prediction records",
        records = count
    );
    let mut contexts = contexts.iter();
    if let Some(first) = contexts.next() {
        let _ = span.set_parent(first.clone());
    }
    for cx in contexts {
        span.add_link(cx.span().span_context().clone());
    }
    let request = RecordRequest { records };
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    async {
        loop {
            attempt += 1;
            match logger
                .record(request.clone(), config.call_timeout, bulkhead)
                .await
            {
                Ok(_) => {
                    if shared.logger_failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(attempt, "prediction log reachable again; delivering the spool");
                    }
                    return;
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    tracing::error!(error = %status.message(), records = count, "the logger refused a batch as invalid; dropped");
                    metrics
                        .dropped
                        .with_label_values(&["rejected"])
                        .inc_by(count as u64);
                    return;
                }
                Err(status) => {
                    if !shared.logger_failing.swap(true, Ordering::Relaxed) || attempt.is_multiple_of(20) {
                        tracing::warn!(code = ?status.code(), error = %status.message(), attempt, records = count, "delivering prediction records failed; they stay in the spool");
                    }
                    let pause = rand::random_range(backoff / 2..=backoff);
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
    .instrument(span)
    .await
}
