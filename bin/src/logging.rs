//! Log formats of `tidepool node run`: every line names the node (`node=<name>` in text, a
//! top-level `"node"` key in JSON), whichever task, actor or library wrote it. A root span would
//! not do that: tokio tasks and ractor actors do not inherit the span of the code that spawned
//! them. JSON lines are flat: the event's fields and those of the spans it is in are top-level
//! keys next to `timestamp`, `level`, `node`, `target` (an event field called `node` that names
//! another node is written as `member`).

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The default filter when `TIDEPOOL_LOG` is not set. openraft's `raft_inner` logs an ERROR
/// for every API call that finds the Raft core stopped, which is every call in flight when the
/// node stops normally; the caller gets the same error as a value and decides, so they are off.
/// Its replication stream reports each failed append to a peer in several lines per retry
/// (a peer not started yet, restarting, or gone); the control plane's network logs the peer's
/// change once each way instead, so those are off too (the replication handler's ERRORs stay).
pub const DEFAULT_FILTER: &str = "info,quinn=warn,rustls=warn,openraft=warn,\
     openraft::raft::raft_inner=off,openraft::replication=off,\
     openraft::engine::handler::replication_handler=error";

/// The level a line is written with: openraft's ERRORs are WARN. It reports at ERROR every
/// RPC to a peer that is unreachable or slow (a vote or append timeout, "link is closed"),
/// which happens whenever a peer restarts or the cluster stops; whatever of it matters reaches
/// Tidepool's control plane as an error value, which logs it itself.
fn shown_level(meta: &tracing::Metadata<'_>) -> tracing::Level {
    if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("openraft") {
        tracing::Level::WARN
    } else {
        *meta.level()
    }
}

/// Text lines: `TIMESTAMP LEVEL node=NAME span{..}: target: message key=value ...`.
#[derive(Debug, Clone)]
pub struct NodeText {
    pub node: String,
}

impl<S, N> FormatEvent<S, N> for NodeText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        SystemTime.format_time(&mut w)?;
        let meta = event.metadata();
        write!(w, " {:>5} node={} ", shown_level(meta), self.node)?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(w, "{}", span.name())?;
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                    write!(w, "{{{f}}}")?;
                }
                w.write_str(": ")?;
            }
        }
        write!(w, "{}: ", meta.target())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// JSON lines, flattened, with `node` at the top level.
#[derive(Debug, Clone)]
pub struct NodeJson {
    pub node: String,
}

impl<S, N> FormatEvent<S, N> for NodeJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Map::new();
        // Span fields (outermost first), as recorded by the JSON field formatter.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>() {
                    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(f) {
                        fields.extend(o);
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut fields));
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), ts.into());
        line.insert("level".into(), shown_level(meta).as_str().into());
        line.insert("node".into(), self.node.as_str().into());
        line.insert("target".into(), meta.target().into());
        for (k, v) in fields {
            let key = match k.as_str() {
                "node" if v.as_str() == Some(self.node.as_str()) => continue,
                "node" => "member".to_string(),
                "timestamp" | "level" | "target" => format!("field_{k}"),
                _ => k,
            };
            line.insert(key, v);
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| std::fmt::Error)?;
        writeln!(w, "{text}")
    }
}

/// Collects an event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), v.into());
    }
    fn record_error(&mut self, f: &Field, v: &(dyn std::error::Error + 'static)) {
        self.0.insert(f.name().into(), v.to_string().into());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), format!("{v:?}").into());
    }
}

fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER))
}

/// Logging of the CLI commands: text (colour on a TTY) or flattened JSON lines, on stderr.
pub fn init_cli(json: bool) {
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Logging of a node (`tidepool node run`): every line carries `node`.
pub fn init_node(json: bool, node: &str) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
    let node = node.to_string();
    if json {
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(NodeJson { node })
            .init();
    } else {
        builder
            .with_ansi(false)
            .event_format(NodeText { node })
            .init();
    }
}

#[cfg(test)]
#[path = "logging_tests.rs"]
mod tests;
