//! Log lines, one per event, each carrying the trace id of the request it was written in.
//!
//! The `fmt` layer's usual JSON keeps every span's fields, formatted as JSON (allocated), from
//! the moment the span opens, so that a line written inside it *could* show them; almost no
//! request writes a line, so for every request that work was thrown away. Here the JSON log
//! layer keeps of a span's fields only its `trace_id` ([`TraceIdOnly`]: the server span records
//! it, no other span has one), and a line, when one is written, puts the innermost recorded
//! trace id first ([`TraceIdFirst`]). The rest of a span's fields are in the trace. The text
//! format (for people at a terminal) keeps the `fmt` layer's full span context.

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

use crate::LogFormat;

/// Span fields as the JSON log layer keeps them: the value of a `trace_id` field, nothing else.
pub struct TraceIdOnly;

struct TraceIdVisitor<'w> {
    writer: Writer<'w>,
    result: std::fmt::Result,
}

impl Visit for TraceIdVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "trace_id" {
            self.result = self.writer.write_str(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

impl<'w> FormatFields<'w> for TraceIdOnly {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut visitor = TraceIdVisitor {
            writer,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        // A trace id is recorded once; a later one replaces it rather than running into it.
        let mut recorded = String::new();
        self.format_fields(Writer::new(&mut recorded), fields)?;
        if !recorded.is_empty() {
            current.fields = recorded;
        }
        Ok(())
    }
}

/// A JSON line format that puts the innermost span's recorded `trace_id` first. Lines outside
/// any traced request have none.
pub struct TraceIdFirst<F>(pub F);

impl<S, F> FormatEvent<S, TraceIdOnly> for TraceIdFirst<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    F: FormatEvent<S, TraceIdOnly>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, TraceIdOnly>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let trace_id = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let extensions = span.extensions();
                let fields = extensions.get::<FormattedFields<TraceIdOnly>>()?;
                (!fields.fields.is_empty()).then(|| fields.fields.clone())
            })
        });
        let Some(trace_id) = trace_id else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

/// The log layer: events that pass `filter` (`RUST_LOG`), in `format`, written to `writer`
/// (standard output in the services).
pub fn layer<S, W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .fmt_fields(TraceIdOnly)
            .event_format(TraceIdFirst(
                tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false),
            ))
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Lines {
        type Writer = Lines;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn logged(format: LogFormat, inside_span: bool) -> (String, Option<String>) {
        let lines = Lines::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(layer(format, EnvFilter::new("info"), lines.clone()));
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "grpc.server",
                rpc.method = "Predict",
                trace_id = tracing::field::Empty
            );
            let trace_id = {
                let _entered = span.enter();
                crate::propagation::current_trace_id()
            };
            if let Some(id) = &trace_id {
                // As `ServerTrace` does.
                span.record("trace_id", id.as_str());
            }
            let _entered = inside_span.then(|| span.enter());
            let child = tracing::info_span!("grpc.client", rpc.method = "GetFeatures");
            let _child = inside_span.then(|| child.enter());
            tracing::info!(answer = 42, "a line");
            tracing::debug!("below the filter");
            trace_id.filter(|_| inside_span)
        });
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        (text, trace_id)
    }

    #[test]
    fn a_json_line_in_a_request_starts_with_its_trace_id_and_stays_json() {
        let (text, trace_id) = logged(LogFormat::Json, true);
        let trace_id = trace_id.expect("a trace id inside the span");
        assert_eq!(
            text.lines().count(),
            1,
            "one line, the debug one filtered: {text}"
        );
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("valid JSON");
        assert_eq!(line["trace_id"], trace_id.as_str());
        assert_eq!(line["fields"]["answer"], 42);
        assert!(text.starts_with("{\"trace_id\":"), "{text}");
    }

    #[test]
    fn lines_outside_a_request_have_no_trace_id_and_text_lines_keep_the_span_context() {
        let (text, trace_id) = logged(LogFormat::Json, false);
        assert_eq!(trace_id, None);
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("valid JSON");
        assert!(line.get("trace_id").is_none(), "{text}");
        let (text, trace_id) = logged(LogFormat::Text, true);
        let trace_id = trace_id.expect("a trace id inside the span");
        assert!(text.contains(&trace_id), "{text}");
        assert!(text.contains("a line"), "{text}");
    }
}
