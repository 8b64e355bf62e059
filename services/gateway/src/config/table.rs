//! The gateway's settings table: every variable it reads, with its default and meaning.

use mesh_runtime::config::Setting;

/// Every variable the gateway reads, with its default.
pub const SETTINGS: &[Setting] = mesh_runtime::settings_table!(
    "0.0.0.0:50051", "0.0.0.0:9101", "1024";
        Setting::value(
            "MESH_FEATURES_URL",
            "http://127.0.0.1:50052",
            "features service",
        ),
        Setting::value(
            "MESH_INFERENCE_URLS",
            "http://127.0.0.1:50053,http://127.0.0.1:50054",
            "inference replicas, comma-separated: URLs, and `dns:///name:port` entries re-resolved every `MESH_DISCOVERY_INTERVAL_MS`, each address a replica",
        ),
        Setting::value(
            "MESH_DISCOVERY_INTERVAL_MS",
            "5000",
            "how often the `dns:///` entries of `MESH_INFERENCE_URLS` are re-resolved; replicas that appear join once SERVING, those that vanish drain out",
        ),
        Setting::value("MESH_LOGGER_URL", "http://127.0.0.1:50055", "logger"),
        Setting::value("MESH_MODELS_DIR", "models", "model registry"),
        Setting::value(
            "MESH_DEFAULT_BUDGET_MS",
            "250",
            "deadline when the caller sends no `grpc-timeout`",
        ),
        Setting::value(
            "MESH_MAX_BUDGET_MS",
            "30000",
            "no call runs longer, whatever the caller asks",
        ),
        Setting::value(
            "MESH_DOWNSTREAM_MARGIN_MS",
            "2",
            "kept back from each downstream call's budget",
        ),
        Setting::value(
            "MESH_FEATURES_CONCURRENCY",
            "256",
            "online calls to features in flight",
        ),
        Setting::value(
            "MESH_INFERENCE_CONCURRENCY",
            "256",
            "online calls to inference in flight",
        ),
        Setting::value(
            "MESH_BATCH_CONCURRENCY",
            "8",
            "`PredictBatch` calls in flight, and the size of each batch compartment",
        ),
        Setting::value("MESH_LOGGER_CONCURRENCY", "4", "`Record` calls in flight"),
        Setting::value(
            "MESH_SHADOW_CONCURRENCY",
            "8",
            "shadow scoring calls in flight (each a batch of up to 64 copies); none free: the batch is shed (counted), never the primary",
        ),
        Setting::value(
            "MESH_SHADOW_QUEUE",
            "1024",
            "shadow copies waiting per shadow while its worker scores a batch; beyond, new copies are shed (counted)",
        ),
        Setting::value(
            "MESH_PREDICT_COALESCE",
            "32",
            "queued `Predict` calls of one model run together as one batch at most; 1 turns coalescing off",
        ),
        Setting::value(
            "MESH_PREDICT_RUNS",
            "1",
            "pipeline runs of one model in flight before further `Predict` calls queue to be coalesced",
        ),
        Setting::value(
            "MESH_PREDICT_RUN_STALL_MS",
            "25",
            "a run in flight longer than this no longer holds its place: queued `Predict` calls start a run of their own (`mesh_predict_stalled_runs_total`)",
        ),
        Setting::value("MESH_MAX_BATCH_ITEMS", "1000", "items per `PredictBatch`"),
        Setting::value(
            "MESH_LOG_QUEUE",
            "50000",
            "records waiting for the spool's writer",
        ),
        Setting::value(
            "MESH_SPOOL_DIR",
            "spool",
            "the durable spool of prediction records; one gateway per directory",
        ),
        Setting::value(
            "MESH_SPOOL_MAX_BYTES",
            "1073741824",
            "undelivered bytes kept; beyond, new records are not kept",
        ),
        Setting::value(
            "MESH_SPOOL_SEGMENT_BYTES",
            "16777216",
            "size of one spool file",
        ),
        Setting::value("MESH_LOG_BATCH_SIZE", "500", "records per `Record` call"),
        Setting::value(
            "MESH_LOG_FLUSH_MS",
            "50",
            "longest wait before a partial batch is sent",
        ),
        Setting::value(
            "MESH_LOG_DELIVERY_DEGRADED_MS",
            "30000",
            "delivery to the logger failing this long makes `/health` say `degraded`",
        ),
        Setting::value(
            "MESH_OUTLIER_CONSECUTIVE_FAILURES",
            "5",
            "consecutive failures that eject an inference replica",
        ),
        Setting::value(
            "MESH_OUTLIER_BASE_EJECTION_MS",
            "30000",
            "first ejection; the n-th lasts n × this",
        ),
        Setting::value("MESH_OUTLIER_MAX_EJECTION_MS", "300000", "longest ejection"),
        Setting::value(
            "MESH_OUTLIER_MAX_EJECTED_PERCENT",
            "50",
            "most replicas ejected at once (never the last)",
        ),
        Setting::value(
            "MESH_BREAKER_FAILURES",
            "5",
            "consecutive failures that open a downstream's breaker",
        ),
        Setting::value(
            "MESH_BREAKER_OPEN_MS",
            "1000",
            "first cool-down of an open breaker",
        ),
        Setting::value(
            "MESH_RETRY_BUDGET_RATIO",
            "0.2",
            "retries may add this share of a downstream's requests",
        ),
        Setting::value(
            "MESH_RETRY_BUDGET_FLOOR",
            "10",
            "plus this many retries per second",
        ),
        Setting::unset(
            "MESH_TLS_CERT",
            "unset (plaintext)",
            "PEM certificate chain for TLS on the public port",
        ),
        Setting::unset(
            "MESH_TLS_KEY",
            "unset (plaintext)",
            "PEM private key for TLS on the public port",
        ),
        Setting::unset(
            "MESH_API_KEYS",
            "unset (access control off, with a warning at start)",
            "comma-separated `id:secret` pairs",
        ),
        Setting::unset(
            "MESH_ADMIN_KEYS",
            "unset (the admin API refuses every call)",
            "comma-separated `id:secret` pairs for `mesh.admin.v1.ModelAdmin` (sent as `x-admin-key`), distinct from the API keys",
        ),
        Setting::unset(
            "MESH_REGISTRY_DATABASE_URL",
            "unset: models and production from the disk, read at start",
            "PostgreSQL of the live model registry: aliases, rollouts and shadows, followed and changed without a restart",
        ),
        Setting::value(
            "MESH_REGISTRY_INTERVAL_MS",
            "1000",
            "re-read the live registry at least this often (changes are notified at once)",
        ),
        Setting::value(
            "MESH_CANARY_LATENCY_SLACK_MS",
            "20",
            "a rollout's candidate breaches on latency when its p99 exceeds twice production's plus this (a candidate known to be slower needs more)",
        ),
        Setting::value(
            "MESH_AUDIT_RETENTION_DAYS",
            "365",
            "days of `model_audit` kept in the live registry; older records are deleted hourly in batches of 1,000",
        ),
        Setting::value(
            "MESH_RATE_LIMIT_RPS",
            "1000",
            "per-key token-bucket rate; `off` disables",
        ),
        Setting::derived(
            "MESH_RATE_LIMIT_BURST",
            "2 × the rate",
            "per-key bucket depth",
        ),
);
