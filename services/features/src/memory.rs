//! The in-process TTL cache: the first tier, answering in well under a microsecond.
//!
//! Two bounded caches (moka, TinyLFU admission with LRU eviction) rather than one:
//!
//! - **known entities**, up to `MESH_CACHE_CAPACITY`;
//! - **known-absent ids**, up to `MESH_CACHE_NEGATIVE_CAPACITY`, a separate and smaller budget.
//!
//! Why two: entity ids arrive from the public gateway, so anyone can send random ones. Each is
//! absent, and remembering that it is absent is worth something (it spares PostgreSQL a
//! repeated miss), but if absent ids shared a budget with real entities a flood of them would
//! push the real ones out and send their traffic to Redis and PostgreSQL. With their own budget
//! they can only evict each other. TinyLFU admission also keeps a one-off id from displacing a
//! frequently read entity inside each budget.
//!
//! Expiry is checked against the time each entry was stored (tokio's clock, so tests can pause
//! it); moka's own time-to-live reclaims the memory of expired entries.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use crate::store::Entity;

/// Entities by id with an expiry; bounded in size, known-absent ids bounded separately.
pub struct FeatureCache {
    ttl: Duration,
    known: Cache<String, (Arc<Entity>, Instant)>,
    absent: Cache<String, Instant>,
}

impl FeatureCache {
    /// A cache keeping entries for `ttl`: at most `capacity` known entities and, separately,
    /// at most `negative_capacity` ids known to be absent.
    pub fn new(ttl: Duration, capacity: usize, negative_capacity: usize) -> Self {
        Self {
            ttl,
            known: bounded(ttl, capacity),
            absent: bounded(ttl, negative_capacity),
        }
    }

    /// The entity (or the fact that it is absent), if cached and fresh.
    pub fn get(&self, id: &str) -> Option<Arc<Entity>> {
        if let Some((entity, stored)) = self.known.get(id) {
            return (stored.elapsed() < self.ttl).then_some(entity);
        }
        let stored = self.absent.get(id)?;
        (stored.elapsed() < self.ttl).then(|| Arc::new(Entity::default()))
    }

    /// Stores `entity` under `id`: in the known cache if the store knows it, else in the
    /// absent-ids cache.
    pub fn put(&self, id: &str, entity: Arc<Entity>) {
        if self.ttl.is_zero() {
            return;
        }
        if entity.found {
            self.absent.invalidate(id);
            self.known.insert(id.to_owned(), (entity, Instant::now()));
        } else {
            self.known.invalidate(id);
            self.absent.insert(id.to_owned(), Instant::now());
        }
    }

    /// Forgets `id` (after a write).
    pub fn invalidate(&self, id: &str) {
        self.known.invalidate(id);
        self.absent.invalidate(id);
    }

    /// Runs moka's pending evictions now (tests: sizes are exact afterwards).
    pub fn run_pending_tasks(&self) {
        self.known.run_pending_tasks();
        self.absent.run_pending_tasks();
    }

    /// Entries held: (known entities, absent ids); approximate until
    /// [`FeatureCache::run_pending_tasks`].
    pub fn sizes(&self) -> (u64, u64) {
        (self.known.entry_count(), self.absent.entry_count())
    }
}

/// A moka cache of at most `capacity` entries that reclaims them after `ttl`.
fn bounded<V: Clone + Send + Sync + 'static>(ttl: Duration, capacity: usize) -> Cache<String, V> {
    let builder = Cache::builder().max_capacity(capacity as u64);
    // A zero TTL caches nothing anyway (`put` returns early), and moka wants a positive one.
    if ttl.is_zero() {
        builder.build()
    } else {
        builder.time_to_live(ttl).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Arc<Entity> {
        Arc::new(Entity {
            found: true,
            ..Entity::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let cache = FeatureCache::new(Duration::from_millis(100), 10, 10);
        cache.put("a", known());
        cache.put("gone", Arc::new(Entity::default()));
        assert!(cache.get("a").is_some());
        assert!(cache.get("gone").is_some_and(|e| !e.found));
        tokio::time::advance(Duration::from_millis(101)).await;
        assert!(cache.get("a").is_none());
        assert!(cache.get("gone").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_makes_room() {
        let cache = FeatureCache::new(Duration::from_secs(10), 2, 2);
        for id in ["a", "b", "c"] {
            cache.put(id, known());
        }
        cache.run_pending_tasks();
        assert!(cache.sizes().0 <= 2, "{:?}", cache.sizes());
    }

    #[tokio::test(start_paused = true)]
    async fn random_unknown_ids_do_not_push_out_cached_entities() {
        let cache = FeatureCache::new(Duration::from_secs(10), 100, 10);
        let ids: Vec<String> = (0..50).map(|i| format!("cust-{i:05}")).collect();
        for id in &ids {
            cache.put(id, known());
            // Read a few times: these are the working set.
            for _ in 0..3 {
                assert!(cache.get(id).is_some());
            }
        }
        for i in 0..10_000 {
            cache.put(&format!("random-{i}"), Arc::new(Entity::default()));
        }
        cache.run_pending_tasks();
        for id in &ids {
            assert!(
                cache.get(id).is_some_and(|e| e.found),
                "{id} was pushed out by unknown ids"
            );
        }
        let (known_held, absent_held) = cache.sizes();
        assert_eq!(known_held, 50);
        assert!(absent_held <= 10, "absent ids held: {absent_held}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_forgets_both_kinds_of_entry() {
        let cache = FeatureCache::new(Duration::from_secs(10), 10, 10);
        cache.put("a", known());
        cache.put("b", Arc::new(Entity::default()));
        cache.invalidate("a");
        cache.invalidate("b");
        assert!(cache.get("a").is_none() && cache.get("b").is_none());
        // An id known absent, then found, is served as found.
        cache.put("c", Arc::new(Entity::default()));
        cache.put("c", known());
        assert!(cache.get("c").is_some_and(|e| e.found));
    }
}
