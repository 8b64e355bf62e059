//! Adaptive batching of `Predict` at the gateway (`mesh_gateway::coalesce`), whole mesh: calls
//! that queue while a run of the same model is in flight share one pipeline run, and each keeps
//! its own answer, error, deadline and trace.
//!
//! To make runs overlap on any machine, the test proxy between the gateway and each inference
//! replica adds a fixed delay (the one faked fault: a slow network; the services are real).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::FeatureValue;
use mesh_tests::*;
use tonic::Code;

/// Scores are float32 inside the graph; the fixture is scikit-learn's float64.
const SKEW_TOLERANCE: f64 = 1e-5;

fn request(
    entity: &str,
    features: HashMap<String, FeatureValue>,
    timeout: Duration,
) -> tonic::Request<PredictRequest> {
    let mut r = tonic::Request::new(PredictRequest {
        model: "churn".into(),
        entity_id: entity.into(),
        features,
        model_version: String::new(),
    });
    r.set_timeout(timeout);
    r
}

/// One run of a model in flight at a time, and none counted as stalled: every other call
/// queues behind it, however slow the run.
fn one_run_at_a_time(c: &mut mesh_gateway::Config) {
    c.bulkheads.coalesce_runs = 1;
    c.bulkheads.coalesce_stall = Duration::from_secs(60);
}

async fn coalesced(mesh: &Mesh) -> (f64, f64) {
    (
        metric(mesh.gateway_http, "mesh_predict_coalesced_items_count").await,
        metric(mesh.gateway_http, "mesh_predict_coalesced_items_sum").await,
    )
}

/// What one burst of concurrent calls got: per fixture row its answer, plus the unknown
/// entities' and the short deadlines' results.
struct Burst {
    known: Vec<(
        FixtureRow,
        Result<mesh_proto::gateway::PredictResponse, tonic::Status>,
    )>,
    unknown: Vec<Result<mesh_proto::gateway::PredictResponse, tonic::Status>>,
    short: Vec<Result<mesh_proto::gateway::PredictResponse, tonic::Status>>,
}

/// 20 fixture rows, 4 unknown entities and 2 calls with a 5 ms deadline, all at once.
async fn burst(mesh: &Mesh) -> Burst {
    let rows: Vec<FixtureRow> = fixture().into_iter().take(20).collect();
    let known = rows.iter().map(|row| {
        let mut client = mesh.gateway_client();
        let row = row.clone();
        async move {
            let answer = client
                .predict(request(
                    &row.entity_id,
                    request_features(&row),
                    Duration::from_secs(5),
                ))
                .await
                .map(|r| r.into_inner());
            (row, answer)
        }
    });
    let first = rows[0].clone();
    let unknown = (0..4).map(|i| {
        let mut client = mesh.gateway_client();
        let features = request_features(&first);
        async move {
            client
                .predict(request(
                    &format!("nobody-{i}"),
                    features,
                    Duration::from_secs(5),
                ))
                .await
                .map(|r| r.into_inner())
        }
    });
    let short = (0..2).map(|_| {
        let mut client = mesh.gateway_client();
        let row = first.clone();
        async move {
            // Queued behind a run that takes at least the proxy's delay.
            tokio::time::sleep(Duration::from_millis(5)).await;
            client
                .predict(request(
                    &row.entity_id,
                    request_features(&row),
                    Duration::from_millis(5),
                ))
                .await
                .map(|r| r.into_inner())
        }
    });
    let (known, unknown, short) = tokio::join!(
        futures::future::join_all(known),
        futures::future::join_all(unknown),
        futures::future::join_all(short)
    );
    Burst {
        known,
        unknown,
        short,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_predicts_share_runs_and_keep_their_own_answers_errors_deadlines_and_traces() {
    // The shipped settings, but no stall: the proxy's 30 ms exceed MESH_PREDICT_RUN_STALL_MS.
    let mesh = Mesh::start(|c| c.bulkheads.coalesce_stall = Duration::from_secs(60)).await;
    mesh.seed(50).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::from_millis(30));
    }
    let burst = burst(&mesh).await;
    let (runs, calls) = coalesced(&mesh).await;
    println!("coalesced: {calls} calls in {runs} runs");
    assert!(runs >= 1.0, "queued calls ran coalesced");
    assert!(
        calls > runs,
        "some run served several calls: {calls} calls in {runs} runs"
    );

    // Each answer is its own entity's score (a mix-up between items would not match), with a
    // trace of its own.
    let mut traces = std::collections::HashSet::new();
    for (row, answer) in &burst.known {
        let answer = answer
            .as_ref()
            .unwrap_or_else(|s| panic!("{}: {s}", row.entity_id));
        assert!(
            (answer.score - row.probability).abs() < SKEW_TOLERANCE,
            "{}: {} vs the fixture's {}",
            row.entity_id,
            answer.score,
            row.probability
        );
        assert!(
            traces.insert(answer.trace_id.clone()),
            "trace {} given twice",
            answer.trace_id
        );
    }
    for result in &burst.unknown {
        let status = result
            .as_ref()
            .expect_err("an unknown entity fails on its own");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains("nobody-"), "{status:?}");
    }
    for result in &burst.short {
        let status = result
            .as_ref()
            .expect_err("a 5 ms deadline behind a 30 ms run");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }

    // Every answer is logged under its own id with its own trace id and score.
    let db = mesh.db().await;
    let started = Instant::now();
    for (_, answer) in &burst.known {
        let answer = answer.as_ref().expect("answer");
        let row = loop {
            let found = db
                .query_opt(
                    "SELECT trace_id, score FROM predictions WHERE prediction_id = $1",
                    &[&answer.prediction_id],
                )
                .await
                .expect("query");
            if let Some(row) = found {
                break row;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} not logged",
                answer.prediction_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(row.get::<_, String>(0), answer.trace_id);
        assert_eq!(row.get::<_, f64>(1), answer.score);
    }
    mesh.assert_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_coalescing_off_every_predict_runs_alone() {
    let mesh = Mesh::start(|c| c.bulkheads.coalesce = 1).await;
    mesh.seed(50).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::from_millis(30));
    }
    let burst = burst(&mesh).await;
    assert!(burst.known.iter().all(|(_, a)| a.is_ok()));
    assert_eq!(coalesced(&mesh).await, (0.0, 0.0), "no coalesced run");
    mesh.assert_idle().await;
}

