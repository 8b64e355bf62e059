//! `mesh_spool_oldest_record_age_seconds`: how long the oldest record not yet committed by the
//! logger has waited since it was served. The backlog's size (`mesh_spool_pending_records`)
//! says how much is waiting; this says for how long, which is what the log-completeness SLO
//! ("in PostgreSQL within 5 minutes of serving") is about.
//!
//! The shipper notes the serving time of the first record of the batch it is delivering (the
//! oldest undelivered one, since delivery is in order) and clears it once the batch is
//! committed. The age is computed when scraped, so it keeps growing while a batch waits for
//! the logger; between batches (a few milliseconds) it reads 0.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::Gauge;

/// No record is being delivered.
const NONE: i64 = i64::MIN;

/// The serving time of the oldest undelivered record, and the gauge that reports its age.
#[derive(Clone)]
pub struct OldestRecord {
    served_micros: Arc<AtomicI64>,
    gauge: Gauge,
}

impl OldestRecord {
    /// The collector (register it once).
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            served_micros: Arc::new(AtomicI64::new(NONE)),
            gauge: Gauge::new(
                "mesh_spool_oldest_record_age_seconds",
                "Seconds since the oldest record not yet committed by the logger was served \
                 (0 when the spool is delivered)",
            )?,
        })
    }

    /// The batch being delivered starts with a record served at `micros` (Unix time).
    pub fn delivering(&self, micros: i64) {
        self.served_micros.store(micros, Ordering::Relaxed);
    }

    /// The batch is committed.
    pub fn delivered(&self) {
        self.served_micros.store(NONE, Ordering::Relaxed);
    }

    /// The age now, in seconds.
    pub fn age_seconds(&self) -> f64 {
        let served = self.served_micros.load(Ordering::Relaxed);
        if served == NONE {
            return 0.0;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(served);
        (now.saturating_sub(served)).max(0) as f64 / 1e6
    }
}

impl Collector for OldestRecord {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set(self.age_seconds());
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_grows_while_delivering_and_is_zero_after() {
        let oldest = OldestRecord::new().expect("gauge");
        assert_eq!(oldest.age_seconds(), 0.0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_micros() as i64;
        oldest.delivering(now - 90_000_000);
        let age = oldest.age_seconds();
        assert!((90.0..91.0).contains(&age), "age {age}");
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(oldest.clone()))
            .expect("register");
        let families = registry.gather();
        let value = families[0].get_metric()[0].get_gauge().get_value();
        assert!(value >= 90.0, "scraped {value}");
        oldest.delivered();
        assert_eq!(oldest.age_seconds(), 0.0);
    }
}
