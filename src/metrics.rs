//! `/metrics` in the Prometheus text exposition format, version 0.0.4 (served as
//! [`CONTENT_TYPE`]): every family has its `# HELP` and `# TYPE` lines, counters end in
//! `_total` (family and sample alike), label values and help texts are escaped.
//!
//! Written here rather than with `prometheus-client`, whose text encoder writes
//! OpenMetrics (counter families without their `_total`, `# EOF`): served as 0.0.4, the
//! Prometheus server and `promtool check metrics` read every counter as an untyped
//! metric without help. One format, said by its content type, is what a scraper needs.

use std::fmt::Write;

/// The content type of what [`Metrics::finish`] returns.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The body of a `/metrics` answer, family by family.
#[derive(Default)]
pub struct Metrics {
    text: String,
}

impl Metrics {
    /// Starts a family: `name` gets the `shoal_` prefix (and `_total` for a counter).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        let name = match kind {
            Kind::Counter => format!("shoal_{name}_total"),
            Kind::Gauge => format!("shoal_{name}"),
        };
        let kind_name = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.text, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.text, "# TYPE {name} {kind_name}");
        Family {
            text: &mut self.text,
            name,
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// One family's samples.
pub struct Family<'a> {
    text: &'a mut String,
    name: String,
}

impl Family<'_> {
    /// One sample with `labels` (name, value) pairs.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(&self.name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{name}=\"{}\"", escape(value, true));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }
}

/// Escapes a help text (backslash, newline) or a label value (also the double quote).
fn escape(text: &str, quote: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_and_type_and_counters_end_in_total() {
        let mut metrics = Metrics::default();
        metrics
            .family("files_applied", Kind::Counter, "Files applied\nfrom peers")
            .sample(&[], 3.0);
        metrics
            .family("peer_connected", Kind::Gauge, "Whether connected")
            .sample(&[("peer", "10.0.0.1:7029"), ("name", "a\"b\\")], 1.0);
        assert_eq!(
            metrics.finish(),
            "# HELP shoal_files_applied_total Files applied\\nfrom peers\n\
             # TYPE shoal_files_applied_total counter\n\
             shoal_files_applied_total 3\n\
             # HELP shoal_peer_connected Whether connected\n\
             # TYPE shoal_peer_connected gauge\n\
             shoal_peer_connected{peer=\"10.0.0.1:7029\",name=\"a\\\"b\\\\\"} 1\n"
        );
    }
}
