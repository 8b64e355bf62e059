//! Which versions each inference replica has ready, from its `mesh.catalog.v1.ModelCatalog`,
//! polled every half second. Routing uses it to send a request only to a version some replica
//! has ready, and the balancer to send it only to replicas that have it.
//!
//! Replicas join and leave as discovery finds them ([`ReplicaVersions::update`]); each is named
//! by its URL, the same name the balancer uses, so an answer never goes stale by a position.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_proto::catalog::model_catalog_client::ModelCatalogClient;
use mesh_proto::catalog::version_state::State;
use mesh_proto::catalog::{ListVersionsRequest, VersionState};
use mesh_runtime::internal::InternalChannel;
use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
use tokio::task::JoinHandle;

/// How often each replica's catalog is read.
pub const POLL: Duration = Duration::from_millis(500);

/// Longest wait for one read of a catalog.
const POLL_TIMEOUT: Duration = Duration::from_millis(400);

/// What one replica reported last.
#[derive(Debug, Clone)]
enum Report {
    /// It has never answered: it joined, or the gateway just started.
    Pending,
    /// It answered before; its last read timed out (slow, but there: its last listing was
    /// true a moment ago). A read that *fails* (refused, unreachable: the process is down or
    /// restarting and may come back without its versions) makes it [`Report::Pending`] again.
    Unreadable,
    /// Every version it holds, with its state.
    Listed(Vec<VersionState>),
}

impl Report {
    fn listed(&self) -> Option<&[VersionState]> {
        match self {
            Self::Listed(versions) => Some(versions),
            Self::Pending | Self::Unreadable => None,
        }
    }
}

/// Every replica's last report, by URL.
pub struct ReplicaVersions {
    reports: RwLock<BTreeMap<String, Report>>,
    tasks: std::sync::Mutex<HashMap<String, JoinHandle<()>>>,
    ready: IntGaugeVec,
}

impl Drop for ReplicaVersions {
    fn drop(&mut self) {
        for (_, task) in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            task.abort();
        }
    }
}

