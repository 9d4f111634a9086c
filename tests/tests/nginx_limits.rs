//! End to end: real nginx in front of real uWSGI, limited by its own
//! configuration or its launcher, a bounded burst of requests, and
//! droptrace's counts must equal nginx's own record of each refusal: its
//! error log lines.
use std::net::SocketAddr;

use droptrace_tests::{
    droptrace::{Droptrace, Report},
    http, require_root,
    stack::{self, Stack, StackConfig},
};

const SHORTAGE: &str = "worker_connections are not enough";
const EMFILE: &str = "(24: Too many open files)";

/// Start droptrace on the running stack (with `extra` arguments), send
/// the burst, stop.
fn burst_through_with(stack: &Stack, extra: &[&str]) -> (http::Outcomes, Report) {
    let (nginx, uwsgi) = (stack.nginx.id().to_string(), stack.uwsgi.id().to_string());
    let mut args = vec!["--pid", &nginx, "--pid", &uwsgi];
    args.extend_from_slice(extra);
    let tracer = Droptrace::start(&args);
    let addr: SocketAddr = format!("127.0.0.1:{}", stack.port).parse().unwrap();
    let outcomes = http::burst(addr, None);
    let report = tracer.stop();
    (outcomes, report)
}

fn burst_through(stack: &Stack) -> (http::Outcomes, Report) {
    burst_through_with(stack, &[])
}

fn conf(stack: &Stack) -> String {
    stack.dir.path().join("nginx.conf").display().to_string()
}

/// A burst through nginx with `worker_connections 64`: droptrace's
/// shortages equal nginx's alerts; returns the drops' limit source.
fn assert_shortages_match_nginx(
    stack: &Stack,
    report: &Report,
    outcomes: &http::Outcomes,
) -> String {
    // "[warn] ... are not enough, reusing connections" is not a refusal.
    let alerts = stack.error_lines_where(|l| l.contains("[alert]") && l.contains(SHORTAGE)) as u64;
    let counted = report.count_of("worker_connections", |_| true);
    eprintln!(
        "outcomes {outcomes:?}; nginx logged {alerts} shortages; droptrace counted {counted}"
    );
    assert!(
        alerts > 0,
        "the burst ran nginx out of nothing: {outcomes:?}\n{}",
        stack.error_log()
    );
    assert_eq!(
        counted,
        alerts,
        "{:#?}",
        report.drops_of("worker_connections")
    );
    assert_eq!(
        report.total_of("worker_connections"),
        alerts,
        "{}",
        report.summary
    );
    assert_eq!(report.lost(), 0);
    let mut sources = Vec::new();
    for drop in report.drops_of("worker_connections") {
        assert_eq!(drop["client"]["role"], "nginx-worker", "{drop}");
        assert_eq!(drop["limit"]["name"], "worker_connections", "{drop}");
        assert_eq!(drop["limit"]["value"], 64, "{drop}");
        let source = drop["limit"]["source"].as_str().unwrap();
        assert!(
            source.starts_with(&format!("worker_connections 64 at {}:", conf(stack))),
            "{source}"
        );
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .starts_with("raise worker_connections to 1024"),
            "{drop}"
        );
        sources.push(source.to_string());
    }
    sources.dedup();
    assert_eq!(sources.len(), 1, "{sources:?}");
    sources.remove(0)
}

fn short_of_connections(nginx_without_symbol: bool) -> Stack {
    Stack::start(StackConfig {
        port: stack::free_port(),
        worker_connections: 64,
        // Without it nginx parks each new connection until its request is
        // read, and when it runs short it closes those parked ones
        // ("reusing connections") rather than failing: a worker only runs
        // out when every connection is busy with a request.
        deferred_accept: true,
        nginx_without_symbol,
        ..StackConfig::default()
    })
}

fn assert_seen_in_error_log(stack: &Stack, source: &str) {
    let log = stack.dir.path().join("error.log");
    let how = format!("(seen through nginx's error log {})", log.display());
    assert!(source.ends_with(&how), "{source}");
}

/// By default the shortages are read from nginx's own error log: nothing
/// is attached to nginx.
#[test]
fn worker_connections_shortages_equal_nginx_alerts() {
    let test = "worker_connections_shortages_equal_nginx_alerts";
    require_root(test);
    stack::require(test);
    let stack = short_of_connections(false);
    let (outcomes, report) = burst_through(&stack);
    let source = assert_shortages_match_nginx(&stack, &report, &outcomes);
    assert_seen_in_error_log(&stack, &source);
}

/// --nginx-uretprobe counts them in the kernel, from ngx_get_connection
/// returning NULL: the same count as nginx's alerts.
#[test]
fn with_the_uretprobe_shortages_equal_nginx_alerts() {
    let test = "with_the_uretprobe_shortages_equal_nginx_alerts";
    require_root(test);
    stack::require(test);
    let stack = short_of_connections(false);
    let (outcomes, report) = burst_through_with(&stack, &["--nginx-uretprobe"]);
    let source = assert_shortages_match_nginx(&stack, &report, &outcomes);
    assert!(
        source.ends_with("(seen through a uretprobe on ngx_get_connection in /usr/sbin/nginx)"),
        "{source}"
    );
}

