//! Entries, resolution and membership. Names resolve through [`MapResolver`] (a map standing
//! in for a hosts file, changed while the test runs), except one test of the system resolver
//! on `localhost`.

use std::net::{IpAddr, Ipv4Addr};

use mesh_runtime::internal::WithToken;
use prometheus::Registry;

use super::*;
use crate::client::replicas::{OutlierConfig, ReplicaMetrics};

const NAME: &str = "inference.mesh.svc";
const ENTRY: &str = "dns:///inference.mesh.svc:50053";

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn urls(endpoints: &[Endpoint]) -> Vec<&str> {
    endpoints.iter().map(|e| e.url.as_str()).collect()
}

fn discovery(resolver: &MapResolver, entries: &[&str]) -> (Discovery, Registry) {
    let registry = Registry::new();
    let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
    let discovery = Discovery::new(
        parse_targets(&entries).expect("entries"),
        Resolver::new(resolver.clone()),
        DiscoveryMetrics::register(&registry).expect("metrics"),
    );
    (discovery, registry)
}

fn exported(registry: &Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode")
}

#[test]
fn entries_are_urls_or_dns_names_with_a_port_and_bad_ones_say_why() {
    assert_eq!(
        Target::parse(ENTRY),
        Ok(Target::Dns {
            entry: ENTRY.into(),
            host: NAME.into(),
            port: 50053
        })
    );
    assert_eq!(
        Target::parse(" http://inference-1:50053 "),
        Ok(Target::Static("http://inference-1:50053".into()))
    );
    for (bad, says) in [
        ("dns:///inference", "needs a port"),
        ("dns:///inference:http", "is not a port"),
        ("dns://10.0.0.10/inference:50053", "only dns:///name:port"),
        ("dns:///:50053", "expected dns:///name:port"),
    ] {
        let error = Target::parse(bad).expect_err(bad);
        assert!(error.contains(says), "{bad}: {error}");
    }
    assert!(parse_targets(&[]).is_err(), "no replica at all");
}

#[tokio::test]
async fn a_failed_or_empty_resolution_keeps_the_last_good_addresses_and_is_counted() {
    let resolver = MapResolver::default();
    let (mut discovery, registry) = discovery(&resolver, &[ENTRY, "http://127.0.0.1:50060"]);
    // Before the name ever resolves: only the static entry.
    assert_eq!(
        urls(&discovery.endpoints().await),
        ["http://127.0.0.1:50060"]
    );
    resolver.set(NAME, &[loopback(3), loopback(2)]);
    let two = discovery.endpoints().await;
    assert_eq!(
        urls(&two),
        [
            "http://127.0.0.1:50060",
            "http://127.0.0.2:50053",
            "http://127.0.0.3:50053"
        ]
    );
    assert_eq!(two[1].source, ENTRY, "a resolved address names its entry");
    resolver.fail(NAME, "SERVFAIL");
    assert_eq!(discovery.endpoints().await, two, "a failure keeps the set");
    resolver.set(NAME, &[]);
    assert_eq!(
        discovery.endpoints().await,
        two,
        "an empty answer keeps the set"
    );
    resolver.set(NAME, &[loopback(2)]);
    assert_eq!(
        urls(&discovery.endpoints().await),
        ["http://127.0.0.1:50060", "http://127.0.0.2:50053"]
    );
    let text = exported(&registry);
    for (outcome, count) in [("ok", 2), ("failed", 2), ("empty", 1)] {
        let line = format!(
            "mesh_discovery_resolutions_total{{name=\"{ENTRY}\",outcome=\"{outcome}\"}} {count}"
        );
        assert!(text.contains(&line), "{line} not in {text}");
    }
    assert!(text.contains(&format!("mesh_discovery_addresses{{name=\"{ENTRY}\"}} 1")));
}

#[tokio::test]
async fn membership_follows_the_answers_in_the_balancer_and_the_catalog_polls() {
    let registry = Registry::new();
    let replicas = crate::client::replicas::ReplicaSet::start(
        OutlierConfig::default(),
        ReplicaMetrics::register(&registry).expect("metrics"),
    );
    let versions = ReplicaVersions::start(&registry).expect("versions");
    let membership = Membership {
        replicas: replicas.set().clone(),
        versions: versions.clone(),
        connect: Arc::new(|url: &str| {
            let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
                .map_err(|e| e.to_string())?;
            Ok(WithToken::new(endpoint.connect_lazy(), None))
        }),
    };
    let resolver = MapResolver::default();
    let (mut discovery, _) = discovery(&resolver, &[ENTRY]);
    resolver.set(NAME, &[loopback(2), loopback(3)]);
    membership.apply(&discovery.endpoints().await);
    let polled = |versions: &ReplicaVersions| -> Vec<String> {
        versions
            .snapshot()
            .into_iter()
            .map(|(url, _)| url)
            .collect()
    };
    let two = ["http://127.0.0.2:50053", "http://127.0.0.3:50053"];
    assert_eq!(replicas.urls(), two);
    assert_eq!(polled(&versions), two);
    resolver.set(NAME, &[loopback(3), loopback(4)]);
    membership.apply(&discovery.endpoints().await);
    let moved = ["http://127.0.0.3:50053", "http://127.0.0.4:50053"];
    assert_eq!(replicas.urls(), moved);
    assert_eq!(polled(&versions), moved);
    resolver.fail(NAME, "timeout");
    membership.apply(&discovery.endpoints().await);
    assert_eq!(
        replicas.urls(),
        moved,
        "a failed resolution changes nothing"
    );
    let text = exported(&registry);
    assert!(
        !text.contains("127.0.0.2:50053"),
        "the replica that left keeps series: {text}"
    );
    assert!(text.contains(r#"mesh_replica_versions_ready{replica="http://127.0.0.4:50053"} -1"#));
}

/// The system resolver (getaddrinfo): `localhost` resolves to loopback addresses only.
#[tokio::test]
async fn the_system_resolver_finds_localhost_on_loopback() {
    let addresses = SystemResolver
        .resolve("localhost", 50053)
        .await
        .expect("localhost resolves");
    assert!(!addresses.is_empty());
    assert!(
        addresses
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 50053),
        "{addresses:?}"
    );
}

/// A static URL that a name also resolves to is one replica, not two.
#[tokio::test]
async fn an_address_named_twice_is_one_replica() {
    let resolver = MapResolver::default();
    resolver.set(NAME, &[loopback(2), loopback(3)]);
    let (mut discovery, _) = discovery(&resolver, &["http://127.0.0.2:50053", ENTRY]);
    let endpoints = discovery.endpoints().await;
    assert_eq!(
        urls(&endpoints),
        ["http://127.0.0.2:50053", "http://127.0.0.3:50053"]
    );
    assert_eq!(endpoints[0].source, "http://127.0.0.2:50053");
}
