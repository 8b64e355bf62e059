//! Scenario 10: poison records at volume. `Record` calls go straight to the logger (with the
//! internal token), each carrying valid records mixed with poison ones that PostgreSQL or the
//! logger must refuse: a timestamp PostgreSQL cannot represent (`time_unix_micros = i64::MAX`)
//! or a NaN score. The logger is to commit the valid ones to `predictions`, keep the poison ones
//! in `prediction_rejects` and answer OK; the gateway's own records must keep flowing meanwhile.
//! Bounded in calls, attempts and time.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_proto::logger::prediction_log_client::PredictionLogClient;
use mesh_proto::logger::{PredictionRecord, RecordRequest};
use mesh_proto::types::{feature_value::Kind, FeatureTier, FeatureValue};
use tonic::metadata::MetadataValue;

/// What to send.
pub struct Plan {
    /// The logger's URL.
    pub logger_url: String,
    /// Sent as `x-mesh-internal-token`.
    pub internal_token: String,
    /// Records per `Record` call.
    pub records_per_call: usize,
    /// One record in `poison_every` is poison (alternately a bad timestamp and a NaN score).
    pub poison_every: usize,
    /// Pause between calls.
    pub interval: Duration,
    /// Stop starting calls after this.
    pub until: tokio::time::Instant,
    /// Prefix of the prediction ids (unique per run).
    pub id_prefix: String,
}

/// What was sent and how the logger answered.
#[derive(Default)]
pub struct Sent {
    /// Ids of the valid records.
    pub valid: Vec<String>,
    /// Ids of the poison records.
    pub poison: Vec<String>,
    /// `Record` calls made (each retried until answered OK, at most `ATTEMPTS` times).
    pub calls: usize,
    /// Calls finally answered OK.
    pub calls_ok: usize,
    /// Sum of `accepted` over the OK answers.
    pub accepted: u64,
    /// Final answers by status code (and attempts by code, for retried ones).
    pub outcomes: BTreeMap<String, usize>,
}

/// Attempts per call: a sender retries refusals that say "later" (UNAVAILABLE,
/// RESOURCE_EXHAUSTED), as the gateway's spool does.
const ATTEMPTS: usize = 4;

fn record(id: String, poison: Option<Poison>) -> PredictionRecord {
    let now = crate::unix_ms() as i64 * 1000;
    let value = |kind| FeatureValue { kind: Some(kind) };
    PredictionRecord {
        prediction_id: id,
        time_unix_micros: if poison == Some(Poison::Timestamp) {
            i64::MAX
        } else {
            now
        },
        model: "churn".into(),
        model_version: "1".into(),
        entity_id: "cust-00001".into(),
        features: [
            ("support_calls_30d".to_owned(), value(Kind::Number(1.0))),
            ("channel".to_owned(), value(Kind::Category("web".into()))),
        ]
        .into_iter()
        .collect(),
        score: if poison == Some(Poison::NanScore) {
            f64::NAN
        } else {
            0.25
        },
        latency_micros: 1000,
        feature_tier: FeatureTier::Request as i32,
        trace_id: "0123456789abcdef0123456789abcdef".into(),
        shadow_of: String::new(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Poison {
    Timestamp,
    NanScore,
}

/// Sends until `plan.until`; returns what was sent and answered.
pub async fn run(plan: Plan) -> Sent {
    let mut sent = Sent::default();
    let channel = match tonic::transport::Endpoint::from_shared(plan.logger_url.clone()) {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy(),
        Err(e) => {
            *sent.outcomes.entry(format!("bad URL: {e}")).or_default() += 1;
            return sent;
        }
    };
    let token = match MetadataValue::try_from(plan.internal_token.as_str()) {
        Ok(token) => token,
        Err(e) => {
            *sent.outcomes.entry(format!("bad token: {e}")).or_default() += 1;
            return sent;
        }
    };
    let mut client = PredictionLogClient::new(channel);
    let mut n = 0usize;
    let mut poison_kind = Poison::Timestamp;
    while tokio::time::Instant::now() < plan.until {
        let mut records = Vec::with_capacity(plan.records_per_call);
        for _ in 0..plan.records_per_call {
            n += 1;
            let id = format!("{}-{n:06}", plan.id_prefix);
            if n.is_multiple_of(plan.poison_every.max(1)) {
                sent.poison.push(id.clone());
                records.push(record(id, Some(poison_kind)));
                poison_kind = match poison_kind {
                    Poison::Timestamp => Poison::NanScore,
                    Poison::NanScore => Poison::Timestamp,
                };
            } else {
                sent.valid.push(id.clone());
                records.push(record(id, None));
            }
        }
        sent.calls += 1;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let mut request = tonic::Request::new(RecordRequest {
                records: records.clone(),
            });
            request.set_timeout(Duration::from_secs(5));
            request
                .metadata_mut()
                .insert("x-mesh-internal-token", token.clone());
            match client.record(request).await {
                Ok(answer) => {
                    sent.calls_ok += 1;
                    sent.accepted += u64::from(answer.into_inner().accepted);
                    last = "Ok".into();
                    break;
                }
                Err(status) => {
                    last = format!("{:?}", status.code());
                    let retry = matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                    );
                    if !retry || attempt + 1 == ATTEMPTS {
                        break;
                    }
                    *sent
                        .outcomes
                        .entry(format!("{last} (retried)"))
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        *sent.outcomes.entry(last).or_default() += 1;
        tokio::time::sleep(plan.interval).await;
    }
    sent
}
