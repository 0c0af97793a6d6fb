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
    /// Sequential write of incompressible data, fsynced: what the store's packs cannot beat.
    pub write_bps: f64,
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
    /// The churn as asked for (`1%`, `64MiB`), for incremental runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<String>,
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
    /// The QEMU backend against the sim and `qemu-img convert` (`qemu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu: Option<crate::qemubench::QemuFigures>,
    /// `ls` and `recover-items` of large directories (`items`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<crate::itemsbench::ItemsFigures>,
    /// One coordinator with many VMs (`scale`), one row per VM count.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scale: Vec<crate::scalebench::ScaleRow>,
    /// The headline ratios, in words (also printed).
    pub findings: Vec<String>,
}

impl Report {
    fn find(&self, tool: &str, scenario: &str, size: u64, churn: Option<&str>) -> Option<&BenchResult> {
        self.results
            .iter()
            .find(|r| r.tool == tool && r.scenario == scenario && r.size_bytes == size && r.churn.as_deref() == churn)
    }

    fn sizes(&self, scenario: &str) -> Vec<u64> {
        let mut s: Vec<u64> = self.results.iter().filter(|r| r.scenario == scenario).map(|r| r.size_bytes).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    fn churns(&self) -> Vec<String> {
        let mut c: Vec<String> = vec![];
        for r in self.results.iter().filter(|r| r.scenario == "incremental") {
            if let Some(k) = &r.churn {
                if !c.contains(k) {
                    c.push(k.clone());
                }
            }
        }
        c
    }

    fn peers(&self) -> Vec<String> {
        let mut p: Vec<String> = vec![];
        for r in self.results.iter().filter(|r| r.tool != "bulwark") {
            if !p.contains(&r.tool) {
                p.push(r.tool.clone());
            }
        }
        p
    }

    /// The headline ratios of the protection runs: incremental speed-ups over the peers at the
    /// largest size, how each tool's incremental time grows with the disk for the same churn,
    /// bytes stored per byte changed, and initial throughput against the peers and against the
    /// slowest stage of the machine's pipeline.
    pub fn compute_findings(&mut self) {
        let mut out = vec![];
        let size = |b: u64| bulwark_protocol::units::format_size(b);
        let inc_sizes = self.sizes("incremental");
        for churn in self.churns() {
            let c = Some(churn.as_str());
            if let (Some(&small), Some(&large)) = (inc_sizes.first(), inc_sizes.last()) {
                if let Some(b) = self.find("bulwark", "incremental", large, c) {
                    for p in self.peers() {
                        if let Some(r) = self.find(&p, "incremental", large, c) {
                            out.push(format!(
                                "incremental, {churn} churn, {}: bulwark {:.2} s, {p} {:.1} s: {:.1}x faster",
                                size(large),
                                b.seconds,
                                r.seconds,
                                r.seconds / b.seconds.max(1e-9)
                            ));
                        }
                    }
                }
                if small != large {
                    for tool in std::iter::once("bulwark".to_owned()).chain(self.peers()) {
                        if let (Some(a), Some(z)) =
                            (self.find(&tool, "incremental", small, c), self.find(&tool, "incremental", large, c))
                        {
                            out.push(format!(
                                "incremental, {churn} churn: {tool} {:.2} s at {}, {:.2} s at {}: grows {:.2}x for {:.0}x the disk",
                                a.seconds,
                                size(small),
                                z.seconds,
                                size(large),
                                z.seconds / a.seconds.max(1e-9),
                                large as f64 / small as f64
                            ));
                        }
                    }
                }
                for tool in std::iter::once("bulwark".to_owned()).chain(self.peers()) {
                    if let Some(r) = self.find(&tool, "incremental", large, c) {
                        out.push(format!(
                            "incremental, {churn} churn, {}: {tool} stored {:.2}x the changed bytes ({} of {})",
                            size(large),
                            r.bytes_stored as f64 / r.churn_bytes.max(1) as f64,
                            r.bytes_stored,
                            r.churn_bytes
                        ));
                    }
                }
            }
        }
        let l = &self.limits;
        let stages =
            [("raw read", l.read_bps), ("BLAKE3", l.blake3_bps), ("QUIC+mTLS", l.quic_bps), ("write", l.write_bps)];
        let slowest = stages.iter().filter(|s| s.1 > 0.0).min_by(|a, b| a.1.total_cmp(&b.1));
        for disk in self.sizes("initial") {
            let Some(b) = self.find("bulwark", "initial", disk, None) else { continue };
            let bps = disk as f64 / b.seconds.max(1e-9);
            let mut line = format!("initial, {}: bulwark {:.0} MiB/s", size(disk), bps / 1048576.0);
            for p in self.peers() {
                if let Some(r) = self.find(&p, "initial", disk, None) {
                    let pbps = disk as f64 / r.seconds.max(1e-9);
                    line += &format!(", {p} {:.0} MiB/s ({:.2}x)", pbps / 1048576.0, bps / pbps.max(1e-9));
                }
            }
            if let Some((name, v)) = slowest {
                line += &format!("; {:.2}x the slowest stage ({name}, {:.0} MiB/s)", bps / v, v / 1048576.0);
            }
            out.push(line);
        }
        // Full restores of one image: Bulwark's against the write limit and the peers'.
        if let Some(b) = self.results.iter().find(|r| r.tool == "bulwark" && r.scenario == "restore") {
            let bps = b.size_bytes as f64 / b.seconds.max(1e-9);
            let mut line = format!(
                "full restore, {}: bulwark {:.2} s = {:.2}x the write + fsync limit ({:.0} MiB/s)",
                size(b.size_bytes),
                b.seconds,
                bps / self.limits.write_bps.max(1.0),
                self.limits.write_bps / 1048576.0
            );
            for p in self.peers() {
                if let Some(r) = self.results.iter().find(|r| r.tool == p && r.scenario == "restore") {
                    line +=
                        &format!(", {p} {:.2} s ({:.2}x bulwark's time)", r.seconds, r.seconds / b.seconds.max(1e-9));
                }
            }
            out.push(line);
        }
        // `initial NxK[+Dms]` rows: N disks of one VM, K at once (each block read D ms slower).
        for one in self.results.iter().filter(|r| r.tool == "bulwark") {
            let Some((n, delay)) = one.scenario.strip_prefix("initial ").and_then(|s| s.split_once("x1")) else {
                continue;
            };
            let parallel = format!("initial {n}x{n}{delay}");
            if let Some(all) = self.results.iter().find(|r| r.tool == "bulwark" && r.scenario == parallel) {
                let storage = match delay.strip_prefix('+') {
                    Some(d) => format!(", each block read {d} slower"),
                    None => String::new(),
                };
                out.push(format!(
                    "initial copy of {n} disks ({}{storage}): all at once {:.2} s, one at a time {:.2} s: {:.2}x the speed",
                    size(all.size_bytes),
                    all.seconds,
                    one.seconds,
                    one.seconds / all.seconds.max(1e-9)
                ));
            }
        }
        if let Some(q) = &self.qemu {
            let mib = |b: f64| b / (1u64 << 20) as f64;
            out.push(format!(
                "qemu, initial {}: over NBD {:.0} MiB/s = {:.2}x qemu-img convert ({:.0} MiB/s), {:.2}x the sim backend ({:.0} MiB/s)",
                size(q.disk_bytes),
                mib(q.qemu_initial_bps),
                q.qemu_initial_bps / q.convert_bps.max(1.0),
                mib(q.convert_bps),
                q.qemu_initial_bps / q.sim_initial_bps.max(1.0),
                mib(q.sim_initial_bps)
            ));
            out.push(format!(
                "qemu, incremental after 1 % churn: {:.2} s reading {} over NBD vs the sim backend {:.2} s reading {}",
                q.qemu_incremental_seconds,
                size(q.qemu_incremental_read),
                q.sim_incremental_seconds,
                size(q.sim_incremental_read)
            ));
        }
        self.findings = out;
    }

    /// Incremental time against disk size: one line per tool and churn.
    pub fn incremental_series(&self) -> Vec<Series> {
        let mut series = vec![];
        for churn in self.churns() {
            for tool in std::iter::once("bulwark".to_owned()).chain(self.peers()) {
                let points: Vec<(f64, f64)> = self
                    .sizes("incremental")
                    .into_iter()
                    .filter_map(|s| {
                        self.find(&tool, "incremental", s, Some(&churn))
                            .map(|r| (s as f64 / (1u64 << 30) as f64, r.seconds))
                    })
                    .collect();
                if !points.is_empty() {
                    series.push(Series { name: format!("{tool}, {churn} churn"), points });
                }
            }
        }
        series
    }
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

/// One line of a line chart: a name and its (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: &[&str] = &["#3b6ea5", "#c0504d", "#9bbb59", "#8064a2", "#4bacc6", "#f79646"];

/// A line chart with logarithmic axes (sizes and times span decades), as SVG, the axes named
/// `x_label` and `y_label`. Points that are not positive are left out.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (760.0, 460.0);
    let (left, right, top, bottom) = (80.0, 220.0, 50.0, 60.0);
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0 > 0.0 && p.1 > 0.0);
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x0 > x1 {
        (x0, x1, y0, y1) = (1.0, 10.0, 1.0, 10.0);
    }
    // Whole decades on y, powers of two on x.
    let (ly0, ly1) = (y0.log10().floor(), y1.log10().ceil().max(y0.log10().floor() + 1.0));
    let (lx0, lx1) = (x0.log2().floor(), x1.log2().ceil().max(x0.log2().floor() + 1.0));
    let px = |x: f64| left + (x.log2() - lx0) / (lx1 - lx0) * (w - left - right);
    let py = |y: f64| h - bottom - (y.log10() - ly0) / (ly1 - ly0) * (h - top - bottom);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(svg, r#"<text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#, escape(title));
    let mut d = ly0;
    while d <= ly1 {
        let y = py(10f64.powf(d));
        let _ = writeln!(svg, r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##, w - right);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, y + 4.0, tick(d));
        d += 1.0;
    }
    let mut e = lx0;
    while e <= lx1 {
        let x = px(2f64.powf(e));
        let _ = writeln!(svg, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##, h - bottom);
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            h - bottom + 18.0,
            2f64.powf(e)
        );
        e += 1.0;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        h - 18.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">{}</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = if i / PALETTE.len() % 2 == 1 { r#" stroke-dasharray="6 4""# } else { "" };
        let at: Vec<(f64, f64)> =
            s.points.iter().filter(|p| p.0 > 0.0 && p.1 > 0.0).map(|&(x, y)| (px(x), py(y))).collect();
        let line: Vec<String> = at.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            line.join(" ")
        );
        for (x, y) in &at {
            let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = w - right + 16.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, lx + 30.0, ly + 4.0, escape(&s.name));
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(decade: f64) -> String {
    let v = 10f64.powf(decade);
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_chart_places_points_inside_the_plot() {
        let s = vec![
            Series { name: "bulwark".into(), points: vec![(1.0, 0.5), (4.0, 0.6), (16.0, 0.7)] },
            Series { name: "restic <1%>".into(), points: vec![(1.0, 4.0), (4.0, 16.0), (16.0, 66.0)] },
        ];
        let svg = line_chart_svg("t", "GiB", "s", &s);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(svg.contains("restic &lt;1%&gt;"));
        for c in svg.lines().filter(|l| l.starts_with("<circle")) {
            let num = |k: &str| -> f64 {
                let v = c.split(&format!("{k}=\"")).nth(1).unwrap().split('"').next().unwrap();
                v.parse().unwrap()
            };
            assert!((80.0..=540.0).contains(&num("cx")), "{c}");
            assert!((50.0..=400.0).contains(&num("cy")), "{c}");
        }
    }
}
