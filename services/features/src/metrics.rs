//! Feature-store metrics: answers per tier, coalesced waits, Redis errors.

use mesh_proto::types::FeatureTier;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Counters of the feature store.
#[derive(Clone)]
pub struct FeatureMetrics {
    tier_hits: IntCounterVec,
    /// Lookups that waited on another caller's load instead of starting their own.
    pub coalesced: IntCounter,
    /// Redis calls that failed or timed out.
    pub redis_errors: IntCounter,
}

impl FeatureMetrics {
    /// Registers `mesh_feature_tier_hits_total{tier}`, `mesh_feature_coalesced_total`,
    /// `mesh_feature_redis_errors_total`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let tier_hits = IntCounterVec::new(
            Opts::new("mesh_feature_tier_hits_total", "Entities served, by tier"),
            &["tier"],
        )?;
        let coalesced = IntCounter::new(
            "mesh_feature_coalesced_total",
            "Entity lookups that joined a load already in flight",
        )?;
        let redis_errors = IntCounter::new(
            "mesh_feature_redis_errors_total",
            "Redis calls that failed or timed out",
        )?;
        registry.register(Box::new(tier_hits.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        for tier in ["memory", "redis", "database"] {
            tier_hits.with_label_values(&[tier]);
        }
        Ok(Self {
            tier_hits,
            coalesced,
            redis_errors,
        })
    }

    /// Counts one entity served from `tier`.
    pub fn hit(&self, tier: FeatureTier) {
        let label = match tier {
            FeatureTier::Memory => "memory",
            FeatureTier::Redis => "redis",
            FeatureTier::Database => "database",
            FeatureTier::Request | FeatureTier::Unspecified => "other",
        };
        self.tier_hits.with_label_values(&[label]).inc();
    }
}
