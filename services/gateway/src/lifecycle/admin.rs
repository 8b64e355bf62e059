//! `mesh.admin.v1.ModelAdmin`: promote, roll back, roll out, shadow, and read the audit log.
//!
//! Every call needs an admin key (`MESH_ADMIN_KEYS`, sent as `x-admin-key`); with none
//! configured the API refuses everything. Changes go to the live registry in PostgreSQL as one
//! audited transaction each (the actor is the admin key's id), and reach every gateway and
//! inference replica through `LISTEN/NOTIFY` within a second or two.

use std::sync::Arc;

use mesh_proto::admin::model_admin_server::ModelAdmin;
use mesh_proto::admin::{
    AuditEntry, ChangeResponse, HistoryRequest, HistoryResponse, ListModelsRequest,
    ListModelsResponse, ModelStatus, PromoteRequest, ReplicaVersion, RollbackRequest,
    SetRolloutRequest, SetShadowRequest, ShadowReportRequest, ShadowReportResponse, StopRequest,
};
use mesh_registry::{AuditRecord, Change, Policy, RegistryStore, StoreError};
use tonic::{Request, Response, Status};

use super::routing::Router;
use super::shadow::Shadow;
use crate::auth::{constant_time_eq, ApiKey};

/// The metadata entry carrying the admin key.
pub use mesh_proto::admin_key::ADMIN_KEY_HEADER;

/// The admin service.
pub struct AdminService {
    keys: Arc<Vec<ApiKey>>,
    store: Option<RegistryStore>,
    router: Arc<Router>,
    shadow: Arc<Shadow>,
}

impl AdminService {
    /// Admin over `store` (none: read-only status), for holders of `keys`.
    pub fn new(
        keys: Vec<ApiKey>,
        store: Option<RegistryStore>,
        router: Arc<Router>,
        shadow: Arc<Shadow>,
    ) -> Self {
        Self {
            keys: Arc::new(keys),
            store,
            router,
            shadow,
        }
    }

    /// The id of the admin key `request` carries.
    fn authorize<T>(&self, request: &Request<T>) -> Result<String, Status> {
        if self.keys.is_empty() {
            return Err(Status::permission_denied(
                "the admin API is disabled: set MESH_ADMIN_KEYS on the gateway",
            ));
        }
        let presented = request
            .metadata()
            .get(ADMIN_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated(format!("missing admin key: send it as {ADMIN_KEY_HEADER}"))
            })?;
        let mut found = None;
        for key in self.keys.iter() {
            // Every key is compared, so timing does not tell which one matched.
            if constant_time_eq(presented.as_bytes(), key.secret.as_bytes()) {
                found = Some(key.id.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("invalid admin key"))
    }

    fn store(&self) -> Result<&RegistryStore, Status> {
        self.store.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "no live registry: set MESH_REGISTRY_DATABASE_URL on the gateway and inference",
            )
        })
    }

    /// `version` of `model` must exist on disk before any policy may name it.
    fn on_disk(&self, model: &str, version: &str) -> Result<(), Status> {
        if version.is_empty() {
            return Err(Status::invalid_argument("version is empty"));
        }
        self.router
            .version(model, version)
            .map(|_| ())
            .map_err(Status::from)
    }

    async fn change(
        &self,
        actor: String,
        model: &str,
        change: Change,
        reason: &str,
    ) -> Result<Response<ChangeResponse>, Status> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 1000 {
            return Err(Status::invalid_argument(
                "reason is required (at most 1000 bytes): it goes to the audit log",
            ));
        }
        let (policy, audit) = self
            .store()?
            .apply(model, change, &actor, reason, serde_json::json!({}))
            .await
            .map_err(store_status)?;
        tracing::info!(%actor, model, action = %audit.action, from = ?audit.from_version, to = ?audit.to_version, reason, "model policy changed");
        Ok(Response::new(ChangeResponse {
            model: Some(self.status(model, Some(&policy))),
            audit: Some(entry(audit)),
        }))
    }

    fn status(&self, model: &str, policy: Option<&Policy>) -> ModelStatus {
        let disk = self.router.disk();
        let versions = disk
            .models
            .get(model)
            .map(|m| m.versions.keys().cloned().collect())
            .unwrap_or_default();
        let mut status = ModelStatus {
            model: model.to_owned(),
            versions,
            ..Default::default()
        };
        match policy {
            Some(p) => {
                status.aliases = p.aliases.clone().into_iter().collect();
                status.previous_production = p.previous_production.clone().unwrap_or_default();
                if let Some(r) = &p.rollout {
                    status.rollout_candidate = r.candidate.clone();
                    status.rollout_percent = r.percent;
                    status.rollout_promote_after_secs = r.promote_after_secs.unwrap_or(0.0);
                    status.rollout_since_unix_micros = r.since_unix_micros;
                }
                status.shadow = p.shadow.clone().unwrap_or_default();
                status.generation = p.generation;
            }
            None => {
                if let Some(m) = disk.models.get(model) {
                    status
                        .aliases
                        .insert("production".into(), m.production.clone());
                }
            }
        }
        for (url, report) in self.router.ready().snapshot() {
            for v in report.into_iter().flatten().filter(|v| v.model == model) {
                status.replicas.push(ReplicaVersion {
                    replica: url.clone(),
                    version: v.version,
                    state: state_name(v.state).to_owned(),
                    reason: v.reason,
                });
            }
        }
        status
    }
}

