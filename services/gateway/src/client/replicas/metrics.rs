//! Per-replica gauges and counters. The `replica` label is a replica's URL: a configured one,
//! or `http://<address>` for an address a configured DNS name resolved to, so the label set is
//! bounded by the configuration; a replica that leaves takes its series with it.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The verdicts `mesh_replica_calls_total` counts, in [`ReplicaSeries::calls`] order.
pub(super) const VERDICTS: [&str; 3] = ["success", "failure", "ignore"];

/// Per-replica gauges and counters, by `replica`.
#[derive(Clone)]
pub struct ReplicaMetrics {
    ejected: IntGaugeVec,
    ejections: IntCounterVec,
    serving: IntGaugeVec,
    in_flight: IntGaugeVec,
    calls: IntCounterVec,
}

/// One replica's series, resolved once when it joins.
pub(super) struct ReplicaSeries {
    pub ejected: IntGauge,
    pub ejections: IntCounter,
    pub serving: IntGauge,
    /// Calls in flight: the load the choice compares.
    pub in_flight: IntGauge,
    /// By verdict, in [`VERDICTS`] order.
    pub calls: [IntCounter; 3],
}

impl ReplicaMetrics {
    /// Registers `mesh_replica_ejected`, `mesh_replica_ejections_total`,
    /// `mesh_replica_serving`, `mesh_replica_in_flight` (all by `replica`) and
    /// `mesh_replica_calls_total{replica, verdict}`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["replica"]);
        let metrics = Self {
            ejected: gauge(
                "mesh_replica_ejected",
                "1 while the inference replica is ejected by outlier detection",
            )?,
            ejections: IntCounterVec::new(
                Opts::new(
                    "mesh_replica_ejections_total",
                    "Times the inference replica was ejected after consecutive failures",
                ),
                &["replica"],
            )?,
            serving: gauge(
                "mesh_replica_serving",
                "1 while the replica's grpc.health.v1 Watch says SERVING",
            )?,
            in_flight: gauge(
                "mesh_replica_in_flight",
                "ModelInfer calls the gateway has in flight to the replica",
            )?,
            calls: IntCounterVec::new(
                Opts::new(
                    "mesh_replica_calls_total",
                    "ModelInfer attempts per replica, by the classifier's verdict (success, failure, ignore)",
                ),
                &["replica", "verdict"],
            )?,
        };
        registry.register(Box::new(metrics.ejected.clone()))?;
        registry.register(Box::new(metrics.ejections.clone()))?;
        registry.register(Box::new(metrics.serving.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        registry.register(Box::new(metrics.calls.clone()))?;
        Ok(metrics)
    }

    /// The series of the replica at `url` (created at 0).
    pub(super) fn series(&self, url: &str) -> ReplicaSeries {
        let series = ReplicaSeries {
            ejected: self.ejected.with_label_values(&[url]),
            ejections: self.ejections.with_label_values(&[url]),
            serving: self.serving.with_label_values(&[url]),
            in_flight: self.in_flight.with_label_values(&[url]),
            calls: VERDICTS.map(|verdict| self.calls.with_label_values(&[url, verdict])),
        };
        series.serving.set(0);
        series.ejected.set(0);
        series
    }

    /// Removes the series of the replica at `url`, which left. Handles still held by calls
    /// on their way there keep counting, unexported.
    pub(super) fn remove(&self, url: &str) {
        // A series that was never created is not an error worth reporting.
        let _ = self.ejected.remove_label_values(&[url]);
        let _ = self.ejections.remove_label_values(&[url]);
        let _ = self.serving.remove_label_values(&[url]);
        let _ = self.in_flight.remove_label_values(&[url]);
        for verdict in VERDICTS {
            let _ = self.calls.remove_label_values(&[url, verdict]);
        }
    }
}
