//! `droptrace report --html`: one self-contained page (inline CSS and SVG,
//! no scripts, nothing fetched) to attach to an incident ticket.
use std::{
    collections::BTreeMap,
    fmt::Write,
    time::{Duration, UNIX_EPOCH},
};

use super::analysis::Analysis;
use crate::{
    contract::rfc3339,
    sinks::terminal::{clock, clock_second, kind_label, limit_label},
};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;
/// At most this many buckets across a chart.
const MAX_BUCKETS: u64 = 600;
const COLORS: &[&str] = &[
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// HTML-escape text.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A line on a chart: (UNIX seconds, value) points.
struct Series {
    label: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
    dashed: bool,
    /// Hold each value until the next point (samples), rather than joining
    /// points with slopes.
    step: bool,
}

/// A round number of at least `raw`: 1, 2, 5 times a power of ten.
fn nice(raw: f64) -> f64 {
    if raw <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&v| v >= raw)
        .unwrap_or(10.0 * power)
}

fn hh_mm_ss(seconds: f64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs_f64(seconds.max(0.0));
    clock_second(&rfc3339(time)).to_string()
}

/// An SVG line chart over [start, end] (UNIX seconds), with axes, ticks
/// and a legend.
fn chart(title: &str, y_label: &str, start: f64, end: f64, series: &[Series]) -> String {
    let span = (end - start).max(1.0);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let y_step = nice(max.max(1.0) / 4.0);
    let y_top = (max / y_step).ceil().max(1.0) * y_step;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: f64| LEFT + (t - start) / span * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_top * plot_h;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure><figcaption>{}</figcaption><svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"#,
        esc(title),
        esc(title)
    );
    // Horizontal grid and y ticks.
    let mut value = 0.0;
    while value <= y_top + y_step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{value}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(value) + 4.0,
            y = y(value),
        );
        value += y_step;
    }
    // x ticks: about six, on whole seconds.
    let x_step = nice(span / 6.0).max(1.0);
    let mut tick = (start / x_step).ceil() * x_step;
    while tick <= end {
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"##,
            TOP + plot_h,
            HEIGHT - BOTTOM + 16.0,
            hh_mm_ss(tick),
            px = x(tick),
        );
        tick += x_step;
    }
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#444"/><line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#444"/><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle" class="tick">{}</text><text x="{}" y="{}" text-anchor="middle" class="tick">time (UTC)</text>"##,
        TOP + plot_h,
        WIDTH - RIGHT,
        TOP + plot_h,
        TOP + plot_h,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(y_label),
        LEFT + plot_w / 2.0,
        HEIGHT - 4.0,
    );
    for s in series {
        let mut path = String::new();
        let mut previous: Option<f64> = None;
        for &(t, v) in &s.points {
            let (px, py) = (x(t.clamp(start, end)), y(v));
            match previous {
                None => {
                    let _ = write!(path, "M{px:.1},{py:.1}");
                }
                Some(prev) if s.step => {
                    let _ = write!(path, " L{px:.1},{prev:.1} L{px:.1},{py:.1}");
                }
                Some(_) => {
                    let _ = write!(path, " L{px:.1},{py:.1}");
                }
            }
            previous = Some(py);
        }
        if s.step {
            if let Some(prev) = previous {
                let _ = write!(path, " L{:.1},{prev:.1}", x(end));
            }
        }
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = write!(
            svg,
            r#"<path d="{path}" fill="none" stroke="{}" stroke-width="2"{dash}><title>{}</title></path>"#,
            s.color,
            esc(&s.label)
        );
    }
    svg.push_str("</svg><ul class=\"legend\">");
    for s in series {
        let style = if s.dashed { "dashed" } else { "solid" };
        let _ = write!(
            svg,
            r#"<li><span class="swatch {style}" style="border-color:{}"></span>{}</li>"#,
            s.color,
            esc(&s.label)
        );
    }
    svg.push_str("</ul></figure>");
    svg
}

