//! `cargo xtask bench`: droptrace's cost beside what an operator would run
//! instead (bpftrace, or no tracer), measured in one run with the rounds
//! interleaved so that this machine's noise hits every side alike, and
//! reported as ratios:
//! - a storm of refused non-blocking UNIX connects against a full listener;
//! - nginx → uWSGI on a UNIX socket under wrk, keep-alive and a new
//!   connection per request;
//! - the time each kind of droptrace program takes per run
//!   (kernel.bpf_stats_enabled), on ordinary loopback traffic;
//! - start-up to attached, and peak memory;
//! - a successful UNIX connect + accept.
//!
//! Prints figures and asserts only exactness (every refusal counted, none
//! lost): time is not a test's job.
use std::{
    io::{BufRead, BufReader, Read},
    os::fd::RawFd,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use droptrace_tests::{
    bpf,
    droptrace::{self, Droptrace},
    memory_mib, stack, unix,
};

const ROUNDS: usize = 3;

/// A step that stops progressing becomes a failure that says which step,
/// and where each process the bench started waits in the kernel, instead
/// of a silent hang (once, in a 6.1 guest, a run stopped in its wrk rounds
/// and printed nothing).
mod watchdog {
    use std::{
        sync::Mutex,
        time::{Duration, Instant},
    };

    /// No step (a tracer's start or stop, one round's load) takes this long,
    /// even under emulation.
    const LIMIT: Duration = Duration::from_secs(300);

    static STEP: Mutex<Option<(String, Instant)>> = Mutex::new(None);

    /// The bench is now doing `what`.
    pub fn step(what: impl Into<String>) {
        *STEP.lock().unwrap() = Some((what.into(), Instant::now()));
    }

    /// Watch the steps from a thread of its own.
    pub fn start() {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let stuck = match &*STEP.lock().unwrap() {
                Some((what, since)) if since.elapsed() > LIMIT => what.clone(),
                _ => continue,
            };
            eprintln!("bench: stuck for {} s in: {stuck}", LIMIT.as_secs());
            let descendants = descendants(std::process::id());
            for pid in &descendants {
                eprintln!("{}", describe(*pid));
            }
            for pid in descendants {
                droptrace_tests::signal(pid, libc::SIGKILL);
            }
            std::process::exit(3);
        });
    }

    /// Every process under `root`, parents first.
    fn descendants(root: u32) -> Vec<u32> {
        let parent_of = |pid: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields
            // follow the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(1)?.parse().ok()
        };
        // (pid, parent) of every process, each /proc/PID/stat read once.
        let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .filter_map(|pid| Some((pid, parent_of(pid)?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut found = vec![root];
        let mut i = 0;
        while i < found.len() {
            let parent = found[i];
            found.extend(all.iter().filter(|(_, p)| *p == parent).map(|(pid, _)| pid));
            i += 1;
        }
        found.remove(0);
        found
    }

    /// A process's command, state, and where it waits in the kernel.
    fn describe(pid: u32) -> String {
        let read =
            |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        format!(
            "  pid {pid} {}: {state}, wchan {}\n{}",
            read("comm").trim(),
            read("wchan"),
            read("stack")
        )
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Why bpftrace is not running a script.
enum NotAttached {
    NotInstalled,
    Refused,
}

/// bpftrace running a script, attached.
struct Bpftrace {
    child: Child,
}

impl Bpftrace {
    /// None when bpftrace is not installed (the figure is then left out).
    fn start(script: &str) -> Option<Self> {
        match Self::try_start(script) {
            Ok(tracer) => Some(tracer),
            Err(NotAttached::NotInstalled) => None,
            Err(NotAttached::Refused) => panic!("bpftrace did not attach: {script}"),
        }
    }

    /// bpftrace attached, or why not (a kernel may refuse kretfunc).
    fn try_start(script: &str) -> Result<Self, NotAttached> {
        watchdog::step("bpftrace: starting, until it attaches");
        // Unbuffered: a pipe makes bpftrace buffer its output, and its
        // "Attaching" line once stayed in the buffer (the bench hung).
        let mut child = Command::new("bpftrace")
            .args(["-B", "none", "-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|_| NotAttached::NotInstalled)?;
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while stdout.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("Attaching") {
            line.clear();
        }
        if !line.contains("Attaching") {
            let _ = child.wait();
            return Err(NotAttached::Refused);
        }
        // "Attaching N probes..." is printed before the attach itself.
        std::thread::sleep(Duration::from_millis(1000));
        child.stdout = Some(stdout.into_inner());
        Ok(Self { child })
    }

    /// Stop it; what it printed (its maps).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> String {
        watchdog::step("bpftrace: stopping");
        droptrace_tests::signal(self.child.id(), libc::SIGINT);
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        self.child.wait().unwrap();
        out
    }
}

/// Counting refused connects by command name in the kernel: the cheapest
/// bpftrace an operator would write.
const BPFTRACE_STORM: &str =
    "tracepoint:syscalls:sys_exit_connect /args->ret == -11/ { @[comm] = count(); }";

/// The same through one BPF trampoline (kretfunc = fexit) on
/// unix_stream_connect, where the kernel allows it: what one trampoline
/// costs in this storm, beside droptrace's.
const BPFTRACE_STORM_FEXIT: &str =
    "kretfunc:unix_stream_connect /retval == -11/ { @[comm] = count(); }";

/// What a storm script counted, from its printed map (`@[bench]: N`).
fn bpftrace_count(printed: &str) -> u64 {
    printed
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("@[")?
                .split_once("]: ")?
                .1
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// bpftrace on the syscall tracepoints droptrace uses where fexit is
/// refused, doing as little as droptrace does on them.
const BPFTRACE_SYSCALLS: &str = "tracepoint:syscalls:sys_enter_connect { @pending[tid] = args->uservaddr; } \
tracepoint:syscalls:sys_exit_connect { if (args->ret == -11 || args->ret == -99) { @connect[comm] = count(); } delete(@pending[tid]); } \
tracepoint:syscalls:sys_exit_accept, tracepoint:syscalls:sys_exit_accept4, tracepoint:syscalls:sys_exit_socket, \
tracepoint:syscalls:sys_exit_open, tracepoint:syscalls:sys_exit_openat /args->ret == -24 || args->ret == -23/ { @fd[comm] = count(); } \
tracepoint:syscalls:sys_enter_listen { @listen[tid] = args->backlog; } \
tracepoint:syscalls:sys_exit_listen { delete(@listen[tid]); }";

/// Refused connects per second against the full listener at `path`.
fn storm_rate(path: &str, connects: usize) -> f64 {
    let start = Instant::now();
    let (more, refused) = unix::connect_many(path, connects);
    let elapsed = start.elapsed();
    assert!(more.is_empty() && refused == connects);
    refused as f64 / elapsed.as_secs_f64()
}

struct Figures {
    rows: Vec<(String, String)>,
}

impl Figures {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let (what, value) = (what.into(), value.into());
        println!("{what:<58} {value}");
        self.rows.push((what, value));
    }
}

fn ratio(with: f64, without: f64) -> String {
    format!("{:.3}", with / without)
}

/// The storm: no tracer, bpftrace, droptrace, interleaved.
fn storm(figures: &mut Figures, me: &str, connects: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storm.sock").display().to_string();
    let listener = unix::Listener::bind(&path, 1);
    let (queued, _) = unix::connect_many(&path, 2);
    let (mut none, mut bpftrace, mut droptrace) = (Vec::new(), Vec::new(), Vec::new());
    let mut bpftrace_fexit = Vec::new();
    let (mut counted, mut lost, mut details_dropped) = (0, 0, 0);
    // A storm under bpftrace, which must have counted every refusal.
    let under = |tracer: Bpftrace| {
        let rate = storm_rate(&path, connects);
        let printed = tracer.stop();
        assert_eq!(
            bpftrace_count(&printed),
            connects as u64,
            "bpftrace counted: {printed}"
        );
        rate
    };
    for round in 1..=ROUNDS {
        watchdog::step(format!("storm round {round}, no tracer"));
        none.push(storm_rate(&path, connects));
        if let Some(tracer) = Bpftrace::start(BPFTRACE_STORM) {
            watchdog::step(format!("storm round {round}, bpftrace attached"));
            bpftrace.push(under(tracer));
        }
        if let Ok(tracer) = Bpftrace::try_start(BPFTRACE_STORM_FEXIT) {
            watchdog::step(format!("storm round {round}, bpftrace's kretfunc attached"));
            bpftrace_fexit.push(under(tracer));
        }
        watchdog::step(format!("storm round {round}: droptrace starting"));
        let tracer = Droptrace::start(&["--pid", me]);
        watchdog::step(format!("storm round {round}, droptrace attached"));
        droptrace.push(storm_rate(&path, connects));
        watchdog::step(format!("storm round {round}: droptrace stopping"));
        let report = tracer.stop();
        counted += report.total_at(&path);
        lost += report.lost();
        details_dropped += report.summary["details_dropped"].as_u64().unwrap();
    }
    unix::close_all(queued);
    drop(listener);
    let refused = (ROUNDS * connects) as u64;
    assert_eq!(
        (counted, lost),
        (refused, 0),
        "droptrace counted {counted} of {refused} refusals, lost {lost}"
    );
    let none = median(none);
    figures.add(
        format!("storm: refused connects/s, no tracer ({connects} per round)"),
        format!("{none:.0}"),
    );
    if !bpftrace.is_empty() {
        let bpftrace = median(bpftrace);
        figures.add(
            "storm: ratio with bpftrace counting them by comm",
            ratio(bpftrace, none),
        );
    } else {
        println!("(bpftrace not installed: apt-get install bpftrace)");
    }
    if !bpftrace_fexit.is_empty() {
        figures.add(
            "storm: ratio with bpftrace through one trampoline (kretfunc)",
            ratio(median(bpftrace_fexit), none),
        );
    }
    let droptrace = median(droptrace);
    figures.add("storm: ratio with droptrace", ratio(droptrace, none));
    figures.add(
        "storm: droptrace counted / refused, lost, details dropped",
        format!("{counted} / {refused}, {lost}, {details_dropped}"),
    );
}

/// (run_time_ns, run_cnt) per BPF program name of `pid`'s programs, from
/// /proc/PID/fdinfo (counted while kernel.bpf_stats_enabled=1).
fn program_stats(pid: u32) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut totals = std::collections::BTreeMap::new();
    for (fd, info) in bpf::objects(pid, "prog_type:") {
        let name = bpf::program_name(pid, fd).unwrap_or_else(|| format!("fd {fd}"));
        let (time, runs) = bpf::run_stats(&info);
        let total: &mut (u64, u64) = totals.entry(name).or_default();
        total.0 += time;
        total.1 += runs;
    }
    totals
}

struct Stats;

impl Stats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    /// Run `load` with kernel.bpf_stats_enabled=1; ns per run of each of
    /// `pid`'s programs that ran, and runs.
    fn during(pid: u32, load: impl FnOnce()) -> Vec<(String, f64, u64)> {
        let previous = std::fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into());
        std::fs::write(Self::PATH, "1").expect("cannot enable kernel.bpf_stats_enabled");
        let before = program_stats(pid);
        load();
        let after = program_stats(pid);
        std::fs::write(Self::PATH, previous.trim()).unwrap();
        after
            .into_iter()
            .filter_map(|(name, (time, runs))| {
                let (time0, runs0) = before.get(&name).copied().unwrap_or_default();
                let runs = runs - runs0;
                (runs > 0).then(|| (name, (time - time0) as f64 / runs as f64, runs))
            })
            .collect()
    }
}

/// Ordinary loopback TCP: connect, write, read, close, `n` times.
fn loopback_traffic(n: usize) {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    for _ in 0..n {
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut peer, _) = server.accept().unwrap();
        std::io::Write::write_all(&mut client, b"ping").unwrap();
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut peer, &mut buf).unwrap();
    }
}

