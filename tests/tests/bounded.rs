//! droptrace runs for weeks: what it holds in the kernel's tables for a
//! process or a listener goes once that process exited or that listener
//! closed (after a quiet spell, shortened here with
//! DROPTRACE_RETIRE_AFTER_MS), and a drop after that is still counted. The
//! tables are read from the kernel (bpf(2) on droptrace's own map fds), the
//! counts from what the helper itself saw.
use std::{
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use droptrace_tests::{
    bpf,
    droptrace::{Droptrace, AVOID_TCP_CALLS},
    memory_mib, netns,
    netns::Netns,
    require_root, signal, spawn_and_read_line, tcp,
};

/// struct FdLimitKey: pid first, 32 bytes.
const FD_LIMIT_KEY: usize = 32;
/// struct TcpOverflowKey: inode first, 16 bytes.
const TCP_KEY: usize = 16;

/// Keys of droptrace's map `map` (keys of `key_size` bytes) that begin
/// with `subject` (a pid or an inode, as the kernel lays it out).
fn keys_of(tracer: u32, map: &str, key_size: usize, subject: &[u8]) -> usize {
    bpf::map_keys(tracer, map, key_size)
        .unwrap_or_else(|| panic!("droptrace has no {map} map"))
        .iter()
        .filter(|key| key.starts_with(subject))
        .count()
}

fn fd_limit_keys_of(tracer: u32, pid: u32) -> usize {
    keys_of(tracer, "FD_LIMIT_HITS", FD_LIMIT_KEY, &pid.to_ne_bytes())
}

fn tcp_keys_of(tracer: u32, inode: u64) -> usize {
    keys_of(tracer, "TCP_OVERFLOWS", TCP_KEY, &inode.to_ne_bytes())
}

/// Wait up to 10 s for `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The exhaust helper under RLIMIT_NOFILE 16: its pid and what it saw
/// (`socket=1 accept4=1 openat=1`); it lives until `stop` is called.
struct Helper(std::process::Child, String);

impl Helper {
    fn start() -> Self {
        let (child, line) = spawn_and_read_line(
            Command::new(env!("CARGO_BIN_EXE_exhaust"))
                .args(["nofile", "16"])
                .stdin(Stdio::piped()),
        );
        Self(child, line)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// EMFILEs it saw, over its three syscalls.
    fn refused(&self) -> u64 {
        self.1
            .split_whitespace()
            .filter_map(|word| word.split_once('=')?.1.parse::<u64>().ok())
            .sum()
    }

    fn stop(mut self) {
        drop(self.0.stdin.take());
        assert!(
            self.0.wait().unwrap().success(),
            "helper failed: {}",
            self.1
        );
    }
}

#[test]
fn keys_of_exited_processes_and_closed_listeners_leave_the_kernel_tables() {
    let test = "keys_of_exited_processes_and_closed_listeners_leave_the_kernel_tables";
    require_root(test);
    let tracer = Droptrace::start_with_env(&[], &[("DROPTRACE_RETIRE_AFTER_MS", "300")]);
    let me = tracer.pid();

    // A process that hit EMFILE: its key stays while it lives...
    let first = Helper::start();
    let first_pid = first.pid();
    assert!(first.refused() > 0, "{}", first.1);
    eventually("the helper's key in FD_LIMIT_HITS", || {
        fd_limit_keys_of(me, first_pid) > 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        fd_limit_keys_of(me, first_pid) > 0,
        "retired while its process still runs"
    );
    let first_refused = first.refused();
    // ...and goes once it exited.
    first.stop();
    eventually("the exited helper's keys leaving FD_LIMIT_HITS", || {
        fd_limit_keys_of(me, first_pid) == 0
    });

    // A TCP listener that overflowed: its keys stay while it is open...
    let addr = "127.0.0.1:18097".parse().unwrap();
    let listener = tcp::listener(addr, 0);
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
            .unwrap()
            .ino()
    };
    let clients = tcp::connect_many(addr, 8);
    eventually("the listener's keys in TCP_OVERFLOWS", || {
        tcp_keys_of(me, inode) > 0
    });
    tcp::close_all(clients);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        tcp_keys_of(me, inode) > 0,
        "retired while the listener is open"
    );
    // ...and go once it closed.
    drop(listener);
    eventually("the closed listener's keys leaving TCP_OVERFLOWS", || {
        tcp_keys_of(me, inode) == 0
    });

    // A drop after all that is counted, exactly, with its process.
    let second = Helper::start();
    let (second_pid, second_refused) = (second.pid(), second.refused());
    std::thread::sleep(Duration::from_millis(500));
    let report = tracer.stop();
    second.stop();
    let counted = |pid: u32| report.count_of("nofile", |d| d["client"]["pid"] == pid);
    assert_eq!(counted(first_pid), first_refused, "{:#?}", report.drops);
    assert_eq!(counted(second_pid), second_refused, "{:#?}", report.drops);
    assert_eq!(report.lost(), 0);
}

/// droptrace looks into every network namespace through a socket of its
/// own inside it. A namespace that went away (its processes gone, `ip netns
/// del`) must not be kept alive by that socket: once it is gone from the
/// system, droptrace lets go of it. The kernel says which namespace each of
/// droptrace's sockets is in (SIOCGSKNS).
#[test]
fn a_namespace_that_went_away_is_not_kept_alive_by_droptrace() {
    let test = "a_namespace_that_went_away_is_not_kept_alive_by_droptrace";
    require_root(test);
    let namespace = Netns::create("pinned", &[]);
    let inode = namespace.inode();
    let tracer = Droptrace::start_with_env(&[], &[("DROPTRACE_RETIRE_AFTER_MS", "300")]);
    let me = tracer.pid();
    eventually("a droptrace socket inside the namespace", || {
        netns::of_sockets(me).contains(&inode)
    });
    drop(namespace);
    eventually("droptrace letting go of the deleted namespace", || {
        !netns::of_sockets(me).contains(&inode)
    });
    assert_eq!(tracer.stop().lost(), 0);
}

/// `--pid P` means that process, not the number: once it exited, a new
/// process the kernel gives the same pid (forced here through
/// kernel.ns_last_pid) is a stranger, and its drops are not shown.
#[test]
fn a_pid_reused_by_another_process_is_not_the_one_given_to_pid() {
    let test = "a_pid_reused_by_another_process_is_not_the_one_given_to_pid";
    require_root(test);
    let mut given = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = given.id();
    let tracer = Droptrace::start(&["--pid", &pid.to_string()]);
    signal(pid, libc::SIGKILL);
    given.wait().unwrap();
    // The next process the kernel makes takes `pid` again, unless another
    // process on the machine was quicker: then try again.
    let stranger = (0..100)
        .find_map(|_| {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
            let helper = Helper::start();
            if helper.pid() == pid {
                return Some(helper);
            }
            helper.stop();
            None
        })
        .expect("the kernel never gave the pid again: other processes took it each time");
    assert!(stranger.refused() > 0, "{}", stranger.1);
    std::thread::sleep(Duration::from_millis(500));
    let report = tracer.stop();
    stranger.stop();
    assert_eq!(
        report.count_of("nofile", |d| d["client"]["pid"] == pid),
        0,
        "the process that took pid {pid} was watched as if it were the one given: {:#?}",
        report.drops
    );
}

/// aya parses the kernel's BTF at start-up, and again in the watcher when
/// the TCP free programs are first needed (17 MB for a moment each, the
/// peak): after each, those pages are back with the kernel, not kept for
/// weeks by the allocator.
#[test]
fn the_memory_of_each_parse_is_given_back() {
    let test = "the_memory_of_each_parse_is_given_back";
    require_root(test);
    let namespace = Netns::create("memory", &[]);
    // The packet programs, whose free programs are loaded on demand.
    let tracer = Droptrace::start_with_env(
        &["--pid", &std::process::id().to_string()],
        &[("DROPTRACE_AVOID", AVOID_TCP_CALLS)],
    );
    let pid = tracer.pid();
    let (peak, started) = (memory_mib(pid, "VmHWM"), memory_mib(pid, "VmRSS"));
    // A full listener: the free programs are loaded (the second parse).
    std::thread::scope(|s| {
        s.spawn(|| {
            namespace.enter_on_this_thread();
            let addr = "127.0.0.1:19091".parse().unwrap();
            let listener = tcp::listener(addr, 2);
            let fds = tcp::connect_many(addr, 12);
            eventually("the TCP free programs attached", || {
                bpf::free_links(pid).len() == 4
            });
            tcp::close_all(fds);
            drop(listener);
        });
    });
    let loaded = memory_mib(pid, "VmRSS");
    tracer.stop();
    assert!(
        peak - started >= 12.0,
        "droptrace holds {started:.1} MiB once watching, its peak was {peak:.1} MiB: \
         the start-up parse's pages were not given back"
    );
    assert!(
        loaded - started < 6.0,
        "droptrace holds {loaded:.1} MiB after loading the TCP free programs, \
         {started:.1} MiB before: the watcher's parse was not given back"
    );
}
