//! `droptrace doctor`: what will refuse connections under load, read off
//! the host as it is now, without eBPF. The checks are pure functions of a
//! [`Snapshot`] (so `report` can run them on a capture's header too).
use std::{
    collections::HashMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    cli::DoctorArgs,
    config::{nginx::UpstreamTarget, Setting},
    contract::{Family, ListenerView, ProcessState, Role, Snapshot},
    families::backlog::clamp_fix,
    host::{process::PidFilter, sock_diag::NetnsView},
    sinks::terminal::escape,
};

/// ListenOverflows is read twice, at least this far apart.
const GROWTH_WINDOW: Duration = Duration::from_millis(500);

/// The exit code when doctor could not look (a risk found is 1).
pub fn cannot_look() -> ExitCode {
    ExitCode::from(2)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RiskKind {
    /// A listener's backlog is below the connections nginx can open to it.
    ListenQueueBelowNginx,
    /// nginx's worker_connections is above its workers' RLIMIT_NOFILE.
    WorkerConnectionsAboveNofile,
    /// A listener's queue is at its backlog now.
    QueueFullNow,
    /// A configured backlog is above net.core.somaxconn, which clamps it.
    BacklogClamped,
    /// TcpExtListenOverflows grew while doctor looked.
    ListenOverflowsGrowing,
}

impl RiskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ListenQueueBelowNginx => "listen_queue_below_nginx",
            Self::WorkerConnectionsAboveNofile => "worker_connections_above_nofile",
            Self::QueueFullNow => "queue_full_now",
            Self::BacklogClamped => "backlog_clamped",
            Self::ListenOverflowsGrowing => "listen_overflows_growing",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Risk {
    pub kind: RiskKind,
    /// The listener or process at risk: "/run/app.sock, owner uwsgi[12] uwsgi-master".
    pub subject: String,
    /// What was found, with values and where they were set.
    pub finding: String,
    pub fix: String,
}

/// TcpExtListenOverflows growth of one namespace over `seconds`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    pub netns: u32,
    pub overflows: u64,
    pub seconds: f64,
}

/// Every risk in `snapshot`, then the growing counters.
pub fn risks(snapshot: &Snapshot, growth: &[Growth]) -> Vec<Risk> {
    let mut risks = Vec::new();
    for master in snapshot.processes.iter().filter(|p| p.nginx.is_some()) {
        risks.extend(upstream_queues(snapshot, master));
        risks.extend(worker_connections_above_nofile(snapshot, master));
    }
    for listener in &snapshot.listeners {
        risks.extend(queue_full(snapshot, listener));
        risks.extend(clamped(snapshot, listener));
    }
    for g in growth.iter().filter(|g| g.overflows > 0) {
        let full: Vec<String> = snapshot
            .listeners
            .iter()
            .filter(|l| l.netns == Some(g.netns) && l.family != Family::Unix && is_full(l))
            .map(ListenerView::label)
            .collect();
        let which = if full.is_empty() {
            "run `sudo droptrace` to see which TCP listener overflows and why".to_string()
        } else {
            format!(
                "full now: {}; run `sudo droptrace` for the limit and its fix",
                full.join(", ")
            )
        };
        risks.push(Risk {
            kind: RiskKind::ListenOverflowsGrowing,
            subject: format!("network namespace {}", g.netns),
            finding: format!(
                "TcpExtListenOverflows grew by {} in {:.1} s: TCP connections are being dropped now",
                g.overflows, g.seconds
            ),
            fix: which,
        });
    }
    risks
}

fn owner_label(listener: &ListenerView) -> String {
    format!("{}, owner {}", listener.label(), listener.owner_label())
}

fn is_full(listener: &ListenerView) -> bool {
    matches!((listener.queue, listener.backlog), (Some(q), Some(b)) if q > 0 && q >= b)
}

