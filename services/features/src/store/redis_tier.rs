//! The Redis tier of the feature store: reads bounded by a short timeout, a cool-down after a
//! failure (an outage costs one timeout, not one per request), best-effort write-back off the
//! answer's path, and the version tokens that keep a write-back from undoing a write (see the
//! module doc of [`super`]).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use mesh_proto::features::EntityFeatures;
use mesh_proto::types::FeatureTier;
use prost::Message as _;
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{redis_key, redis_version_key, Entity, FeatureStore, Served};

/// Version tokens read with the values, by entity id (`""`: no token), or `None` when Redis
/// was not read (then nothing is written back: without a token the write could be stale).
pub(super) type Versions = Option<HashMap<String, String>>;

/// Sets each value only if its entity's version token is still the one read before the load
/// read PostgreSQL. KEYS: value and version key per entity; ARGV: TTL in seconds, then the token
/// read and the value per entity. Returns how many values it set.
static WRITE_BACK_IF_UNCHANGED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local written = 0
for i = 1, #KEYS, 2 do
  local now = redis.call('GET', KEYS[i + 1])
  if (now or '') == ARGV[i + 1] then
    redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[1])
    written = written + 1
  end
end
return written
",
    )
});

impl FeatureStore {
    pub(super) fn redis_usable(&self) -> Option<ConnectionManager> {
        let redis = self.redis.clone()?;
        let skip = self.redis_skip_until.lock().ok().and_then(|g| *g);
        match skip {
            Some(until) if Instant::now() < until => None,
            _ => Some(redis),
        }
    }

    pub(super) fn redis_failed(&self, error: &str) {
        self.metrics.redis_errors.inc();
        tracing::warn!(error, cooldown = ?self.redis_settings.cooldown, "redis failed; skipping it for a while");
        if let Ok(mut g) = self.redis_skip_until.lock() {
            *g = Some(Instant::now() + self.redis_settings.cooldown);
        }
    }

    /// The entities Redis holds among `ids`, and every id's version token, in one `MGET`.
    pub(super) async fn read_redis(&self, ids: &[String]) -> (HashMap<String, Served>, Versions) {
        let mut out = HashMap::new();
        let Some(mut redis) = self.redis_usable() else {
            return (out, None);
        };
        let keys: Vec<String> = ids
            .iter()
            .map(|id| redis_key(id))
            .chain(ids.iter().map(|id| redis_version_key(id)))
            .collect();
        let span = mesh_telemetry::propagation::store_span("redis", "redis MGET", keys.len());
        let call = async {
            redis::cmd("MGET")
                .arg(&keys)
                .query_async::<Vec<Option<Vec<u8>>>>(&mut redis)
                .await
        }
        .instrument(span);
        let values = match tokio::time::timeout(self.redis_settings.timeout, call).await {
            Ok(Ok(values)) if values.len() == keys.len() => values,
            Ok(Ok(_)) => {
                self.redis_failed("MGET answered a different number of values");
                return (out, None);
            }
            Ok(Err(e)) => {
                self.redis_failed(&e.to_string());
                return (out, None);
            }
            Err(_) => {
                self.redis_failed("timeout");
                return (out, None);
            }
        };
        let (entities, tokens) = values.split_at(ids.len());
        let mut versions = HashMap::new();
        for ((id, value), token) in ids.iter().zip(entities).zip(tokens) {
            let token = token.as_deref().unwrap_or_default();
            versions.insert(id.clone(), String::from_utf8_lossy(token).into_owned());
            let Some(bytes) = value else { continue };
            match EntityFeatures::decode(bytes.as_slice()) {
                Ok(decoded) => {
                    let entity = Arc::new(Entity {
                        found: decoded.found,
                        features: decoded.features.into_iter().collect(),
                    });
                    let tier = FeatureTier::Redis;
                    out.insert(id.clone(), Served { entity, tier });
                }
                Err(e) => {
                    tracing::warn!(entity = %id, error = %e, "undecodable redis entry ignored")
                }
            }
        }
        (out, Some(versions))
    }

    /// Writes `loaded` back to Redis, each entity only if its version token is unchanged since
    /// `versions` was read; on its own task.
    pub(super) fn write_back(&self, loaded: Vec<(String, Arc<Entity>)>, versions: Versions) {
        let (Some(mut redis), Some(versions)) = (self.redis_usable(), versions) else {
            return;
        };
        let mut script = WRITE_BACK_IF_UNCHANGED.prepare_invoke();
        script.arg(self.redis_settings.ttl.as_secs().max(1));
        let mut count = 0;
        for (id, entity) in loaded.iter().filter(|(_, e)| e.found) {
            let seen = versions.get(id).map(String::as_str).unwrap_or_default();
            script
                .key(redis_key(id))
                .key(redis_version_key(id))
                .arg(seen)
                .arg(encode_entity(id, entity));
            count += 1;
        }
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
                        tracing::warn!("redis write-back timed out");
                    }
                }
            }
            .instrument(set_span),
        );
    }

    /// After a write to PostgreSQL: replaces the entities' version tokens and deletes their
    /// values, in one `MULTI`. A failure is logged and counted, not returned: the write itself
    /// succeeded, and a stale value left behind expires with its TTL.
    pub(super) async fn forget_in_redis(&self, ids: &[&str]) {
        let Some(mut redis) = self.redis_usable() else {
            return;
        };
        let ttl_ms = self.redis_settings.ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in ids {
            let token = uuid::Uuid::now_v7().to_string();
            pipe.cmd("SET")
                .arg(redis_version_key(id))
                .arg(token)
                .arg("PX")
                .arg(ttl_ms)
                .ignore();
            pipe.del(redis_key(id)).ignore();
        }
        let write = pipe.query_async::<()>(&mut redis);
        match tokio::time::timeout(self.redis_settings.timeout * 4, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.redis_failed(&e.to_string()),
            Err(_) => self.redis_failed("timeout"),
        }
    }
}

fn encode_entity(id: &str, entity: &Entity) -> Vec<u8> {
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