/// --nginx-uretprobe on a binary without the symbol falls back to the log.
#[test]
fn without_the_symbol_shortages_are_read_from_nginx_error_log() {
    let test = "without_the_symbol_shortages_are_read_from_nginx_error_log";
    require_root(test);
    stack::require(test);
    let stack = short_of_connections(true);
    let (outcomes, report) = burst_through_with(&stack, &["--nginx-uretprobe"]);
    let source = assert_shortages_match_nginx(&stack, &report, &outcomes);
    assert_seen_in_error_log(&stack, &source);
    assert!(
        report.stderr.contains("falling back to its error log"),
        "{}",
        report.stderr
    );
}

/// nofile drops equal nginx's "(24: Too many open files)" lines, syscall by
/// syscall; returns the drops.
fn assert_nofile_matches_nginx<'a>(
    stack: &Stack,
    report: &'a Report,
    limit: u64,
) -> Vec<&'a serde_json::Value> {
    let logged = stack.error_lines_with(EMFILE) as u64;
    eprintln!(
        "nginx logged {logged} EMFILE lines; droptrace: {}",
        report.summary["totals"]
    );
    assert!(
        logged > 0,
        "the burst exhausted nothing:\n{}",
        stack.error_log()
    );
    // nginx names the call it made: socket(), accept4(), open() (openat).
    for (syscall, logged_as) in [
        ("socket", "socket()"),
        ("accept4", "accept4()"),
        ("openat", "open()"),
    ] {
        let lines = stack.error_lines_where(|l| l.contains(EMFILE) && l.contains(logged_as)) as u64;
        let counted = report.count_of("nofile", |d| d["client"]["syscall"] == syscall);
        assert_eq!(counted, lines, "{syscall}: droptrace vs nginx's error log");
    }
    assert_eq!(report.count_of("nofile", |_| true), logged);
    assert_eq!(report.total_of("nofile"), logged, "{}", report.summary);
    assert_eq!(report.lost(), 0);
    let drops = report.drops_of("nofile");
    for drop in &drops {
        assert_eq!(drop["client"]["role"], "nginx-worker", "{drop}");
        assert_eq!(drop["limit"]["name"], "rlimit_nofile", "{drop}");
        assert_eq!(drop["limit"]["value"], limit, "{drop}");
        assert_eq!(drop["limit"]["hard"], limit, "{drop}");
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .starts_with("set \"worker_rlimit_nofile 65536;\" in the main context of"),
            "{drop}"
        );
    }
    drops
}

#[test]
fn worker_rlimit_nofile_emfiles_equal_nginx_error_lines_by_syscall() {
    let test = "worker_rlimit_nofile_emfiles_equal_nginx_error_lines_by_syscall";
    require_root(test);
    stack::require(test);
    let stack = Stack::start(StackConfig {
        port: stack::free_port(),
        worker_rlimit_nofile: Some(64),
        ..StackConfig::default()
    });
    let (_, report) = burst_through(&stack);
    for drop in assert_nofile_matches_nginx(&stack, &report, 64) {
        let source = drop["limit"]["source"].as_str().unwrap();
        assert!(
            source.starts_with(&format!("worker_rlimit_nofile 64 at {}:4", conf(&stack))),
            "{source}"
        );
    }
    // nginx stops accepting for 500 ms after accept4() fails: whatever its
    // own listener dropped meanwhile is linked to that failure.
    let listener_drops = report.tcp_drops_at("127.0.0.1", stack.port);
    let linked: Vec<_> = listener_drops
        .iter()
        .filter(|d| !d["caused_by"].is_null())
        .collect();
    eprintln!(
        "{} drop lines at nginx's listener, {} linked to an EMFILE",
        listener_drops.len(),
        linked.len()
    );
    for drop in linked {
        assert_eq!(drop["caused_by"]["kind"], "nofile", "{drop}");
        assert_eq!(drop["caused_by"]["syscall"], "accept4", "{drop}");
    }
}

#[test]
fn a_nofile_limit_set_by_prlimit_on_the_master_is_traced_to_it() {
    let test = "a_nofile_limit_set_by_prlimit_on_the_master_is_traced_to_it";
    require_root(test);
    stack::require(test);
    let stack = Stack::start(StackConfig {
        port: stack::free_port(),
        worker_rlimit_nofile: None,
        prlimit_nofile: Some(64),
        ..StackConfig::default()
    });
    let (_, report) = burst_through(&stack);
    let master = stack.nginx.id();
    for drop in assert_nofile_matches_nginx(&stack, &report, 64) {
        let source = drop["limit"]["source"].as_str().unwrap();
        assert!(
            source.starts_with(&format!(
                "set on nginx[{master}] by prlimit, ulimit -n or setrlimit (its parent "
            )),
            "{source}"
        );
        assert!(
            source.ends_with(&format!("; no worker_rlimit_nofile in {}", conf(&stack))),
            "{source}"
        );
    }
}
