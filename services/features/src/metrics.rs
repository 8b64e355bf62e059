//! Feature-store metrics: answers per tier, coalesced waits, Redis errors, cache fills refused
//! because a write raced the load, materializations.

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
    stale_skipped: IntCounterVec,
    /// Materializations by outcome (`ok`, `failed`).
    pub materializations: IntCounterVec,
}

impl FeatureMetrics {
    /// Registers `mesh_feature_tier_hits_total{tier}`, `mesh_feature_coalesced_total`,
    /// `mesh_feature_redis_errors_total`, `mesh_feature_stale_fills_skipped_total{tier}`,
    /// `mesh_feature_materializations_total{outcome}`.
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
        let stale_skipped = IntCounterVec::new(
            Opts::new(
                "mesh_feature_stale_fills_skipped_total",
                "Cache fills refused because a PutFeatures for the entity raced the load",
            ),
            &["tier"],
        )?;
        let materializations = IntCounterVec::new(
            Opts::new(
                "mesh_feature_materializations_total",
                "Bulk copies of PostgreSQL's entities into Redis, by outcome (ok, failed)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(materializations.clone()))?;
        for outcome in ["ok", "failed"] {
            materializations.with_label_values(&[outcome]);
        }
        registry.register(Box::new(stale_skipped.clone()))?;
        registry.register(Box::new(tier_hits.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(redis_errors.clone()))?;
        for tier in ["memory", "redis", "database"] {
            tier_hits.with_label_values(&[tier]);
        }
        for tier in ["memory", "redis"] {
            stale_skipped.with_label_values(&[tier]);
        }
        Ok(Self {
            tier_hits,
            coalesced,
            redis_errors,
            stale_skipped,
            materializations,
        })
    }

    /// Counts `n` fills of `tier` (`memory` or `redis`) refused because a write raced the load.
    pub fn stale_skipped(&self, tier: &'static str, n: u64) {
        self.stale_skipped.with_label_values(&[tier]).inc_by(n);
    }

    /// Fills of `tier` refused so far (for tests).
    pub fn stale_skipped_total(&self, tier: &'static str) -> u64 {
        self.stale_skipped.with_label_values(&[tier]).get()
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