/// The workers an nginx master runs: counted, or from worker_processes.
fn nginx_workers(snapshot: &Snapshot, master: &ProcessState) -> (u64, String) {
    let running = snapshot
        .processes
        .iter()
        .filter(|p| p.ppid == Some(master.pid) && p.role == Role::NginxWorker)
        .count() as u64;
    if running > 0 {
        return (running, format!("{running} workers running"));
    }
    let configured = master.nginx.as_ref().map(|c| &c.worker_processes);
    match configured.map(|s| (s.value.parse::<u64>(), s)) {
        Some((Ok(n), setting)) => (n, format!("worker_processes {n} ({})", setting.source)),
        _ => (
            snapshot.host.cpus.into(),
            format!("worker_processes auto = {} CPUs", snapshot.host.cpus),
        ),
    }
}

/// The listener an nginx upstream target names, in nginx's namespace.
fn target_listener<'a>(
    snapshot: &'a Snapshot,
    master: &ProcessState,
    target: &UpstreamTarget,
) -> Option<&'a ListenerView> {
    let same_netns = |l: &&ListenerView| master.netns.is_none() || l.netns == master.netns;
    if let Some(path) = target.server.strip_prefix("unix:") {
        return snapshot
            .listeners
            .iter()
            .filter(same_netns)
            .find(|l| l.path.as_deref() == Some(path));
    }
    let (host, port) = target.server.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = ["localhost", "127.0.0.1", "::1"].contains(&host);
    snapshot.listeners.iter().filter(same_netns).find(|l| {
        l.port == Some(port)
            && l.family != Family::Unix
            && l.addr.as_deref().is_some_and(|addr| {
                addr == host
                    || addr == "0.0.0.0"
                    || addr == "::"
                    || (local && addr.starts_with("127."))
            })
    })
}

/// What set a listener's backlog, from its owner's configuration.
fn requested_backlog(snapshot: &Snapshot, listener: &ListenerView) -> Option<Setting> {
    let owner = snapshot.process(listener.pid?)?;
    if let Some(uwsgi) = &owner.uwsgi {
        return Some(uwsgi.listen.clone());
    }
    let nginx = owner.nginx.as_ref()?;
    let path = listener.path.as_deref().map(std::path::Path::new);
    let port = if listener.family == Family::Unix {
        None
    } else {
        listener.port
    };
    nginx.listen_backlog(port, path).cloned()
}

fn upstream_queues(snapshot: &Snapshot, master: &ProcessState) -> Vec<Risk> {
    let Some(config) = &master.nginx else {
        return Vec::new();
    };
    let (workers, workers_source) = nginx_workers(snapshot, master);
    let connections = u64::from(config.worker_connections.value);
    // Each proxied request holds a client and an upstream connection.
    let capacity = workers.saturating_mul(connections) / 2;
    let mut risks = Vec::new();
    let mut seen = Vec::new();
    for target in &config.upstreams {
        let Some(listener) = target_listener(snapshot, master, target) else {
            continue;
        };
        let Some(backlog) = listener.backlog else {
            continue;
        };
        if u64::from(backlog) >= capacity || seen.contains(&listener.label()) {
            continue;
        }
        seen.push(listener.label());
        let requested = requested_backlog(snapshot, listener);
        let somaxconn = snapshot.netns(listener.netns).and_then(|n| n.somaxconn);
        let set_by = match &requested {
            Some(setting) if u64::from(setting.value) == u64::from(backlog) => {
                format!("{} ({})", backlog, setting.source)
            }
            Some(setting) => format!(
                "{backlog}: {} asked for {} ({}) and net.core.somaxconn={} clamped it",
                listener.owner_label(),
                setting.value,
                setting.source,
                somaxconn.map_or("?".into(), |s| s.to_string())
            ),
            None => backlog.to_string(),
        };
        let owner_is_uwsgi = listener.role.is_some_and(Role::is_uwsgi);
        let program = if owner_is_uwsgi {
            "uWSGI listen"
        } else {
            "backlog"
        };
        let raise = if owner_is_uwsgi {
            format!("raise uWSGI's listen to {capacity} (listen = {capacity} in its config, or --listen {capacity})")
        } else {
            format!(
                "raise the listen() backlog of {} to {capacity}",
                listener.owner_label()
            )
        };
        let sysctl = match somaxconn {
            Some(s) if u64::from(s) < capacity => {
                format!(" and net.core.somaxconn to {capacity} (now {s})")
            }
            _ => String::new(),
        };
        risks.push(Risk {
            kind: RiskKind::ListenQueueBelowNginx,
            subject: owner_label(listener),
            finding: format!(
                "{program} {set_by}, while nginx[{}] can hold {workers} × {connections} worker_connections / 2 = {capacity} upstream connections at once ({workers_source}; {}; {} {} at {}): a burst beyond the queue gets 502s",
                master.pid,
                config.worker_connections.source,
                target.directive,
                target.server,
                target.origin
            ),
            fix: format!("{raise}{sysctl}, or lower nginx's worker_connections; then restart {}", listener.owner_label()),
        });
    }
    risks
}

