//! The Redis tier of the feature store: reads bounded by a short timeout, a cool-down after a
//! failure (an outage costs one timeout, not one per request), and every write to Redis
//! conditional on the entity's version (see the module doc of [`super`]): write-through after a
//! `PutFeatures`, write-back after a load, and the bulk materialization all go through
//! [`SET_IF_NEWER`], so whichever arrives last, Redis keeps the newest version.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use mesh_proto::features::EntityFeatures;
use mesh_proto::types::FeatureTier;
use prost::Message as _;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::redis_link::RedisLink;
use super::{redis_key, redis_version_key, Entity, FeatureStore, Served};

/// How many times `MESH_REDIS_TIMEOUT_MS` a read may take while PostgreSQL is failing.
const LAST_SOURCE_PATIENCE: u32 = 5;

/// The least time a write-through may take (see [`FeatureStore::write_through`]).
const WRITE_THROUGH_AT_LEAST: std::time::Duration = std::time::Duration::from_millis(250);

/// Sets each entity's value and version only if its version is newer than the one Redis holds
/// (none counts as older than any). KEYS: value and version key per entity; ARGV: TTL in
/// milliseconds (0: no expiry), then version and value per entity. Returns how many it set.
pub(super) static SET_IF_NEWER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local written = 0
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local held = tonumber(redis.call('GET', KEYS[i + 1]) or '') or -1
  local version = tonumber(ARGV[i + 1])
  if version > held then
    if ttl > 0 then
      redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ttl)
      redis.call('SET', KEYS[i + 1], ARGV[i + 1], 'PX', ttl)
    else
      redis.call('SET', KEYS[i], ARGV[i + 2])
      redis.call('SET', KEYS[i + 1], ARGV[i + 1])
    end
    written = written + 1
  end
end
return written
",
    )
});

impl FeatureStore {
    /// Redis, unless it is in its cool-down after a failure while PostgreSQL works (see the
    /// module doc of [`super`]).
    pub(super) fn redis_usable(&self) -> Option<RedisLink> {
        let redis = self.redis.clone()?;
        let skip = self.redis_skip_until.lock().ok().and_then(|g| *g);
        match skip {
            Some(until) if Instant::now() < until && !self.db_failing() => None,
            _ => Some(redis),
        }
    }

    pub(super) fn redis_failed(&self, error: &str) {
        self.metrics.redis_errors.inc();
        tracing::warn!(error, cooldown = ?self.redis_settings.cooldown, "redis failed; skipping it for a while");
        if let Some(redis) = &self.redis {
            redis.forget();
        }
        if let Ok(mut g) = self.redis_skip_until.lock() {
            *g = Some(Instant::now() + self.redis_settings.cooldown);
        }
    }

    /// The entities Redis holds among `ids`, in one `MGET`.
    pub(super) async fn read_redis(&self, ids: &[String]) -> HashMap<String, Served> {
        let mut out = HashMap::new();
        let Some(mut redis) = self.redis_usable() else {
            return out;
        };
        let keys: Vec<String> = ids.iter().map(|id| redis_key(id)).collect();
        let span = mesh_telemetry::propagation::store_span("redis", "redis MGET", keys.len());
        let call = async {
            redis::cmd("MGET")
                .arg(&keys)
                .query_async::<Vec<Option<Vec<u8>>>>(&mut redis)
                .await
        }
        .instrument(span);
        // While PostgreSQL fails, Redis is the last source: a slow answer is worth waiting
        // for a little longer than usual.
        let limit = match self.db_failing() {
            true => self.redis_settings.timeout * LAST_SOURCE_PATIENCE,
            false => self.redis_settings.timeout,
        };
        let values = match tokio::time::timeout(limit, call).await {
            Ok(Ok(values)) if values.len() == keys.len() => values,
            Ok(Ok(_)) => {
                self.redis_failed("MGET answered a different number of values");
                return out;
            }
            Ok(Err(e)) => {
                self.redis_failed(&e.to_string());
                return out;
            }
            Err(_) => {
                self.redis_failed("timeout");
                return out;
            }
        };
        for (id, value) in ids.iter().zip(values) {
            let Some(bytes) = value else { continue };
            match EntityFeatures::decode(bytes.as_slice()) {
                Ok(decoded) => {
                    let entity = Arc::new(Entity {
                        found: decoded.found,
                        features: decoded.features.into_iter().collect(),
                        version: 0,
                    });
                    let tier = FeatureTier::Redis;
                    out.insert(id.clone(), Served { entity, tier });
                }
                Err(e) => {
                    tracing::warn!(entity = %id, error = %e, "undecodable redis entry ignored")
                }
            }
        }
        out
    }