fn state_name(state: i32) -> &'static str {
    use mesh_proto::catalog::version_state::State;
    match State::try_from(state).unwrap_or(State::Unspecified) {
        State::Loading => "LOADING",
        State::Ready => "READY",
        State::Failed => "FAILED",
        State::Unspecified => "UNKNOWN",
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::UnknownModel(model) => {
            Status::not_found(format!("no model {model:?} in the live registry"))
        }
        StoreError::Refused(why) => Status::failed_precondition(why),
        StoreError::Database(error) => {
            tracing::error!(%error, "model registry unavailable");
            Status::unavailable("the model registry's database is unavailable")
        }
    }
}

fn entry(r: AuditRecord) -> AuditEntry {
    AuditEntry {
        id: r.id,
        at_unix_micros: r.at_unix_micros,
        actor: r.actor,
        model: r.model,
        action: r.action,
        from_version: r.from_version.unwrap_or_default(),
        to_version: r.to_version.unwrap_or_default(),
        reason: r.reason,
        details: r.details,
    }
}

#[tonic::async_trait]
impl ModelAdmin for AdminService {
    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        self.authorize(&request)?;
        // The store is the truth; the followed copy can be a notification behind it.
        let state = match &self.store {
            Some(store) => Some(Arc::new(store.read().await.map_err(store_status)?)),
            None => self.router.state(),
        };
        let models = self
            .router
            .disk()
            .models
            .keys()
            .map(|m| self.status(m, state.as_ref().and_then(|s| s.policy(m))))
            .collect();
        Ok(Response::new(ListModelsResponse {
            models,
            live_registry: self.store.is_some(),
        }))
    }

    async fn promote(
        &self,
        request: Request<PromoteRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.on_disk(&r.model, &r.version)?;
        let alias = if r.alias.is_empty() {
            "production".to_owned()
        } else {
            r.alias
        };
        let change = Change::SetAlias {
            alias,
            version: r.version,
        };
        self.change(actor, &r.model, change, &r.reason).await
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.change(actor, &r.model, Change::Rollback, &r.reason)
            .await
    }

    async fn set_rollout(
        &self,
        request: Request<SetRolloutRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.on_disk(&r.model, &r.candidate)?;
        let change = Change::SetRollout {
            candidate: r.candidate,
            percent: r.percent,
            // 0 (the field's default) means none; a negative or NaN bake is refused by name.
            promote_after_secs: (r.promote_after_secs != 0.0).then_some(r.promote_after_secs),
        };
        self.change(actor, &r.model, change, &r.reason).await
    }

    async fn stop_rollout(
        &self,
        request: Request<StopRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.change(actor, &r.model, Change::StopRollout, &r.reason)
            .await
    }

    async fn set_shadow(
        &self,
        request: Request<SetShadowRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.on_disk(&r.model, &r.version)?;
        let change = Change::SetShadow { version: r.version };
        self.change(actor, &r.model, change, &r.reason).await
    }

    async fn stop_shadow(
        &self,
        request: Request<StopRequest>,
    ) -> Result<Response<ChangeResponse>, Status> {
        let actor = self.authorize(&request)?;
        let r = request.into_inner();
        self.change(actor, &r.model, Change::StopShadow, &r.reason)
            .await
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 50,
            n => i64::from(n.min(1000)),
        };
        let model = (!r.model.is_empty()).then_some(r.model.as_str());
        let entries = self
            .store()?
            .history(model, limit)
            .await
            .map_err(store_status)?
            .into_iter()
            .map(entry)
            .collect();
        Ok(Response::new(HistoryResponse { entries }))
    }

    async fn shadow_report(
        &self,
        request: Request<ShadowReportRequest>,
    ) -> Result<Response<ShadowReportResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let model = (!r.model.is_empty()).then_some(r.model.as_str());
        Ok(Response::new(ShadowReportResponse {
            shadows: self.shadow.report(model),
        }))
    }
}
