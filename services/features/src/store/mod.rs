//! The tiered feature store: memory → Redis → PostgreSQL (the source of truth).
//!
//! - Redis calls (module `redis_tier`) are bounded by a short timeout, and after a failure Redis
//!   is skipped for a cool-down, so a Redis outage costs at most one timeout rather than one per
//!   request. Not while PostgreSQL is failing too: then Redis is the only source left, and
//!   skipping it after one slow answer would fail entities it holds.
//! - Concurrent misses for the same entity are coalesced: the first caller starts one load
//!   (on its own task, so it finishes even if that caller gives up) and every caller waits on
//!   its result.
//! - Each entity of a call is answered on its own: one that cannot be loaded (PostgreSQL down
//!   and no cache has it) is an error for that entity only.
//! - Redis is the materialized online store (as in Feast): every `PutFeatures` is written through
//!   (the whole entity as committed), every entity in PostgreSQL is copied in at start, on
//!   `SIGHUP`, every `MESH_MATERIALIZE_INTERVAL_MS`, and whenever Redis lost them (module
//!   `materialize`), and entries do not expire (`MESH_REDIS_TTL_MS` = 0). So a PostgreSQL
//!   outage costs nothing for entities that exist. Entities loaded from PostgreSQL are also
//!   written back to Redis on a separate task; the answer never waits for it.
//! - Redis is one server or the master named by Sentinels (module `redis_link`).
//!
//! # A load racing a write
//!
//! A load reads Redis, then PostgreSQL, then fills the caches. A `PutFeatures` for the same
//! entity in between must not be undone by that fill (a cache would serve the old values).
//! Two rules keep it from happening:
//!
//! - **Memory (this instance).** A load *owns* each entity it registered in the in-flight map
//!   (under its load number) and fills memory only for the entities it still owns when it
//!   finishes; that check and the fill happen under the in-flight lock. A write, once
//!   PostgreSQL has committed it, takes the entities away from any load in flight (removes their
//!   in-flight entries) and drops them from memory, under the same lock. So a load either filled
//!   before the write dropped the entry, or sees that it lost the entity and does not fill. Later
//!   callers start a fresh load instead of joining the stale one.
//! - **Redis (all instances).** Every entity has a version in PostgreSQL
//!   (`feature_entity_versions`), incremented by each write in the write's transaction; the
//!   row lock orders concurrent writers, so versions follow commit order. Every value written to
//!   Redis carries the version it was read at (`mesh:features-version:v1:<id>`), and a script
//!   sets it only if that version is newer than the one Redis holds. A load that read version 5
//!   cannot overwrite the write-through of version 6, whichever instance made either, and a
//!   write-through cannot be overwritten by an older one that arrives late.
//!
//! Refused fills are counted in `mesh_feature_stale_fills_skipped_total{tier}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use mesh_proto::types::{FeatureTier, FeatureValue};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::config::RedisSettings;
use crate::error::FeaturesError;
use crate::memory::FeatureCache;
use crate::metrics::FeatureMetrics;

pub mod materialize;
mod postgres_tier;
pub mod redis_link;
mod redis_tier;

pub use materialize::{MaterializeReport, MaterializerGuard, MATERIALIZED_KEY};
pub use redis_link::RedisLink;

/// One entity's stored features.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entity {
    /// Whether the store knows the entity.
    pub found: bool,
    /// Features by name.
    pub features: BTreeMap<String, FeatureValue>,
    /// Its version in PostgreSQL when read from there (0 when read from Redis or unknown).
    pub version: i64,
}

/// An entity and the tier that served it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The entity.
    pub entity: Arc<Entity>,
    /// Where it came from.
    pub tier: FeatureTier,
}

/// One entity's answer: served, or why not.
pub type LoadResult = Result<Served, FeaturesError>;
type Slot = watch::Receiver<Option<LoadResult>>;
type Pending = Vec<(String, watch::Sender<Option<LoadResult>>)>;
/// Per requested id: the answer memory gave, or (by index) the slot to wait on.
type Started = (Vec<Option<LoadResult>>, Vec<(usize, Slot)>);

/// Awaited by every load after it has read Redis and PostgreSQL and before it fills the caches.
/// Tests use it to hold a load exactly where a concurrent `PutFeatures` makes it stale.
pub type LoadHook = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A load in flight for an entity: which load (its number) and where its result will appear.
struct InFlight {
    load: u64,
    slot: Slot,
}

