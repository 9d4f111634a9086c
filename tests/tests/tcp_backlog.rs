//! Kernel integration: TCP listeners with tiny backlogs that never accept,
//! in private network namespaces (so the kernel's TcpExtListenOverflows
//! counts only this test's drops), and droptrace must count exactly what
//! the kernel counts, at the right listener, with the right limit.
use std::{net::SocketAddr, os::fd::AsRawFd, time::Duration};

use droptrace_tests::{
    bpf,
    droptrace::{Droptrace, Report, AVOID_TCP_CALLS, TCP_CLIENT_HOOKS, TCP_HOOKS, TCP_PACKET_HOOK},
    netns::{Netns, TcpExt},
    require_root, tcp,
};

/// How droptrace is made to see a flood's drops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hooks {
    /// What this kernel allows first: the per-connection calls where fentry
    /// is allowed (the kernel matrix), the packet programs with the connect
    /// hooks here.
    Preferred,
    /// The packet programs, clients named by the state tracepoint: the
    /// calls and the connect hooks left out, as a kernel refusing them would.
    PacketsAndStateTracepoint,
}

/// Flood a backlog-`backlog` listener at `addr` inside `netns` with `clients`
/// connects, let their SYNs be retransmitted for `linger`, then close them
/// all before droptrace stops, so both counts end together. Returns what
/// droptrace reported and what the namespace's own counters gained.
fn flood(
    netns: &Netns,
    addr: SocketAddr,
    backlog: i32,
    clients: usize,
    linger: Duration,
    deferred: bool,
) -> (Report, TcpExt) {
    flood_seen_by(netns, Hooks::Preferred, || {
        flood_of(addr, backlog, clients, linger, deferred)
    })
}

/// The load of `flood`, run inside the namespace.
fn flood_of(addr: SocketAddr, backlog: i32, clients: usize, linger: Duration, deferred: bool) {
    let listener = tcp::listener(addr, backlog);
    if deferred {
        tcp::defer_accept(&listener);
    }
    let fds = tcp::connect_many(addr, clients);
    std::thread::sleep(linger);
    tcp::close_all(fds);
    drop(listener);
}

/// Run `load` inside `netns`, seen through `hooks`.
fn flood_seen_by(netns: &Netns, hooks: Hooks, load: impl FnOnce() + Send) -> (Report, TcpExt) {
    let me = std::process::id().to_string();
    let family = "tcp_accept_queue/tcp_syn_queue";
    let avoid = match hooks {
        Hooks::Preferred => String::new(),
        Hooks::PacketsAndStateTracepoint => {
            format!("{AVOID_TCP_CALLS},tcp_client_connect4,tcp_client_connect6")
        }
    };
    let env = [("RUST_LOG", "debug"), ("DROPTRACE_AVOID", avoid.as_str())];
    let tracer = Droptrace::start_with_env(&["--pid", &me], &env);
    let extra = tracer.extra_of(family);
    if hooks == Hooks::Preferred {
        let used = tracer.assert_mechanism(family, TCP_HOOKS);
        // The calls name clients themselves; the packet programs with the
        // connect hooks, on every kernel droptrace supports so far.
        let expected = (used != TCP_HOOKS[0]).then_some(TCP_CLIENT_HOOKS[0]);
        assert_eq!(extra.as_deref(), expected);
    } else {
        assert_packet_mechanism(&tracer);
        assert_eq!(extra.as_deref(), Some(TCP_CLIENT_HOOKS[1]));
    }
    let before = netns.tcp_ext();
    netns.run(load);
    let grew = netns.tcp_ext().since(before);
    // Let the last counted drops reach droptrace's next poll.
    std::thread::sleep(Duration::from_millis(500));
    (tracer.stop(), grew)
}

/// The TCP family uses its packet programs (AVOID_TCP_CALLS in effect):
/// the one the kernel matrix names, or one of them.
fn assert_packet_mechanism(tracer: &Droptrace) {
    let used = tracer.mechanism_of("tcp_accept_queue/tcp_syn_queue");
    match std::env::var(TCP_PACKET_HOOK) {
        Ok(expected) => assert_eq!(used, expected, "{TCP_PACKET_HOOK}: {}", tracer.hooks_line()),
        Err(_) => assert!(TCP_HOOKS[1..].contains(&used.as_str()), "uses {used}"),
    }
}

