//! Property tests of the codec against hostile tensors: whatever a client declares and sends,
//! decoding never panics, never allocates more than a small multiple of what was sent, and
//! refuses with a message that names the problem.
//!
//! Allocation is measured with a counting global allocator; this file holds one test so that
//! nothing else allocates while it measures.
#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_proto::inference::model_infer_request::InferInputTensor;
use mesh_proto::inference::InferTensorContents;
use mesh_tensor::{decode_input, ColumnKind};
use proptest::prelude::*;
use prost::Message as _;

/// The system allocator, counting the bytes live and the most live since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("FP32".to_owned()),
        Just("FP64".to_owned()),
        Just("BYTES".to_owned()),
        Just("INT64".to_owned()),
        "[A-Z0-9]{0,6}",
    ]
}

/// Shapes: plausible, huge, negative and odd ranks.
fn shape() -> impl Strategy<Value = Vec<i64>> {
    let dim = prop_oneof![
        0i64..8,
        Just(1i64 << 48),
        Just(i64::MAX),
        Just(-1i64),
        any::<i64>(),
    ];
    prop::collection::vec(dim, 0..4)
}

fn contents() -> impl Strategy<Value = Option<InferTensorContents>> {
    prop::option::of(
        (
            prop::collection::vec(any::<f32>(), 0..16),
            prop::collection::vec(any::<f64>(), 0..16),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..16),
        )
            .prop_map(|(fp32, fp64, bytes)| InferTensorContents {
                fp32_contents: fp32,
                fp64_contents: fp64,
                bytes_contents: bytes,
                ..Default::default()
            }),
    )
}

/// Raw contents: arbitrary bytes, or BYTES elements whose length prefixes may lie.
fn raw() -> impl Strategy<Value = Option<Vec<u8>>> {
    let lying = prop::collection::vec(
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..8)),
        0..8,
    )
    .prop_map(|elements| {
        elements
            .into_iter()
            .flat_map(|(len, data)| {
                let mut e = len.to_le_bytes().to_vec();
                e.extend(data);
                e
            })
            .collect()
    });
    prop::option::of(prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        lying,
        // Many empty elements: 4 bytes each.
        (0usize..200).prop_map(|n| vec![0u8; n * 4]),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..ProptestConfig::default()
    })]

    #[test]
    fn decoding_any_tensor_is_bounded_and_explained(
        datatype in datatype(),
        shape in shape(),
        contents in contents(),
        raw in raw(),
        category in any::<bool>(),
    ) {
        let input = InferInputTensor {
            name: "x".into(),
            datatype,
            shape,
            parameters: Default::default(),
            contents,
        };
        let sent = input.encoded_len() + raw.as_ref().map_or(0, Vec::len);
        let kind = if category { ColumnKind::Category } else { ColumnKind::Number };
        let (result, peak) = peak_of(|| decode_input(&input, raw.as_deref(), kind));
        prop_assert!(
            peak <= 8 * sent + 1024,
            "decoding {sent} bytes allocated {peak} (shape {:?})", input.shape
        );
        match result {
            Ok(column) => {
                let declared = input.shape.first().copied().unwrap_or(-1);
                prop_assert_eq!(column.len() as i64, declared, "rows as declared");
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
