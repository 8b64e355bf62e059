//! The lifecycle scenarios' traffic: two `mesh-bench` loads (one per gateway), and the requests
//! the scenarios send themselves (routing probes, the broken inputs), every one recorded.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::gateway::gateway_client::GatewayClient;
use mesh_proto::gateway::PredictRequest;
use mesh_proto::types::FeatureValue;
use tonic::transport::Channel;

use crate::load::{Load, Req};
use crate::mesh::Mesh;

/// Two benches, one per gateway, at half the rate each.
pub struct Traffic {
    loads: Vec<Load>,
    /// The earliest bench start, unix ms: offsets are relative to it.
    pub base_unix_ms: u64,
}

/// What the benches did.
pub struct Merged {
    /// Every request, `start_ms` relative to [`Traffic::base_unix_ms`].
    pub reqs: Vec<Req>,
    /// Every bench's ids (in the order that bench received them), and its requests and start.
    pub per_load: Vec<(Vec<String>, Vec<Req>, u64)>,
    /// Answers by model version.
    pub versions: BTreeMap<String, usize>,
    /// The benches' JSON reports.
    pub reports: Vec<serde_json::Value>,
}

impl Merged {
    /// Every id, bench after bench.
    pub fn ids(&self) -> Vec<String> {
        self.per_load
            .iter()
            .flat_map(|(ids, _, _)| ids.iter().cloned())
            .collect()
    }
}

impl Traffic {
    /// Starts both benches for at most `max_secs`.
    pub async fn start(
        mesh: &Mesh,
        rate: u64,
        timeout_ms: u64,
        max_secs: f64,
        dir: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        let mut loads = Vec::new();
        let half = rate / 2;
        for (i, (gateway, rate)) in [(&mesh.gateway, rate - half), (&mesh.gateway2, half)]
            .into_iter()
            .enumerate()
        {
            loads.push(
                Load::start(
                    &mesh.bench(),
                    &gateway.url(),
                    rate.max(1),
                    timeout_ms,
                    max_secs,
                    &dir.join(format!("gateway-{}", i + 1)),
                    &format!("{name}-gw{}", i + 1),
                )
                .await?,
            );
        }
        let base_unix_ms = loads.iter().map(|l| l.start_unix_ms).min().unwrap_or(0);
        Ok(Self {
            loads,
            base_unix_ms,
        })
    }

    /// Now, ms since [`Traffic::base_unix_ms`].
    pub fn now_ms(&self) -> f64 {
        self.offset_of(crate::unix_ms())
    }

    /// `unix_ms` relative to [`Traffic::base_unix_ms`].
    pub fn offset_of(&self, unix_ms: u64) -> f64 {
        unix_ms as f64 - self.base_unix_ms as f64
    }

    /// Sleeps until `offset_ms` after the base.
    pub async fn sleep_until(&self, offset_ms: f64) {
        let wait = offset_ms - self.now_ms();
        if wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait / 1000.0)).await;
        }
    }

    /// Stops both benches and reads what they wrote.
    pub async fn finish(self) -> anyhow::Result<Merged> {
        let mut merged = Merged {
            reqs: Vec::new(),
            per_load: Vec::new(),
            versions: BTreeMap::new(),
            reports: Vec::new(),
        };
        for load in self.loads {
            let shift = load.start_unix_ms as f64 - self.base_unix_ms as f64;
            let start = load.start_unix_ms;
            let versions_path = load.dir.join("versions.txt");
            let fin = load.finish().await?;
            for line in std::fs::read_to_string(&versions_path)
                .unwrap_or_default()
                .lines()
            {
                if let Some((_, version)) = line.split_once(' ') {
                    *merged.versions.entry(version.to_owned()).or_default() += 1;
                }
            }
            merged.reqs.extend(fin.reqs.iter().map(|r| Req {
                start_ms: r.start_ms + shift,
                ..r.clone()
            }));
            merged.per_load.push((fin.ids, fin.reqs, start));
            merged.reports.push(fin.report);
        }
        merged
            .reqs
            .sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        Ok(merged)
    }
}

/// What sent a request of the scenario's own.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, serde::Serialize)]
pub enum Kind {
    /// A routing probe (which version does this gateway route the entity to?).
    Probe,
    /// An input the broken version fails on (scenario 12).
    Broken,
}

/// One request of the scenario's own.
#[derive(Clone, Debug)]
pub struct Shot {
    /// What sent it.
    pub kind: Kind,
    /// Gateway 0 or 1.
    pub gateway: usize,
    /// Intended start, unix ms.
    pub at_unix_ms: u64,
    /// From the intended start to the answer, ms.
    pub latency_ms: f64,
    /// gRPC code (0 = OK).
    pub code: i32,
    /// The answer's model version ("" on an error).
    pub version: String,
    /// The answer's score is a finite number (false on an error).
    pub finite: bool,
}

