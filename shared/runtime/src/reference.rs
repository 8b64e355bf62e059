//! Reference distributions and the population stability index (PSI), shared by the gateway's
//! live drift gauges and `meshctl models drift` (which computes them from the prediction log).
//!
//! A model version's `reference.json` (written by `training/` with the version) holds the
//! training distribution of its score and of every feature: numbers as bin edges with each bin's
//! share, categories as each value's share. Binning follows the reference's rule: bin `i` holds
//! `edges[i] <= v < edges[i+1]`, values below the first edge fall into the first bin and values
//! above the last into the last (so the bin is the number of *inner* edges `<= v`: PostgreSQL's
//! `width_bucket(v, inner_edges)`). A category outside the reference counts in a bucket of its
//! own with reference share 0. Shares are clamped to [`EPSILON`] so an empty bin stays finite.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The smallest share a bin is given.
pub const EPSILON: f64 = 1e-4;

/// One distribution of `reference.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Reference {
    /// Numbers: bin edges and each bin's share.
    Bins {
        /// Ascending edges, one more than the bins.
        edges: Vec<f64>,
        /// Share per bin.
        fractions: Vec<f64>,
    },
    /// Categories: each value's share.
    Categories {
        /// Value → share.
        categories: BTreeMap<String, f64>,
    },
}

/// A version's `reference.json`: the training distribution of its score and features.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceFile {
    /// The score's distribution.
    pub score: Reference,
    /// Each feature's distribution, by name.
    pub features: BTreeMap<String, Reference>,
}

impl ReferenceFile {
    /// Parses the text of a `reference.json`.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The distributions in report order: the score (named `score`) first, then each feature.
    pub fn distributions(self) -> Vec<(String, Reference)> {
        std::iter::once(("score".to_owned(), self.score))
            .chain(self.features)
            .collect()
    }
}

/// A value to place in a distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// A number (a score or a numeric feature).
    Number(f64),
    /// A category.
    Category(&'a str),
}

/// The bucket `value` falls in (`None`: a category outside the reference, its own bucket).
pub fn bucket(reference: &Reference, value: &Value<'_>) -> Option<usize> {
    match (reference, value) {
        (Reference::Bins { .. }, Value::Number(v)) => Some(
            inner_edges(reference)
                .iter()
                .take_while(|e| **e <= *v)
                .count(),
        ),
        (Reference::Categories { categories }, Value::Category(c)) => {
            categories.keys().position(|k| k == c)
        }
        _ => None,
    }
}

/// PSI of the live `buckets` (one count per reference bucket, plus the count outside) against
/// `reference`.
pub fn psi(reference: &Reference, counts: &[u64], outside: u64) -> f64 {
    let total = counts.iter().sum::<u64>() + outside;
    if total == 0 {
        return 0.0;
    }
    let expected: Vec<f64> = match reference {
        Reference::Bins { fractions, .. } => fractions.clone(),
        Reference::Categories { categories } => categories.values().copied().collect(),
    };
    let term = |live: u64, e: f64| {
        let a = (live as f64 / total as f64).max(EPSILON);
        let e = e.max(EPSILON);
        (a - e) * (a / e).ln()
    };
    let inside: f64 = expected
        .iter()
        .zip(counts.iter().chain(std::iter::repeat(&0)))
        .map(|(e, c)| term(*c, *e))
        .sum();
    inside + if outside > 0 { term(outside, 0.0) } else { 0.0 }
}

/// How many buckets `reference` has (besides "outside").
pub fn size(reference: &Reference) -> usize {
    match reference {
        Reference::Bins { fractions, .. } => fractions.len(),
        Reference::Categories { categories } => categories.len(),
    }
}

/// The inner edges of a numeric reference (the thresholds between its bins), empty for a
/// categorical one.
pub fn inner_edges(reference: &Reference) -> &[f64] {
    match reference {
        Reference::Bins { edges, .. } => edges.get(1..edges.len().saturating_sub(1)).unwrap_or(&[]),
        Reference::Categories { .. } => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deciles() -> Reference {
        Reference::Bins {
            edges: (0..=10).map(f64::from).collect(),
            fractions: vec![0.1; 10],
        }
    }

    #[test]
    fn psi_is_near_zero_on_the_reference_and_large_on_a_shift() {
        assert!(psi(&deciles(), &[100; 10], 0) < 1e-9);
        let shifted = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1000];
        assert!(psi(&deciles(), &shifted, 0) > 0.2);
        let categories = Reference::Categories {
            categories: [("a".to_owned(), 0.5), ("b".to_owned(), 0.5)].into(),
        };
        assert!(psi(&categories, &[50, 50], 0) < 1e-9);
        assert!(
            psi(&categories, &[50, 0], 50) > 0.2,
            "unseen categories count"
        );
    }

    #[test]
    fn values_are_binned_by_the_references_rule() {
        let reference = deciles();
        let at = |v: f64| bucket(&reference, &Value::Number(v));
        assert_eq!(at(-5.0), Some(0), "below the first edge: the first bin");
        assert_eq!(at(0.5), Some(0));
        assert_eq!(at(1.0), Some(1), "an edge starts its bin");
        assert_eq!(at(10.0), Some(9), "the last edge is in the last bin");
        assert_eq!(at(99.0), Some(9), "above the last edge: the last bin");
    }
}