/// `flood` a backlog-2 listener at 127.0.0.1:19090 with 20 clients.
fn flood_backlog_2(netns: &Netns) -> (Report, TcpExt) {
    flood(
        netns,
        "127.0.0.1:19090".parse().unwrap(),
        2,
        20,
        Duration::from_millis(2500),
        false,
    )
}

/// The sum of the `count`s of the drop lines of `kind`.
fn total(drops: &[&serde_json::Value], kind: &str) -> u64 {
    drops
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| d["count"].as_u64().unwrap())
        .sum()
}

fn assert_counted_like_the_kernel(
    netns: &Netns,
    (report, kernel): &(Report, TcpExt),
    addr: &str,
    port: u16,
    family: &str,
) -> u64 {
    let drops = report.tcp_drops_at(addr, port);
    let counted = total(&drops, "tcp_accept_queue");
    assert!(
        kernel.listen_overflows > 0,
        "the flood overflowed nothing, so it proves nothing"
    );
    assert_eq!(
        counted, kernel.listen_overflows,
        "{addr}:{port}: droptrace's tcp_accept_queue vs the namespace's TcpExtListenOverflows; droptrace said:\n{}",
        report.stderr
    );
    assert_eq!(
        counted + total(&drops, "tcp_syn_queue"),
        kernel.listen_drops,
        "{addr}:{port}: droptrace's TCP drops vs the namespace's TcpExtListenDrops"
    );
    assert_eq!(report.lost(), 0);
    let stages: Vec<&str> = drops.iter().map(|d| d["stage"].as_str().unwrap()).collect();
    eprintln!("{addr}:{port}: droptrace {counted}, kernel {kernel:?}, stages {stages:?}");
    let me = u64::from(std::process::id());
    for drop in &drops {
        assert_eq!(drop["kind"], "tcp_accept_queue", "{drop}");
        assert!(
            ["syn", "ack", "ack_syncookie"].contains(&drop["stage"].as_str().unwrap()),
            "{drop}"
        );
        assert_eq!(drop["listener"]["family"], family);
        assert_eq!(drop["listener"]["netns"], netns.inode());
        assert_eq!(drop["listener"]["pid"], me, "owner: {drop}");
        assert_eq!(drop["client"]["addr"], addr, "{drop}");
        // SYN-time drops find the sender's own socket: the local process.
        if drop["stage"] == "syn" {
            assert_eq!(drop["client"]["pid"], me, "refused client: {drop}");
        }
        assert!(drop["client"]["port"].as_u64().unwrap() > 0);
    }
    counted
}

#[test]
fn a_full_ipv4_accept_queue_is_counted_like_the_kernel_counts_it() {
    require_root("a_full_ipv4_accept_queue_is_counted_like_the_kernel_counts_it");
    let netns = Netns::create("tcp4", &[]);
    let report = flood_backlog_2(&netns);
    assert_counted_like_the_kernel(&netns, &report, "127.0.0.1", 19090, "tcp");
    for drop in report.0.tcp_drops_at("127.0.0.1", 19090) {
        assert_eq!(drop["listener"]["backlog"], 2);
        assert_eq!(drop["limit"]["name"], "app_backlog", "{drop}");
        assert_eq!(drop["limit"]["value"], 2);
    }
}

#[test]
fn a_full_ipv6_accept_queue_is_counted_like_the_kernel_counts_it() {
    require_root("a_full_ipv6_accept_queue_is_counted_like_the_kernel_counts_it");
    let netns = Netns::create("tcp6", &[]);
    let report = flood(
        &netns,
        "[::1]:19090".parse().unwrap(),
        2,
        20,
        Duration::from_millis(2500),
        false,
    );
    assert_counted_like_the_kernel(&netns, &report, "::1", 19090, "tcp6");
    for drop in report.0.tcp_drops_at("::1", 19090) {
        assert_eq!(drop["limit"]["name"], "app_backlog", "{drop}");
        assert_eq!(drop["limit"]["value"], 2);
    }
}

