//! The PostgreSQL tier, the source of truth: the batched read of a load, and the write path
//! (`PutFeatures`): upsert, then make both caches forget the entities in the order the module
//! doc of [`super`] explains (Redis version tokens first, then this instance's memory).

use std::collections::HashMap;
use std::sync::Arc;

use mesh_proto::features::EntityFeatures;
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use tracing::Instrument as _;

use super::{Entity, FeatureStore};
use crate::error::FeaturesError;

/// The columns of one upsert: one element per (entity, feature).
#[derive(Default)]
struct Rows {
    ids: Vec<String>,
    names: Vec<String>,
    numbers: Vec<Option<f64>>,
    categories: Vec<Option<String>>,
}

impl Rows {
    fn of(entities: &[EntityFeatures]) -> Result<Self, FeaturesError> {
        let mut rows = Rows::default();
        for entity in entities {
            for (name, value) in &entity.features {
                let (number, category) = match &value.kind {
                    Some(Kind::Number(n)) => (Some(*n), None),
                    Some(Kind::Category(c)) => (None, Some(c.clone())),
                    None => {
                        return Err(FeaturesError::InvalidArgument(format!(
                            "entity {:?} feature {name:?} has no value",
                            entity.entity_id
                        )))
                    }
                };
                rows.ids.push(entity.entity_id.clone());
                rows.names.push(name.clone());
                rows.numbers.push(number);
                rows.categories.push(category);
            }
        }
        Ok(rows)
    }
}

impl FeatureStore {
    pub(super) async fn read_db(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Arc<Entity>)>, FeaturesError> {
        let span = mesh_telemetry::propagation::store_span(
            "postgresql",
            "SELECT feature_values",
            ids.len(),
        );
        async {
            let client = mesh_runtime::postgres::connection(&self.db)
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))?;
            let stmt = client
                .prepare_cached(
                    "SELECT entity_id, name, number, category FROM feature_values WHERE entity_id = ANY($1)",
                )
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))?;
            let rows = client
                .query(&stmt, &[&ids])
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))?;
            let mut entities: HashMap<String, Entity> = HashMap::new();
            for row in rows {
                let id: String = row.get(0);
                let name: String = row.get(1);
                let number: Option<f64> = row.get(2);
                let category: Option<String> = row.get(3);
                let kind = match (number, category) {
                    (Some(n), _) => Kind::Number(n),
                    (None, Some(c)) => Kind::Category(c),
                    (None, None) => continue,
                };
                let entity = entities.entry(id).or_default();
                entity.found = true;
                entity
                    .features
                    .insert(name, FeatureValue { kind: Some(kind) });
            }
            Ok(ids
                .iter()
                .map(|id| {
                    let entity = entities.remove(id).unwrap_or_default();
                    (id.clone(), Arc::new(entity))
                })
                .collect())
        }
        .instrument(span)
        .await
    }

    /// Upserts entities' features into PostgreSQL, then makes both caches forget them (a load
    /// in flight for one of them will not fill a cache with what it read before). Returns the
    /// number of values written.
    pub async fn put_many(&self, entities: &[EntityFeatures]) -> Result<usize, FeaturesError> {
        let rows = Rows::of(entities)?;
        let span = mesh_telemetry::propagation::store_span(
            "postgresql",
            "UPSERT feature_values",
            rows.ids.len(),
        );
        async {
            let client = mesh_runtime::postgres::connection(&self.db)
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))?;
            client
                .execute(
                    "INSERT INTO feature_values (entity_id, name, number, category, updated_at)
                     SELECT * , now() FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[])
                     ON CONFLICT (entity_id, name) DO UPDATE
                       SET number = EXCLUDED.number, category = EXCLUDED.category, updated_at = now()",
                    &[&rows.ids, &rows.names, &rows.numbers, &rows.categories],
                )
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))
        }
        .instrument(span)
        .await?;
        let ids: Vec<&str> = entities.iter().map(|e| e.entity_id.as_str()).collect();
        // Redis first, then memory: a load that starts after memory forgot the entity finds
        // Redis already forgotten (and its token replaced), so it cannot bring the old values
        // back from Redis either.
        self.forget_in_redis(&ids).await;
        self.forget_locally(&ids);
        Ok(rows.ids.len())
    }
}
