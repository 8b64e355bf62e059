//! Property test of the gateway's request validation: arbitrary `PredictRequest`s and
//! `PredictBatchRequest`s (arbitrary strings, maps, sizes, numbers) never make it panic, and
//! every refusal is `INVALID_ARGUMENT` with a non-empty, bounded message. Fixed seed and a
//! bounded number of cases, so it runs in seconds and the same way every time.

use std::collections::HashMap;
use std::path::PathBuf;

use mesh_gateway::error::GatewayError;
use mesh_gateway::validate;
use mesh_proto::gateway::{BatchItem, PredictBatchRequest, PredictRequest};
use mesh_proto::types::{feature_value::Kind, FeatureValue};
use mesh_runtime::registry::ModelRegistry;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn registry() -> ModelRegistry {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    ModelRegistry::load(&models).expect("registry")
}

/// Strings a hostile or careless client sends: anything, names and values the model knows,
/// control characters, and strings around and far over the length limits.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z_]{0,24}",
        Just("churn".to_owned()),
        prop::sample::select(vec![
            "tenure_months",
            "contract",
            "channel",
            "support_calls_30d",
            "web",
            "fiber",
            "month_to_month",
            "",
            " ",
            "a\u{0}b",
            "\u{7f}",
            "production",
            "1",
        ])
        .prop_map(str::to_owned),
        (250usize..270).prop_map(|n| "x".repeat(n)),
        (1_000usize..20_000).prop_map(|n| "é".repeat(n)),
    ]
}

fn value() -> impl Strategy<Value = FeatureValue> {
    let kind = prop_oneof![
        Just(None),
        any::<f64>().prop_map(|n| Some(Kind::Number(n))),
        prop_oneof![
            Just(1e300),
            Just(-1e39),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(3.0)
        ]
        .prop_map(|n| Some(Kind::Number(n))),
        text().prop_map(|c| Some(Kind::Category(c))),
    ];
    kind.prop_map(|kind| FeatureValue { kind })
}

fn features() -> impl Strategy<Value = HashMap<String, FeatureValue>> {
    prop_oneof![
        prop::collection::hash_map(text(), value(), 0..12),
        prop::collection::hash_map("[a-z]{1,8}", value(), 250..300),
    ]
}

fn predict() -> impl Strategy<Value = PredictRequest> {
    (text(), text(), features(), text()).prop_map(|(model, entity_id, features, model_version)| {
        PredictRequest {
            model,
            entity_id,
            features,
            model_version,
        }
    })
}

fn batch() -> impl Strategy<Value = PredictBatchRequest> {
    let item = (text(), features()).prop_map(|(entity_id, features)| BatchItem {
        entity_id,
        features,
    });
    (text(), prop::collection::vec(item, 0..6), text()).prop_map(|(model, items, model_version)| {
        PredictBatchRequest {
            model,
            items,
            model_version,
        }
    })
}

/// A refusal as the property wants it.
fn assert_refusal(error: GatewayError) {
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let message = error.public_message();
    assert!(!message.trim().is_empty());
    assert!(message.len() <= 4096, "message of {} bytes", message.len());
}

/// Validates one item the way the pipeline does (plan, then assembly from the request alone
/// when the request is complete); refusals must be INVALID_ARGUMENT.
fn check_item(registry: &ModelRegistry, model: &str, version: &str, item: &BatchItem) {
    if let Err(error) = validate::model_ref(model, version) {
        return assert_refusal(error);
    }
    let Ok(found) = registry.resolve(model, version) else {
        return; // NOT_FOUND: not a validation outcome
    };
    let manifest = &found.manifest;
    match validate::item(manifest, &item.entity_id, &item.features) {
        Err(error) => assert_refusal(error),
        Ok(()) if validate::request_is_complete(manifest, &item.features) => {
            if let Err(error) = validate::assemble(manifest, &item.entity_id, &item.features, None)
            {
                assert_refusal(error);
            }
        }
        Ok(()) => {}
    }
}

fn config() -> Config {
    Config {
        cases: 128,
        rng_seed: RngSeed::Fixed(0x6d65_7368),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn predict_requests_are_refused_cleanly_or_accepted(request in predict()) {
        let registry = registry();
        let item = BatchItem { entity_id: request.entity_id, features: request.features };
        check_item(&registry, &request.model, &request.model_version, &item);
    }

    #[test]
    fn batch_requests_are_refused_cleanly_or_accepted(
        request in batch(),
        max in 1usize..8,
        declared in 0usize..100_000,
    ) {
        let registry = registry();
        if let Err(error) = validate::batch_len(declared, 1000) {
            assert_refusal(error);
        }
        match validate::batch_len(request.items.len(), max) {
            Err(error) => assert_refusal(error),
            Ok(()) => {
                for item in &request.items {
                    check_item(&registry, &request.model, &request.model_version, item);
                }
            }
        }
    }
}