#[test]
fn a_tcp_backlog_clamped_by_somaxconn_blames_somaxconn() {
    require_root("a_tcp_backlog_clamped_by_somaxconn_blames_somaxconn");
    let netns = Netns::create("tcpclamp", &[("net.core.somaxconn", "4")]);
    // The packet programs and the state tracepoint here: the fallbacks
    // are tested too, on every kernel.
    let report = flood_seen_by(&netns, Hooks::PacketsAndStateTracepoint, || {
        flood_of(
            "127.0.0.1:19090".parse().unwrap(),
            64,
            30,
            Duration::from_millis(2500),
            false,
        )
    });
    assert_counted_like_the_kernel(&netns, &report, "127.0.0.1", 19090, "tcp");
    for drop in report.0.tcp_drops_at("127.0.0.1", 19090) {
        assert_eq!(drop["listener"]["backlog"], 4);
        assert_eq!(drop["limit"]["name"], "somaxconn", "{drop}");
        assert_eq!(drop["limit"]["value"], 4);
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .starts_with("sysctl -w net.core.somaxconn=64"),
            "{drop}"
        );
    }
}

/// A client is named whatever its listener looked like when it connected.
/// Here the listener fills with no packet to show it: 50 handshakes done
/// (the queue far below its backlog of 200), then listen() shrinks the
/// backlog to 2, and only then do 10 more clients connect. Their SYNs are
/// refused; each refusal must name this process. Seen through the
/// preferred hooks and through the state tracepoint.
#[test]
fn a_client_is_named_though_no_packet_showed_its_listener_full() {
    require_root("a_client_is_named_though_no_packet_showed_its_listener_full");
    let addr: SocketAddr = "127.0.0.1:19090".parse().unwrap();
    for (tag, hooks) in [
        ("tcpshrink", Hooks::Preferred),
        ("tcpshrinkst", Hooks::PacketsAndStateTracepoint),
    ] {
        let netns = Netns::create(tag, &[]);
        let report = flood_seen_by(&netns, hooks, || {
            let listener = tcp::listener(addr, 200);
            let queued = tcp::connect_many(addr, 50);
            // Loopback handshakes complete within the connect; this is
            // margin.
            std::thread::sleep(Duration::from_millis(200));
            // listen() again: the backlog falls below the queue.
            // SAFETY: a listening socket's fd.
            assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 2) }, 0);
            let refused = tcp::connect_many(addr, 10);
            std::thread::sleep(Duration::from_millis(2500));
            tcp::close_all(refused);
            tcp::close_all(queued);
            drop(listener);
        });
        assert!(
            report.1.listen_overflows >= 10,
            "{tag}: the 10 late clients were not refused: {:?}",
            report.1
        );
        // Every refusal is counted, and each SYN refused names this process.
        assert_counted_like_the_kernel(&netns, &report, "127.0.0.1", 19090, "tcp");
        let drops = report.0.tcp_drops_at("127.0.0.1", 19090);
        assert!(
            drops.iter().any(|d| d["stage"] == "syn"),
            "{tag}: {drops:?}"
        );
    }
}

