//! Kernel integration: a process refused for lack of a resource (open
//! files, ephemeral ports) or a listener clamped by somaxconn, made to
//! happen for real, and droptrace must report exactly what happened.
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use droptrace_tests::{
    droptrace::{Droptrace, Report, EPHEMERAL_PORTS_HOOKS, LISTEN, LISTEN_HOOKS, NOFILE_HOOKS},
    netns::Netns,
    require_root,
};

/// `word=N` in the helper's output line.
fn count_in(line: &str, word: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{word}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {word}= in {line:?}"))
}

/// Run `command` (the exhaust helper), read its one line of counts, keep it
/// alive until droptrace has stopped (so droptrace can still look at it).
fn run_helper(command: Command, tracer: Droptrace) -> (u32, String, Report) {
    run_helper_then(command, || tracer.stop())
}

/// Run the helper; once it said what it saw, `stop` droptrace.
fn run_helper_then<T>(mut command: Command, stop: impl FnOnce() -> T) -> (u32, String, T) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start the exhaust helper");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Let droptrace read the records while the helper still lives.
    std::thread::sleep(Duration::from_millis(500));
    let stopped = stop();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "helper failed: {line}");
    (child.id(), line, stopped)
}

#[test]
fn emfile_is_counted_per_syscall_with_the_limit_and_who_set_it() {
    let test = "emfile_is_counted_per_syscall_with_the_limit_and_who_set_it";
    require_root(test);
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    tracer.assert_mechanism("nofile/file_max", NOFILE_HOOKS);
    assert_emfile_counted(tracer);
}

/// A process names itself with an escape sequence and a newline, then hits
/// EMFILE: droptrace's terminal lines show the name escaped, and no byte
/// it chose reaches the operator's terminal raw.
#[test]
fn a_hostile_process_name_never_reaches_the_terminal_raw() {
    let test = "a_hostile_process_name_never_reaches_the_terminal_raw";
    require_root(test);
    let me = std::process::id().to_string();
    let tracer = Droptrace::start_human(&["--pid", &me]);
    let mut helper = Command::new(env!("CARGO_BIN_EXE_exhaust"));
    helper.args(["nofile", "16", "ev\x1b[2Jil\n"]);
    let (_, _, out) = run_helper_then(helper, || tracer.stop_raw());
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("nofile") && text.contains("ev\\x1b[2Jil\\n["),
        "the drop is shown with its name escaped:\n{text}"
    );
    assert!(
        !out.contains(&0x1b),
        "a raw escape byte reached stdout:\n{text}"
    );
    for l in text.lines() {
        assert!(
            !l.starts_with("il"),
            "the name's newline started a line of its own: {l:?}"
        );
    }
}

/// Where fexit is refused, the per-syscall exit tracepoints count the same.
#[test]
fn emfile_is_counted_by_the_syscall_tracepoints_too() {
    let test = "emfile_is_counted_by_the_syscall_tracepoints_too";
    require_root(test);
    let me = std::process::id().to_string();
    let avoid = "accept_fexit,accept4_fexit,socket_fexit,open_fexit,openat_fexit";
    let tracer = Droptrace::start_with_env(&["--pid", &me], &[("DROPTRACE_AVOID", avoid)]);
    assert_eq!(
        tracer.mechanism_of("nofile/file_max"),
        "tracepoints syscalls/sys_exit_{accept,accept4,socket,open,openat} (64-bit callers)"
    );
    assert_emfile_counted(tracer);
}

/// Where neither fexit nor the exit tracepoints can be had, tp_btf/sys_exit
/// counts the same.
#[test]
fn emfile_is_counted_by_tp_btf_sys_exit_too() {
    let test = "emfile_is_counted_by_tp_btf_sys_exit_too";
    require_root(test);
    let me = std::process::id().to_string();
    let avoid = "accept_fexit,accept4_fexit,socket_fexit,open_fexit,openat_fexit,\
                 accept_exit,accept4_exit,socket_exit,open_exit,openat_exit";
    let tracer = Droptrace::start_with_env(&["--pid", &me], &[("DROPTRACE_AVOID", avoid)]);
    assert_eq!(tracer.mechanism_of("nofile/file_max"), "tp_btf/sys_exit");
    assert_emfile_counted(tracer);
}

