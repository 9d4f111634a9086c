//! Test harness for droptrace: run the real binary against the real kernel,
//! real nginx and real uWSGI, and read what it reports.
//!
//! Everything started here is stopped by its PID; nothing is killed by name.
pub mod droptrace;
pub mod guest;
pub mod http;
pub mod netns;
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

/// Send `signal` to `pid` (a process this harness started).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: plain syscall on a pid we own.
    unsafe { libc::kill(pid as i32, signal) };
}