/// Time per run of each of droptrace's programs on ordinary loopback TCP
/// (as kernel.bpf_stats_enabled counts it: its own clock reads included),
/// beside a cgroup_skb program that does nothing on the same packets: the
/// floor that those clock reads set (the kernel's dispatch around a run is
/// not in any of these figures; the wrk ratios hold it).
fn program_costs(figures: &mut Figures, me: &str) {
    // The floor, on the same packets: a program that only returns.
    let pass = bpf::PassIngress::attach().expect("cannot attach a cgroup_skb program");
    let tracer = Droptrace::start(&["--pid", me]);
    let (time_before, runs_before) = pass.stats();
    const CONNECTIONS: usize = 5_000;
    let stats = Stats::during(tracer.pid(), || loopback_traffic(CONNECTIONS));
    let (time_after, runs_after) = pass.stats();
    let (pass_time, pass_runs) = (time_after - time_before, runs_after - runs_before);
    tracer.stop();
    drop(pass);
    let ingress = stats.iter().find(|(name, _, _)| name == "tcp_syn_ingress");
    let floor = pass_time as f64 / pass_runs.max(1) as f64;
    figures.add(
        "per run on loopback TCP: a cgroup_skb program that only returns, same packets (the floor: the clock reads bpf_stats adds)",
        format!("{floor:.0} ns ({pass_runs} runs)"),
    );
    if let Some((_, ns, _)) = ingress {
        figures.add(
            "per run on loopback TCP: tcp_syn_ingress above that floor",
            format!("{:+.0} ns", ns - floor),
        );
    }
    let mut total = 0.0;
    for (name, ns, runs) in &stats {
        figures.add(
            format!("per run on loopback TCP: {name}"),
            format!("{ns:.0} ns ({runs} runs)"),
        );
        total += ns * *runs as f64;
    }
    // The empty program ran once per packet received.
    figures.add(
        "all programs, per packet received (ordinary loopback TCP)",
        format!("{:.0} ns", total / pass_runs.max(1) as f64),
    );
    figures.add(
        "all programs, per connection (connect, 4 bytes, close)",
        format!("{:.0} ns", total / CONNECTIONS as f64),
    );
    // The same during a storm of refused UNIX connects.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storm.sock").display().to_string();
    let listener = unix::Listener::bind(&path, 1);
    let (queued, _) = unix::connect_many(&path, 2);
    let tracer = Droptrace::start(&["--pid", me]);
    let stats = Stats::during(tracer.pid(), || {
        unix::connect_many(&path, 100_000);
    });
    tracer.stop();
    unix::close_all(queued);
    drop(listener);
    for (name, ns, runs) in &stats {
        figures.add(
            format!("per run in a storm of 100000 refused connects: {name}"),
            format!("{ns:.0} ns ({runs} runs)"),
        );
    }
}