/// Drops per bucket for each total, and queue against backlog for each
/// listener, over the incident window (with a margin).
fn charts(analysis: &Analysis) -> String {
    let seconds: Vec<u64> = analysis
        .per_second
        .iter()
        .flat_map(|m| m.keys().copied())
        .collect();
    let (Some(&first), Some(&last)) = (seconds.iter().min(), seconds.iter().max()) else {
        return "<p>No drops were recorded: nothing to chart.</p>".into();
    };
    let margin = ((last - first) / 10).max(5);
    // Seconds near 1970 or near the end of u64 are a capture's to claim.
    let (start, end) = (
        first.saturating_sub(margin),
        last.saturating_add(margin).saturating_add(1),
    );
    let bucket = (end - start).div_ceil(MAX_BUCKETS).max(1);

    let mut drops = Vec::new();
    for (index, (total, per_second)) in analysis.totals.iter().zip(&analysis.per_second).enumerate()
    {
        let mut buckets: BTreeMap<u64, u64> = (start..end)
            .step_by(bucket as usize)
            .map(|b| (b, 0))
            .collect();
        for (&at, &count) in per_second {
            let sum = buckets
                .entry(start + (at - start) / bucket * bucket)
                .or_default();
            *sum = sum.saturating_add(count);
        }
        drops.push(Series {
            label: format!(
                "{} {} ({} drops)",
                kind_label(&total.drop),
                total.drop.subject(),
                total.count
            ),
            color: COLORS[index % COLORS.len()],
            points: buckets
                .into_iter()
                .map(|(b, n)| (b as f64, n as f64))
                .collect(),
            dashed: false,
            step: true,
        });
    }
    let unit = if bucket == 1 {
        "second".to_string()
    } else {
        format!("{bucket} s")
    };
    let mut html = chart(
        &format!("Drops per {unit}, per listener (or process) and limit"),
        &format!("drops per {unit}"),
        start as f64,
        end as f64,
        &drops,
    );

    // Queue samples and the queue seen at each drop, per listener.
    let mut queues: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for capture in &analysis.captures {
        for record in &capture.queues {
            let at = record
                .time
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            for sample in &record.listeners {
                queues.entry(sample.listener.clone()).or_default().push((
                    at,
                    sample.queue.into(),
                    sample.backlog.into(),
                ));
            }
        }
        for line in &capture.drops {
            let Some(listener) = &line.drop.listener else {
                continue;
            };
            if let (Some(queue), Some(backlog)) = (listener.queue, listener.backlog) {
                let at = line
                    .drop
                    .time
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                queues.entry(listener.label()).or_default().push((
                    at,
                    queue.into(),
                    backlog.into(),
                ));
            }
        }
    }
    // Only listeners that queued anything: idle ones would flatten the rest.
    queues.retain(|_, samples| samples.iter().any(|s| s.1 > 0.0));
    let mut depth = Vec::new();
    for (index, (label, mut samples)) in queues.into_iter().enumerate() {
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = COLORS[index % COLORS.len()];
        depth.push(Series {
            label: format!("{label} queue"),
            color,
            points: samples.iter().map(|s| (s.0, s.1)).collect(),
            dashed: false,
            step: true,
        });
        depth.push(Series {
            label: format!("{label} backlog"),
            color,
            points: samples.iter().map(|s| (s.0, s.2)).collect(),
            dashed: true,
            step: true,
        });
    }
    if depth.is_empty() {
        html.push_str("<p>No listener queued a connection in the samples of the capture.</p>");
    } else {
        html.push_str(&chart(
            "Queue depth (solid) against backlog (dashed), per listener",
            "connections waiting",
            start as f64,
            end as f64,
            &depth,
        ));
    }
    html
}

