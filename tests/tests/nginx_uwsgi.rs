//! End to end: real nginx in front of real uWSGI on a UNIX socket, a bounded
//! burst of requests, and droptrace's count must equal nginx's own record of
//! the refusals: its "(11: Resource temporarily unavailable)" error lines.
use std::net::SocketAddr;

use droptrace_tests::{
    droptrace::{Droptrace, Report},
    http,
    netns::Netns,
    require_root,
    stack::{self, Stack, StackConfig},
};

const EAGAIN_LINE: &str = "(11: Resource temporarily unavailable) while connecting to upstream";

/// Every refusal nginx logged is one droptrace reported, with the right
/// people and the right limit.
fn assert_matches_nginx(stack: &Stack, report: &Report, outcomes: &http::Outcomes, listen: u64) {
    let socket = stack.socket_path();
    let logged = stack.error_lines_with(EAGAIN_LINE) as u64;
    eprintln!(
        "outcomes {outcomes:?}; nginx logged {logged} EAGAIN connects; droptrace counted {}",
        report.count_at(&socket)
    );
    assert!(
        logged > 0,
        "the burst refused nothing, so it proves nothing: {outcomes:?}\n{}",
        stack.error_log()
    );
    assert_eq!(
        outcomes.count(502) as u64,
        logged,
        "every EAGAIN is one 502"
    );
    // nginx logs each refusal when connect() returns; droptrace ran from
    // before the first request to after the last response: no window skew.
    assert_eq!(
        report.count_at(&socket),
        logged,
        "drop lines: {:#?}",
        report.drops_at(&socket)
    );
    assert_eq!(
        report.total_at(&socket),
        logged,
        "summary: {}",
        report.summary
    );
    assert_eq!(report.lost(), 0);
    for drop in report.drops_at(&socket) {
        assert_eq!(drop["kind"], "unix_backlog");
        assert_eq!(drop["client"]["role"], "nginx-worker", "{drop}");
        assert_eq!(drop["client"]["comm"], "nginx");
        let owner_role = drop["listener"]["role"].as_str().unwrap();
        assert!(owner_role.starts_with("uwsgi-"), "{drop}");
        assert_eq!(
            drop["listener"]["pid"],
            stack.uwsgi.id(),
            "the uWSGI master owns the socket: {drop}"
        );
        assert_eq!(drop["listener"]["backlog"], listen);
        assert_eq!(drop["limit"]["name"], "uwsgi_listen", "{drop}");
        assert_eq!(drop["limit"]["value"], listen);
    }
}

#[test]
fn nginx_502s_from_a_full_uwsgi_socket_are_counted_and_explained() {
    let test = "nginx_502s_from_a_full_uwsgi_socket_are_counted_and_explained";
    require_root(test);
    stack::require(test);
    let port = stack::free_port();
    let stack = Stack::start(StackConfig {
        port,
        ..StackConfig::default()
    });
    // Started after the servers: the listener comes from the socket table
    // and its listen setting from uWSGI's command line.
    let (nginx_pid, uwsgi_pid) = (stack.nginx.id().to_string(), stack.uwsgi.id().to_string());
    let tracer = Droptrace::start(&["--pid", &nginx_pid, "--pid", &uwsgi_pid]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let outcomes = http::burst(addr, None);
    let report = tracer.stop();
    assert_matches_nginx(&stack, &report, &outcomes, 100);
    let drop = report.drops_at(&stack.socket_path())[0];
    assert_eq!(
        drop["limit"]["source"],
        "uWSGI default, no listen option set"
    );
    assert!(
        drop["limit"]["fix"]
            .as_str()
            .unwrap()
            .starts_with("uWSGI listen=100 (default): set \"listen = 1024\" in the uWSGI ini"),
        "{drop}"
    );
}

#[test]
fn in_a_namespace_with_low_somaxconn_uwsgi_listen_is_named_and_nginx_clamp_is_noticed() {
    let test = "in_a_namespace_with_low_somaxconn_uwsgi_listen_is_named_and_nginx_clamp_is_noticed";
    require_root(test);
    stack::require(test);
    let netns = Netns::create("e2e", &[("net.core.somaxconn", "64")]);
    // Started before the servers: the listener comes from uWSGI's listen().
    let tracer = Droptrace::start(&[]);
    let stack = Stack::start(StackConfig {
        netns: Some(&netns),
        uwsgi_listen: Some(64),
        ..StackConfig::default()
    });
    let addr: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let outcomes = http::burst(addr, Some(&netns));
    let report = tracer.stop();
    assert_matches_nginx(&stack, &report, &outcomes, 64);
    // nginx's listen(511) was clamped to the namespace's somaxconn, and
    // said so before any drop; uWSGI asked for 64, which fits.
    let nginx_pid = u64::from(stack.nginx.id());
    let clamped: Vec<_> = report
        .notices
        .iter()
        .filter(|n| n["kind"] == "backlog_clamped")
        .collect();
    assert_eq!(clamped.len(), 1, "{clamped:#?}");
    let notice = clamped[0];
    assert_eq!(notice["listener"]["pid"], nginx_pid, "{notice}");
    assert_eq!(notice["listener"]["role"], "nginx-master", "{notice}");
    assert_eq!(notice["listener"]["addr"], "127.0.0.1", "{notice}");
    assert_eq!(notice["listener"]["port"], 18080, "{notice}");
    assert_eq!(notice["listener"]["netns"], netns.inode(), "{notice}");
    assert_eq!(
        (
            notice["requested"].as_u64(),
            notice["effective"].as_u64(),
            notice["somaxconn"].as_u64()
        ),
        (Some(511), Some(64), Some(64))
    );
    let drop = report.drops_at(&stack.socket_path())[0];
    assert_eq!(drop["listener"]["netns"], netns.inode());
    assert_eq!(
        drop["limit"]["source"],
        "--listen 64 on the uWSGI command line"
    );
    assert!(
        drop["limit"]["fix"]
            .as_str()
            .unwrap()
            .contains("first raise net.core.somaxconn to 1024 (now 64"),
        "{drop}"
    );
}
