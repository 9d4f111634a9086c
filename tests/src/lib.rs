//! Test harness for droptrace: run the real binary against the real kernel,
//! real nginx and real uWSGI, and read what it reports.
//!
//! Everything started here is stopped by its PID; nothing is killed by name.
pub mod bpf;
pub mod droptrace;
pub mod guest;
pub mod http;
pub mod netns;
pub mod prometheus;
pub mod stack;
pub mod tcp;
pub mod unix;

/// Fails the test unless it may touch the kernel. Without root,
/// `cargo xtask test` leaves these tests out (counted as skipped): a test
/// that runs is never one that silently did nothing.
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "{test} needs root (eBPF): run `sudo -E cargo xtask test` (without root it leaves this test out as skipped)"
    );
}

/// Start `command` with its stdout piped; the child, and the first line it
/// printed (trimmed).
pub fn spawn_and_read_line(command: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_string())
}

/// A copy of fd `fd` of process `pid`.
pub fn fd_of(pid: u32, fd: i32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: plain syscalls; the copy is owned by the returned OwnedFd.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        libc::close(pidfd);
        (copy >= 0).then(|| <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy))
    }
}

/// Send `signal` to `pid` (a process this harness started).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: plain syscall on a pid we own.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A memory figure of `pid` from /proc/PID/status ("VmRSS", "VmHWM"), in
/// MiB, as the kernel counts it; 0 once the process is gone.
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}
