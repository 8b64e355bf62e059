//! The tiered feature store: memory → Redis → PostgreSQL (the source of truth).
//!
//! - Redis calls (module `redis_tier`) are bounded by a short timeout, and after a failure Redis is skipped for a
//!   cool-down, so a Redis outage costs at most one timeout rather than one per request.
//! - Concurrent misses for the same entity are coalesced: the first caller starts one load
//!   (on its own task, so it finishes even if that caller gives up) and every caller waits on
//!   its result.
//! - Entities loaded from PostgreSQL are written back to Redis on a separate task; the answer
//!   never waits for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use mesh_proto::features::EntityFeatures;
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::RedisSettings;
use crate::error::FeaturesError;
use crate::memory::FeatureCache;
use crate::metrics::FeatureMetrics;

mod redis_tier;

/// One entity's stored features.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entity {
    /// Whether the store knows the entity.
    pub found: bool,
    /// Features by name.
    pub features: BTreeMap<String, FeatureValue>,
}

/// An entity and the tier that served it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The entity.
    pub entity: Arc<Entity>,
    /// Where it came from.
    pub tier: FeatureTier,
}

type LoadResult = Result<Served, FeaturesError>;
type Slot = watch::Receiver<Option<LoadResult>>;

/// The store itself; cheap to share behind an `Arc`.
pub struct FeatureStore {
    redis_settings: RedisSettings,
    db_timeout: Duration,
    memory: FeatureCache,
    redis: Option<ConnectionManager>,
    redis_skip_until: Mutex<Option<Instant>>,
    db_failed_at: Mutex<Option<Instant>>,
    db: Pool,
    inflight: Mutex<HashMap<String, Slot>>,
    metrics: FeatureMetrics,
    loads: AtomicU64,
}

/// How long answers say PostgreSQL is unavailable after a failed read.
pub const DB_FAILURE_NOTE_FOR: Duration = Duration::from_secs(5);

/// Redis key of an entity's features (protobuf-encoded `EntityFeatures`).
pub fn redis_key(entity_id: &str) -> String {
    format!("mesh:features:v1:{entity_id}")
}

impl FeatureStore {
    /// A store over `memory`, `redis` (None disables the tier; `redis_settings` bound its
    /// calls) and `db` (each load bounded by `db_timeout`).
    pub fn new(
        redis_settings: RedisSettings,
        db_timeout: Duration,
        memory: FeatureCache,
        redis: Option<ConnectionManager>,
        db: Pool,
        metrics: FeatureMetrics,
    ) -> Self {
        Self {
            redis_settings,
            db_timeout,
            memory,
            redis,
            redis_skip_until: Mutex::new(None),
            db_failed_at: Mutex::new(None),
            db,
            inflight: Mutex::new(HashMap::new()),
            metrics,
            loads: AtomicU64::new(0),
        }
    }

    /// The tiers failing now, as notes for answers served meanwhile: Redis while it is being
    /// skipped after a failure, PostgreSQL for [`DB_FAILURE_NOTE_FOR`] after a failed read.
    pub fn degraded(&self) -> Vec<String> {
        let now = Instant::now();
        let mut notes = Vec::new();
        if self.redis.is_some()
            && matches!(self.redis_skip_until.lock().ok().and_then(|g| *g), Some(until) if now < until)
        {
            notes.push("features: redis unavailable; served from memory/PostgreSQL".to_owned());
        }
        if matches!(self.db_failed_at.lock().ok().and_then(|g| *g), Some(at) if now.duration_since(at) < DB_FAILURE_NOTE_FOR)
        {
            notes.push("features: PostgreSQL unavailable; served from cache".to_owned());
        }
        notes
    }