/// The call that leads a run goes away mid-run (its client gives up); the calls queued behind
/// it are still answered, and the lane keeps working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_call_cancelled_mid_run_does_not_strand_the_queue() {
    // One run at a time: the other calls queue behind the lead call's.
    let mesh = Mesh::start(one_run_at_a_time).await;
    mesh.seed(50).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::from_millis(200));
    }
    let rows: Vec<FixtureRow> = fixture().into_iter().take(9).collect();
    let mut lead_client = mesh.gateway_client();
    let lead = lead_client.predict(request(
        &rows[0].entity_id,
        request_features(&rows[0]),
        Duration::from_secs(5),
    ));
    let queued = rows[1..].iter().map(|row| {
        let mut client = mesh.gateway_client();
        let row = row.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let answer = client
                .predict(request(
                    &row.entity_id,
                    request_features(&row),
                    Duration::from_secs(5),
                ))
                .await;
            (row, answer)
        }
    });
    // The lead call is dropped 100 ms in: inside its run (the proxy holds it 200 ms).
    let cancelled = tokio::time::timeout(Duration::from_millis(100), lead);
    let (cancelled, answers) = tokio::join!(cancelled, futures::future::join_all(queued));
    assert!(
        cancelled.is_err(),
        "the lead call was still running at 100 ms"
    );
    for (row, answer) in answers {
        let answer = answer.unwrap_or_else(|s| panic!("{} stranded: {s}", row.entity_id));
        assert!((answer.into_inner().score - row.probability).abs() < SKEW_TOLERANCE);
    }
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::ZERO);
    }
    let again = mesh
        .gateway_client()
        .predict(request(
            &rows[0].entity_id,
            request_features(&rows[0]),
            Duration::from_secs(5),
        ))
        .await
        .expect("the lane works after the cancellation");
    assert!((again.into_inner().score - rows[0].probability).abs() < SKEW_TOLERANCE);
    mesh.assert_idle().await;
}

