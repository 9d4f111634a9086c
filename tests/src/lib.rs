//! Test harness for droptrace: run the real binary against the real kernel,
//! real nginx and real uWSGI, and read what it reports.
//!
//! Everything started here is stopped by its PID; nothing is killed by name.
pub mod droptrace;
pub mod http;
pub mod netns;
pub mod stack;
pub mod tcp;
pub mod unix;

/// True when the test may touch the kernel; otherwise says loudly why not.
pub fn running_as_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("\n*** SKIPPED {test}: needs root (eBPF). Run `sudo -E cargo xtask test`. ***\n");
    false
}

/// Send `signal` to `pid` (a process this harness started).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: plain syscall on a pid we own.
    unsafe { libc::kill(pid as i32, signal) };
}