/// The store itself; cheap to share behind an `Arc`.
pub struct FeatureStore {
    redis_settings: RedisSettings,
    db_timeout: Duration,
    memory: FeatureCache,
    redis: Option<RedisLink>,
    materialize_wanted: Arc<tokio::sync::Notify>,
    redis_skip_until: Mutex<Option<Instant>>,
    db_failed_at: Mutex<Option<Instant>>,
    db: Pool,
    inflight: Mutex<HashMap<String, InFlight>>,
    metrics: FeatureMetrics,
    loads: AtomicU64,
    next_load: AtomicU64,
    load_hook: Option<LoadHook>,
}

/// How long answers say PostgreSQL is unavailable after a failed read.
pub const DB_FAILURE_NOTE_FOR: Duration = Duration::from_secs(5);

/// Redis key of an entity's features (protobuf-encoded `EntityFeatures`).
pub fn redis_key(entity_id: &str) -> String {
    format!("mesh:features:v1:{entity_id}")
}

/// Redis key of the PostgreSQL version of the entity held under [`redis_key`] (see the module
/// doc). A different prefix from [`redis_key`], so no entity id can make the two collide.
pub fn redis_version_key(entity_id: &str) -> String {
    format!("mesh:features-version:v1:{entity_id}")
}

impl FeatureStore {
    /// A store over `memory`, `redis` (None disables the tier; `redis_settings` bound its
    /// calls) and `db` (each load bounded by `db_timeout`).
    pub fn new(
        redis_settings: RedisSettings,
        db_timeout: Duration,
        memory: FeatureCache,
        redis: Option<RedisLink>,
        db: Pool,
        metrics: FeatureMetrics,
    ) -> Self {
        Self {
            redis_settings,
            db_timeout,
            memory,
            redis,
            materialize_wanted: Arc::new(tokio::sync::Notify::new()),
            redis_skip_until: Mutex::new(None),
            db_failed_at: Mutex::new(None),
            db,
            inflight: Mutex::new(HashMap::new()),
            metrics,
            loads: AtomicU64::new(0),
            next_load: AtomicU64::new(0),
            load_hook: None,
        }
    }

    /// This store with `hook` awaited by every load between reading and filling the caches.
    pub fn with_load_hook(mut self, hook: LoadHook) -> Self {
        self.load_hook = Some(hook);
        self
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
        if self.db_failing() {
            notes.push("features: PostgreSQL unavailable; served from cache".to_owned());
        }
        notes
    }