fn worker_connections_above_nofile(snapshot: &Snapshot, master: &ProcessState) -> Option<Risk> {
    let config = master.nginx.as_ref()?;
    let worker = snapshot
        .processes
        .iter()
        .find(|p| p.ppid == Some(master.pid) && p.role == Role::NginxWorker);
    let (nofile, holder) = match worker.and_then(|w| Some((w.nofile?, w))) {
        Some((nofile, w)) => (nofile, format!("its worker nginx[{}]", w.pid)),
        None => (master.nofile?, format!("nginx[{}]", master.pid)),
    };
    let connections = u64::from(config.worker_connections.value);
    if connections <= nofile.soft {
        return None;
    }
    let source = match &config.worker_rlimit_nofile {
        Some(setting) if setting.value == nofile.soft => setting.source.clone(),
        _ => format!(
            "no worker_rlimit_nofile in {}, so the limit nginx was started with",
            config.main_file.display()
        ),
    };
    let target = connections.saturating_mul(2);
    let hard = if nofile.hard < target {
        format!(
            " (the hard limit {} must rise too: LimitNOFILE= in the unit, or ulimit -Hn)",
            nofile.hard
        )
    } else {
        String::new()
    };
    Some(Risk {
        kind: RiskKind::WorkerConnectionsAboveNofile,
        subject: format!("nginx[{}] nginx-master", master.pid),
        finding: format!(
            "worker_connections {connections} ({}) is above the open-file limit {} of {holder} ({source}): under load accept() and socket() fail with \"Too many open files\"",
            config.worker_connections.source, nofile.soft
        ),
        fix: format!(
            "set worker_rlimit_nofile {target} in {} (two descriptors per proxied request){hard}, or lower worker_connections; then reload nginx",
            config.main_file.display()
        ),
    })
}

fn queue_full(snapshot: &Snapshot, listener: &ListenerView) -> Option<Risk> {
    if !is_full(listener) {
        return None;
    }
    let owner = listener.pid.and_then(|pid| snapshot.process(pid));
    let fix = match owner.and_then(|o| o.uwsgi.as_ref()) {
        Some(uwsgi) => format!(
            "uWSGI is not accepting fast enough: more processes (now {}, {}) or a faster app; a bigger listen only buys time",
            uwsgi.processes.value, uwsgi.processes.source
        ),
        None => format!(
            "{} is not accepting fast enough: more workers or a faster app; a bigger backlog only buys time",
            listener.owner_label()
        ),
    };
    Some(Risk {
        kind: RiskKind::QueueFullNow,
        subject: owner_label(listener),
        finding: format!(
            "queue {}/{} now: the next connection is refused",
            listener.queue.unwrap_or(0),
            listener.backlog.unwrap_or(0)
        ),
        fix,
    })
}

fn clamped(snapshot: &Snapshot, listener: &ListenerView) -> Option<Risk> {
    let requested = requested_backlog(snapshot, listener)?;
    let netns = snapshot.netns(listener.netns)?;
    let somaxconn = netns.somaxconn?;
    if requested.value <= somaxconn {
        return None;
    }
    Some(Risk {
        kind: RiskKind::BacklogClamped,
        subject: owner_label(listener),
        finding: format!(
            "asks for a backlog of {} ({}) but net.core.somaxconn={somaxconn} in network namespace {} clamps it to {}",
            requested.value,
            requested.source,
            netns.netns,
            listener.backlog.map_or("?".into(), |b| b.to_string())
        ),
        fix: clamp_fix(&listener.owner_label(), requested.value),
    })
}

