//! A replica set's background work: each member's health watch, and the ejection decay.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Replica, ReplicaSet};

/// Follows `replica`'s `grpc.health.v1` status with `Watch` until aborted (when the replica
/// leaves); while the stream cannot be opened or breaks, the replica counts as not serving
/// (re-tried every second).
pub(super) async fn watch_health(replica: Arc<Replica>) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let update = |serving: bool| {
        if replica.serving.swap(serving, Ordering::Relaxed) != serving {
            tracing::info!(replica = %replica.url, serving, "inference replica health changed");
        }
        replica.series.serving.set(serving as i64);
    };
    let mut client = HealthClient::new(replica.channel.clone());
    loop {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        if let Ok(response) = client.watch(request).await {
            let mut stream = response.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                update(message.status() == ServingStatus::Serving);
            }
        }
        update(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A replica's ejection count falls by one for every this many base ejection times it stays in.
const EJECTION_DECAY_FACTOR: u32 = 5;

/// Every second, while the set lives: clears the ejected gauge of members whose ejection ended,
/// and lowers the ejection count of members that stayed in for [`EJECTION_DECAY_FACTOR`] base
/// ejection times.
pub(super) async fn decay_ejections(set: Weak<ReplicaSet>) {
    let tick = Duration::from_secs(1);
    loop {
        tokio::time::sleep(tick).await;
        let Some(set) = set.upgrade() else {
            return;
        };
        let decay_after = set
            .outlier
            .base_ejection
            .saturating_mul(EJECTION_DECAY_FACTOR);
        let now = Instant::now();
        for replica in set.members().iter() {
            let mut state = replica.outlier();
            if matches!(state.ejected_until, Some(until) if now < until) {
                continue;
            }
            replica.series.ejected.set(0);
            state.in_for += tick;
            if state.in_for >= decay_after {
                state.in_for = Duration::ZERO;
                state.ejections = state.ejections.saturating_sub(1);
            }
        }
    }
}