    /// Number of loads started below memory (for tests of coalescing).
    pub fn loads_started(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The memory tier (for tests and sizing).
    pub fn memory(&self) -> &FeatureCache {
        &self.memory
    }

    /// Features of `ids`, in order, each entity served or failed on its own: an entity fails
    /// only when it is in no cache and PostgreSQL is unreachable. The call itself fails only on
    /// a bug.
    pub async fn get_many(
        self: &Arc<Self>,
        ids: &[String],
    ) -> Result<Vec<LoadResult>, FeaturesError> {
        let (mut results, waits) = self.start_loads(ids)?;
        let abandoned = || FeaturesError::Unavailable("load abandoned".into());
        for (i, mut slot) in waits {
            let value = match slot.wait_for(|v| v.is_some()).await {
                Ok(value) => value.clone().unwrap_or_else(|| Err(abandoned())),
                Err(_) => Err(abandoned()),
            };
            results[i] = Some(value);
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(FeaturesError::Internal("entity not looked up".into())))
            })
            .collect())
    }

    /// Answers what memory has, joins loads in flight, and starts one load for the rest.
    fn start_loads(self: &Arc<Self>, ids: &[String]) -> Result<Started, FeaturesError> {
        let mut results: Vec<Option<LoadResult>> = vec![None; ids.len()];
        let mut waits: Vec<(usize, Slot)> = Vec::new();
        let mut to_load: Pending = Vec::new();
        // Unique per load: a write takes entities away from exactly the loads in flight.
        let load = self.next_load.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut inflight = self
                .inflight
                .lock()
                .map_err(|_| FeaturesError::Internal("inflight lock poisoned".into()))?;
            for (i, id) in ids.iter().enumerate() {
                if let Some(entity) = self.memory.get(id) {
                    self.metrics.hit(FeatureTier::Memory);
                    results[i] = Some(Ok(Served {
                        entity,
                        tier: FeatureTier::Memory,
                    }));
                    continue;
                }
                if let Some(pending) = inflight.get(id) {
                    if pending.load != load {
                        self.metrics.coalesced.inc();
                    }
                    waits.push((i, pending.slot.clone()));
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(
                    id.clone(),
                    InFlight {
                        load,
                        slot: rx.clone(),
                    },
                );
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
                async move { store.load(load, to_load).await }.instrument(tracing::Span::current()),
            );
        }
        Ok((results, waits))
    }

    /// Load number `load`: `pending` from Redis, then PostgreSQL; fills the caches for the
    /// entities it still owns and publishes each result to its waiters.
    async fn load(self: Arc<Self>, load: u64, pending: Pending) {
        let ids: Vec<String> = pending.iter().map(|(id, _)| id.clone()).collect();
        let mut found = self.read_redis(&ids).await;
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        let mut loaded = Vec::new();
        let mut db_error = None;
        if !missing.is_empty() {
            match self.read_db_bounded(&missing).await {
                Ok(entities) => loaded = entities,
                Err(e) => db_error = Some(e),
            }
        }
        // PostgreSQL failed: Redis is the last source left. Ask it (again) for what it did not
        // give, in case it was skipped in its cool-down or one slow answer timed out
        // (`redis_usable` does not skip it, and reads wait longer, while PostgreSQL fails).
        if db_error.is_some() && self.redis.is_some() {
            found.extend(self.read_redis(&missing).await);
        }
        if let Some(hook) = &self.load_hook {
            hook().await;
        }
        for (id, entity) in &loaded {
            let served = Served {
                entity: entity.clone(),
                tier: FeatureTier::Database,
            };
            found.insert(id.clone(), served);
        }
        let owned = self.settle(load, &ids, &found);
        loaded.retain(|(id, _)| owned.contains(id));
        self.write_back(loaded);
        for (id, tx) in pending {
            let result = match found.remove(&id) {
                Some(served) => {
                    self.metrics.hit(served.tier);
                    Ok(served)
                }
                None => Err(db_error
                    .clone()
                    .unwrap_or_else(|| FeaturesError::Unavailable("entity not loaded".into()))),
            };
            let _ = tx.send(Some(result));
        }
    }

    /// Ends load `load` for `ids`: fills memory with what it found for each entity it still
    /// owns (a write may have taken it away, see the module doc) and returns those ids.
    fn settle(
        &self,
        load: u64,
        ids: &[String],
        found: &HashMap<String, Served>,
    ) -> HashSet<String> {
        let mut owned = HashSet::new();
        let Ok(mut inflight) = self.inflight.lock() else {
            return owned;
        };
        for id in ids {
            let lost = inflight.get(id).is_none_or(|f| f.load != load);
            if lost {
                if found.contains_key(id) {
                    self.metrics.stale_skipped("memory", 1);
                }
                continue;
            }
            inflight.remove(id);
            if let Some(served) = found.get(id) {
                self.memory.put(id, served.entity.clone());
            }
            owned.insert(id.clone());
        }
        owned
    }

    /// After a write to PostgreSQL: takes `ids` away from the loads in flight and drops them
    /// from memory, together, under the in-flight lock (see the module doc).
    fn forget_locally(&self, ids: &[&str]) {
        match self.inflight.lock() {
            Ok(mut inflight) => {
                for id in ids {
                    inflight.remove(*id);
                    self.memory.invalidate(id);
                }
            }
            Err(_) => {
                for id in ids {
                    self.memory.invalidate(id);
                }
            }
        }
    }

    /// Whether a PostgreSQL read failed within [`DB_FAILURE_NOTE_FOR`].
    pub(super) fn db_failing(&self) -> bool {
        matches!(self.db_failed_at.lock().ok().and_then(|g| *g), Some(at) if at.elapsed() < DB_FAILURE_NOTE_FOR)
    }

    /// PostgreSQL read of `ids`, bounded by the database timeout; remembers a failure for the
    /// `degraded` note.
    async fn read_db_bounded(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Arc<Entity>)>, FeaturesError> {
        let result = match tokio::time::timeout(self.db_timeout, self.read_db(ids)).await {
            Ok(result) => result,
            Err(_) => Err(FeaturesError::Unavailable(format!(
                "PostgreSQL did not answer within {:?}",
                self.db_timeout
            ))),
        };
        if let Ok(mut failed_at) = self.db_failed_at.lock() {
            *failed_at = result.is_err().then(Instant::now);
        }
        result
    }
}