const STYLE: &str = "
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #222; margin: 24px auto; max-width: 1000px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .warning { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; } th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; } td.fix { color: #0a5; }
code, .mono { font-family: ui-monospace, 'DejaVu Sans Mono', monospace; font-size: 12px; }
figure { margin: 16px 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { max-width: 100%; height: auto; background: #fff; } .tick { font-size: 11px; fill: #555; }
ul.legend { list-style: none; padding: 0; margin: 4px 0 0 64px; font-size: 12px; } ul.legend li { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 22px; height: 0; border-top: 3px solid; margin-right: 6px; vertical-align: middle; } .swatch.dashed { border-top-style: dashed; }
.risk { margin: 8px 0; } .risk b { color: #b00; }
";

/// The whole page.
pub fn page(analysis: &Analysis) -> String {
    let report = &analysis.json;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>droptrace report</title><style>{STYLE}</style></head><body><h1>droptrace report</h1>"
    );
    for file in &report.files {
        let _ = write!(
            html,
            "<p class=\"meta\"><span class=\"mono\">{}</span>: host <b>{}</b>, kernel {}, recorded {} to {}</p>",
            esc(&file.path),
            esc(&file.host),
            esc(&file.kernel),
            esc(&file.started),
            esc(&file.ended)
        );
        if let Some(reason) = &file.truncated {
            let _ = write!(
                html,
                "<p class=\"warning\"><b>Truncated capture</b>: {} ({}). Everything up to its last complete record is shown.</p>",
                esc(&file.path),
                esc(reason)
            );
        }
    }
    match &report.window {
        Some(window) => {
            let lost = match report.lost {
                Some(n) => n.to_string(),
                None => "unknown (no summary)".into(),
            };
            let _ = write!(
                html,
                "<p><b>Incident window</b>: {} to {} ({:.1} s): <b>{} drops</b>, {} lost.",
                esc(&window.start),
                esc(clock(&window.end)),
                window.duration_s,
                report.drops,
                esc(&lost)
            );
            if let (Some(first), Some(worst)) = (&report.first_second, &report.worst_second) {
                let _ = write!(
                    html,
                    " First second {} ({} drops); worst second {} ({} drops).",
                    esc(clock_second(&first.time)),
                    first.drops,
                    esc(clock_second(&worst.time)),
                    worst.drops
                );
            }
            html.push_str("</p>");
        }
        None => html.push_str("<p><b>No drops were recorded.</b></p>"),
    }

    html.push_str("<h2>Timeline</h2>");
    html.push_str(&charts(analysis));

    html.push_str("<h2>Drops by listener, limit and kind</h2><table><tr><th>Count</th><th>Kind</th><th>Listener or process</th><th>Owner or client</th><th>Limit (value, source)</th><th>First</th><th>Worst second</th></tr>");
    for (total, detail) in analysis.totals.iter().zip(&report.totals) {
        let drop = &total.drop;
        let owner = drop.owner_or_client();
        let _ = write!(
            html,
            "<tr><td class=\"num\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{} ({})</td></tr><tr><td></td><td colspan=\"6\" class=\"fix\">fix: {}</td></tr>",
            total.count,
            esc(&kind_label(drop)),
            esc(&drop.subject()),
            esc(&owner),
            esc(&limit_label(&drop.limit)),
            esc(clock(&detail.first)),
            esc(clock_second(&detail.worst_second.time)),
            detail.worst_second.drops,
            esc(&detail.fix)
        );
    }
    html.push_str("</table>");

    if !report.kernel.is_empty() {
        html.push_str("<h2>Kernel counters over the capture (nstat)</h2><table><tr><th>Network namespace</th><th>ListenOverflows</th><th>ListenDrops</th><th>TCPReqQFullDrop</th><th>TCPReqQFullDoCookies</th><th>droptrace tcp_accept_queue</th></tr>");
        for netns in &report.kernel {
            let g = &netns.growth;
            let _ = write!(
                html,
                "<tr><td class=\"mono\">{}</td><td class=\"num\">+{}</td><td class=\"num\">+{}</td><td class=\"num\">+{}</td><td class=\"num\">+{}</td><td class=\"num\">{}</td></tr>",
                netns.netns, g.listen_overflows, g.listen_drops, g.req_q_full_drop, g.req_q_full_do_cookies, netns.droptrace_tcp_accept_queue
            );
        }
        html.push_str("</table>");
    }
    if !report.notices.is_empty() {
        html.push_str("<h2>Notices</h2><table><tr><th>Time</th><th>Listener</th><th>Owner</th><th>Requested</th><th>Effective</th><th>Fix</th></tr>");
        for notice in &report.notices {
            let _ = write!(
                html,
                "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{} (somaxconn {})</td><td class=\"fix\">{}</td></tr>",
                esc(clock(&rfc3339(notice.time))),
                esc(&notice.listener.label()),
                esc(&notice.listener.owner_label()),
                notice.requested,
                notice.effective,
                notice.somaxconn,
                esc(&notice.fix)
            );
        }
        html.push_str("</table>");
    }
    if !report.risks_at_start.is_empty() {
        html.push_str("<h2>Risks when the capture started (droptrace doctor)</h2>");
        for risk in &report.risks_at_start {
            let _ = write!(
                html,
                "<div class=\"risk\"><b>{}</b> <span class=\"mono\">{}</span><br>{}<br><span class=\"fix\">fix: {}</span></div>",
                esc(risk.kind.as_str()),
                esc(&risk.subject),
                esc(&risk.finding),
                esc(&risk.fix)
            );
        }
    }
    html.push_str("<p class=\"meta\">Written by droptrace report. Each drop record counts the drops up to its time; per-second figures put them in that second.</p></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn chart_steps_are_round_numbers() {
        assert_eq!(nice(0.3), 0.5);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(120.0), 200.0);
        assert_eq!(nice(0.0), 1.0);
    }

    #[test]
    fn a_chart_draws_one_path_per_series_inside_its_box() {
        let series = [Series {
            label: "a <b>".into(),
            color: COLORS[0],
            points: vec![(100.0, 0.0), (101.0, 50.0), (102.0, 10.0)],
            dashed: false,
            step: false,
        }];
        let svg = chart("t", "y", 100.0, 102.0, &series);
        assert_eq!(svg.matches("<path ").count(), 1);
        assert!(svg.contains("a &lt;b&gt;"));
        // The highest point sits at the top of the plot, the zero at its foot.
        assert!(
            svg.contains(&format!("M{LEFT:.1},{:.1}", HEIGHT - BOTTOM)),
            "{svg}"
        );
    }
}