/// A helper runs out of file descriptors under RLIMIT_NOFILE 16: each
/// EMFILE it saw, syscall by syscall, is one drop naming the limit.
fn assert_emfile_counted(tracer: Droptrace) {
    let mut helper = Command::new(env!("CARGO_BIN_EXE_exhaust"));
    helper.args(["nofile", "16"]);
    let (pid, line, report) = run_helper(helper, tracer);
    eprintln!("helper: {line}");
    for syscall in ["socket", "accept4", "openat"] {
        let expected = count_in(&line, syscall);
        assert!(
            expected > 0,
            "the helper saw no EMFILE from {syscall}: {line}"
        );
        let counted = report.count_of("nofile", |d| d["client"]["syscall"] == syscall);
        assert_eq!(counted, expected, "{syscall}: {:#?}", report.drops);
    }
    assert_eq!(
        report.total_of("nofile"),
        report.count_of("nofile", |_| true)
    );
    assert_eq!(report.lost(), 0);
    for drop in report.drops_of("nofile") {
        assert_eq!(drop["client"]["pid"], pid, "{drop}");
        assert_eq!(drop["client"]["comm"], "exhaust", "{drop}");
        assert!(drop.get("listener").is_none(), "{drop}");
        assert_eq!(drop["limit"]["name"], "rlimit_nofile", "{drop}");
        assert_eq!(drop["limit"]["value"], 16, "{drop}");
        assert_eq!(drop["limit"]["hard"], 16, "{drop}");
        let source = drop["limit"]["source"].as_str().unwrap();
        assert!(
            source.starts_with(&format!(
                "set on exhaust[{pid}] by prlimit, ulimit -n or setrlimit (its parent "
            )),
            "{source}"
        );
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .contains("LimitNOFILE="),
            "{drop}"
        );
    }
}

#[test]
fn eaddrnotavail_is_counted_and_names_the_port_range() {
    let test = "eaddrnotavail_is_counted_and_names_the_port_range";
    require_root(test);
    let netns = Netns::create("ports", &[("net.ipv4.ip_local_port_range", "40000 40003")]);
    let tracer = Droptrace::start(&[]);
    tracer.assert_mechanism("ephemeral_ports", EPHEMERAL_PORTS_HOOKS);
    let mut helper = netns.command(env!("CARGO_BIN_EXE_exhaust"));
    helper.args(["ports", "10"]);
    let (pid, line, report) = run_helper(helper, tracer);
    eprintln!("helper: {line}");
    assert_eq!(count_in(&line, "connected"), 4, "4 ports, 4 connections");
    let refused = count_in(&line, "connect");
    assert_eq!(refused, 6);
    let port = count_in(&line, "port");
    let mine = |d: &serde_json::Value| d["client"]["pid"] == pid;
    assert_eq!(
        report.count_of("ephemeral_ports", mine),
        refused,
        "{:#?}",
        report.drops
    );
    for drop in report
        .drops_of("ephemeral_ports")
        .into_iter()
        .filter(|d| mine(d))
    {
        assert_eq!(drop["listener"]["addr"], "127.0.0.1", "{drop}");
        assert_eq!(drop["listener"]["port"], port, "{drop}");
        assert_eq!(drop["listener"]["netns"], netns.inode(), "{drop}");
        assert_eq!(drop["limit"]["name"], "ip_local_port_range", "{drop}");
        assert_eq!(drop["limit"]["value"], 4, "{drop}");
        assert!(
            drop["limit"]["source"]
                .as_str()
                .unwrap()
                .starts_with("net.ipv4.ip_local_port_range 40000 40003 of netns"),
            "{drop}"
        );
        assert!(
            drop["limit"]["fix"].as_str().unwrap().contains("keepalive"),
            "{drop}"
        );
    }
}