/// Start-up to the "watching" line, and peak memory once idle.
fn startup(figures: &mut Figures, me: &str) {
    let (mut times, mut peaks, mut idle) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let tracer = Droptrace::start(&["--pid", me]);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_secs(1));
        peaks.push(memory_mib(tracer.pid(), "VmHWM"));
        idle.push(memory_mib(tracer.pid(), "VmRSS"));
        tracer.stop();
    }
    figures.add(
        "start-up to attached (watching)",
        format!("{:.0} ms", median(times)),
    );
    figures.add(
        "peak RSS (VmHWM), idle",
        format!("{:.1} MiB", median(peaks)),
    );
    figures.add("RSS once idle (VmRSS)", format!("{:.1} MiB", median(idle)));
}

/// CPU time `pid` has used (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which may hold spaces: utime and
    // stime are the 14th and 15th of the line, the 12th and 13th after it.
    let after_name = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Keys droptrace's kernel tables hold for processes and listeners.
fn kernel_keys(pid: u32) -> usize {
    [
        ("FD_LIMIT_HITS", 32),
        ("CONNECT_FAILURES", 124),
        ("NO_CONNECTION", 4),
        ("TCP_OVERFLOWS", 16),
    ]
    .iter()
    .map(|(map, key)| bpf::map_keys(pid, map, *key).map_or(0, |keys| keys.len()))
    .sum()
}

