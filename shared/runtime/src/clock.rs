//! Wall-clock time as the mesh stores it: Unix microseconds (prediction records, rollout
//! starts, catalog states).

/// Now, in Unix microseconds (0 if the clock is before 1970).
pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
