//! The fleet path: what droptrace counts, as Prometheus metrics.
//!
//! The watcher adds every drop here as it adds it to the summary, so
//! `droptrace_drops_total` holds the summary's counts; listener gauges come
//! from the drops (queue and backlog sampled at the drop) and from a
//! periodic look at the host, which also refreshes doctor's risks. Scrapes
//! read the metrics without waiting for either.
//!
//! Encoded by prometheus-client (OpenMetrics); a scraper that does not ask
//! for OpenMetrics gets the Prometheus text format 0.0.4, rewritten from it.
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    contract::{Drop, ListenerView, Lost},
    probes::hooks::Choice,
};

/// Label sets kept apart per metric; past this, new listeners share
/// `listener="other"` (processes choose their names and paths).
pub const MAX_SERIES: usize = 1000;
const OTHER: &str = "other";

/// The content types of the two encodings.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    kind: &'static str,
    limit: &'static str,
    listener: String,
    owner_role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RiskLabels {
    kind: &'static str,
    subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// A metric family that keeps at most MAX_SERIES label sets apart.
struct Capped<L, M> {
    family: Family<L, M>,
    series: AtomicUsize,
}

impl<L, M> Capped<L, M>
where
    L: Clone + std::hash::Hash + Eq,
    M: Default,
{
    fn new() -> Self {
        Self {
            family: Family::default(),
            series: AtomicUsize::new(0),
        }
    }

    /// Whether `labels` has a series, or may have one now.
    fn admits(&self, labels: &L) -> bool {
        self.family.get(labels).is_some()
            || self
                .series
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < MAX_SERIES).then_some(n + 1)
                })
                .is_ok()
    }
}