/// An exhaust helper run to its end: its pid and the EMFILEs it saw.
fn exhaust_once() -> (u32, u64) {
    // Built beside this benchmark (cargo xtask bench builds both).
    let exhaust = std::env::current_exe().unwrap().with_file_name("exhaust");
    let child = Command::new(exhaust)
        .args(["nofile", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let refused = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.split_once('=')?.1.parse::<u64>().ok())
        .sum();
    (pid, refused)
}

/// Weeks in a minute: droptrace watches every process while 100,000 UNIX
/// listeners open and close and 10,000 processes start, hit EMFILE (a key
/// in the kernel's table each) and end. Keys are retired after 2 s here
/// (DROPTRACE_RETIRE_AFTER_MS) instead of 60 s. RSS and the kernel tables
/// must not grow with them; a drop at the end is still counted.
fn soak(figures: &mut Figures) {
    const LISTENERS: usize = 100_000;
    const PROCESSES: usize = 10_000;
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(droptrace::binary());
    command
        .args(["--json"])
        .env("RUST_LOG", "info,droptrace=debug")
        .env("DROPTRACE_RETIRE_AFTER_MS", "2000")
        .stdout(out.reopen().unwrap());
    let (mut child, _, stderr) = droptrace::spawn_until_watching(&mut command);
    let pid = child.id();
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let rss_start = memory_mib(pid, "VmRSS");
    let mut rss_peak = rss_start;
    let mut keys_peak = 0;
    let sample = |rss_peak: &mut f64, keys_peak: &mut usize| {
        *rss_peak = rss_peak.max(memory_mib(pid, "VmRSS"));
        *keys_peak = (*keys_peak).max(kernel_keys(pid));
    };
    let per_round = PROCESSES / 10;
    for round in 0..10 {
        // About a minute in all, as a busy host would spread them.
        let round_ends = Instant::now() + Duration::from_secs(6);
        for n in 0..LISTENERS / 10 {
            drop(unix::Listener::bind(
                &format!("@droptrace-soak-{round}-{n}"),
                0,
            ));
        }
        for _ in 0..per_round {
            exhaust_once();
        }
        sample(&mut rss_peak, &mut keys_peak);
        while Instant::now() < round_ends {
            std::thread::sleep(Duration::from_millis(250));
            sample(&mut rss_peak, &mut keys_peak);
        }
        if let Some(tables) = stderr
            .try_iter()
            .filter(|l| l.contains("tables after"))
            .last()
        {
            println!("  {tables}");
        }
        println!(
            "soak round {}: {:.0} s, RSS {:.1} MiB, kernel keys {}",
            round + 1,
            started.elapsed().as_secs_f64(),
            memory_mib(pid, "VmRSS"),
            kernel_keys(pid)
        );
    }
    let churn = started.elapsed();
    // Past the retirement delay and a check, everything gone is let go.
    std::thread::sleep(Duration::from_secs(15));
    let rss_end = memory_mib(pid, "VmRSS");
    let keys_end = kernel_keys(pid);
    let (last_pid, last_refused) = exhaust_once();
    std::thread::sleep(Duration::from_millis(1500));
    droptrace_tests::signal(pid, libc::SIGINT);
    assert!(child.wait().unwrap().success(), "droptrace failed");
    let text = std::fs::read_to_string(out.path()).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let counted: u64 = records
        .iter()
        .filter(|v| v["type"] == "drop" && v["client"]["pid"] == last_pid)
        .map(|v| v["count"].as_u64().unwrap_or(0))
        .sum();
    let lost = records
        .iter()
        .find(|v| v["type"] == "summary")
        .map(|v| v["lost"].clone());
    figures.add(
        format!("soak: {LISTENERS} listeners, {PROCESSES} processes in"),
        format!("{:.0} s", churn.as_secs_f64()),
    );
    figures.add(
        "soak: RSS at start / peak / after (MiB)",
        format!("{rss_start:.1} / {rss_peak:.1} / {rss_end:.1}"),
    );
    figures.add(
        "soak: kernel table keys, peak / after",
        format!("{keys_peak} / {keys_end}"),
    );
    figures.add(
        "soak: the last process's EMFILEs counted / seen",
        format!("{counted} / {last_refused}"),
    );
    figures.add(
        "soak: lost (drops the kernel's full tables could not count)",
        format!("{}", lost.clone().unwrap_or_default()),
    );
    assert_eq!(
        counted, last_refused,
        "the drop after the soak was not counted"
    );
    assert_eq!(lost, Some(serde_json::json!(0)), "drops were lost");
}

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

/// A successful connection's cost, with and without droptrace: a UNIX
/// connect + accept, and loopback TCP (connect, accept, 4 bytes, close:
/// what the TCP family's packet and connect programs add), then a syscall
/// nobody watches.
fn connect_cost(figures: &mut Figures, me: &str) {
    const CYCLES: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roomy.sock").display().to_string();
    let roomy = unix::Listener::bind(&path, 4096);
    let ns = |d: Duration| d.as_nanos() as f64 / CYCLES as f64;
    let unix = || ns(connect_accept_cycles(&path, roomy.fd, CYCLES));
    let tcp = || {
        let start = Instant::now();
        loopback_traffic(CYCLES);
        ns(start.elapsed())
    };
    let cycles: [(&str, &dyn Fn() -> f64); 2] = [
        ("UNIX connect+accept", &unix),
        ("TCP connect+accept+close on loopback", &tcp),
    ];
    for (what, timed) in cycles {
        let (mut without, mut with) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            without.push(timed());
            let tracer = Droptrace::start(&["--pid", me]);
            with.push(timed());
            let report = tracer.stop();
            assert!(report.drops.is_empty(), "successful connects were reported");
        }
        let (without, with) = (median(without), median(with));
        figures.add(
            format!("{what}: ns without, with droptrace"),
            format!("{without:.0}, {with:.0} ({:+.0} ns)", with - without),
        );
    }
    syscall_cost(figures, me);
}

