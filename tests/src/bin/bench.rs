//! `cargo xtask bench`: a storm of refused connects against a listener of
//! backlog 1, and the cost droptrace adds to connects that succeed.
//! Prints figures; asserts nothing about time (that is not a test's job).
use std::{
    os::fd::RawFd,
    time::{Duration, Instant},
};

use droptrace_tests::{droptrace::Droptrace, unix};

fn connect_accept_cycles(path: &str, listener: RawFd, cycles: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..cycles {
        let (queued, refused) = unix::connect_many(path, 1);
        assert_eq!(refused, 0);
        unsafe {
            let accepted = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
            assert!(accepted >= 0);
            libc::close(accepted);
        }
        unix::close_all(queued);
    }
    start.elapsed()
}

/// BPF_PROG_TYPE_CGROUP_SKB: droptrace's per-packet hook.
const PROG_TYPE_CGROUP_SKB: u64 = 8;

/// (run_time_ns, run_cnt) summed over `pid`'s BPF programs of `prog_type`,
/// from /proc/PID/fdinfo (filled while kernel.bpf_stats_enabled=1).
fn program_stats(pid: u32, prog_type: u64) -> (u64, u64) {
    let mut totals = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        };
        if field("prog_type:") == Some(prog_type) {
            totals.0 += field("run_time_ns:").unwrap_or(0);
            totals.1 += field("run_cnt:").unwrap_or(0);
        }
    }
    totals
}

/// Nanoseconds per run of droptrace's cgroup_skb program while `load` runs.
fn ns_per_packet(pid: u32, load: impl FnOnce()) -> (f64, u64) {
    let (time_before, runs_before) = program_stats(pid, PROG_TYPE_CGROUP_SKB);
    load();
    let (time_after, runs_after) = program_stats(pid, PROG_TYPE_CGROUP_SKB);
    let runs = runs_after - runs_before;
    ((time_after - time_before) as f64 / runs.max(1) as f64, runs)
}

/// The per-packet hook's cost: ordinary loopback connections (SYN, ACK,
/// data, FIN: the common path), then a SYN flood against a full listener.
fn tcp_hook_cost(me: &str) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(STATS, "1").expect("cannot enable kernel.bpf_stats_enabled");
    let tracer = Droptrace::start(&["--pid", me]);
    let roomy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let roomy_addr = roomy.local_addr().unwrap();
    let (ordinary, ordinary_runs) = ns_per_packet(tracer.pid(), || {
        for _ in 0..5_000 {
            let mut client = std::net::TcpStream::connect(roomy_addr).unwrap();
            let (mut server, _) = roomy.accept().unwrap();
            std::io::Write::write_all(&mut client, b"ping").unwrap();
            let mut buf = [0u8; 4];
            std::io::Read::read_exact(&mut server, &mut buf).unwrap();
        }
    });
    let full = droptrace_tests::tcp::listener("127.0.0.1:0".parse().unwrap(), 1);
    let full_addr = full.local_addr().unwrap();
    let (flood, flood_runs) = ns_per_packet(tracer.pid(), || {
        let fds = droptrace_tests::tcp::connect_many(full_addr, 2_000);
        std::thread::sleep(Duration::from_millis(1500));
        droptrace_tests::tcp::close_all(fds);
    });
    let report = tracer.stop();
    std::fs::write(STATS, previous.trim()).unwrap();
    let dropped = report
        .tcp_drops_at("127.0.0.1", full_addr.port())
        .iter()
        .map(|d| d["count"].as_u64().unwrap())
        .sum::<u64>();
    println!("cgroup_skb per packet         {ordinary:.0} ns on ordinary loopback traffic ({ordinary_runs} packets)");
    println!("cgroup_skb per packet         {flood:.0} ns under a SYN flood on a full listener ({flood_runs} packets, {dropped} drops counted)");
}

/// BPF_PROG_TYPE_KPROBE: uprobes and uretprobes are of this type.
const PROG_TYPE_KPROBE: u64 = 2;

/// `requests` GETs of nginx's /ping, each on a new connection; ns each.
fn ping_nginx(port: u16, requests: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..requests {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut stream, b"GET /ping HTTP/1.0\r\n\r\n").unwrap();
        let mut response = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut response).unwrap();
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&response)
        );
    }
    start.elapsed().as_nanos() as f64 / requests as f64
}

