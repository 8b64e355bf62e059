//! Property tests of recovery and reading over hostile segment files: arbitrary bytes, and
//! valid segments cut short or with a bit flipped. Opening, recovering and reading never
//! panic, never take more memory than the file justifies (a declared length is checked against
//! the bytes remaining before anything is allocated for it), and every frame before the damage
//! is recovered. Fixed seed and bounded cases: deterministic, and a few seconds in `make test`.

use std::fs;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::frame::{self, FRAME_HEADER, HEADER_LEN, SEGMENT_HEADER};
use super::tests::temp_dir;
use super::*;

fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[42; 32]))
}

/// Opens a spool whose only segment holds `bytes`, and reads everything recovery left.
/// Returns the payloads read, or `None` if the open refused the file.
fn open_and_read(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let dir = temp_dir("fuzz");
    fs::write(segment_path(&dir, 0), bytes).expect("write");
    Spool::open(&dir, 1 << 20, Arc::new(RealDisk))
        .ok()
        .map(|recovered| {
            let end = recovered.spool.end();
            let mut reader = Reader::new(&dir, recovered.cursor).expect("reader");
            let (frames, _) = reader.read(end, usize::MAX).expect("read");
            assert_eq!(frames.len() as u64, recovered.pending_records);
            assert!(end <= bytes.len().max(HEADER_LEN as usize) as u64);
            frames.into_iter().map(|f| f.payload).collect::<Vec<_>>()
        })
}

fn segment(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = SEGMENT_HEADER.to_vec();
    for p in payloads {
        frame::encode(p, &mut bytes).expect("encode");
    }
    bytes
}

/// How many whole frames of `payloads` lie before byte `at` of their segment.
fn frames_before(payloads: &[Vec<u8>], at: u64) -> usize {
    let mut end = HEADER_LEN;
    payloads
        .iter()
        .take_while(|p| {
            end += FRAME_HEADER + p.len() as u64;
            end <= at
        })
        .count()
}

#[test]
fn arbitrary_bytes_as_a_segment_never_panic_and_never_yield_more_than_they_hold() {
    // Half the cases start with a valid header, so the frames themselves are exercised.
    let input = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..2048),
    );
    runner(300)
        .run(&input, |(with_header, tail)| {
            let mut bytes = if with_header {
                SEGMENT_HEADER.to_vec()
            } else {
                Vec::new()
            };
            bytes.extend_from_slice(&tail);
            if let Some(payloads) = open_and_read(&bytes) {
                let total: usize = payloads.iter().map(|p| p.len() + 8).sum();
                prop_assert!(total <= bytes.len());
            }
            Ok(())
        })
        .expect("property");
}

#[test]
fn a_cut_short_segment_recovers_every_whole_frame_before_the_cut() {
    let payloads = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20);
    let input = payloads.prop_flat_map(|p| {
        let len = segment(&p).len();
        (Just(p), HEADER_LEN as usize..=len)
    });
    runner(200)
        .run(&input, |(payloads, cut)| {
            let bytes = segment(&payloads);
            let read = open_and_read(&bytes[..cut]).expect("a valid header opens");
            let whole = frames_before(&payloads, cut as u64);
            prop_assert_eq!(read, payloads[..whole].to_vec());
            Ok(())
        })
        .expect("property");
}

#[test]
fn a_flipped_bit_loses_at_most_the_frames_from_the_damaged_one_on() {
    let payloads = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..20);
    let input = payloads.prop_flat_map(|p| {
        let len = segment(&p).len();
        (Just(p), 0..len, 0..8u8)
    });
    runner(300)
        .run(&input, |(payloads, at, bit)| {
            let mut bytes = segment(&payloads);
            bytes[at] ^= 1 << bit;
            let read = open_and_read(&bytes);
            if (at as u64) < HEADER_LEN {
                // A damaged header is refused with an error naming the file, not misread.
                prop_assert!(read.is_none());
                return Ok(());
            }
            let read = read.expect("a valid header opens");
            let intact = frames_before(&payloads, at as u64);
            prop_assert_eq!(read, payloads[..intact].to_vec());
            Ok(())
        })
        .expect("property");
}
