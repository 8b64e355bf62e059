//! Which versions each inference replica has ready, from its `mesh.catalog.v1.ModelCatalog`,
//! polled every half second. Routing uses it to send a request only to a version some replica
//! has ready, and the balancer to send it only to replicas that have it.

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

/// What one replica reported last: every version with its state; `None` until it answered.
type Report = Option<Vec<VersionState>>;

/// Every replica's last report, by replica index.
pub struct ReplicaVersions {
    reports: RwLock<Vec<Report>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    ready: IntGaugeVec,
}

impl Drop for ReplicaVersions {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl ReplicaVersions {
    /// Polls each replica at `channels` (URL and channel each); exports
    /// `mesh_replica_versions_ready{replica}` (versions the replica last reported ready, -1
    /// while its catalog cannot be read) in `registry`.
    pub fn start(
        channels: &[(String, InternalChannel)],
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let ready = IntGaugeVec::new(
            Opts::new(
                "mesh_replica_versions_ready",
                "Model versions the inference replica last reported ready; -1 while its \
                 catalog cannot be read",
            ),
            &["replica"],
        )?;
        registry.register(Box::new(ready.clone()))?;
        for (url, _) in channels {
            ready.with_label_values(&[url.as_str()]).set(-1);
        }
        let versions = Arc::new(Self {
            reports: RwLock::new(vec![None; channels.len()]),
            tasks: Default::default(),
            ready,
        });
        let tasks = channels
            .iter()
            .enumerate()
            .map(|(i, (url, channel))| {
                let gauge = versions.ready.with_label_values(&[url.as_str()]);
                tokio::spawn(poll(Arc::downgrade(&versions), i, channel.clone(), gauge))
            })
            .collect();
        *versions.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        Ok(versions)
    }

    fn reports(&self) -> std::sync::RwLockReadGuard<'_, Vec<Report>> {
        self.reports.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any replica has answered at all (before that, nothing is known: route as asked).
    pub fn known(&self) -> bool {
        self.reports().iter().any(Option::is_some)
    }

    /// Whether some replica has `model` `version` ready.
    pub fn ready_anywhere(&self, model: &str, version: &str) -> bool {
        self.reports()
            .iter()
            .flatten()
            .any(|report| is_ready(report, model, version))
    }

    /// Replicas not known to have `model` `version` ready (its catalog says otherwise, or could
    /// not be read since it last failed: a restarted replica may still be loading), if at least
    /// one is known to have it; else none (then every replica may be tried).
    pub fn lacking(&self, model: &str, version: &str) -> Vec<usize> {
        let reports = self.reports();
        let (has, lacks): (Vec<usize>, Vec<usize>) = (0..reports.len()).partition(|&i| {
            reports[i]
                .as_ref()
                .is_some_and(|r| is_ready(r, model, version))
        });
        if has.is_empty() {
            Vec::new()
        } else {
            lacks
        }
    }

    /// Every replica's last report, for the admin API.
    pub fn snapshot(&self) -> Vec<Report> {
        self.reports().clone()
    }
}

fn is_ready(report: &[VersionState], model: &str, version: &str) -> bool {
    report
        .iter()
        .any(|v| v.model == model && v.version == version && v.state == State::Ready as i32)
}

/// Reads replica `index`'s catalog every [`POLL`] while `versions` lives. A replica whose
/// catalog cannot be read counts as unknown at once rather than keeping a stale report (which
/// could keep it out after it became ready, or in after it restarted without a version): an
/// unknown replica takes a version's requests only when no replica is known to have it ready,
/// and one that cannot answer is judged by the health watch and outlier ejection.
async fn poll(
    versions: std::sync::Weak<ReplicaVersions>,
    index: usize,
    channel: InternalChannel,
    gauge: IntGauge,
) {
    let mut client = ModelCatalogClient::new(channel);
    loop {
        let mut request = tonic::Request::new(ListVersionsRequest {});
        request.set_timeout(POLL_TIMEOUT);
        // `grpc-timeout` bounds the server; this bounds the wait here (a hung peer, a slow link).
        let report = tokio::time::timeout(POLL_TIMEOUT, client.list_versions(request))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|response| response.into_inner().versions);
        gauge.set(report.as_ref().map_or(-1, |r| {
            r.iter().filter(|v| v.state == State::Ready as i32).count() as i64
        }));
        let Some(versions) = versions.upgrade() else {
            return;
        };
        versions.reports.write().unwrap_or_else(|e| e.into_inner())[index] = report;
        drop(versions);
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(reports: Vec<Report>) -> ReplicaVersions {
        ReplicaVersions {
            reports: RwLock::new(reports),
            tasks: Default::default(),
            ready: IntGaugeVec::new(Opts::new("ready", "test"), &["replica"]).expect("gauge"),
        }
    }

    fn report(version: &str, state: State) -> Report {
        Some(vec![VersionState {
            model: "churn".into(),
            version: version.into(),
            state: state as i32,
            ..Default::default()
        }])
    }

    #[test]
    fn a_replica_not_known_to_have_a_version_ready_is_skipped_while_another_has_it() {
        // Restarted, its catalog not read yet (it may still be loading): the other one serves.
        let restarted = versions(vec![None, report("3", State::Ready)]);
        assert_eq!(restarted.lacking("churn", "3"), vec![0]);
        let loading = versions(vec![report("3", State::Loading), report("3", State::Ready)]);
        assert_eq!(loading.lacking("churn", "3"), vec![0]);
        // Nobody known to have it: every replica may be tried (and answers honestly).
        let nobody = versions(vec![None, report("1", State::Ready)]);
        assert_eq!(nobody.lacking("churn", "3"), Vec::<usize>::new());
        let unknown = versions(vec![None, None]);
        assert_eq!(unknown.lacking("churn", "3"), Vec::<usize>::new());
    }
}
