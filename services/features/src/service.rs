//! The `mesh.features.v1.Features` handlers.

use std::sync::Arc;

use mesh_proto::features::features_server::Features;
use mesh_proto::features::{
    EntityFeatures, GetFeaturesRequest, GetFeaturesResponse, PutFeaturesRequest,
    PutFeaturesResponse,
};
use mesh_proto::types::feature_value::Kind;
use tonic::{Request, Response, Status};

use crate::error::FeaturesError;
use crate::store::FeatureStore;

/// Most entities one call may ask for or write.
pub const MAX_ENTITIES_PER_CALL: usize = 1000;

/// The gRPC service over a [`FeatureStore`].
pub struct FeaturesService {
    store: Arc<FeatureStore>,
}

impl FeaturesService {
    /// A service over `store`.
    pub fn new(store: Arc<FeatureStore>) -> Self {
        Self { store }
    }
}

fn check_ids<'a>(ids: impl Iterator<Item = &'a str>, count: usize) -> Result<(), FeaturesError> {
    if count == 0 {
        return Err(FeaturesError::InvalidArgument("no entity ids given".into()));
    }
    if count > MAX_ENTITIES_PER_CALL {
        return Err(FeaturesError::InvalidArgument(format!(
            "{count} entities in one call; the limit is {MAX_ENTITIES_PER_CALL}"
        )));
    }
    for (i, id) in ids.enumerate() {
        if let Some(problem) = mesh_runtime::text::entity_id_problem(id) {
            return Err(FeaturesError::InvalidArgument(format!(
                "entity id #{i} {problem}"
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Features for FeaturesService {
    async fn get_features(
        &self,
        request: Request<GetFeaturesRequest>,
    ) -> Result<Response<GetFeaturesResponse>, Status> {
        let GetFeaturesRequest { entity_ids } = request.into_inner();
        check_ids(entity_ids.iter().map(String::as_str), entity_ids.len())?;
        let served = self.store.get_many(&entity_ids).await?;
        let entities = entity_ids
            .into_iter()
            .zip(served)
            .map(|(entity_id, s)| EntityFeatures {
                entity_id,
                found: s.entity.found,
                features: s
                    .entity
                    .features
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                tier: s.tier as i32,
            })
            .collect();
        Ok(Response::new(GetFeaturesResponse {
            entities,
            degraded: self.store.degraded(),
        }))
    }

    async fn put_features(
        &self,
        request: Request<PutFeaturesRequest>,
    ) -> Result<Response<PutFeaturesResponse>, Status> {
        let PutFeaturesRequest { entities } = request.into_inner();
        check_ids(
            entities.iter().map(|e| e.entity_id.as_str()),
            entities.len(),
        )?;
        for entity in &entities {
            for (name, value) in &entity.features {
                if name.trim().is_empty() {
                    return Err(FeaturesError::InvalidArgument(format!(
                        "entity {:?} has a feature with an empty name",
                        entity.entity_id
                    ))
                    .into());
                }
                let text = match &value.kind {
                    Some(Kind::Category(c)) => Some(c.as_str()),
                    _ => None,
                };
                if let Some(c) = [Some(name.as_str()), text]
                    .into_iter()
                    .flatten()
                    .find_map(mesh_runtime::text::control_character)
                {
                    return Err(FeaturesError::InvalidArgument(format!(
                        "entity {:?} feature {name:?} contains a control character ({c})",
                        entity.entity_id
                    ))
                    .into());
                }
                if let Some(Kind::Number(n)) = value.kind {
                    if !n.is_finite() {
                        return Err(FeaturesError::InvalidArgument(format!(
                            "entity {:?} feature {name:?} is not a finite number",
                            entity.entity_id
                        ))
                        .into());
                    }
                }
            }
        }
        let written = self.store.put_many(&entities).await?;
        Ok(Response::new(PutFeaturesResponse {
            values_written: written as u32,
            entities_written: entities.len() as u32,
        }))
    }
}
