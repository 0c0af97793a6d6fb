//! The benchmark report: `bench-results.json` (CONTRACT: bulwark-bench) and an SVG bar chart.

use serde::Serialize;
use std::fmt::Write as _;

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub mem_bytes: u64,
}

/// The machine's limits (bytes/s). `quic_bps` is the better of the 1- and 4-stream figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Limits {
    pub read_bps: f64,
    pub blake3_bps: f64,
    pub quic_bps: f64,
    /// Sequential read through a warm page cache (memory speed, for reference).
    pub read_bps_cached: f64,
    /// Whether `read_bps` bypassed the page cache (false on file systems without O_DIRECT).
    pub read_direct: bool,
    pub blake3_bps_one_thread: f64,
    pub quic_bps_1_stream: f64,
    pub quic_bps_4_streams: f64,
    pub sample_bytes: u64,
}

/// One measured run of a tool on a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub tool: String,
    pub scenario: String,
    pub size_bytes: u64,
    pub churn_percent: f64,
    pub churn_bytes: u64,
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub bytes_stored: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub limits: Limits,
    pub results: Vec<BenchResult>,
    /// The store scenario's figures, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::storebench::StoreFigures>,
    /// The agent's read path, when the `read` scenario ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_read: Option<crate::agentbench::ReadFigures>,
    /// Full and smart restore figures (`restore`, `smart-restore`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::restorebench::RestoreFigures>,
}

/// A horizontal bar chart of named rates (bytes/s), as SVG.
pub fn bar_chart_svg(title: &str, bars: &[(String, f64)]) -> String {
    let width = 760.0;
    let label_w = 220.0;
    let bar_h = 26.0;
    let height = 50.0 + bars.len() as f64 * (bar_h + 10.0);
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(svg, r#"<text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#, escape(title));
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 40.0 + i as f64 * (bar_h + 10.0);
        let w = (width - label_w - 140.0) * v / max;
        let _ = writeln!(svg, r#"<text x="10" y="{}">{}</text>"#, y + 18.0, escape(name));
        let _ = writeln!(svg, r##"<rect x="{label_w}" y="{y}" width="{w:.1}" height="{bar_h}" fill="#3b6ea5"/>"##);
        let _ =
            writeln!(svg, r#"<text x="{:.1}" y="{}">{:.0} MiB/s</text>"#, label_w + w + 6.0, y + 18.0, v / 1048576.0);
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