/// Every caller of a coalesced run goes away (their clients give up long before their 10 s
/// deadlines): the run stops and releases what it held, instead of waiting out the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_callers_all_went_away_stops() {
    let mesh = Mesh::start(one_run_at_a_time).await;
    mesh.seed(50).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_fault(mesh_testkit::proxy::Fault::Hold);
    }
    let rows: Vec<FixtureRow> = fixture().into_iter().take(6).collect();
    // The lead call gives up at 100 ms; the five queued behind it then run together (held by
    // the proxy) and give up at 400 ms.
    let calls = rows.iter().enumerate().map(|(i, row)| {
        let mut client = mesh.gateway_client();
        let row = row.clone();
        async move {
            let (delay, patience) = if i == 0 {
                (Duration::ZERO, Duration::from_millis(100))
            } else {
                (Duration::from_millis(30), Duration::from_millis(400))
            };
            tokio::time::sleep(delay).await;
            let call = client.predict(request(
                &row.entity_id,
                request_features(&row),
                Duration::from_secs(10),
            ));
            tokio::time::timeout(patience, call).await.is_err()
        }
    });
    let gave_up = futures::future::join_all(calls).await;
    assert!(
        gave_up.iter().all(|g| *g),
        "every call was still held: {gave_up:?}"
    );
    let (runs, calls) = coalesced(&mesh).await;
    assert_eq!(
        (runs, calls),
        (1.0, 5.0),
        "the five queued calls ran as one"
    );
    // Still held by the proxy: only stopping the run can have released its counts.
    mesh.assert_idle().await;
}

/// Lanes are keyed by what requests name: invented model names must not leave lanes behind
/// (the map, and `mesh_predict_lanes`, go back to 0 once nothing is in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_model_names_leave_no_lane_behind() {
    let mesh = Mesh::start(one_run_at_a_time).await;
    mesh.seed(50).await;
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(Duration::from_millis(30));
    }
    let row = fixture()[0].clone();
    let calls = (0..60).map(|i| {
        let mut client = mesh.gateway_client();
        let row = row.clone();
        async move {
            let mut r = request(
                &row.entity_id,
                request_features(&row),
                Duration::from_secs(5),
            );
            if i % 2 == 1 {
                r.get_mut().model = format!("invented-{i}");
            }
            (i, client.predict(r).await)
        }
    });
    // The gauge's highest reading while the burst lasts (sampled throughout, not at a fixed
    // instant: on a loaded machine the calls take a while to connect).
    let done = std::sync::atomic::AtomicBool::new(false);
    let burst = async {
        let answers = futures::future::join_all(calls).await;
        done.store(true, std::sync::atomic::Ordering::Release);
        answers
    };
    let sample = async {
        let mut highest: f64 = 0.0;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            highest = highest.max(metric(mesh.gateway_http, "mesh_predict_lanes").await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        highest
    };
    let (answers, during) = tokio::join!(burst, sample);
    assert!(during >= 1.0, "a lane was open during the burst: {during}");
    for (i, answer) in answers {
        if i % 2 == 1 {
            let status = answer.expect_err("an invented model");
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
        } else {
            answer.unwrap_or_else(|s| panic!("churn call {i}: {s}"));
        }
    }
    assert_eq!(
        metric(mesh.gateway_http, "mesh_predict_lanes").await,
        0.0,
        "no lane left"
    );
    mesh.assert_idle().await;
}