/// `measure` with no tracer, under bpftrace's syscall tracepoints (when
/// installed) and under droptrace with `args`, interleaved for `rounds`
/// rounds: (none, bpftrace, droptrace), one value per round each.
fn interleaved(
    rounds: usize,
    args: &[&str],
    mut measure: impl FnMut() -> f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut none, mut bpftrace, mut droptrace) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        watchdog::step(format!("round {round}, no tracer"));
        none.push(measure());
        if let Some(tracer) = Bpftrace::start(BPFTRACE_SYSCALLS) {
            watchdog::step(format!("round {round}, bpftrace attached"));
            bpftrace.push(measure());
            tracer.stop();
        }
        watchdog::step(format!("round {round}: droptrace starting"));
        let tracer = Droptrace::start(args);
        watchdog::step(format!("round {round}, droptrace attached"));
        droptrace.push(measure());
        watchdog::step(format!("round {round}: droptrace stopping"));
        tracer.stop();
    }
    (none, bpftrace, droptrace)
}

/// A syscall no tracer watches (getppid), timed bare, under bpftrace's
/// syscall tracepoints and under droptrace: what tracing syscalls at all
/// costs the other processes.
fn syscall_cost(figures: &mut Figures, me: &str) {
    const CALLS: u32 = 2_000_000;
    let timed = || {
        let start = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        start.elapsed().as_nanos() as f64 / f64::from(CALLS)
    };
    let (none, bpftrace, droptrace) = interleaved(ROUNDS, &["--pid", me], timed);
    let none = median(none);
    let extra = |with: Vec<f64>| format!("{:+.0} ns", median(with) - none);
    let mut value = format!("{none:.0} ns bare; droptrace {}", extra(droptrace));
    if !bpftrace.is_empty() {
        value = format!("{value}, bpftrace {}", extra(bpftrace));
    }
    figures.add("a syscall nobody watches (getppid)", value);
}