#[test]
fn a_full_syn_queue_with_syncookies_off_is_counted_like_the_kernel_counts_it() {
    let test = "a_full_syn_queue_with_syncookies_off_is_counted_like_the_kernel_counts_it";
    require_root(test);
    let netns = Netns::create("tcpsynq", &[("net.ipv4.tcp_syncookies", "0")]);
    // Deferred accept keeps every data-less handshake in the SYN queue, so
    // the accept queue never fills: SYNs are refused by the SYN queue.
    let (report, kernel) = flood(
        &netns,
        "127.0.0.1:19090".parse().unwrap(),
        4,
        20,
        Duration::from_millis(2500),
        true,
    );
    let drops = report.tcp_drops_at("127.0.0.1", 19090);
    let counted = total(&drops, "tcp_syn_queue");
    eprintln!("SYN queue: droptrace {counted}, kernel {kernel:?}");
    assert!(
        kernel.req_q_full_drop > 0,
        "the SYN queue never filled: {kernel:?}"
    );
    assert_eq!(kernel.listen_overflows, 0, "{kernel:?}");
    assert_eq!(total(&drops, "tcp_accept_queue"), 0);
    assert_eq!(
        counted, kernel.listen_drops,
        "droptrace's tcp_syn_queue vs the namespace's TcpExtListenDrops; droptrace said:\n{}",
        report.stderr
    );
    assert_eq!(report.lost(), 0);
    for drop in &drops {
        assert_eq!(drop["stage"], "syn", "{drop}");
        assert_eq!(drop["listener"]["netns"], netns.inode());
        assert_eq!(drop["limit"]["name"], "app_backlog", "{drop}");
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .ends_with("so a full SYN queue answers with cookies"),
            "{drop}"
        );
    }
}

/// With `net.ipv4.tcp_syncookies=2` every SYN is answered with a cookie and
/// no request waits in the SYN queue: every ACK to the listener runs the
/// cookie check (cookie_v4_check), and the counts stay exact. An ACK the
/// full accept queue refuses there is a cookie's, which the per-connection
/// calls name `ack_syncookie` on every kernel, never `ack`. (Loopback
/// completes each handshake inside its connect(), so this flood's drops
/// are mostly SYNs: whether a cookie's ACK is refused depends on two
/// handshakes overlapping.)
#[test]
fn a_full_accept_queue_with_syncookies_always_on_is_counted_like_the_kernel_counts_it() {
    let test = "a_full_accept_queue_with_syncookies_always_on_is_counted_like_the_kernel_counts_it";
    require_root(test);
    let netns = Netns::create("tcpcookie", &[("net.ipv4.tcp_syncookies", "2")]);
    let report = flood_backlog_2(&netns);
    assert!(
        report.1.syncookies_sent > 0,
        "no SYN was answered with a cookie: {:?}",
        report.1
    );
    assert_counted_like_the_kernel(&netns, &report, "127.0.0.1", 19090, "tcp");
    // The mechanism in use follows the family's name; one skipped follows
    // "(skipped ".
    let family = "tcp_accept_queue/tcp_syn_queue";
    if report
        .0
        .stderr
        .contains(&format!("{family}: {}", TCP_HOOKS[0]))
    {
        for drop in report.0.tcp_drops_at("127.0.0.1", 19090) {
            assert_ne!(drop["stage"], "ack", "a cookie's ACK named ack: {drop}");
        }
    }
}

/// A SYN cookie's final ACK refused by a full accept queue (in
/// cookie_v4_check): a raw socket holds a handshake half-way while three
/// clients fill a backlog-2 queue, then sends its ACK. Counted like the
/// kernel counts it, and named `ack_syncookie` wherever the stage can be
/// known: by the calls, and by kfree_skb's drop reason (5.17+) once the
/// free programs are attached; `ack` without drop reasons.
#[test]
fn a_syn_cookies_ack_refused_by_a_full_accept_queue_is_named_and_counted() {
    let test = "a_syn_cookies_ack_refused_by_a_full_accept_queue_is_named_and_counted";
    require_root(test);
    let netns = Netns::create("tcpcookieack", &[("net.ipv4.tcp_syncookies", "2")]);
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    let used = tracer.assert_mechanism("tcp_accept_queue/tcp_syn_queue", TCP_HOOKS);
    let pid = tracer.pid();
    let addr: std::net::SocketAddrV4 = "127.0.0.1:19092".parse().unwrap();
    let before = netns.tcp_ext();
    netns.run(|| {
        let listener = tcp::listener(addr.into(), 2);
        // Below the ephemeral range: no client of the kernel's has it.
        let handshake = tcp::CookieHandshake::syn(addr, 20123);
        let fds = tcp::connect_many(addr.into(), 3);
        if used != TCP_HOOKS[0] {
            // The packet programs name the stage once the free
            // programs see the drop reason.
            free_links_until(pid, Duration::from_secs(5), |links| links.len() == 4);
        }
        handshake.ack();
        std::thread::sleep(Duration::from_millis(500));
        tcp::close_all(fds);
        drop(listener);
    });
    let grew = netns.tcp_ext().since(before);
    std::thread::sleep(Duration::from_millis(500));
    let report = tracer.stop();
    assert_eq!(grew.listen_overflows, 1, "the cookie's ACK alone: {grew:?}");
    let drops = report.tcp_drops_at("127.0.0.1", 19092);
    assert_eq!(total(&drops, "tcp_accept_queue"), 1, "{}", report.stderr);
    let expected = if used == TCP_HOOKS[2] {
        "ack"
    } else {
        "ack_syncookie"
    };
    assert_eq!(drops[0]["stage"], expected, "{}", drops[0]);
    assert_eq!(drops[0]["client"]["port"], 20123, "{}", drops[0]);
}

