//! `droptrace report FILE...`: captures explained, without root or eBPF.
//!
//! A drop record stands for `count` drops that happened up to its time
//! (after the previous record of the same listener and limit, at most
//! 250 ms earlier in a storm); per-second figures put them in its second.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::capture::Capture;
use crate::{
    contract::{rfc3339, DropKind, Line, ListenCounters, Notice, TotalRecord},
    doctor::{self, Risk},
    sinks::{
        aggregate::{Aggregator, Key, Total},
        terminal::{clock, clock_second, escape, total_row, TOTALS_HEADER},
    },
};

/// `droptrace report --json`.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReportJson {
    pub files: Vec<FileInfo>,
    /// From the first drop to the last; absent when nothing was dropped.
    pub window: Option<Window>,
    pub drops: u64,
    /// Drop events the kernel could not hand over, from the captures'
    /// summaries; null when a capture has no summary (truncated).
    pub lost: Option<u64>,
    pub first_second: Option<Second>,
    pub worst_second: Option<Second>,
    /// The same objects as the live summary's totals, with their seconds.
    pub totals: Vec<ReportTotal>,
    /// The kernel's listen-queue counters over the capture, per namespace.
    pub kernel: Vec<KernelCounters>,
    pub notices: Vec<Notice>,
    /// What `droptrace doctor` finds in the first capture's header.
    pub risks_at_start: Vec<Risk>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileInfo {
    /// The path as given (bytes that are not UTF-8 shown as U+FFFD).
    pub path: String,
    pub host: String,
    pub kernel: String,
    pub format_version: u32,
    pub started: String,
    /// The time of its last record.
    pub ended: String,
    /// Why the capture ends early, when it does.
    pub truncated: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Window {
    pub start: String,
    pub end: String,
    pub duration_s: f64,
}

/// One wall-clock second and the drops in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Second {
    pub time: String,
    pub drops: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReportTotal {
    #[serde(flatten)]
    pub total: TotalRecord,
    pub first: String,
    pub worst_second: Second,
    pub fix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct KernelCounters {
    pub netns: u32,
    /// Growth of each counter from the header to the last sample.
    #[serde(flatten)]
    pub growth: ListenCounters,
    /// droptrace's tcp_accept_queue drops in that namespace, to compare
    /// with ListenOverflows.
    pub droptrace_tcp_accept_queue: u64,
}

/// Captures read and added up.
pub struct Analysis {
    pub json: ReportJson,
    /// Per total (same order): drops per wall-clock second (UNIX seconds).
    pub per_second: Vec<BTreeMap<u64, u64>>,
    pub totals: Vec<Total>,
    pub captures: Vec<Capture>,
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn second(seconds: u64, drops: u64) -> Second {
    Second {
        time: rfc3339(UNIX_EPOCH + Duration::from_secs(seconds)),
        drops,
    }
}

/// The busiest second (the first of equals).
fn worst(per_second: &BTreeMap<u64, u64>) -> Option<Second> {
    let mut best: Option<(u64, u64)> = None;
    for (&at, &drops) in per_second {
        if best.is_none_or(|(_, most)| drops > most) {
            best = Some((at, drops));
        }
    }
    best.map(|(at, drops)| second(at, drops))
}

/// The time of a capture's last record.
fn ended(capture: &Capture) -> SystemTime {
    let drops = capture.drops.iter().map(|l| l.drop.time);
    let counters = capture.counters.iter().map(|c| c.time);
    let queues = capture.queues.iter().map(|q| q.time);
    let notices = capture.notices.iter().map(|n| n.time);
    let started = humantime::parse_rfc3339(&capture.header.snapshot.time).unwrap_or(UNIX_EPOCH);
    let last = drops.chain(counters).chain(queues).chain(notices).max();
    let recorded = capture
        .summary
        .as_ref()
        .map(|s| started + Duration::from_secs_f64(s.duration_s.clamp(0.0, 1e9)));
    last.into_iter().chain(recorded).max().unwrap_or(started)
}

/// Counter growth from the header's snapshot to the last sample, per netns.
fn counter_growth(capture: &Capture) -> HashMap<u32, ListenCounters> {
    let start: HashMap<u32, ListenCounters> = capture
        .header
        .snapshot
        .namespaces
        .iter()
        .filter_map(|n| Some((n.netns, n.counters?)))
        .collect();
    let mut end = start.clone();
    for record in &capture.counters {
        for netns in &record.namespaces {
            end.insert(netns.netns, netns.counters);
        }
    }
    end.into_iter()
        .map(|(netns, last)| {
            let first = start.get(&netns).copied().unwrap_or_default();
            let grew = |a: u64, b: u64| a.saturating_sub(b);
            let growth = ListenCounters {
                listen_overflows: grew(last.listen_overflows, first.listen_overflows),
                listen_drops: grew(last.listen_drops, first.listen_drops),
                req_q_full_drop: grew(last.req_q_full_drop, first.req_q_full_drop),
                req_q_full_do_cookies: grew(
                    last.req_q_full_do_cookies,
                    first.req_q_full_do_cookies,
                ),
            };
            (netns, growth)
        })
        .collect()
}

impl Analysis {
    pub fn of(paths: &[PathBuf]) -> Result<Self> {
        let captures: Vec<Capture> = paths
            .iter()
            .map(|path| Capture::read(path))
            .collect::<Result<_>>()?;
        Ok(Self::from_captures(paths, captures))
    }

    pub fn from_captures(paths: &[PathBuf], captures: Vec<Capture>) -> Self {
        let mut lines: Vec<&Line> = captures.iter().flat_map(|c| &c.drops).collect();
        lines.sort_by_key(|l| l.drop.time);

        let mut aggregator = Aggregator::new(Duration::ZERO);
        // Per key: its first drop (lines are in time order) and its seconds.
        let mut by_key: HashMap<Key, (SystemTime, BTreeMap<u64, u64>)> = HashMap::new();
        let mut all: BTreeMap<u64, u64> = BTreeMap::new();
        let now = Instant::now();
        for line in &lines {
            let at = unix_seconds(line.drop.time);
            let (_, seconds) = by_key
                .entry(Key::of(&line.drop))
                .or_insert_with(|| (line.drop.time, BTreeMap::new()));
            let second = seconds.entry(at).or_default();
            *second = second.saturating_add(line.count);
            let second = all.entry(at).or_default();
            *second = second.saturating_add(line.count);
            aggregator.add(line.drop.clone(), line.count, now);
        }
        let totals = aggregator.totals();
        let (firsts, per_second): (Vec<SystemTime>, Vec<BTreeMap<u64, u64>>) = totals
            .iter()
            .map(|t| {
                by_key
                    .remove(&Key::of(&t.drop))
                    .unwrap_or((UNIX_EPOCH, BTreeMap::new()))
            })
            .unzip();
        let report_totals = totals
            .iter()
            .zip(firsts.iter().zip(&per_second))
            .map(|(total, (first, seconds))| ReportTotal {
                total: TotalRecord::from(total),
                first: rfc3339(*first),
                worst_second: worst(seconds).unwrap_or(second(0, 0)),
                fix: total.drop.limit.fix.clone(),
            })
            .collect();

        let mut growth: BTreeMap<u32, ListenCounters> = BTreeMap::new();
        for capture in &captures {
            for (netns, grew) in counter_growth(capture) {
                let sum = growth.entry(netns).or_default();
                sum.listen_overflows += grew.listen_overflows;
                sum.listen_drops += grew.listen_drops;
                sum.req_q_full_drop += grew.req_q_full_drop;
                sum.req_q_full_do_cookies += grew.req_q_full_do_cookies;
            }
        }
        let tcp_in = |netns: u32| -> u64 {
            totals
                .iter()
                .filter(|t| t.drop.kind == DropKind::TcpAcceptQueue)
                .filter(|t| t.drop.listener.as_ref().and_then(|l| l.netns) == Some(netns))
                .map(|t| t.count)
                .fold(0, u64::saturating_add)
        };
        let kernel = growth
            .into_iter()
            .filter(|(netns, grew)| *grew != ListenCounters::default() || tcp_in(*netns) > 0)
            .map(|(netns, grew)| KernelCounters {
                netns,
                growth: grew,
                droptrace_tcp_accept_queue: tcp_in(netns),
            })
            .collect();

        let window = match (lines.first(), lines.last()) {
            (Some(first), Some(last)) => Some(Window {
                start: rfc3339(first.drop.time),
                end: rfc3339(last.drop.time),
                duration_s: last
                    .drop
                    .time
                    .duration_since(first.drop.time)
                    .unwrap_or_default()
                    .as_secs_f64(),
            }),
            _ => None,
        };
        let lost = captures
            .iter()
            .map(|c| c.summary.as_ref().map(|s| s.lost))
            .try_fold(0, |sum: u64, lost| Some(sum.saturating_add(lost?)));
        let files = paths
            .iter()
            .zip(&captures)
            .map(|(path, capture)| FileInfo {
                path: path.to_string_lossy().into_owned(),
                host: capture.header.snapshot.host.hostname.clone(),
                kernel: capture.header.snapshot.host.kernel.clone(),
                format_version: capture.header.format_version,
                started: capture.header.snapshot.time.clone(),
                ended: rfc3339(ended(capture)),
                truncated: capture.truncated.clone(),
            })
            .collect();
        let mut notices: Vec<Notice> = captures.iter().flat_map(|c| c.notices.clone()).collect();
        notices.sort_by_key(|n| n.time);
        let risks_at_start = captures
            .first()
            .map_or_else(Vec::new, |c| doctor::risks(&c.header.snapshot, &[]));
        let json = ReportJson {
            files,
            window,
            drops: totals.iter().map(|t| t.count).fold(0, u64::saturating_add),
            lost,
            first_second: all.first_key_value().map(|(&at, &drops)| second(at, drops)),
            worst_second: worst(&all),
            totals: report_totals,
            kernel,
            notices,
            risks_at_start,
        };
        Self {
            json,
            per_second,
            totals,
            captures,
        }
    }

    /// The report an operator reads.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        let report = &self.json;
        for file in &report.files {
            writeln!(
                out,
                "droptrace report: {} (host {}, kernel {}), recorded {} to {}{}",
                escape(&file.path),
                escape(&file.host),
                escape(&file.kernel),
                file.started,
                file.ended,
                if file.truncated.is_some() {
                    ", TRUNCATED"
                } else {
                    ""
                }
            )?;
        }
        let Some(window) = &report.window else {
            writeln!(out, "\nNo drops were recorded.")?;
            return self.write_context(out);
        };
        let lost = match report.lost {
            Some(0) => "0 lost".to_string(),
            Some(n) => format!("{n} LOST (the counts below are short by that much)"),
            None => "lost events unknown (a capture has no summary)".to_string(),
        };
        writeln!(
            out,
            "\nIncident window: {} to {} ({:.1} s): {} drops, {lost}",
            window.start,
            clock(&window.end),
            window.duration_s,
            report.drops
        )?;
        if let (Some(first), Some(worst)) = (&report.first_second, &report.worst_second) {
            writeln!(
                out,
                "First second: {} with {} drops; worst second: {} with {} drops",
                clock_second(&first.time),
                first.drops,
                clock_second(&worst.time),
                worst.drops
            )?;
        }
        writeln!(out, "\n{TOTALS_HEADER}")?;
        for (total, detail) in self.totals.iter().zip(&report.totals) {
            writeln!(out, "{}", escape(&total_row(total)))?;
            writeln!(
                out,
                "{:>8}  first {}, worst second {} with {} drops",
                "",
                clock(&detail.first),
                clock_second(&detail.worst_second.time),
                detail.worst_second.drops
            )?;
            writeln!(out, "{:>8}  fix: {}", "", escape(&detail.fix))?;
        }
        self.write_context(out)
    }

    /// Kernel counters, notices and the risks at the start.
    fn write_context(&self, out: &mut impl Write) -> std::io::Result<()> {
        let report = &self.json;
        if !report.kernel.is_empty() {
            writeln!(out, "\nKernel counters over the capture (nstat):")?;
        }
        for netns in &report.kernel {
            let g = &netns.growth;
            let verdict = if g.listen_overflows == netns.droptrace_tcp_accept_queue {
                "match"
            } else {
                "MISMATCH"
            };
            writeln!(
                out,
                "  netns {}: ListenOverflows +{}, ListenDrops +{}, TCPReqQFullDrop +{}, TCPReqQFullDoCookies +{}; droptrace tcp_accept_queue {} ({verdict})",
                netns.netns,
                g.listen_overflows,
                g.listen_drops,
                g.req_q_full_drop,
                g.req_q_full_do_cookies,
                netns.droptrace_tcp_accept_queue
            )?;
        }
        if !report.notices.is_empty() {
            writeln!(out, "\nNotices:")?;
        }
        for notice in &report.notices {
            writeln!(
                out,
                "  {} backlog_clamped {}, owner {}: listen({}) clamped to {} by net.core.somaxconn={}; fix: {}",
                clock(&rfc3339(notice.time)),
                escape(&notice.listener.label()),
                escape(&notice.listener.owner_label()),
                notice.requested,
                notice.effective,
                notice.somaxconn,
                escape(&notice.fix)
            )?;
        }
        if !report.risks_at_start.is_empty() {
            writeln!(
                out,
                "\nWhen the capture started, `droptrace doctor` would have found:\n"
            )?;
            write!(out, "{}", doctor::risk_lines(&report.risks_at_start))?;
        }
        Ok(())
    }
}
