//! The PostgreSQL tier, the source of truth: the batched read of a load, and the write path
//! (`PutFeatures`): in one transaction, bump each entity's version, upsert its values and read
//! it back whole; then write it through to Redis and make this instance's memory forget it (see
//! the module doc of [`super`]).

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

/// Bumps the versions of the entities in `$1` (sorted, so concurrent writers lock rows in the
/// same order), creating them at 1.
const BUMP_VERSIONS: &str = "INSERT INTO feature_entity_versions (entity_id, version)
     SELECT DISTINCT id, 1 FROM UNNEST($1::text[]) AS id ORDER BY id
     ON CONFLICT (entity_id) DO UPDATE SET version = feature_entity_versions.version + 1";

const UPSERT_VALUES: &str =
    "INSERT INTO feature_values (entity_id, name, number, category, updated_at)
     SELECT * , now() FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[])
     ON CONFLICT (entity_id, name) DO UPDATE
       SET number = EXCLUDED.number, category = EXCLUDED.category, updated_at = now()";

/// Whole entities with their versions (0 for an entity written before versions existed).
pub(super) const SELECT_ENTITIES: &str =
    "SELECT f.entity_id, COALESCE(v.version, 0), f.name, f.number, f.category
     FROM feature_values f LEFT JOIN feature_entity_versions v USING (entity_id)
     WHERE f.entity_id = ANY($1)";

/// Entities from rows of (entity_id, version, name, number, category), by id.
pub(super) fn entities_of(rows: Vec<tokio_postgres::Row>) -> HashMap<String, Entity> {
    let mut entities: HashMap<String, Entity> = HashMap::new();
    for row in rows {
        let id: String = row.get(0);
        let version: i64 = row.get(1);
        let name: String = row.get(2);
        let number: Option<f64> = row.get(3);
        let category: Option<String> = row.get(4);
        let kind = match (number, category) {
            (Some(n), _) => Kind::Number(n),
            (None, Some(c)) => Kind::Category(c),
            (None, None) => continue,
        };
        let entity = entities.entry(id).or_default();
        entity.found = true;
        entity.version = version;
        entity
            .features
            .insert(name, FeatureValue { kind: Some(kind) });
    }
    entities
}

fn unavailable(e: impl std::fmt::Display) -> FeaturesError {
    FeaturesError::Unavailable(e.to_string())
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
                .map_err(unavailable)?;
            let stmt = client
                .prepare_cached(SELECT_ENTITIES)
                .await
                .map_err(unavailable)?;
            let rows = client.query(&stmt, &[&ids]).await.map_err(unavailable)?;
            let mut entities = entities_of(rows);
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

    /// Upserts entities' features into PostgreSQL (a new version of each), writes them through
    /// to Redis, and makes this instance's memory forget them (a load in flight for one of them
    /// will not fill it with what it read before). Returns the number of values written.
    pub async fn put_many(&self, entities: &[EntityFeatures]) -> Result<usize, FeaturesError> {
        let rows = Rows::of(entities)?;
        let span = mesh_telemetry::propagation::store_span(
            "postgresql",
            "UPSERT feature_values",
            rows.ids.len(),
        );
        let ids: Vec<String> = entities.iter().map(|e| e.entity_id.clone()).collect();
        let committed = async {
            let mut client = mesh_runtime::postgres::connection(&self.db)
                .await
                .map_err(unavailable)?;
            let tx = client.transaction().await.map_err(unavailable)?;
            // Versions first: the row locks make a concurrent writer of the same entity wait
            // for this commit, so its read-back below sees these values.
            tx.execute(BUMP_VERSIONS, &[&ids])
                .await
                .map_err(unavailable)?;
            tx.execute(
                UPSERT_VALUES,
                &[&rows.ids, &rows.names, &rows.numbers, &rows.categories],
            )
            .await
            .map_err(unavailable)?;
            let read_back = tx
                .query(SELECT_ENTITIES, &[&ids])
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok::<_, FeaturesError>(entities_of(read_back))
        }
        .instrument(span)
        .await?;
        let committed: Vec<(String, Arc<Entity>)> = committed
            .into_iter()
            .map(|(id, entity)| (id, Arc::new(entity)))
            .collect();
        // Redis first, then memory: a load that starts after memory forgot the entity finds
        // the new version in Redis. (If the write-through failed, Redis may hold the old one
        // until the materialization that failure asked for.)
        self.write_through(&committed).await;
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.forget_locally(&ids);
        Ok(rows.ids.len())
    }
}