/// Polls `bpf::free_links` until `done` says yes, for at most `limit`.
fn free_links_until(pid: u32, limit: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let links = bpf::free_links(pid);
        if done(&links) || start.elapsed() > limit {
            return links;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every packet the machine frees would run the packet programs' free
/// tracepoints: they are attached while a listener is near full and
/// detached after, and the drops before they attach are counted all the
/// same. (The per-connection calls, where the kernel allows them, have
/// none: they are left out here.)
#[test]
fn the_free_tracepoints_are_attached_only_while_a_listener_is_near_full() {
    let test = "the_free_tracepoints_are_attached_only_while_a_listener_is_near_full";
    require_root(test);
    let netns = Netns::create("tcpfree", &[]);
    let me = std::process::id().to_string();
    let tracer =
        Droptrace::start_with_env(&["--pid", &me], &[("DROPTRACE_AVOID", AVOID_TCP_CALLS)]);
    assert_packet_mechanism(&tracer);
    let pid = tracer.pid();
    let addr: SocketAddr = "127.0.0.1:19090".parse().unwrap();
    let before = netns.tcp_ext();
    let (far, near) = netns.run(|| {
        // Far from full: 8 queued of 128.
        let listener = tcp::listener(addr, 128);
        let fds = tcp::connect_many(addr, 8);
        std::thread::sleep(Duration::from_millis(1500));
        let far = bpf::free_links(pid);
        tcp::close_all(fds);
        drop(listener);
        // Full: backlog 2, 12 clients.
        let listener = tcp::listener(addr, 2);
        let fds = tcp::connect_many(addr, 12);
        // The four are attached one after another: wait for all of them
        // (under emulation a look can fall between two).
        let near = free_links_until(pid, Duration::from_secs(3), |links| links.len() == 4);
        std::thread::sleep(Duration::from_millis(1500));
        tcp::close_all(fds);
        drop(listener);
        (far, near)
    });
    let grew = netns.tcp_ext().since(before);
    assert_eq!(
        far,
        Vec::<String>::new(),
        "attached with no listener near full"
    );
    assert_eq!(
        near.iter().filter(|l| *l == "consume_skb").count(),
        2,
        "consume_skb links while a listener is full: {near:?}"
    );
    assert_eq!(
        near.iter().filter(|l| *l == "kfree_skb").count(),
        2,
        "kfree_skb links while a listener is full: {near:?}"
    );
    let after = free_links_until(pid, Duration::from_secs(10), |links| links.is_empty());
    assert_eq!(after, Vec::<String>::new(), "still attached 10 s after");
    std::thread::sleep(Duration::from_millis(500));
    let report = tracer.stop();
    let counted = total(&report.tcp_drops_at("127.0.0.1", 19090), "tcp_accept_queue");
    assert!(grew.listen_overflows > 0, "nothing overflowed: {grew:?}");
    assert_eq!(
        counted, grew.listen_overflows,
        "droptrace's tcp_accept_queue vs the namespace's TcpExtListenOverflows; droptrace said:\n{}",
        report.stderr
    );
}