/// TcpExtListenOverflows growth of each namespace of `before` to the
/// readings `after` taken `seconds` later.
pub fn growth(before: &Snapshot, after: &HashMap<u32, u64>, seconds: Duration) -> Vec<Growth> {
    before
        .namespaces
        .iter()
        .filter_map(|n| {
            let was = n.counters?.listen_overflows;
            Some(Growth {
                netns: n.netns,
                overflows: after.get(&n.netns)?.checked_sub(was)?,
                seconds: seconds.as_secs_f64(),
            })
        })
        .collect()
}

/// TcpExtListenOverflows now, per namespace, through views kept open.
fn overflows(views: &HashMap<u32, NetnsView>) -> HashMap<u32, u64> {
    views
        .iter()
        .filter_map(|(netns, view)| Some((*netns, view.listen_overflows()?)))
        .collect()
}

/// Look, print, and exit 1 when a risk was found.
pub fn run(args: &DoctorArgs) -> Result<ExitCode> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("not root: the configurations, limits and sockets of other users' processes may be unreadable; run `sudo droptrace doctor` for a complete check");
    }
    let mut filter = PidFilter::new(&args.pids, &[])?;
    cut_short_after(Duration::from_secs(args.timeout));
    // The snapshot reads each namespace's counters first thing; they are
    // read again through its views once the window has passed.
    let (snapshot, views) = Snapshot::take(&mut filter);
    if let Some(rest) = GROWTH_WINDOW.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let growth = growth(&snapshot, &overflows(&views), started.elapsed());
    let risks = risks(&snapshot, &growth);
    let checked = Checked::of(&snapshot);
    let cut_short = crate::config::files::is_stopping();
    if cut_short {
        tracing::warn!(
            "the look was cut short at --timeout {} s: owners, limits or configurations not read by then are missing above",
            args.timeout
        );
    }
    if args.json {
        let report = serde_json::json!({
            "host": snapshot.host.hostname,
            "checked": checked,
            "cut_short": cut_short,
            "risks": risks,
        });
        println!("{report}");
    } else {
        print_risks(&risks, &snapshot, &checked, started.elapsed());
    }
    Ok(if risks.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// At `timeout`, tell every read and scan still going that doctor stops:
/// they give up within half a second (`config::files`), and doctor says
/// what it saw.
fn cut_short_after(timeout: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        crate::config::files::stopping();
    });
}

/// What doctor looked at, to say so.
#[derive(Clone, Copy, Debug, Serialize)]
struct Checked {
    nginx: usize,
    uwsgi: usize,
    listeners: usize,
    namespaces: usize,
}

impl Checked {
    fn of(snapshot: &Snapshot) -> Self {
        let masters = |role| snapshot.processes.iter().filter(|p| p.role == role).count();
        Self {
            nginx: masters(Role::NginxMaster),
            uwsgi: masters(Role::UwsgiMaster),
            listeners: snapshot.listeners.len(),
            namespaces: snapshot.namespaces.len(),
        }
    }
}

fn print_risks(risks: &[Risk], snapshot: &Snapshot, checked: &Checked, took: Duration) {
    let what = format!(
        "{} nginx, {} uWSGI, {} listeners in {} network namespaces checked in {:.1} s",
        checked.nginx,
        checked.uwsgi,
        checked.listeners,
        checked.namespaces,
        took.as_secs_f64()
    );
    if risks.is_empty() {
        println!(
            "droptrace doctor: no risk found on {}: {what}",
            escape(&snapshot.host.hostname)
        );
        return;
    }
    println!(
        "droptrace doctor: {} risk{} on {}: {what}\n",
        risks.len(),
        if risks.len() == 1 { "" } else { "s" },
        escape(&snapshot.host.hostname)
    );
    print!("{}", risk_lines(risks));
}