impl<L> Capped<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq,
{
    /// Set a gauge, unless that would add a label set past MAX_SERIES.
    fn set(&self, labels: L, value: u64) {
        if self.admits(&labels) {
            self.family
                .get_or_create(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

/// Every metric droptrace serves.
pub struct Metrics {
    registry: Registry,
    drops: Capped<DropLabels, Counter>,
    folded: Counter,
    queue: Capped<ListenerLabels, Gauge>,
    backlog: Capped<ListenerLabels, Gauge>,
    limit_value: Capped<LimitLabels, Gauge>,
    risk: Family<RiskLabels, Gauge>,
    lost: Family<CauseLabels, Counter>,
    /// The kernel's lost counters as last read, to add what they grew by.
    lost_seen: Mutex<Lost>,
}

impl Metrics {
    /// `kernel` is `uname -r`; `hooks` what each family attached.
    pub fn new(kernel: &str, hooks: &[Choice]) -> Self {
        let mut registry = Registry::with_prefix("droptrace");
        let drops = Capped::<DropLabels, Counter>::new();
        registry.register(
            "drops",
            "Connections and files refused, by kind, the limit hit, the listener (UNIX path or addr:port; for drops without one, the process) and its owner's role: the counts of droptrace's summary",
            drops.family.clone(),
        );
        let folded = Counter::default();
        registry.register(
            "folded_drops",
            format!("Drops counted under listener=\"other\" because {MAX_SERIES} label sets were kept apart already"),
            folded.clone(),
        );
        let queue = Capped::<ListenerLabels, Gauge>::new();
        registry.register(
            "listener_queue",
            "Connections waiting in a listener's accept queue, at the last drop or look",
            queue.family.clone(),
        );
        let backlog = Capped::<ListenerLabels, Gauge>::new();
        registry.register(
            "listener_backlog",
            "A listener's effective backlog: the queue length at which it refuses",
            backlog.family.clone(),
        );
        let limit_value = Capped::<LimitLabels, Gauge>::new();
        registry.register(
            "limit_value",
            "The value of the limit a drop hit",
            limit_value.family.clone(),
        );
        let risk = Family::<RiskLabels, Gauge>::default();
        registry.register(
            "risk",
            "1 for each risk droptrace doctor's checks find now (refreshed periodically)",
            risk.clone(),
        );
        let lost = Family::<CauseLabels, Counter>::default();
        registry.register(
            "lost_events",
            "Kernel events droptrace could not count (pending_map_full, counter_map_full: drops missing from droptrace_drops_total) or not detail (ring_buffer_full: the counts stay exact)",
            lost.clone(),
        );
        for (cause, _) in Lost::default().by_cause() {
            drop(lost.get_or_create(&CauseLabels { cause }));
        }
        registry.register(
            "build",
            "droptrace's version and the kernel it runs on",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("kernel", kernel.to_string()),
            ]),
        );
        let hook = Family::<HookLabels, Gauge>::default();
        for choice in hooks {
            hook.get_or_create(&HookLabels {
                family: choice.family,
                mechanism: choice.mechanism.unwrap_or("none"),
            })
            .set(1);
        }
        registry.register(
            "hook_info",
            "1 for the kernel mechanism each drop family uses (\"none\": its drops are not seen on this kernel)",
            hook,
        );
        Self {
            registry,
            drops,
            folded,
            queue,
            backlog,
            limit_value,
            risk,
            lost,
            lost_seen: Mutex::new(Lost::default()),
        }
    }

    /// `count` drops like `drop` (as the summary counts them).
    pub fn add(&self, drop: &Drop, count: u64) {
        let mut labels = DropLabels {
            kind: drop.kind.as_str(),
            limit: drop.limit.name.as_str(),
            // Its path or addr:port; for drops without a listener, the
            // process (the summary's first column).
            listener: drop.subject(),
            owner_role: drop
                .owner_or_client_role()
                .map_or("unknown", |role| role.as_str()),
        };
        if !self.drops.admits(&labels) {
            labels.listener = OTHER.into();
            self.folded.inc_by(count);
        }
        self.drops.family.get_or_create(&labels).inc_by(count);
        if let Some(value) = drop.limit.value {
            self.limit_value.set(
                LimitLabels {
                    limit: labels.limit,
                    listener: labels.listener,
                },
                value,
            );
        }
        if let Some(view) = drop.refusing_listener() {
            self.listener(view);
        }
    }

    /// A listener's queue and backlog, as sampled.
    pub fn listener(&self, view: &ListenerView) {
        let labels = ListenerLabels {
            listener: view.label(),
        };
        if let Some(queue) = view.queue {
            self.queue.set(labels.clone(), queue.into());
        }
        if let Some(backlog) = view.backlog {
            self.backlog.set(labels, backlog.into());
        }
    }

    /// The risks found now, as (kind, subject), replacing those found
    /// before.
    pub fn risks<'a>(&self, risks: impl IntoIterator<Item = (&'static str, &'a str)>) {
        self.risk.clear();
        for (kind, subject) in risks.into_iter().take(MAX_SERIES) {
            self.risk
                .get_or_create(&RiskLabels {
                    kind,
                    subject: subject.to_string(),
                })
                .set(1);
        }
    }

    /// The kernel's lost counters, read now.
    pub fn lost(&self, now: &Lost) {
        let mut seen = self.lost_seen.lock().unwrap_or_else(|e| e.into_inner());
        for ((cause, count), (_, was)) in now.by_cause().into_iter().zip(seen.by_cause()) {
            let grew = count.saturating_sub(was);
            if grew > 0 {
                self.lost.get_or_create(&CauseLabels { cause }).inc_by(grew);
            }
        }
        *seen = *now;
    }

    /// The metrics, as OpenMetrics or as the Prometheus text format.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        if openmetrics {
            text
        } else {
            prometheus_text(&text)
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    family: &'static str,
    mechanism: &'static str,
}

/// OpenMetrics text as the Prometheus text format 0.0.4: counters are
/// typed under their `_total` name, info metrics become gauges named
/// `_info`, and `# UNIT` and `# EOF` go.
fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Client, DropKind, Family as SocketFamily, Role, Verdict};

    fn drop_at(path: &str, count_role: Role) -> Drop {
        Drop {
            time: std::time::SystemTime::UNIX_EPOCH,
            kind: DropKind::UnixBacklog,
            stage: None,
            listener: Some(ListenerView {
                family: SocketFamily::Unix,
                path: Some(path.into()),
                addr: None,
                port: None,
                netns: Some(1),
                pid: Some(7),
                comm: Some("uwsgi".into()),
                role: Some(count_role),
                queue: Some(101),
                backlog: Some(100),
            }),
            client: Client::default(),
            limit: Verdict {
                name: crate::contract::LimitName::UwsgiListen,
                value: Some(100),
                hard: None,
                source: "uWSGI default".into(),
                fix: "listen = 1024".into(),
            },
            caused_by: None,
        }
    }

    #[test]
    fn drops_are_counted_by_kind_limit_listener_and_owner_role() {
        let metrics = Metrics::new("6.1.0", &[]);
        metrics.add(&drop_at("/run/app.sock", Role::UwsgiMaster), 3);
        metrics.add(&drop_at("/run/app.sock", Role::UwsgiMaster), 2);
        let text = metrics.encode(false);
        assert!(
            text.contains(r#"droptrace_drops_total{kind="unix_backlog",limit="uwsgi_listen",listener="/run/app.sock",owner_role="uwsgi-master"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"droptrace_listener_queue{listener="/run/app.sock"} 101"#),
            "{text}"
        );
        assert!(
            text.contains(r#"droptrace_listener_backlog{listener="/run/app.sock"} 100"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"droptrace_limit_value{limit="uwsgi_listen",listener="/run/app.sock"} 100"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"droptrace_build_info{version=""#), "{text}");
        assert!(
            text.contains(r#"droptrace_lost_events_total{cause="counter_map_full"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn the_prometheus_text_types_counters_under_their_total_name() {
        let metrics = Metrics::new("6.1.0", &[]);
        metrics.add(&drop_at("/a", Role::Other), 1);
        let text = metrics.encode(false);
        assert!(
            text.contains("# TYPE droptrace_drops_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP droptrace_drops_total Connections"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE droptrace_build_info gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let openmetrics = metrics.encode(true);
        assert!(
            openmetrics.contains("# TYPE droptrace_drops counter\n"),
            "{openmetrics}"
        );
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    }

    #[test]
    fn listeners_past_the_cap_are_folded_and_the_folding_counted() {
        let metrics = Metrics::new("6.1.0", &[]);
        for n in 0..MAX_SERIES + 5 {
            metrics.add(&drop_at(&format!("/run/{n}.sock"), Role::Other), 2);
        }
        let text = metrics.encode(false);
        assert!(
            text.contains(r#"listener="other",owner_role="other"} 10"#),
            "{text}"
        );
        assert!(text.contains("droptrace_folded_drops_total 10\n"), "{text}");
        let total: u64 = text
            .lines()
            .filter(|l| l.starts_with("droptrace_drops_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 2 * (MAX_SERIES as u64 + 5));
    }

    #[test]
    fn names_that_processes_chose_are_escaped_in_labels() {
        let metrics = Metrics::new("6.1.0", &[]);
        metrics.add(&drop_at("/run/\"evil\"\n} 99", Role::Other), 1);
        let text = metrics.encode(false);
        assert!(
            text.contains(r#"listener="/run/\"evil\"\n} 99",owner_role="other"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn lost_events_add_what_the_kernel_counters_grew_by() {
        let metrics = Metrics::new("6.1.0", &[]);
        metrics.lost(&Lost {
            ring_buffer_full: 4,
            pending_map_full: 0,
            counter_map_full: 1,
        });
        metrics.lost(&Lost {
            ring_buffer_full: 10,
            pending_map_full: 0,
            counter_map_full: 1,
        });
        let text = metrics.encode(false);
        assert!(
            text.contains(r#"droptrace_lost_events_total{cause="ring_buffer_full"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"droptrace_lost_events_total{cause="counter_map_full"} 1"#),
            "{text}"
        );
    }
}