    /// The [`SET_IF_NEWER`] call writing `entities` (known ones only), and how many it carries.
    pub(super) fn set_if_newer(
        &self,
        entities: &[(String, Arc<Entity>)],
    ) -> (redis::ScriptInvocation<'static>, usize) {
        let mut script = SET_IF_NEWER.prepare_invoke();
        script.arg(self.redis_settings.ttl.as_millis() as u64);
        let mut count = 0;
        for (id, entity) in entities.iter().filter(|(_, e)| e.found) {
            script
                .key(redis_key(id))
                .key(redis_version_key(id))
                .arg(entity.version)
                .arg(encode_entity(id, entity));
            count += 1;
        }
        (script, count)
    }

    /// Writes `loaded` back to Redis, each entity only if its version is newer than Redis's;
    /// on its own task. An older version refused is a load that raced a write: counted.
    pub(super) fn write_back(&self, loaded: Vec<(String, Arc<Entity>)>) {
        let Some(mut redis) = self.redis_usable() else {
            return;
        };
        let (script, count) = self.set_if_newer(&loaded);
        if count == 0 {
            return;
        }
        let set_span = mesh_telemetry::propagation::store_span("redis", "redis SET", count);
        let timeout = self.redis_settings.timeout;
        let metrics = self.metrics.clone();
        // Best effort, off the answer's path: a slow or absent Redis delays nothing.
        tokio::spawn(
            async move {
                let write = script.invoke_async::<u64>(&mut redis);
                match tokio::time::timeout(timeout * 4, write).await {
                    Ok(Ok(written)) => {
                        metrics.stale_skipped("redis", (count as u64).saturating_sub(written))
                    }
                    Ok(Err(e)) => {
                        metrics.redis_errors.inc();
                        tracing::warn!(error = %e, "redis write-back failed");
                    }
                    Err(_) => {
                        metrics.redis_errors.inc();
                        redis.forget();
                        tracing::warn!("redis write-back timed out");
                    }
                }
            }
            .instrument(set_span),
        );
    }

    /// After a write to PostgreSQL: writes the entities as committed (whole, with their new
    /// versions) through to Redis. A failure is logged, counted and remembered, not returned:
    /// the write itself succeeded, and the materializer copies everything again soon (see
    /// [`FeatureStore::materialize_soon`]).
    pub(super) async fn write_through(&self, entities: &[(String, Arc<Entity>)]) {
        let Some(mut redis) = self.redis_usable() else {
            self.materialize_soon();
            return;
        };
        let (script, count) = self.set_if_newer(entities);
        if count == 0 {
            return;
        }
        let write = script.invoke_async::<u64>(&mut redis);
        // The caller already waited for PostgreSQL; a Redis that is only slow should not
        // cost the entity its write-through (it would serve the old version until the next
        // materialization).
        let limit = (self.redis_settings.timeout * 4).max(WRITE_THROUGH_AT_LEAST);
        let failed = match tokio::time::timeout(limit, write).await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timeout".to_owned(),
        };
        self.redis_failed(&failed);
        self.materialize_soon();
    }
}

pub(super) fn encode_entity(id: &str, entity: &Entity) -> Vec<u8> {
    EntityFeatures {
        entity_id: id.to_owned(),
        found: entity.found,
        features: entity
            .features
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        tier: FeatureTier::Unspecified as i32,
    }
    .encode_to_vec()
}