/// What droptrace costs nginx: requests on new connections (each one call
/// of ngx_get_connection, where the uretprobe sits) with and without it.
fn nginx_cost() {
    use droptrace_tests::stack::{self, Stack, StackConfig};
    if !stack::available() {
        eprintln!(
            "bench: nginx's cost not measured: apt-get install nginx uwsgi uwsgi-plugin-python3"
        );
        return;
    }
    const ROUNDS: usize = 3;
    const REQUESTS: usize = 3_000;
    let stack = Stack::start(StackConfig {
        port: stack::free_port(),
        ..StackConfig::default()
    });
    let nginx = stack.nginx.id().to_string();
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let previous = std::fs::read_to_string(STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(STATS, "1").expect("cannot enable kernel.bpf_stats_enabled");
    let (mut without, mut with, mut probe) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(ping_nginx(stack.port, REQUESTS));
        let tracer = Droptrace::start(&["--pid", &nginx]);
        let (before, runs_before) = program_stats(tracer.pid(), PROG_TYPE_KPROBE);
        with.push(ping_nginx(stack.port, REQUESTS));
        let (after, runs_after) = program_stats(tracer.pid(), PROG_TYPE_KPROBE);
        probe.push((after - before) as f64 / (runs_after - runs_before).max(1) as f64);
        tracer.stop();
    }
    std::fs::write(STATS, previous.trim()).unwrap();
    let (without, with, probe) = (median(without), median(with), median(probe));
    println!(
        "nginx request, new connection median of {ROUNDS} rounds: {without:.0} ns without droptrace, {with:.0} ns with it ({:+.0} ns, {:+.1} %); the uretprobe's program {probe:.0} ns per call",
        with - without,
        100.0 * (with / without - 1.0)
    );
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    droptrace_tests::require_root("bench");
    let connects: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let storm_path = dir.path().join("storm.sock").display().to_string();
    let roomy_path = dir.path().join("roomy.sock").display().to_string();
    let me = std::process::id().to_string();
    let roomy = unix::Listener::bind(&roomy_path, 4096);

    // Successful connects with and without droptrace, interleaved over
    // several rounds so that machine noise hits both sides alike.
    const ROUNDS: usize = 5;
    const CYCLES: usize = 10_000;
    let ns_per_cycle = |d: Duration| d.as_nanos() as f64 / CYCLES as f64;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(ns_per_cycle(connect_accept_cycles(
            &roomy_path,
            roomy.fd,
            CYCLES,
        )));
        let tracer = Droptrace::start(&["--pid", &me]);
        with.push(ns_per_cycle(connect_accept_cycles(
            &roomy_path,
            roomy.fd,
            CYCLES,
        )));
        let report = tracer.stop();
        assert!(report.drops.is_empty(), "successful connects were reported");
    }

    // A storm of refused connects against a full backlog-1 listener.
    let tracer = Droptrace::start(&["--pid", &me]);
    let storm = unix::Listener::bind(&storm_path, 1);
    let (queued, _) = unix::connect_many(&storm_path, 2);
    let start = Instant::now();
    let (more, refused) = unix::connect_many(&storm_path, connects);
    let storm_time = start.elapsed();
    assert!(more.is_empty());
    std::thread::sleep(Duration::from_secs(1));
    let report = tracer.stop();
    unix::close_all(queued);
    drop(storm);

    let delivered = report.total_at(&storm_path);
    let lost = report.lost();
    let (without, with) = (median(without), median(with));
    println!(
        "droptrace benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "refused connects generated   {refused} in {:.3} s ({:.0}/s)",
        storm_time.as_secs_f64(),
        refused as f64 / storm_time.as_secs_f64()
    );
    println!(
        "drops delivered to userspace {delivered} ({:.0}/s over the storm)",
        delivered as f64 / storm_time.as_secs_f64()
    );
    println!(
        "lost (counted by the kernel) {lost} ({:.4} %)",
        100.0 * lost as f64 / refused.max(1) as f64
    );
    println!(
        "unaccounted                  {}",
        refused as i64 - delivered as i64 - lost as i64
    );
    tcp_hook_cost(&me);
    nginx_cost();
    println!(
        "successful connect+accept    median of {ROUNDS} rounds: {without:.0} ns without droptrace, {with:.0} ns with it ({:+.0} ns, {:+.1} %)",
        with - without,
        100.0 * (with / without - 1.0)
    );
}