    /// Number of loads started below memory (for tests of coalescing).
    pub fn loads_started(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Features of `ids`, in order. Fails only when an entity is in no cache and PostgreSQL is
    /// unreachable.
    pub async fn get_many(self: &Arc<Self>, ids: &[String]) -> Result<Vec<Served>, FeaturesError> {
        let mut results: Vec<Option<Served>> = vec![None; ids.len()];
        let mut waits: Vec<(usize, Slot)> = Vec::new();
        let mut to_load: Vec<(String, watch::Sender<Option<LoadResult>>)> = Vec::new();
        {
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| FeaturesError::Internal("inflight lock poisoned".into()))?;
            for (i, id) in ids.iter().enumerate() {
                if let Some(entity) = self.memory.get(id) {
                    self.metrics.hit(FeatureTier::Memory);
                    results[i] = Some(Served {
                        entity,
                        tier: FeatureTier::Memory,
                    });
                    continue;
                }
                if let Some(slot) = inflight.get(id) {
                    self.metrics.coalesced.inc();
                    waits.push((i, slot.clone()));
                    continue;
                }
                if let Some((_, pending)) = to_load.iter().find(|(pid, _)| pid == id) {
                    waits.push((i, pending.subscribe()));
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(id.clone(), rx.clone());
                waits.push((i, rx));
                to_load.push((id.clone(), tx));
            }
        }
        if !to_load.is_empty() {
            self.loads.fetch_add(1, Ordering::Relaxed);
            let store = self.clone();
            // Own task: the load completes (and fills the caches) even if this caller's
            // deadline cancels it, and coalesced callers are not left waiting.
            tokio::spawn(
                async move { store.load(to_load).await }.instrument(tracing::Span::current()),
            );
        }
        for (i, mut slot) in waits {
            let value = slot
                .wait_for(|v| v.is_some())
                .await
                .map_err(|_| FeaturesError::Unavailable("load abandoned".into()))?
                .clone();
            match value {
                Some(Ok(served)) => results[i] = Some(served),
                Some(Err(e)) => return Err(e),
                None => return Err(FeaturesError::Unavailable("load abandoned".into())),
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Loads `pending` from Redis, then PostgreSQL, publishing each result to its waiters.
    async fn load(self: Arc<Self>, pending: Vec<(String, watch::Sender<Option<LoadResult>>)>) {
        let ids: Vec<String> = pending.iter().map(|(id, _)| id.clone()).collect();
        let mut found: HashMap<String, Served> = self.read_redis(&ids).await;
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        let mut db_error = None;
        if !missing.is_empty() {
            match tokio::time::timeout(self.db_timeout, self.read_db(&missing)).await {
                Ok(Ok(loaded)) => {
                    if let Ok(mut g) = self.db_failed_at.lock() {
                        *g = None;
                    }
                    self.write_back(&loaded);
                    for (id, entity) in loaded {
                        found.insert(
                            id,
                            Served {
                                entity,
                                tier: FeatureTier::Database,
                            },
                        );
                    }
                }
                Ok(Err(e)) => db_error = Some(e),
                Err(_) => {
                    db_error = Some(FeaturesError::Unavailable(format!(
                        "PostgreSQL did not answer within {:?}",
                        self.db_timeout
                    )))
                }
            }
        }
        if db_error.is_some() {
            if let Ok(mut g) = self.db_failed_at.lock() {
                *g = Some(Instant::now());
            }
        }
        let mut inflight = self.inflight.lock().ok();
        for (id, tx) in pending {
            let result = match found.remove(&id) {
                Some(served) => {
                    self.metrics.hit(served.tier);
                    self.memory.put(&id, served.entity.clone());
                    Ok(served)
                }
                None => Err(db_error
                    .clone()
                    .unwrap_or_else(|| FeaturesError::Unavailable("entity not loaded".into()))),
            };
            if let Some(map) = inflight.as_mut() {
                map.remove(&id);
            }
            let _ = tx.send(Some(result));
        }
    }

    async fn read_db(&self, ids: &[String]) -> Result<Vec<(String, Arc<Entity>)>, FeaturesError> {
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

    /// Upserts entities' features into PostgreSQL and drops them from both caches.
    pub async fn put_many(&self, entities: &[EntityFeatures]) -> Result<usize, FeaturesError> {
        let mut ids = Vec::new();
        let mut names = Vec::new();
        let mut numbers: Vec<Option<f64>> = Vec::new();
        let mut categories: Vec<Option<String>> = Vec::new();
        for entity in entities {
            for (name, value) in &entity.features {
                ids.push(entity.entity_id.clone());
                names.push(name.clone());
                match &value.kind {
                    Some(Kind::Number(n)) => {
                        numbers.push(Some(*n));
                        categories.push(None);
                    }
                    Some(Kind::Category(c)) => {
                        numbers.push(None);
                        categories.push(Some(c.clone()));
                    }
                    None => {
                        return Err(FeaturesError::InvalidArgument(format!(
                            "entity {:?} feature {name:?} has no value",
                            entity.entity_id
                        )))
                    }
                }
            }
        }
        let span = mesh_telemetry::propagation::store_span(
            "postgresql",
            "UPSERT feature_values",
            ids.len(),
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
                    &[&ids, &names, &numbers, &categories],
                )
                .await
                .map_err(|e| FeaturesError::Unavailable(e.to_string()))
        }
        .instrument(span)
        .await?;
        for entity in entities {
            self.memory.invalidate(&entity.entity_id);
        }
        if let Some(mut redis) = self.redis_usable() {
            let keys: Vec<String> = entities.iter().map(|e| redis_key(&e.entity_id)).collect();
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&keys);
            let del = cmd.query_async::<i64>(&mut redis);
            // A stale Redis entry would expire with its TTL; the write itself succeeded.
            match tokio::time::timeout(self.redis_settings.timeout * 4, del).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.redis_failed(&e.to_string()),
                Err(_) => self.redis_failed("timeout"),
            }
        }
        Ok(ids.len())
    }
}
