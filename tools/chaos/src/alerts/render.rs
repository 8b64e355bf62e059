//! The shipped alerting configuration, rendered for a chaos run: the same files, with time
//! compressed so that alerts written for minutes and hours fire and resolve within a fault of
//! 10–30 s. Nothing is kept by hand: the rules are read from `deploy/prometheus/rules/*.yml`
//! and Alertmanager's routing from `deploy/prometheus/alertmanager.yml` at every run.
//!
//! The rules' time scale: every `for:`, every range-vector window (`[5m]`) and every threshold
//! on an age in seconds (a number compared with a `*_age_seconds` metric, e.g. the spool's
//! oldest record) is divided by [`FACTOR`] (a minute becomes a second), then clamped: a window
//! is at least [`MIN_WINDOW`] (`rate()` needs several scrapes in it; Prometheus scrapes every
//! 500 ms here, so the shortest shipped window, 2 m, becomes 2 s and is not raised: raising a
//! window but not the `for:` beside it would make a single error look sustained) and any
//! duration is at most [`MAX_DURATION`]. The cap is what keeps a run bounded: the slow-burn windows (6 h, 3 d)
//! would otherwise become 6 and 72 minutes, and an alert that fired in one scenario would still
//! fire several scenarios later. Multi-window burn-rate alerts therefore compare windows of at
//! most a minute: their thresholds and logic are the shipped ones, their time scale is not.
//! Thresholds that are not ages (a histogram bucket such as `le="300"`, `3 * 3600` since the last
//! partition maintenance) stay as written: a bucket cannot be renamed, and the maintenance
//! runs hourly, so a scaled threshold would fire on a healthy mesh.
//!
//! Alertmanager: the shipped routes, receivers and inhibitions, with `group_wait` and
//! `group_interval` at 1 s, `repeat_interval` at 1 h (one notification per change) and every
//! webhook pointed at the receiver inside mesh-chaos (the path keeps the receiver's name).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// Every duration of the rules is divided by this.
pub const FACTOR: u64 = 60;
/// The shortest range-vector window after scaling.
pub const MIN_WINDOW: Duration = Duration::from_secs(2);
/// The longest duration after scaling.
pub const MAX_DURATION: Duration = Duration::from_secs(60);

/// Renders every `*.yml` of `from` into `to` (see the module doc); the names of the files written.
pub fn rules(from: &Path, to: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(to)?;
    let mut written = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("cannot read {}", from.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let rendered = rules_text(&text).with_context(|| format!("in {}", path.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        std::fs::write(to.join(&name), rendered)?;
        written.push(name);
    }
    if written.is_empty() {
        bail!("no rules (*.yml) in {}", from.display());
    }
    Ok(written)
}

/// One rules file, rendered.
pub fn rules_text(text: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        if body.starts_with('#') {
            out.push_str(line);
        } else if let Some(value) = body.strip_prefix("for: ") {
            let d = parse_duration(value.trim())?;
            out.push_str(&format!(
                "{indent}for: {}",
                format_duration(scale(d, false))
            ));
        } else {
            out.push_str(&scale_ages(&scale_windows(line)?)?);
        }
        out.push('\n');
    }
    Ok(out)
}

/// Alertmanager's shipped configuration with short timings and every webhook at `receiver`
/// (`http://127.0.0.1:<port>`), keeping each URL's path.
pub fn alertmanager_text(text: &str, receiver: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut urls = 0;
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let key = body.split(':').next().unwrap_or_default();
        let rendered = match key {
            "group_wait" | "group_interval" => format!("{indent}{key}: 1s"),
            "repeat_interval" => format!("{indent}{key}: 1h"),
            "- url" | "url" => {
                let url = body.split_once(": ").map(|(_, u)| u.trim()).unwrap_or("");
                let path = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
                    .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                    .with_context(|| format!("webhook url without a path: {line:?}"))?;
                urls += 1;
                format!("{indent}{key}: {receiver}{path}")
            }
            _ => line.to_owned(),
        };
        out.push_str(&rendered);
        out.push('\n');
    }
    if urls == 0 {
        bail!("no webhook url in Alertmanager's configuration");
    }
    Ok(out)
}

fn scale(d: Duration, window: bool) -> Duration {
    let scaled = d / FACTOR as u32;
    let scaled = if window {
        scaled.max(MIN_WINDOW)
    } else {
        scaled
    };
    scaled.min(MAX_DURATION)
}