/// A run that hangs on a downstream call (the features service held: a paused network, the
/// faked fault) stops holding back the calls queued behind it once it has been in flight for
/// `MESH_PREDICT_RUN_STALL_MS`: a queued call that needs nothing from features is answered
/// while the hung run still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_run_does_not_hold_up_the_queue() {
    let stall = Duration::from_millis(100);
    let mesh = Mesh::start(|c| {
        c.bulkheads.coalesce_runs = 1;
        c.bulkheads.coalesce_stall = stall;
    })
    .await;
    mesh.seed(50).await;
    let rows: Vec<FixtureRow> = fixture().into_iter().take(2).collect();
    mesh.features_proxy
        .set_fault(mesh_testkit::proxy::Fault::Hold);
    // The lead call needs stored features: its run hangs in GetFeatures.
    let mut hung_client = mesh.gateway_client();
    let (lead, lead_features) = (rows[0].entity_id.clone(), request_features(&rows[0]));
    let hung = tokio::spawn(async move {
        let started = Instant::now();
        let answer = hung_client
            .predict(request(&lead, lead_features, Duration::from_secs(3)))
            .await;
        (answer.map(|_| ()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Queued behind it (one run at a time); it brings all its features, so needs no GetFeatures.
    let queued_at = Instant::now();
    let answer = mesh
        .gateway_client()
        .predict(request(
            &rows[1].entity_id,
            json_features(&rows[1].features),
            Duration::from_secs(3),
        ))
        .await
        .expect("the queued call is answered");
    let waited = queued_at.elapsed();
    assert!((answer.into_inner().score - rows[1].probability).abs() < SKEW_TOLERANCE);
    assert!(
        !hung.is_finished(),
        "the queued call was answered while the hung run still waited"
    );
    assert!(
        waited < Duration::from_secs(1),
        "answered {waited:?} after it queued: it waited for the hung run"
    );
    assert_eq!(
        metric(mesh.gateway_http, "mesh_predict_stalled_runs_total").await,
        1.0,
        "one run was started past the stalled one"
    );
    mesh.features_proxy
        .set_fault(mesh_testkit::proxy::Fault::None);
    let (hung, took) = hung.await.expect("the hung call ends");
    println!("queued call answered after {waited:?}; hung call ended after {took:?}: {hung:?}");
    mesh.assert_idle().await;
}

/// `mesh_predict_step_seconds` says which step a slow prediction spent its time in: with the
/// features service behind a slow network the `fetch` step takes the delay and `score` does
/// not; with the inference replicas behind it, the other way round; and calls queued behind a
/// slow run show that wait in `queue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_histogram_names_the_step_that_was_slow() {
    let mesh = Mesh::start(one_run_at_a_time).await;
    mesh.seed(50).await;
    let rows: Vec<FixtureRow> = fixture().into_iter().take(8).collect();
    let delay = Duration::from_millis(80);
    // (sum, count) of each step so far.
    let steps = || async {
        let mut out = HashMap::new();
        for step in ["queue", "fetch", "score", "record"] {
            let sum = format!("mesh_predict_step_seconds_sum{{step=\"{step}\"}}");
            let count = format!("mesh_predict_step_seconds_count{{step=\"{step}\"}}");
            out.insert(
                step,
                (
                    metric(mesh.gateway_http, &sum).await,
                    metric(mesh.gateway_http, &count).await,
                ),
            );
        }
        out
    };
    // One call at a time, each needing stored features: every run fetches, scores and records.
    let one_by_one = |rows: &[FixtureRow]| {
        let rows = rows.to_vec();
        let mut client = mesh.gateway_client();
        async move {
            for row in rows {
                client
                    .predict(request(
                        &row.entity_id,
                        request_features(&row),
                        Duration::from_secs(5),
                    ))
                    .await
                    .expect("answered");
            }
        }
    };
    // The mean of `step` between two readings, and how many samples it got.
    let mean = |before: &HashMap<&str, (f64, f64)>, after: &HashMap<&str, (f64, f64)>, step| {
        let (s0, c0) = before[step];
        let (s1, c1) = after[step];
        (
            Duration::from_secs_f64((s1 - s0) / (c1 - c0).max(1.0)),
            c1 - c0,
        )
    };

    mesh.features_proxy.set_delay(delay);
    let before = steps().await;
    one_by_one(&rows[..3]).await;
    let slow_features = steps().await;
    let (fetch, fetches) = mean(&before, &slow_features, "fetch");
    let (score, scores) = mean(&before, &slow_features, "score");
    let (_, records) = mean(&before, &slow_features, "record");
    println!("features delayed: fetch {fetch:?} score {score:?} (runs: {fetches})");
    assert_eq!(
        (fetches, scores, records),
        (3.0, 3.0, 3.0),
        "one sample per step and run"
    );
    assert!(fetch >= delay, "fetch took the features' delay: {fetch:?}");
    assert!(score < delay, "score did not: {score:?}");

    mesh.features_proxy.set_delay(Duration::ZERO);
    for proxy in &mesh.inference_proxies {
        proxy.set_delay(delay);
    }
    one_by_one(&rows[3..6]).await;
    let slow_inference = steps().await;
    let (fetch, _) = mean(&slow_features, &slow_inference, "fetch");
    let (score, _) = mean(&slow_features, &slow_inference, "score");
    println!("inference delayed: fetch {fetch:?} score {score:?}");
    assert!(score >= delay, "score took the replicas' delay: {score:?}");
    assert!(fetch < delay, "fetch did not: {fetch:?}");
    let (_, queued) = mean(&before, &slow_inference, "queue");
    assert_eq!(queued, 0.0, "calls one at a time never queue");

    // Concurrent calls queue behind the slow run in flight (one run at a time): each waits at
    // least for the rest of it.
    let lead = one_by_one(&rows[6..7]);
    let behind = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        futures::future::join_all((0..4).map(|_| one_by_one(&rows[7..8]))).await
    };
    tokio::join!(lead, behind);
    let after = steps().await;
    let (queue, queued) = mean(&slow_inference, &after, "queue");
    println!("queued: {queued} calls, mean wait {queue:?}");
    assert_eq!(queued, 4.0, "the four calls behind the lead queued");
    assert!(
        queue >= delay / 2,
        "they waited for the run in flight: {queue:?}"
    );
    mesh.assert_idle().await;
}