/// Three lines per risk: kind and subject, the finding, the fix.
pub fn risk_lines(risks: &[Risk]) -> String {
    risks
        .iter()
        .map(|risk| {
            // Subjects, findings and fixes carry names and paths other
            // processes chose: escaped for the terminal, field by field.
            format!(
                "RISK {}  {}\n     {}\n     fix: {}\n\n",
                risk.kind.as_str(),
                escape(&risk.subject),
                escape(&risk.finding),
                escape(&risk.fix)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::uwsgi::UwsgiConfig,
        contract::{HostFacts, NetnsState},
    };

    fn listener(path: &str, queue: u32, backlog: u32) -> ListenerView {
        ListenerView {
            family: Family::Unix,
            path: Some(path.into()),
            addr: None,
            port: None,
            netns: Some(7),
            pid: Some(10),
            comm: Some("uwsgi".into()),
            role: Some(Role::UwsgiMaster),
            queue: Some(queue),
            backlog: Some(backlog),
        }
    }

    fn snapshot(listeners: Vec<ListenerView>, listen: u32) -> Snapshot {
        let uwsgi = UwsgiConfig {
            listen: Setting::configured(listen, "listen 2048 at /etc/uwsgi/app.ini:3"),
            ..UwsgiConfig::default()
        };
        Snapshot {
            time: String::new(),
            host: HostFacts {
                hostname: "web1".into(),
                kernel: "6.18".into(),
                cpus: 2,
                file_max: None,
                files_open: None,
            },
            namespaces: vec![NetnsState {
                netns: 7,
                somaxconn: Some(1024),
                ..NetnsState::default()
            }],
            processes: vec![ProcessState {
                pid: 10,
                ppid: Some(1),
                comm: "uwsgi".into(),
                role: Role::UwsgiMaster,
                cmdline: Vec::new(),
                netns: Some(7),
                nofile: None,
                nginx: None,
                uwsgi: Some(uwsgi),
            }],
            listeners,
        }
    }

    #[test]
    fn a_full_queue_and_a_clamped_backlog_are_risks_with_their_fix() {
        let risks = risks(
            &snapshot(vec![listener("/run/app.sock", 1024, 1024)], 2048),
            &[],
        );
        let kinds: Vec<RiskKind> = risks.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RiskKind::QueueFullNow, RiskKind::BacklogClamped]);
        assert_eq!(
            risks[0].finding,
            "queue 1024/1024 now: the next connection is refused"
        );
        assert!(
            risks[0]
                .fix
                .starts_with("uWSGI is not accepting fast enough: more processes (now 1,"),
            "{}",
            risks[0].fix
        );
        assert_eq!(
            risks[1].finding,
            "asks for a backlog of 2048 (listen 2048 at /etc/uwsgi/app.ini:3) but net.core.somaxconn=1024 in network namespace 7 clamps it to 1024"
        );
        assert!(
            risks[1]
                .fix
                .starts_with("sysctl -w net.core.somaxconn=2048"),
            "{}",
            risks[1].fix
        );
    }

    #[test]
    fn a_quiet_sound_listener_is_no_risk_and_growing_overflows_are() {
        let sound = snapshot(vec![listener("/run/app.sock", 0, 1000)], 1000);
        assert_eq!(risks(&sound, &[]), Vec::new());
        let growing = [Growth {
            netns: 7,
            overflows: 12,
            seconds: 0.5,
        }];
        let risks = risks(&sound, &growing);
        assert_eq!(risks.len(), 1);
        assert_eq!(risks[0].kind, RiskKind::ListenOverflowsGrowing);
        assert_eq!(
            risks[0].finding,
            "TcpExtListenOverflows grew by 12 in 0.5 s: TCP connections are being dropped now"
        );
    }

    #[test]
    fn risk_lines_escape_what_other_processes_named() {
        let risk = Risk {
            kind: RiskKind::QueueFullNow,
            subject: "/run/a\nRISK forged.sock, owner ev\x1b[2Jil[7]".into(),
            finding: "queue 101/100".into(),
            fix: "raise it".into(),
        };
        let text = risk_lines(&[risk]);
        assert!(!text.contains('\x1b'), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("RISK")).count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("/run/a\\nRISK forged.sock, owner ev\\x1b[2Jil[7]"),
            "{text}"
        );
    }
}
