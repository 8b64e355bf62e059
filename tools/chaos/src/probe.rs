//! Observing the mesh: the gateway's `/health` report and `/metrics`, `grpc.health.v1`, and the
//! prediction log in PostgreSQL.

use std::time::Duration;

use anyhow::Context as _;

/// `GET <path>` on 127.0.0.1:`port`: status and body. Bounded to 2 s.
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    Ok(mesh_testkit::http_get(addr, path, Duration::from_secs(2)).await?)
}

/// The gateway's `/health` verdict (`healthy`, `degraded`, `unhealthy`), or `None` if it cannot
/// be read.
pub async fn gateway_health(metrics_port: u16) -> Option<String> {
    let (_, body) = http_get(metrics_port, "/health").await.ok()?;
    // Chunked transfer encoding may wrap the JSON; find the object.
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    let value: serde_json::Value = serde_json::from_str(&body[start..=end]).ok()?;
    value["status"].as_str().map(str::to_owned)
}

/// `mesh_spool_pending_records` from the gateway's `/metrics`: `Ok(None)` if the metric is not
/// there (an older gateway), `Err` if the endpoint cannot be read.
pub async fn spool_pending(metrics_port: u16) -> anyhow::Result<Option<f64>> {
    let (status, body) = http_get(metrics_port, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let mut total = None;
    for line in body.lines() {
        if line.starts_with("mesh_spool_pending_records")
            && matches!(
                line.as_bytes().get("mesh_spool_pending_records".len()),
                Some(b' ') | Some(b'{')
            )
        {
            if let Some(value) = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                *total.get_or_insert(0.0) += value;
            }
        }
    }
    Ok(total)
}

/// `grpc.health.v1` Check (server as a whole) says SERVING, within 2 s.
pub async fn grpc_serving(url: &str) -> bool {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(1));
        let status = client.check(request).await?.into_inner().status();
        anyhow::Ok(status == tonic_health::pb::health_check_response::ServingStatus::Serving)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Ok(true))
    )
}

/// A fresh connection to PostgreSQL (one per question: the server restarts in scenario 3, and
/// fails over in scenario 14).
pub async fn pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("PostgreSQL connect timed out")??;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// What the prediction log holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogCounts {
    /// Rows in `predictions`.
    pub rows: i64,
    /// How many of the given ids are there.
    pub found: i64,
}

/// Counts rows, and which of `ids` are in `predictions` (0 when the table does not exist yet).
pub async fn log_counts(url: &str, ids: &[String]) -> anyhow::Result<LogCounts> {
    let client = pg(url).await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('public.predictions') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(LogCounts::default());
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM predictions", &[])
        .await?
        .get(0);
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM predictions WHERE prediction_id = ANY($1)",
            &[&ids],
        )
        .await?
        .get(0);
    Ok(LogCounts { rows, found })
}

/// `served_at` (the record's own `time_unix_micros`, not the time it was written) of each of
/// `ids` found in `predictions`, in unix microseconds.
pub async fn served_at_micros(
    url: &str,
    ids: &[String],
) -> anyhow::Result<std::collections::HashMap<String, i64>> {
    let client = pg(url).await?;
    let rows = client
        .query(
            "SELECT prediction_id, (extract(epoch FROM served_at) * 1e6)::int8
             FROM predictions WHERE prediction_id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// How many distinct ids of `ids` are in `prediction_rejects` (0 while the table does not
/// exist: a logger without a rejects table has kept none).
pub async fn rejects_found(url: &str, ids: &[String]) -> anyhow::Result<i64> {
    let client = pg(url).await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('public.prediction_rejects') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT count(DISTINCT prediction_id) FROM prediction_rejects
             WHERE prediction_id = ANY($1)",
            &[&ids],
        )
        .await?
        .get(0))
}
