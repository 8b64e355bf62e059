//! The registry's tables.
//!
//! - `model_policies`: one row per model: its aliases (`production` among them), the production
//!   version before the last promotion (what a rollback returns to), a rollout candidate with its
//!   percentage, a shadow version, and a generation bumped by every change.
//! - `model_audit`: every change: who (the admin key's id), when, what, from, to, why, and the
//!   figures that triggered it when the mesh itself acted (an automatic rollback). Kept for a
//!   retention window ([`crate::retention`]); migration 2 indexes it by time for that.
//!
//! Every change ends with `pg_notify('mesh_registry', <model>)`, so followers re-read at once.

use mesh_runtime::postgres::Migration;

/// The channel followers `LISTEN` on.
pub const CHANNEL: &str = "mesh_registry";

/// The registry's schema steps (component `registry`).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "model policies and audit",
        sql: "CREATE TABLE model_policies (
              model               text PRIMARY KEY,
              aliases             jsonb NOT NULL DEFAULT '{}'::jsonb,
              previous_production text,
              candidate           text,
              candidate_percent   double precision NOT NULL DEFAULT 0
                                  CHECK (candidate_percent >= 0 AND candidate_percent <= 100),
              shadow              text,
              generation          bigint NOT NULL DEFAULT 1,
              updated_at          timestamptz NOT NULL DEFAULT now()
          );
          CREATE TABLE model_audit (
              id           bigserial PRIMARY KEY,
              at           timestamptz NOT NULL DEFAULT now(),
              actor        text NOT NULL,
              model        text NOT NULL,
              action       text NOT NULL,
              from_version text,
              to_version   text,
              reason       text NOT NULL,
              details      jsonb NOT NULL DEFAULT '{}'::jsonb
          );
          CREATE INDEX model_audit_model_at ON model_audit (model, at DESC);",
    },
    Migration {
        version: 2,
        name: "model audit index by time, for retention",
        sql: "CREATE INDEX model_audit_at ON model_audit (at);",
    },
    Migration {
        version: 3,
        name: "rollout bake",
        // A rollout may promote itself after a healthy bake: how long, and since when. Version 3,
        // not 2: version 2 belongs to the audit table's retention.
        sql: "ALTER TABLE model_policies
              ADD COLUMN promote_after_secs double precision
                  CHECK (promote_after_secs IS NULL OR promote_after_secs > 0),
              ADD COLUMN rollout_since timestamptz;",
    },
];
