//! `meshctl models …`: the model lifecycle through the gateway's admin API
//! (`mesh.admin.v1.ModelAdmin`), with the admin key from `--admin-key` / `MESH_ADMIN_KEY`.

use mesh_proto::admin_key::AdminKey;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use mesh_proto::admin::model_admin_client::ModelAdminClient;
use mesh_proto::admin::{
    AuditEntry, ChangeResponse, HistoryRequest, ListModelsRequest, ModelStatus, PromoteRequest,
    RollbackRequest, SetRolloutRequest, SetShadowRequest, ShadowReportRequest, StopRequest,
};

/// Where the admin API is and who is asking.
#[derive(Args)]
pub struct Admin {
    /// The gateway.
    #[arg(
        long,
        env = "MESH_GATEWAY_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway_url: String,
    /// An admin key (MESH_ADMIN_KEYS on the gateway), sent as x-admin-key (every command but
    /// drift, which reads the prediction log).
    #[arg(long, env = "MESH_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    #[command(subcommand)]
    command: ModelsCommand,
}

/// What to do.
#[derive(Subcommand)]
enum ModelsCommand {
    /// Drift per version from the prediction log: PSI of the score and of each feature against
    /// the version's training reference, with summaries (reads PostgreSQL, not the gateway).
    Drift(crate::drift::DriftArgs),
    #[command(flatten)]
    Admin(AdminCommand),
}

