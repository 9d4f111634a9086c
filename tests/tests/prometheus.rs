//! The fleet path, with the real thing: Prometheus from Debian scrapes
//! droptrace every second during a real nginx → uWSGI burst, and what it
//! stores equals nginx's own record of the refusals; the alert rules that
//! ship in deploy/ fire; the metrics answer during a storm and beside
//! scrapers that never finish.
use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use droptrace_tests::{
    droptrace::{self, Droptrace},
    http,
    netns::Netns,
    prometheus::{self, get, repository_file, Prometheus},
    require_root,
    stack::{self, Stack, StackConfig},
    tcp, unix,
};

const EAGAIN_LINE: &str = "(11: Resource temporarily unavailable) while connecting to upstream";
const ALERTS: &str = "deploy/prometheus/droptrace-alerts.yml";

fn metrics_addr() -> SocketAddr {
    format!("127.0.0.1:{}", stack::free_port()).parse().unwrap()
}

/// The sum of the `droptrace_drops_total` samples of `kind` in a scrape.
fn drops_in(scrape: &str, kind: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with("droptrace_drops_total{") && l.contains(&format!("kind=\"{kind}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn prometheus_stores_what_nginx_logged_and_the_drop_alert_fires() {
    let test = "prometheus_stores_what_nginx_logged_and_the_drop_alert_fires";
    require_root(test);
    stack::require(test);
    prometheus::require(test);
    let port = stack::free_port();
    let stack = Stack::start(StackConfig {
        port,
        ..StackConfig::default()
    });
    let metrics = metrics_addr();
    let (nginx, uwsgi) = (stack.nginx.id().to_string(), stack.uwsgi.id().to_string());
    let tracer = Droptrace::start(&[
        "--prometheus",
        &metrics.to_string(),
        "--pid",
        &nginx,
        "--pid",
        &uwsgi,
    ]);
    let prometheus = Prometheus::start(metrics, &repository_file(ALERTS));
    // Scraped at least once before the burst.
    prometheus
        .wait_for(Duration::from_secs(15), |p| {
            (p.number(r#"up{job="droptrace"}"#) == Some(1.0)).then_some(())
        })
        .unwrap_or_else(|| panic!("prometheus never scraped droptrace:\n{}", prometheus.log()));

    let outcomes = http::burst(format!("127.0.0.1:{port}").parse().unwrap(), None);
    let logged = stack.error_lines_with(EAGAIN_LINE) as u64;
    assert!(logged > 0, "the burst refused nothing: {outcomes:?}");
    assert_eq!(
        outcomes.count(502) as u64,
        logged,
        "every EAGAIN is one 502"
    );

    // The metrics as scraped equal nginx's log once Prometheus has caught up.
    let query = r#"sum(droptrace_drops_total{kind="unix_backlog"})"#;
    let stored = prometheus.wait_for(Duration::from_secs(15), |p| {
        p.number(query).filter(|&n| n as u64 == logged)
    });
    assert_eq!(
        stored.map(|n| n as u64),
        Some(logged),
        "{query} = {:?}, nginx logged {logged} refusals",
        prometheus.number(query)
    );
    let series = prometheus.query(r#"droptrace_drops_total{kind="unix_backlog"}"#);
    let labels = &series[0]["metric"];
    assert_eq!(labels["listener"], stack.socket_path(), "{labels}");
    assert_eq!(labels["limit"], "uwsgi_listen", "{labels}");
    assert!(
        labels["owner_role"].as_str().unwrap().starts_with("uwsgi-"),
        "{labels}"
    );
    assert_eq!(
        prometheus.number(&format!(
            r#"droptrace_limit_value{{limit="uwsgi_listen",listener="{}"}}"#,
            stack.socket_path()
        )),
        Some(100.0),
        "uWSGI's default listen"
    );
    assert_eq!(
        prometheus.number(r#"sum(droptrace_lost_events_total{cause!="ring_buffer_full"})"#),
        Some(0.0)
    );

    let alert = prometheus
        .wait_for(Duration::from_secs(15), |p| {
            p.firing()
                .into_iter()
                .find(|a| a["labels"]["alertname"] == "DroptraceConnectionsRefused")
        })
        .unwrap_or_else(|| panic!("the drop alert did not fire: {:?}", prometheus.firing()));
    assert_eq!(alert["labels"]["listener"], stack.socket_path(), "{alert}");
    eprintln!(
        "nginx logged {logged}; prometheus stored {logged}; alert: {}",
        alert["annotations"]["summary"]
    );

    // What was scraped is clean by promtool's rules.
    let (status, text) = get(metrics, "/metrics", &[]);
    assert_eq!(status, 200);
    let mut check = Command::new(prometheus::PROMTOOL)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The dashboard's queries are valid PromQL, and its drops panel shows
    // this burst.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repository_file("deploy/grafana/droptrace.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            prometheus.query(&expr);
            queries += 1;
        }
    }
    assert!(queries >= 4, "{queries} dashboard queries");
    let report = tracer.stop();
    assert_eq!(report.total_at(&stack.socket_path()), logged, "the summary");
}

/// A storm of refused connects: every scrape during it answers within a
/// second, beside connections that never send a request, and the last
/// scrape counts exactly the EAGAINs the kernel returned to the test.
#[test]
fn metrics_answer_within_a_second_during_a_storm_and_beside_silent_scrapers() {
    let test = "metrics_answer_within_a_second_during_a_storm_and_beside_silent_scrapers";
    require_root(test);
    let me = std::process::id().to_string();
    let metrics = metrics_addr();
    let tracer = Droptrace::start(&["--pid", &me, "--prometheus", &metrics.to_string()]);
    // Connections that say nothing, or half a request, and stay open.
    let silent: Vec<TcpStream> = (0..8)
        .map(|n| {
            let mut stream = TcpStream::connect(metrics).unwrap();
            if n % 2 == 1 {
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            stream
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storm.sock").display().to_string();
    let listener = unix::Listener::bind(&path, 1);
    let (queued, _) = unix::connect_many(&path, 2);
    let (refused, slowest) = std::thread::scope(|scope| {
        let storm = scope.spawn(|| unix::connect_many(&path, 300_000).1);
        let mut slowest = Duration::ZERO;
        let mut scrapes = 0;
        while !storm.is_finished() {
            let started = Instant::now();
            let (status, _) = get(metrics, "/metrics", &[]);
            assert_eq!(status, 200);
            slowest = slowest.max(started.elapsed());
            scrapes += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            scrapes >= 3,
            "the storm ended after {scrapes} scrapes: too short to show anything"
        );
        (storm.join().unwrap(), slowest)
    });
    assert!(refused > 0);
    assert!(
        slowest < Duration::from_secs(1),
        "a scrape during the storm took {slowest:?}"
    );
    // The watcher reads the kernel's counts every 250 ms.
    let scraped = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(250));
            drops_in(&get(metrics, "/metrics", &[]).1, "unix_backlog")
        })
        .find(|&n| n == refused as u64);
    assert_eq!(scraped, Some(refused as u64), "refused {refused}");
    eprintln!("{refused} refused; slowest scrape {slowest:?}");
    drop(silent);
    unix::close_all(queued);
    drop(listener);
    let stopping = Instant::now();
    let report = tracer.stop();
    assert!(stopping.elapsed() < Duration::from_secs(1));
    assert_eq!(report.total_at(&path), refused as u64);
}

#[test]
fn an_address_in_use_is_one_line_and_exit_1() {
    require_root("an_address_in_use_is_one_line_and_exit_1");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let started = Instant::now();
    let run = droptrace::run(&["--prometheus", &addr, "--duration", "5"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it loaded its probes first"
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].contains(&format!("cannot serve metrics on {addr}"))
            && lines[0].contains("Address already in use"),
        "{}",
        lines[0]
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    prometheus::require("the_alert_rules_pass_promtool_and_their_unit_tests");
    let dir = repository_file("deploy/prometheus");
    for args in [
        ["check", "rules", "droptrace-alerts.yml"],
        ["test", "rules", "droptrace-alerts.test.yml"],
    ] {
        let out = Command::new(prometheus::PROMTOOL)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.contains("SUCCESS"),
            "promtool {args:?}:\n{said}"
        );
    }
}

/// The capabilities deploy/systemd/droptrace.service leaves droptrace
/// (CapabilityBoundingSet) are enough: run with exactly those (setpriv), it
/// loads its programs, counts a TCP overflow in another network namespace
/// at a listener owned by nobody, names that owner (its /proc/PID/fd), and
/// reads the namespace's own counters (setns), all without a refusal.
#[test]
fn the_systemd_unit_s_capabilities_are_enough() {
    let test = "the_systemd_unit_s_capabilities_are_enough";
    require_root(test);
    let unit =
        std::fs::read_to_string(repository_file("deploy/systemd/droptrace.service")).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    assert!(caps.len() >= 3, "{caps:?}");
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));

    // The unit is valid for this machine's systemd, pointed at this build.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("droptrace.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/sbin/droptrace",
            &droptrace::binary().display().to_string(),
        ),
    )
    .unwrap();
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        verified.status.success() && verified.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verified.stderr)
    );

    let netns = Netns::create("caps", &[]);
    let addr: SocketAddr = "127.0.0.1:19092".parse().unwrap();
    let (mut owner, said) = droptrace_tests::spawn_and_read_line(
        netns
            .command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_exhaust"))
            .args(["listen", &addr.to_string(), "1"]),
    );
    assert_eq!(said, "listening");
    let owner_pid = owner.id().to_string();
    let tracer = Droptrace::start_wrapped(
        &["setpriv", &bounding, "--inh-caps=-all", "--"],
        &["--pid", &owner_pid],
    );
    let before = netns.tcp_ext();
    std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_on_this_thread();
            let clients = tcp::connect_many(addr, 20);
            std::thread::sleep(Duration::from_millis(300));
            tcp::close_all(clients);
        });
    });
    let grew = netns.tcp_ext().since(before);
    std::thread::sleep(Duration::from_millis(500));
    let report = tracer.stop();
    droptrace_tests::signal(owner.id(), libc::SIGKILL);
    owner.wait().unwrap();

    assert!(grew.listen_overflows > 0, "the flood overflowed nothing");
    let drops = report.tcp_drops_at("127.0.0.1", addr.port());
    let counted = report.tcp_count_at("127.0.0.1", addr.port(), "tcp_accept_queue");
    assert_eq!(counted, grew.listen_overflows, "stderr:\n{}", report.stderr);
    for drop in &drops {
        assert_eq!(
            drop["listener"]["pid"].as_u64(),
            Some(u64::from(owner.id())),
            "owner: {drop}"
        );
    }
    assert_eq!(
        report.reconciliation(netns.inode()),
        (grew.listen_overflows, grew.listen_overflows),
        "droptrace vs the namespace's counters read through setns"
    );
    // Beyond the hooks this kernel refuses anyway (the start-up line says
    // which were skipped), nothing was refused.
    let refused: Vec<&str> = report
        .stderr
        .lines()
        .filter(|l| !l.contains("hooks on this kernel:"))
        .filter(|l| l.contains("not permitted") || l.contains("skipping") || l.contains("NONE"))
        .collect();
    assert!(
        refused.is_empty(),
        "refused with the unit's capabilities:\n{}",
        report.stderr
    );
    assert!(
        !report.stderr.contains("NONE"),
        "a family without hooks:\n{}",
        report.stderr
    );
}