/// Rewrites every `[<duration>]` of a line.
fn scale_windows(line: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|c| open + c) else {
            break;
        };
        out.push_str(&rest[..=open]);
        let inside = &rest[open + 1..close];
        match parse_duration(inside) {
            Ok(d) => out.push_str(&format_duration(scale(d, true))),
            Err(_) => out.push_str(inside),
        }
        out.push(']');
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Scales `N` in `<metric>_age_seconds > N` (or `<`, `>=`, `<=`).
fn scale_ages(line: &str) -> anyhow::Result<String> {
    let Some(at) = line.find("_age_seconds") else {
        return Ok(line.to_owned());
    };
    let after = &line[at + "_age_seconds".len()..];
    let trimmed = after.trim_start();
    let Some(op) = [">=", "<=", ">", "<"]
        .into_iter()
        .find(|op| trimmed.starts_with(op))
    else {
        return Ok(line.to_owned());
    };
    let number_part = trimmed[op.len()..].trim_start();
    let end = number_part
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(number_part.len());
    let seconds: f64 = number_part[..end]
        .parse()
        .with_context(|| format!("an age threshold that is not a number: {line:?}"))?;
    let scaled = scale(Duration::from_secs_f64(seconds), false).as_secs_f64();
    Ok(format!(
        "{}_age_seconds {op} {scaled}{}",
        &line[..at],
        &number_part[end..]
    ))
}

/// A Prometheus duration: one or more `<n><unit>` with units `ms`, `s`, `m`, `h`, `d`, `w`, `y`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .with_context(|| format!("duration {text:?} has no unit"))?;
        if digits == 0 {
            bail!("duration {text:?}: expected a number");
        }
        let n: u64 = rest[..digits].parse()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => {
                total += Duration::from_millis(n);
                rest = &rest[unit_len..];
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "y" => 365 * 86_400,
            other => bail!("duration {text:?}: unknown unit {other:?}"),
        };
        total += Duration::from_secs(n * secs);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Seconds (or milliseconds, below a second) in Prometheus's syntax.
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_prometheus_syntax() {
        assert_eq!(
            parse_duration("5m").expect("test step"),
            Duration::from_secs(300)
        );
        assert_eq!(
            parse_duration("1h30m").expect("test step"),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("3d").expect("test step"),
            Duration::from_secs(259_200)
        );
        assert_eq!(
            parse_duration("250ms").expect("test step"),
            Duration::from_millis(250)
        );
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5q").is_err());
    }

    #[test]
    fn for_windows_and_ages_are_compressed_and_clamped() {
        let text = "      - alert: A\n        # a [5m] comment stays\n        expr: rate(x[1m]) > 0 and rate(y[1h]) > 0 and rate(z[3d]) > 0\n        for: 3m\n      - alert: B\n        expr: mesh_spool_oldest_record_age_seconds > 180\n        for: 1h\n      - alert: C\n        expr: time() - t_timestamp_seconds > 3 * 3600\n";
        let out = rules_text(text).expect("test step");
        assert!(out.contains("# a [5m] comment stays"), "{out}");
        assert!(
            out.contains("rate(x[2s]) > 0 and rate(y[60s]) > 0 and rate(z[60s]) > 0"),
            "{out}"
        );
        assert!(out.contains("        for: 3s\n"), "{out}");
        assert!(
            out.contains("mesh_spool_oldest_record_age_seconds > 3\n"),
            "{out}"
        );
        assert!(out.contains("        for: 60s\n"), "{out}");
        assert!(out.contains("> 3 * 3600"), "{out}");
    }

    #[test]
    fn label_matchers_with_brackets_are_left_alone() {
        let line = r#"  expr: x{code=~"[a-z]+"}[5m]"#;
        assert_eq!(
            scale_windows(line).expect("test step"),
            r#"  expr: x{code=~"[a-z]+"}[5s]"#
        );
    }

    #[test]
    fn alertmanager_keeps_routes_and_points_webhooks_here() {
        let text = "route:\n  group_wait: 30s\n  group_interval: 5m\n  repeat_interval: 12h\nreceivers:\n  - name: page\n    webhook_configs:\n      - url: http://127.0.0.1:9095/page\n        send_resolved: true\n";
        let out = alertmanager_text(text, "http://127.0.0.1:4000").expect("test step");
        assert!(out.contains("  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n"));
        assert!(
            out.contains("      - url: http://127.0.0.1:4000/page\n"),
            "{out}"
        );
        assert!(alertmanager_text("route: {}\n", "http://x").is_err());
    }
}