/// What to do through the admin API.
#[derive(Subcommand)]
enum AdminCommand {
    /// Every model: versions, aliases, rollout, shadow.
    List,
    /// One model in detail, with each version's state on every inference replica.
    Status { model: String },
    /// Point production (or --alias) at a version.
    Promote {
        model: String,
        version: String,
        #[arg(long, default_value = "production")]
        alias: String,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Production back to the version before the last promotion.
    Rollback {
        model: String,
        #[arg(long)]
        reason: String,
    },
    /// Start or adjust a sticky percentage rollout, or stop it with --stop.
    Rollout {
        model: String,
        /// The candidate version (not with --stop).
        candidate: Option<String>,
        /// Share of entities, 0 to 100.
        #[arg(long, default_value_t = 10.0)]
        percent: f64,
        /// Let the mesh promote the candidate once it has been out this many seconds and the
        /// canary judges it healthy (default: a person promotes it).
        #[arg(long)]
        promote_after_secs: Option<f64>,
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        reason: String,
    },
    /// Copy live requests to a shadow version, or stop with --stop.
    Shadow {
        model: String,
        version: Option<String>,
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        reason: String,
    },
    /// How each shadow compares with the versions it shadows (this gateway's window).
    ShadowReport {
        /// One model (default: all).
        model: Option<String>,
    },
    /// The audit log, newest first.
    History {
        /// One model (default: all).
        model: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

type Client = mesh_proto::admin_key::AdminClient<tonic::transport::Channel>;

/// A client of the admin API at `url`, sending `key`.
async fn connect(url: &str, key: Option<&str>) -> anyhow::Result<Client> {
    let key = key.context("an admin key is needed: --admin-key or MESH_ADMIN_KEY")?;
    let key = AdminKey::new(key, Duration::from_secs(10))
        .context("--admin-key / MESH_ADMIN_KEY is not a valid metadata value")?;
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {url}"))?;
    Ok(ModelAdminClient::with_interceptor(channel, key))
}

impl Admin {
    /// Runs the command and prints its result.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            ModelsCommand::Drift(drift) => drift.run().await,
            ModelsCommand::Admin(command) => {
                let mut client = connect(&self.gateway_url, self.admin_key.as_deref()).await?;
                run_admin(command, &mut client).await
            }
        }
    }
}

/// Runs an admin API command and prints its result.
async fn run_admin(command: AdminCommand, client: &mut Client) -> anyhow::Result<()> {
    match command {
        AdminCommand::List => {
            let models = client.list_models(ListModelsRequest {}).await?.into_inner();
            if !models.live_registry {
                println!("(no live registry: MESH_REGISTRY_DATABASE_URL is unset on the gateway; read-only)");
            }
            for model in &models.models {
                println!("{}", summary(model));
            }
        }
        AdminCommand::Status { model } => {
            let models = client.list_models(ListModelsRequest {}).await?.into_inner();
            let status = models
                .models
                .iter()
                .find(|m| m.model == model)
                .with_context(|| format!("no model {model:?} on the gateway"))?;
            println!("{}", summary(status));
            for r in &status.replicas {
                let reason = if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.reason)
                };
                println!("  {} version {} {}{reason}", r.replica, r.version, r.state);
            }
        }
        AdminCommand::Promote {
            model,
            version,
            alias,
            reason,
        } => {
            let change = client
                .promote(PromoteRequest {
                    model,
                    version,
                    alias,
                    reason,
                })
                .await?;
            print_change(change.into_inner());
        }
        AdminCommand::Rollback { model, reason } => {
            let change = client.rollback(RollbackRequest { model, reason }).await?;
            print_change(change.into_inner());
        }
        AdminCommand::Rollout {
            model,
            candidate,
            percent,
            promote_after_secs,
            stop,
            reason,
        } => {
            let change = if stop {
                client.stop_rollout(StopRequest { model, reason }).await?
            } else {
                let candidate = candidate.context("give the candidate version, or --stop")?;
                client
                    .set_rollout(SetRolloutRequest {
                        model,
                        candidate,
                        percent,
                        reason,
                        promote_after_secs: promote_after_secs.unwrap_or(0.0),
                    })
                    .await?
            };
            print_change(change.into_inner());
        }
        AdminCommand::Shadow {
            model,
            version,
            stop,
            reason,
        } => {
            let change = if stop {
                client.stop_shadow(StopRequest { model, reason }).await?
            } else {
                let version = version.context("give the shadow version, or --stop")?;
                client
                    .set_shadow(SetShadowRequest {
                        model,
                        version,
                        reason,
                    })
                    .await?
            };
            print_change(change.into_inner());
        }
        AdminCommand::ShadowReport { model } => {
            let report = client
                .shadow_report(ShadowReportRequest {
                    model: model.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if report.shadows.is_empty() {
                println!("no shadow comparisons on this gateway yet");
            }
            for s in &report.shadows {
                println!(
                        "{} shadow {}: {} compared, {} failed, {} shed; |diff| mean {:.4} p99 {:.4}; agreement at {} {:.2} %; shadow p99 {:.1} ms",
                        s.model, s.shadow_version, s.count, s.errors, s.shed, s.mean_abs_diff,
                        s.p99_abs_diff, s.threshold, s.agreement * 100.0, s.shadow_p99_latency_ms
                    );
            }
        }
        AdminCommand::History { model, limit } => {
            let history = client
                .history(HistoryRequest {
                    model: model.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            for entry in &history.entries {
                println!("{}", audit_line(entry));
            }
        }
    }
    Ok(())
}

fn summary(m: &ModelStatus) -> String {
    let aliases: Vec<String> = m.aliases.iter().map(|(a, v)| format!("{a}={v}")).collect();
    let mut line = format!(
        "{}: versions [{}], {}",
        m.model,
        m.versions.join(", "),
        aliases.join(" ")
    );
    if !m.previous_production.is_empty() {
        line += &format!(", rollback to {}", m.previous_production);
    }
    if !m.rollout_candidate.is_empty() {
        line += &format!(
            ", rollout {} at {} %",
            m.rollout_candidate, m.rollout_percent
        );
        if m.rollout_promote_after_secs > 0.0 {
            line += &format!(
                " (promotes itself after a healthy {} s bake)",
                m.rollout_promote_after_secs
            );
        }
    }
    if !m.shadow.is_empty() {
        line += &format!(", shadow {}", m.shadow);
    }
    line
}

fn audit_line(e: &AuditEntry) -> String {
    let at = e.at_unix_micros / 1_000_000;
    format!(
        "#{} at {at} (unix s) {} {} {}: {} -> {} ({})",
        e.id,
        e.actor,
        e.model,
        e.action,
        if e.from_version.is_empty() {
            "-"
        } else {
            &e.from_version
        },
        if e.to_version.is_empty() {
            "-"
        } else {
            &e.to_version
        },
        e.reason
    )
}

fn print_change(change: ChangeResponse) {
    if let Some(model) = &change.model {
        println!("{}", summary(model));
    }
    if let Some(audit) = &change.audit {
        println!("{}", audit_line(audit));
    }
}
