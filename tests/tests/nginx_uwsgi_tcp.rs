//! End to end over TCP: real nginx and uWSGI in a private network namespace
//! (so the kernel's TcpExtListenOverflows counts only them), a bounded
//! burst, and droptrace's per-listener counts must add up to the kernel's.
use std::{net::SocketAddr, time::Duration};

use droptrace_tests::{
    droptrace::{Droptrace, Report},
    http,
    netns::Netns,
    require_root,
    stack::{self, Stack, StackConfig},
};

const NGINX_PORT: u16 = 18080;
const UWSGI_PORT: u16 = 19090;

fn count_at(report: &Report, port: u16) -> u64 {
    report
        .tcp_drops_at("127.0.0.1", port)
        .iter()
        .map(|d| d["count"].as_u64().unwrap())
        .sum()
}

/// Run a burst against nginx in a fresh namespace; returns the report after
/// checking droptrace's count against the kernel's.
fn burst_in_namespace(tag: &str, config: StackConfig) -> (Stack, Netns, Report) {
    let netns = Netns::create(tag, &[]);
    let tracer = Droptrace::start(&[]);
    let before = netns.tcp_ext();
    let stack = Stack::start(StackConfig {
        netns: Some(&netns),
        port: NGINX_PORT,
        ..config
    });
    let addr: SocketAddr = format!("127.0.0.1:{NGINX_PORT}").parse().unwrap();
    let outcomes = http::burst(addr, Some(&netns));
    // Every client got its answer or gave up: no SYN is still in flight.
    std::thread::sleep(Duration::from_millis(500));
    // The namespace's own counter, read by the test: the truth.
    let kernel = netns.tcp_ext().since(before).listen_overflows;
    let report = tracer.stop();
    let (ours, _) = report.reconciliation(netns.inode());
    let (at_nginx, at_uwsgi) = (count_at(&report, NGINX_PORT), count_at(&report, UWSGI_PORT));
    let mut stages = std::collections::BTreeMap::new();
    for drop in &report.drops {
        *stages
            .entry(drop["stage"].as_str().unwrap_or("-").to_string())
            .or_insert(0) += drop["count"].as_u64().unwrap();
    }
    let named: Vec<String> = report
        .drops
        .iter()
        .map(|d| {
            format!(
                "{}:{}",
                d["stage"].as_str().unwrap_or("-"),
                d["client"]["role"].as_str().unwrap_or("?")
            )
        })
        .collect();
    eprintln!("{tag}: {outcomes:?}; kernel ListenOverflows {kernel}; droptrace {ours} = nginx {at_nginx} + uWSGI {at_uwsgi}; by stage {stages:?}; clients {named:?}");
    assert!(
        kernel > 0,
        "the burst overflowed nothing, so it proves nothing"
    );
    assert_eq!(
        at_nginx + at_uwsgi,
        ours,
        "every overflow droptrace counted is at nginx's or uWSGI's listener"
    );
    assert_eq!(
        ours, kernel,
        "{tag}: droptrace's tcp_accept_queue vs the namespace's TcpExtListenOverflows"
    );
    assert_eq!(report.lost(), 0);
    (stack, netns, report)
}

#[test]
fn uwsgi_over_tcp_overflows_match_the_kernel_and_name_uwsgi_listen() {
    let test = "uwsgi_over_tcp_overflows_match_the_kernel_and_name_uwsgi_listen";
    require_root(test);
    stack::require(test);
    let (stack, _netns, report) = burst_in_namespace(
        "e2etcp",
        StackConfig {
            uwsgi_tcp_port: Some(UWSGI_PORT),
            ..StackConfig::default()
        },
    );
    let drops = report.tcp_drops_at("127.0.0.1", UWSGI_PORT);
    assert!(!drops.is_empty(), "no drop at uWSGI's listener");
    for drop in drops {
        assert_eq!(drop["kind"], "tcp_accept_queue");
        assert_eq!(drop["listener"]["pid"], stack.uwsgi.id(), "{drop}");
        assert!(
            drop["listener"]["role"]
                .as_str()
                .unwrap()
                .starts_with("uwsgi-"),
            "{drop}"
        );
        assert_eq!(drop["listener"]["backlog"], 100);
        assert_eq!(drop["limit"]["name"], "uwsgi_listen", "{drop}");
        assert_eq!(drop["limit"]["value"], 100);
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .contains("504 or 499"),
            "{drop}"
        );
        // Whatever the stage, and however full uWSGI's queue was when
        // nginx connected.
        assert_eq!(
            drop["client"]["role"], "nginx-worker",
            "refused client: {drop}"
        );
    }
}

#[test]
fn nginx_own_listener_with_a_tiny_backlog_names_nginx_listen_backlog() {
    let test = "nginx_own_listener_with_a_tiny_backlog_names_nginx_listen_backlog";
    require_root(test);
    stack::require(test);
    let (stack, netns, report) = burst_in_namespace(
        "e2enginx",
        StackConfig {
            // Tiny enough for the burst to overflow it under emulation too,
            // where nginx keeps up with the clients better than here.
            nginx_backlog: Some(2),
            ..StackConfig::default()
        },
    );
    // uWSGI is on a UNIX socket: every TCP overflow droptrace counted is
    // nginx's (burst_in_namespace checked the total against the kernel).
    let drops = report.tcp_drops_at("127.0.0.1", NGINX_PORT);
    assert_eq!(
        count_at(&report, NGINX_PORT),
        report.reconciliation(netns.inode()).0
    );
    for drop in drops {
        assert_eq!(
            drop["listener"]["pid"],
            stack.nginx.id(),
            "the nginx master owns the socket: {drop}"
        );
        assert_eq!(drop["listener"]["role"], "nginx-master");
        assert_eq!(drop["listener"]["backlog"], 2);
        assert_eq!(drop["limit"]["name"], "nginx_listen_backlog", "{drop}");
        assert_eq!(drop["limit"]["value"], 2);
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .starts_with("add \"backlog=1024\" to nginx's listen directive"),
            "{drop}"
        );
    }
}