const WRK_SECONDS: u64 = 3;
/// wrk's rate moves by several percent from one run to the next here, more
/// than the difference measured: more, shorter rounds than the others.
const WRK_ROUNDS: usize = 9;

/// wrk's requests per second.
fn wrk(port: u16, close: bool) -> f64 {
    let mut command = Command::new("wrk");
    command.args(["-t2", "-c16", &format!("-d{WRK_SECONDS}s")]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    let output = command
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("cannot run wrk");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk printed no rate: {text}"))
}

/// nginx → uWSGI (UNIX socket) under wrk: none, bpftrace, droptrace.
fn wrk_cost(figures: &mut Figures) {
    if !stack::available() || Command::new("wrk").arg("-v").output().is_err() {
        println!(
            "(nginx → uWSGI not measured: apt-get install wrk nginx uwsgi uwsgi-plugin-python3)"
        );
        return;
    }
    let stack = stack::Stack::start(stack::StackConfig {
        port: stack::free_port(),
        app_delay_ms: 0,
        uwsgi_listen: Some(1024),
        ..stack::StackConfig::default()
    });
    let pids = [stack.nginx.id().to_string(), stack.uwsgi.id().to_string()];
    for (close, label) in [(false, "keep-alive"), (true, "new connection per request")] {
        let (none, bpftrace, droptrace) =
            interleaved(WRK_ROUNDS, &["--pid", &pids[0], "--pid", &pids[1]], || {
                wrk(stack.port, close)
            });
        // Each round's ratio to the no-tracer run just before it, then the
        // median: the VM's drift over the rounds cancels out.
        let paired = |with: &[f64]| median(with.iter().zip(&none).map(|(w, n)| w / n).collect());
        figures.add(
            format!("nginx → uWSGI, {label}: requests/s, no tracer"),
            format!("{:.0}", median(none.clone())),
        );
        if !bpftrace.is_empty() {
            figures.add(
                format!("nginx → uWSGI, {label}: ratio with bpftrace (same syscall tracepoints), median of {WRK_ROUNDS} rounds"),
                format!("{:.3}", paired(&bpftrace)),
            );
        }
        figures.add(
            format!("nginx → uWSGI, {label}: ratio with droptrace, median of {WRK_ROUNDS} rounds"),
            format!("{:.3}", paired(&droptrace)),
        );
        // What droptrace's programs cost per request, by program.
        watchdog::step(format!("{label}: the programs' cost per request"));
        let tracer = Droptrace::start(&["--pid", &pids[0], "--pid", &pids[1]]);
        let mut rate = 0.0;
        let cpu_before = cpu_time(tracer.pid());
        let stats = Stats::during(tracer.pid(), || rate = wrk(stack.port, close));
        let cpu = cpu_time(tracer.pid()) - cpu_before;
        tracer.stop();
        let requests = rate * WRK_SECONDS as f64;
        figures.add(
            format!(
                "nginx → uWSGI, {label}: droptrace's own CPU time (its process, not its programs)"
            ),
            format!(
                "{:.0} ms in {WRK_SECONDS} s, {:.2} µs per request",
                cpu.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e6 / requests
            ),
        );
        figures.add(
            format!("nginx → uWSGI, {label}: droptrace's programs per request"),
            format!("{:.0} ns (bpf_stats)", per_request(&stats, requests, label)),
        );
        // The same for bpftrace on the same syscall tracepoints.
        if let Some(tracer) = Bpftrace::start(BPFTRACE_SYSCALLS) {
            let stats = Stats::during(tracer.pid(), || rate = wrk(stack.port, close));
            tracer.stop();
            let requests = rate * WRK_SECONDS as f64;
            figures.add(
                format!("nginx → uWSGI, {label}: bpftrace's programs per request"),
                format!("{:.0} ns (bpf_stats)", per_request(&stats, requests, label)),
            );
        }
    }
}

/// Nanoseconds of programs per request, from per-program `stats` over
/// `requests`; each program's share printed.
fn per_request(stats: &[(String, f64, u64)], requests: f64, label: &str) -> f64 {
    let mut total = 0.0;
    for (name, ns, runs) in stats {
        let per_request = *runs as f64 / requests;
        total += ns * per_request;
        println!("  {label}: {name}: {per_request:.1} runs per request, {ns:.0} ns each");
    }
    total
}

/// The storm and the programs' costs inside Linux `series` under QEMU:
/// the same benchmark binary, run in the guest.
fn in_guest(series: &str, connects: usize, only: &str) {
    let dir = droptrace_tests::guest::kernel_dir(series);
    let me = std::env::current_exe().unwrap();
    let droptrace = std::env::var("DROPTRACE_BIN").expect("DROPTRACE_BIN is unset");
    // Programs left out on the host (DROPTRACE_AVOID=NAME,...) are left
    // out in the guest too: what droptrace costs without one family.
    let avoid = match std::env::var("DROPTRACE_AVOID") {
        Ok(names) => format!("export DROPTRACE_AVOID='{names}'\n"),
        Err(_) => String::new(),
    };
    let script = format!(
        "export DROPTRACE_BIN='{droptrace}'\n{avoid}cd /tmp\n'{}' {connects} '{only}' 2>&1\n",
        me.display()
    );
    let run = droptrace_tests::guest::run(series, &dir, &script, Duration::from_secs(40 * 60))
        .unwrap_or_else(|e| panic!("{e}"));
    let figures: Vec<&str> = run
        .console
        .lines()
        .filter(|l| {
            l.starts_with('|') || l.starts_with("  ") || l.starts_with("droptrace benchmark")
        })
        .collect();
    if run.exit != Some(0) || figures.is_empty() {
        panic!("the benchmark failed in Linux {series}:\n{}", run.console);
    }
    println!("{}", figures.join("\n"));
}

fn main() {
    droptrace_tests::require_root("bench");
    let connects: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    if let Some(series) = std::env::args().nth(3) {
        let only = std::env::args().nth(2).unwrap_or_default();
        // Under emulation, what compares tracers side by side (start-up and
        // the connect cycle are absolute times: meaningless there).
        let only: Vec<&str> = only
            .split(',')
            .filter(|p| ["storm", "wrk", "programs"].contains(p))
            .collect();
        return in_guest(&series, connects, &only.join(","));
    }
    let me = std::process::id().to_string();
    println!(
        "droptrace benchmark: Linux {}, {} cores, median of {ROUNDS} interleaved rounds",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let only = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "storm,wrk,programs,startup,connect".into());
    let wanted = |part: &str| only.split(',').any(|p| p.trim() == part);
    watchdog::start();
    let mut figures = Figures { rows: Vec::new() };
    if wanted("storm") {
        watchdog::step("storm");
        storm(&mut figures, &me, connects);
    }
    if wanted("wrk") {
        watchdog::step("wrk");
        wrk_cost(&mut figures);
    }
    if wanted("programs") {
        watchdog::step("programs");
        program_costs(&mut figures, &me);
    }
    if wanted("startup") {
        watchdog::step("startup");
        startup(&mut figures, &me);
    }
    if wanted("connect") {
        watchdog::step("connect");
        connect_cost(&mut figures, &me);
    }
    if wanted("soak") {
        watchdog::step("soak");
        soak(&mut figures);
    }
    println!("\n| figure | value |\n|---|---|");
    for (what, value) in &figures.rows {
        println!("| {what} | {value} |");
    }
}
