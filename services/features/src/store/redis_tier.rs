//! The Redis tier of the feature store: reads bounded by a short timeout, a cool-down after a
//! failure (an outage costs one timeout, not one per request), and best-effort write-back off
//! the answer's path.

use std::collections::HashMap;
use std::sync::Arc;

use mesh_proto::features::EntityFeatures;
use mesh_proto::types::FeatureTier;
use prost::Message as _;
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{redis_key, Entity, FeatureStore, Served};

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
        match tokio::time::timeout(self.redis_settings.timeout, call).await {
            Ok(Ok(values)) => {
                for (id, value) in ids.iter().zip(values) {
                    let Some(bytes) = value else { continue };
                    match EntityFeatures::decode(bytes.as_slice()) {
                        Ok(decoded) => {
                            out.insert(
                                id.clone(),
                                Served {
                                    entity: Arc::new(Entity {
                                        found: decoded.found,
                                        features: decoded.features.into_iter().collect(),
                                    }),
                                    tier: FeatureTier::Redis,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::warn!(entity = %id, error = %e, "undecodable redis entry ignored")
                        }
                    }
                }
            }
            Ok(Err(e)) => self.redis_failed(&e.to_string()),
            Err(_) => self.redis_failed("timeout"),
        }
        out
    }

    pub(super) fn write_back(&self, loaded: &[(String, Arc<Entity>)]) {
        let Some(mut redis) = self.redis_usable() else {
            return;
        };
        let found: Vec<(String, Vec<u8>)> = loaded
            .iter()
            .filter(|(_, e)| e.found)
            .map(|(id, e)| (redis_key(id), encode_entity(id, e)))
            .collect();
        if found.is_empty() {
            return;
        }
        let set_span = mesh_telemetry::propagation::store_span("redis", "redis SET", found.len());
        let ttl = self.redis_settings.ttl.as_secs().max(1);
        let timeout = self.redis_settings.timeout;
        let errors = self.metrics.redis_errors.clone();
        // Best effort, off the answer's path: a slow or absent Redis delays nothing.
        tokio::spawn(
            async move {
                let mut pipe = redis::pipe();
                for (key, value) in &found {
                    pipe.set_ex(key, value.as_slice(), ttl).ignore();
                }
                let write = pipe.query_async::<()>(&mut redis);
                match tokio::time::timeout(timeout * 4, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        errors.inc();
                        tracing::warn!(error = %e, "redis write-back failed");
                    }
                    Err(_) => {
                        errors.inc();
                        tracing::warn!("redis write-back timed out");
                    }
                }
            }
            .instrument(set_span),
        );
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