impl ReplicaVersions {
    /// No replica yet (they join through [`ReplicaVersions::update`]); exports
    /// `mesh_replica_versions_ready{replica}` (versions the replica last reported ready, -1
    /// while its catalog cannot be read) in `registry`.
    pub fn start(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let ready = IntGaugeVec::new(
            Opts::new(
                "mesh_replica_versions_ready",
                "Model versions the inference replica last reported ready; -1 while its \
                 catalog cannot be read",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(ready.clone()))?;
        Ok(Arc::new(Self {
            reports: RwLock::new(BTreeMap::new()),
            tasks: Default::default(),
            ready,
        }))
    }

    /// Starts polling the `joined` replicas (URL and channel each) and forgets those at `left`
    /// (their polls stop, their series go).
    pub fn update(self: &Arc<Self>, joined: Vec<(String, InternalChannel)>, left: &[String]) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut reports = self.reports.write().unwrap_or_else(|e| e.into_inner());
            for url in left {
                reports.remove(url);
            }
            for (url, _) in &joined {
                reports.entry(url.clone()).or_insert(Report::Pending);
            }
        }
        for url in left {
            if let Some(task) = tasks.remove(url) {
                task.abort();
            }
            let _ = self.ready.remove_label_values(&[url.as_str()]);
        }
        for (url, channel) in joined {
            if tasks.contains_key(&url) {
                continue;
            }
            let gauge = self.ready.with_label_values(&[url.as_str()]);
            gauge.set(-1);
            let task = tokio::spawn(poll(Arc::downgrade(self), url.clone(), channel, gauge));
            tasks.insert(url, task);
        }
    }

    fn reports(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Report>> {
        self.reports.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any replica has listed its versions (before that, nothing is known: route as
    /// asked).
    pub fn known(&self) -> bool {
        self.reports().values().any(|r| r.listed().is_some())
    }

    /// Whether some replica has `model` `version` ready.
    pub fn ready_anywhere(&self, model: &str, version: &str) -> bool {
        self.reports()
            .values()
            .filter_map(Report::listed)
            .any(|report| is_ready(report, model, version))
    }

    /// URLs of the replicas known not to have `model` `version` ready, if at least one has it;
    /// else none (then every replica may be tried). A replica that has never answered (one
    /// that just joined), or whose last read failed (down, restarting), counts as not having
    /// it: it takes such requests once its catalog lists the version ready. One that answered
    /// before and is only slow to answer now is not filtered out: a stale report could keep it out after it became ready, and one that
    /// cannot answer is judged by the health watch and outlier ejection instead.
    pub fn lacking(&self, model: &str, version: &str) -> Vec<String> {
        let reports = self.reports();
        let has = |report: &Report| match report {
            Report::Pending => false,
            Report::Unreadable => true,
            Report::Listed(versions) => is_ready(versions, model, version),
        };
        if !reports
            .values()
            .filter_map(Report::listed)
            .any(|r| is_ready(r, model, version))
        {
            return Vec::new();
        }
        reports
            .iter()
            .filter(|(_, report)| !has(report))
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// Every replica's URL and last listing (`None` while it has none), for the admin API.
    pub fn snapshot(&self) -> Vec<(String, Option<Vec<VersionState>>)> {
        self.reports()
            .iter()
            .map(|(url, report)| (url.clone(), report.listed().map(<[_]>::to_vec)))
            .collect()
    }

    /// Records a read of `url`'s catalog if it is still a member (a poll that raced its
    /// replica's leaving must not bring it back): `Ok(Some)` a listing, `Ok(None)` a read
    /// that timed out, `Err` a read that failed.
    fn record(&self, url: &str, read: Result<Option<Vec<VersionState>>, ()>) {
        let mut reports = self.reports.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = reports.get_mut(url) else {
            return;
        };
        *slot = match (read, &*slot) {
            (Ok(Some(versions)), _) => Report::Listed(versions),
            (Ok(None), Report::Pending) | (Err(()), _) => Report::Pending,
            (Ok(None), _) => Report::Unreadable,
        };
    }
}

fn is_ready(report: &[VersionState], model: &str, version: &str) -> bool {
    report
        .iter()
        .any(|v| v.model == model && v.version == version && v.state == State::Ready as i32)
}

/// Reads the catalog of the replica at `url` every [`POLL`] while `versions` lives (the task is
/// aborted when the replica leaves).
async fn poll(
    versions: std::sync::Weak<ReplicaVersions>,
    url: String,
    channel: InternalChannel,
    gauge: IntGauge,
) {
    let mut client = ModelCatalogClient::new(channel);
    loop {
        let mut request = tonic::Request::new(ListVersionsRequest {});
        request.set_timeout(POLL_TIMEOUT);
        // `grpc-timeout` bounds the server; this bounds the wait here (a hung peer, a slow link).
        let read = match tokio::time::timeout(POLL_TIMEOUT, client.list_versions(request)).await {
            Ok(Ok(response)) => Ok(Some(response.into_inner().versions)),
            // Down or restarting (no connection): it may come back without the versions it
            // listed.
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => Err(()),
            // Slow (a timeout, on either side): a stale listing is likelier right than none.
            Err(_) | Ok(Err(_)) => Ok(None),
        };
        gauge.set(match &read {
            Ok(Some(r)) => r.iter().filter(|v| v.state == State::Ready as i32).count() as i64,
            _ => -1,
        });
        let Some(versions) = versions.upgrade() else {
            return;
        };
        versions.record(&url, read);
        drop(versions);
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(versions: &[(&str, State)]) -> Report {
        Report::Listed(
            versions
                .iter()
                .map(|(version, state)| VersionState {
                    model: "churn".into(),
                    version: (*version).into(),
                    state: *state as i32,
                    ..Default::default()
                })
                .collect(),
        )
    }

    fn versions(reports: &[(&str, Report)]) -> ReplicaVersions {
        ReplicaVersions {
            reports: RwLock::new(
                reports
                    .iter()
                    .map(|(url, r)| ((*url).to_owned(), r.clone()))
                    .collect(),
            ),
            tasks: Default::default(),
            ready: IntGaugeVec::new(Opts::new("t", "t"), &["replica"]).expect("gauge"),
        }
    }

    /// A replica that just joined takes a version's requests only once its catalog lists it
    /// ready; one that answered before and is slow to answer now is left to health and ejection;
    /// when no replica has the version, none is filtered out.
    #[test]
    fn a_joined_replica_lacks_every_version_until_its_catalog_lists_it() {
        let set = versions(&[
            ("http://a", listed(&[("v1", State::Ready)])),
            ("http://b", Report::Pending),
            ("http://c", Report::Unreadable),
            ("http://d", listed(&[("v1", State::Loading)])),
        ]);
        assert_eq!(set.lacking("churn", "v1"), ["http://b", "http://d"]);
        assert!(set.lacking("churn", "v2").is_empty());
        assert!(set.known() && set.ready_anywhere("churn", "v1"));
        set.record("http://b", Ok(Some(vec![])));
        set.record("http://b", Ok(None));
        set.record("http://gone", Ok(Some(vec![])));
        assert_eq!(
            set.snapshot().len(),
            4,
            "a poll of a replica that left adds nothing"
        );
        assert_eq!(
            set.lacking("churn", "v1"),
            ["http://d"],
            "b answered once and timed out since: unreadable, left to ejection"
        );
        // A read that fails (the replica is down, restarting) makes it pending again: it may
        // come back still loading the versions it listed (mesh-chaos scenario 13).
        set.record("http://c", Err(()));
        assert_eq!(set.lacking("churn", "v1"), ["http://c", "http://d"]);
    }
}
