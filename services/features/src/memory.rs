//! The in-process TTL cache: the first tier, answering in well under a microsecond.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Entity;

/// Entities by id with an expiry; bounded in size.
pub struct FeatureCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Arc<Entity>, Instant)>>,
}

impl FeatureCache {
    /// A cache keeping entries for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The entity, if cached and fresh.
    pub fn get(&self, id: &str) -> Option<Arc<Entity>> {
        let entries = self.entries.lock().ok()?;
        let (entity, stored) = entries.get(id)?;
        (stored.elapsed() < self.ttl).then(|| entity.clone())
    }

    /// Stores `entity` under `id`. When full, expired entries go first, then everything (a
    /// cache refill is cheaper than an eviction structure for this working-set size).
    pub fn put(&self, id: &str, entity: Arc<Entity>) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= self.capacity && !entries.contains_key(id) {
            let ttl = self.ttl;
            entries.retain(|_, (_, stored)| stored.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(id.to_owned(), (entity, Instant::now()));
    }

    /// Forgets `id` (after a write).
    pub fn invalidate(&self, id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let cache = FeatureCache::new(Duration::from_millis(100), 10);
        cache.put("a", Arc::new(Entity::default()));
        assert!(cache.get("a").is_some());
        tokio::time::advance(Duration::from_millis(101)).await;
        assert!(cache.get("a").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_makes_room() {
        let cache = FeatureCache::new(Duration::from_secs(10), 2);
        cache.put("a", Arc::new(Entity::default()));
        cache.put("b", Arc::new(Entity::default()));
        cache.put("c", Arc::new(Entity::default()));
        assert!(cache.get("c").is_some());
    }
}