impl Shot {
    /// OK within `deadline_ms`.
    pub fn ok_within(&self, deadline_ms: f64) -> bool {
        self.code == 0 && self.latency_ms <= deadline_ms
    }
}

/// Both gateways, and the log of every request the scenario sent them itself.
#[derive(Clone)]
pub struct Gateways {
    clients: Vec<GatewayClient<Channel>>,
    timeout: Duration,
    log: Arc<Mutex<Vec<Shot>>>,
}

impl Gateways {
    /// Clients of both gateways; each request gets `timeout`.
    pub fn new(mesh: &Mesh, timeout: Duration) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for gateway in [&mesh.gateway, &mesh.gateway2] {
            let channel = tonic::transport::Endpoint::from_shared(gateway.url())?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
            clients.push(GatewayClient::new(channel));
        }
        Ok(Self {
            clients,
            timeout,
            log: Arc::default(),
        })
    }

    /// How many gateways.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Sends one Predict to gateway `g`, recording it; `intended` is when it should have
    /// started (latency counts from then).
    pub async fn predict(
        &self,
        kind: Kind,
        g: usize,
        entity: &str,
        features: &HashMap<String, FeatureValue>,
        intended: (Instant, u64),
    ) -> Shot {
        let mut request = tonic::Request::new(PredictRequest {
            model: super::MODEL.into(),
            entity_id: entity.to_owned(),
            features: features.clone(),
            model_version: String::new(),
        });
        request.set_timeout(self.timeout);
        let mut client = self.clients[g].clone();
        let answer = tokio::time::timeout(self.timeout, client.predict(request)).await;
        let (code, version, finite) = match answer {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                (0, r.model_version, r.score.is_finite())
            }
            Ok(Err(status)) => (status.code() as i32, String::new(), false),
            Err(_) => (tonic::Code::DeadlineExceeded as i32, String::new(), false),
        };
        let shot = Shot {
            kind,
            gateway: g,
            at_unix_ms: intended.1,
            latency_ms: intended.0.elapsed().as_secs_f64() * 1e3,
            code,
            version,
            finite,
        };
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(shot.clone());
        shot
    }

    /// Probes every gateway (entity `entity`) until each has answered from `version`; how long
    /// that took, or `None` after `bound`.
    pub async fn until_version(
        &self,
        entity: &str,
        features: &HashMap<String, FeatureValue>,
        version: &str,
        bound: Duration,
    ) -> Option<Duration> {
        let started = Instant::now();
        let mut done = vec![false; self.len()];
        while started.elapsed() < bound {
            for (g, done) in done.iter_mut().enumerate().filter(|(_, d)| !**d) {
                let shot = self.predict(Kind::Probe, g, entity, features, now()).await;
                *done = shot.version == version;
            }
            if done.iter().all(|d| *d) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Probes each gateway every `period` in the background (entity `entity`), until stopped.
    pub fn spawn_probes(
        &self,
        entity: &str,
        features: &HashMap<String, FeatureValue>,
        period: Duration,
    ) -> Stopper {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..self.len())
            .map(|g| {
                let (me, stop) = (self.clone(), stop.clone());
                let (entity, features) = (entity.to_owned(), features.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        me.predict(Kind::Probe, g, &entity, &features, now()).await;
                    }
                })
            })
            .collect();
        Stopper { stop, tasks }
    }

    /// Sends `rate` requests a second, open loop, alternating gateways and cycling through
    /// `entities`, until stopped.
    pub fn spawn_stream(
        &self,
        kind: Kind,
        entities: Vec<String>,
        features: HashMap<String, FeatureValue>,
        rate: u64,
    ) -> Stopper {
        let stop = Arc::new(AtomicBool::new(false));
        let (me, flag) = (self.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let features = Arc::new(features);
            let mut n = 0usize;
            let mut running = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = tick.tick().await;
                let intended = (at.into_std(), crate::unix_ms());
                let (me, features) = (me.clone(), features.clone());
                let entity = entities[n % entities.len().max(1)].clone();
                let g = n % me.len();
                running.push(tokio::spawn(async move {
                    me.predict(kind, g, &entity, &features, intended).await;
                }));
                running.retain(|t| !t.is_finished());
                n += 1;
            }
            for t in running {
                let _ = t.await;
            }
        });
        Stopper {
            stop,
            tasks: vec![task],
        }
    }

    /// Every request recorded so far.
    pub fn shots(&self) -> Vec<Shot> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn now() -> (Instant, u64) {
    (Instant::now(), crate::unix_ms())
}

/// Background requests; they stop when this is stopped or dropped.
pub struct Stopper {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stopper {
    /// Stops and waits for the requests in flight.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
