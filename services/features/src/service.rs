//! The `mesh.features.v1.Features` handlers.

use std::collections::HashSet;
use std::sync::Arc;

use mesh_proto::features::features_server::Features;
use mesh_proto::features::{
    EntityError, EntityFeatures, GetFeaturesRequest, GetFeaturesResponse, PutFeaturesRequest,
    PutFeaturesResponse,
};
use mesh_proto::types::FeatureTier;
use tonic::{Request, Response, Status};

use crate::error::FeaturesError;
use crate::store::{FeatureStore, LoadResult};
use crate::validate;

pub use crate::validate::{MAX_ENTITIES_PER_CALL, MAX_FEATURES_PER_ENTITY};

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

/// The answer's entities in request order, and the failed ones (each distinct id once). Stored
/// data problems are logged per entity; an outage once per call, not once per entity.
fn answer(ids: Vec<String>, results: Vec<LoadResult>) -> (Vec<EntityFeatures>, Vec<EntityError>) {
    let mut failed = Vec::new();
    let mut failed_ids = HashSet::new();
    let mut outage: Option<(FeaturesError, usize)> = None;
    let mut entities = Vec::with_capacity(ids.len());
    for (entity_id, result) in ids.into_iter().zip(results) {
        let checked = result.and_then(|s| validate::stored(&entity_id, &s.entity).map(|()| s));
        match checked {
            Ok(served) => entities.push(EntityFeatures {
                found: served.entity.found,
                features: served
                    .entity
                    .features
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                tier: served.tier as i32,
                entity_id,
            }),
            Err(error) => {
                if failed_ids.insert(entity_id.clone()) {
                    failed.push(error.for_entity(&entity_id));
                    match &error {
                        FeaturesError::StoredData(_) => error.log(),
                        _ => match &mut outage {
                            Some((_, n)) => *n += 1,
                            None => outage = Some((error, 1)),
                        },
                    }
                }
                entities.push(EntityFeatures {
                    entity_id,
                    found: false,
                    features: Default::default(),
                    tier: FeatureTier::Unspecified as i32,
                });
            }
        }
    }
    if let Some((error, n)) = outage {
        tracing::error!(%error, entities = n, "entities could not be served");
    }
    (entities, failed)
}

#[tonic::async_trait]
impl Features for FeaturesService {
    async fn get_features(
        &self,
        request: Request<GetFeaturesRequest>,
    ) -> Result<Response<GetFeaturesResponse>, Status> {
        let GetFeaturesRequest { entity_ids } = request.into_inner();
        validate::ids(entity_ids.iter().map(String::as_str), entity_ids.len())?;
        let results = self.store.get_many(&entity_ids).await?;
        let (entities, failed) = answer(entity_ids, results);
        Ok(Response::new(GetFeaturesResponse {
            entities,
            degraded: self.store.degraded(),
            failed,
        }))
    }

    async fn put_features(
        &self,
        request: Request<PutFeaturesRequest>,
    ) -> Result<Response<PutFeaturesResponse>, Status> {
        let PutFeaturesRequest { entities } = request.into_inner();
        validate::put(&entities)?;
        let written = self.store.put_many(&entities).await?;
        Ok(Response::new(PutFeaturesResponse {
            values_written: written as u32,
            entities_written: entities.len() as u32,
        }))
    }
}