/// connect() says EADDRNOTAVAIL also when no source address fits the
/// destination: IPv6 off on lo, and "localhost" is ::1 (a container's
/// classic); and when the socket was bound to a port whose four-tuple
/// with the destination is taken. No port was sought, so no port shortage
/// may be reported. In one namespace the helper's TCP and UDP connects to
/// [::1] fail while every port of the range is free, so do its connects
/// from sockets bound to one port; then it holds all four ports and is
/// refused from IPv4 sockets, and from IPv6 sockets to an IPv4-mapped
/// address. In another, with IPv6 on, a helper runs out of ports to
/// [::1]. Exactly the refusals after the ports ran out are counted, on
/// each mechanism this kernel allows.
#[test]
fn eaddrnotavail_where_no_port_was_sought_is_not_a_port_shortage() {
    let test = "eaddrnotavail_where_no_port_was_sought_is_not_a_port_shortage";
    require_root(test);
    let range = ("net.ipv4.ip_local_port_range", "40000 40003");
    let no_ipv6 = Netns::create("noaddr", &[range, ("net.ipv6.conf.lo.disable_ipv6", "1")]);
    let ipv6 = Netns::create("ports6", &[range]);
    let fexit = "hash_connect_fexit,hash_connect6_fexit";
    let mut mechanisms = Vec::new();
    for avoid in [
        String::new(),
        format!("{fexit},connect_exit_regs"),
        format!("{fexit},connect_exit_regs,syscall_exit"),
    ] {
        let tracer = Droptrace::start_with_env(&[], &[("DROPTRACE_AVOID", &avoid)]);
        let mechanism = tracer.mechanism_of("ephemeral_ports");
        assert!(!mechanisms.contains(&mechanism), "{mechanism} twice");
        mechanisms.push(mechanism.clone());
        let mut noaddr = no_ipv6.command(env!("CARGO_BIN_EXE_exhaust"));
        noaddr.args(["noaddr", "8"]);
        let mut ports6 = ipv6.command(env!("CARGO_BIN_EXE_exhaust"));
        ports6.args(["ports6", "8"]);
        let (pid, line, (pid6, line6, report)) =
            run_helper_then(noaddr, || run_helper(ports6, tracer));
        eprintln!("{mechanism}: helpers: {} | {}", line.trim(), line6.trim());
        assert_eq!(count_in(&line, "noaddr_tcp6"), 8, "{line}");
        assert_eq!(count_in(&line, "noaddr_udp6"), 8, "{line}");
        assert_eq!(count_in(&line, "bound"), 7, "{line}");
        assert_eq!(count_in(&line, "connected"), 4, "4 ports, 4 connections");
        let refused = count_in(&line, "connect") + count_in(&line, "mapped");
        assert_eq!(refused, 4 + 8, "{line}");
        assert_eq!(count_in(&line6, "connected"), 4, "{line6}");
        let refused6 = count_in(&line6, "connect");
        assert_eq!(refused6, 4, "{line6}");
        for (pid, refused, addrs) in [
            (pid, refused, &["127.0.0.1", "::ffff:127.0.0.1"][..]),
            (pid6, refused6, &["::1"][..]),
        ] {
            let of_pid = |d: &serde_json::Value| d["client"]["pid"] == pid;
            let drops = report.drops_of("ephemeral_ports");
            assert_eq!(
                report.count_of("ephemeral_ports", of_pid),
                refused,
                "{mechanism}, pid {pid}: {drops:#?}"
            );
            for drop in drops.into_iter().filter(|d| of_pid(d)) {
                let addr = drop["listener"]["addr"].as_str().unwrap();
                assert!(addrs.contains(&addr), "{mechanism}: {drop}");
            }
        }
    }
}

/// socket + bind + listen(backlog) on 127.0.0.1:port, by hand (std's
/// TcpListener would listen() once on its own first).
fn raw_listener(port: u16, backlogs: &[i32]) -> std::net::TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; the fd is handed to a TcpListener that owns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
            0
        );
        for &backlog in backlogs {
            assert_eq!(libc::listen(fd, backlog), 0);
        }
        std::net::TcpListener::from_raw_fd(fd)
    }
}

#[test]
fn a_backlog_clamped_by_somaxconn_is_noticed_once_before_any_drop() {
    let test = "a_backlog_clamped_by_somaxconn_is_noticed_once_before_any_drop";
    require_root(test);
    let netns = Netns::create("clamp", &[("net.core.somaxconn", "8")]);
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    tracer.assert_mechanism(LISTEN, LISTEN_HOOKS);
    let (clamped_port, inode) = std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_on_this_thread();
            // Clamped, and listen() twice on one socket as nginx does.
            let clamped = raw_listener(18091, &[64, 64]);
            // Not clamped: within somaxconn, and "as large as allowed".
            let small = raw_listener(18092, &[4]);
            let max = raw_listener(18093, &[-1]);
            let link =
                std::fs::read_link(format!("/proc/self/fd/{}", clamped.as_raw_fd())).unwrap();
            // Let droptrace look at the sockets while they are open.
            std::thread::sleep(Duration::from_millis(500));
            drop((small, max));
            let port = clamped.local_addr().map(|a: SocketAddr| a.port()).unwrap();
            (port, link.display().to_string())
        })
        .join()
        .unwrap()
    });
    let report = tracer.stop();
    assert_eq!(report.notices.len(), 1, "{:#?}\n{inode}", report.notices);
    let notice = &report.notices[0];
    assert_eq!(notice["kind"], "backlog_clamped");
    assert_eq!(notice["requested"], 64);
    assert_eq!(notice["effective"], 8);
    assert_eq!(notice["somaxconn"], 8);
    assert_eq!(notice["listener"]["addr"], "127.0.0.1", "{notice}");
    assert_eq!(notice["listener"]["port"], clamped_port, "{notice}");
    assert_eq!(notice["listener"]["netns"], netns.inode(), "{notice}");
    assert_eq!(notice["listener"]["pid"], std::process::id(), "{notice}");
    assert!(
        notice["fix"]
            .as_str()
            .unwrap()
            .starts_with("sysctl -w net.core.somaxconn=64 in that namespace"),
        "{notice}"
    );
    assert!(
        report.drops.is_empty(),
        "no drop happened: {:#?}",
        report.drops
    );
}
