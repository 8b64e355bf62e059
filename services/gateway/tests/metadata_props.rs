//! Property test of the gateway's key check against arbitrary `x-api-key` and
//! `authorization` metadata: no panic; only the exact secret (trimmed, or after `Bearer `)
//! is accepted; everything else is `UNAUTHENTICATED` with a message.

use mesh_gateway::auth::{parse_keys, AccessControl};
use proptest::prelude::*;

const SECRET: &str = "s3cret-key-0001";

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(SECRET.as_bytes().to_vec()),
        Just(format!("Bearer {SECRET}").into_bytes()),
        Just(format!(" {SECRET} ").into_bytes()),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..ProptestConfig::default()
    })]

    #[test]
    fn only_the_key_itself_authenticates(api_key in prop::option::of(value()), bearer in prop::option::of(value())) {
        let registry = prometheus::Registry::new();
        let keys = parse_keys(&format!("team-a:{SECRET}")).expect("keys");
        let access = AccessControl::new(keys, None, &registry).expect("access");
        let mut metadata = tonic::metadata::MetadataMap::new();
        let mut sent = |name: &'static str, bytes: &Option<Vec<u8>>| {
            let value = bytes.as_ref().and_then(|b| tonic::metadata::MetadataValue::try_from(b.as_slice()).ok())?;
            metadata.insert(name, value);
            bytes.clone()
        };
        let api_key = sent("x-api-key", &api_key);
        let bearer = sent("authorization", &bearer);
        let text = |b: &Option<Vec<u8>>| b.as_ref().and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned);
        // x-api-key wins when it is readable text; otherwise `authorization: Bearer`.
        let presented = match text(&api_key).filter(|v| v.is_ascii() && !v.bytes().any(|b| b < 0x20 && b != b'\t')) {
            Some(v) => Some(v.trim().to_owned()),
            None => text(&bearer)
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::to_owned))
                .map(|v| v.trim().to_owned()),
        };
        match access.authenticate(&metadata) {
            Ok(id) => {
                prop_assert_eq!(id, "team-a");
                prop_assert_eq!(presented.as_deref(), Some(SECRET));
            }
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::Unauthenticated);
                prop_assert!(!status.message().is_empty());
                prop_assert_ne!(presented.as_deref(), Some(SECRET));
            }
        }
    }
}
