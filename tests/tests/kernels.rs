//! The kernel matrix: the kernel integration tests (unix_backlog,
//! tcp_backlog, resource_limits) run again inside Debian's own kernels,
//! booted under QEMU by `cargo xtask test` (5.10 of Debian 11, 6.1 of
//! Debian 12, 6.12 of Debian 13). One test per kernel; its output lists
//! every inner test.
use std::time::Duration;

use droptrace_tests::{
    droptrace::{
        hook_variable, EPHEMERAL_PORTS_HOOKS, LISTEN, LISTEN_HOOKS, NOFILE_HOOKS, TCP_HOOKS,
        TCP_PACKET_HOOK, UNIX_BACKLOG_HOOKS,
    },
    guest, require_root,
};

/// Emulation is slow: a whole kernel's tests get this long.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// The mechanisms droptrace must pick on Debian's cloud kernels, which
/// allow fentry and fexit: the fast path of every family. And where the
/// TCP tests leave the per-connection path out: the packet programs, with
/// kfree_skb's drop reasons from 5.17 on.
fn expected_hooks(series: &str) -> String {
    let tcp_packets = if series == "5.10" {
        TCP_HOOKS[2]
    } else {
        TCP_HOOKS[1]
    };
    let packets = format!("export {TCP_PACKET_HOOK}='{tcp_packets}'\n");
    let fast = [
        ("unix_backlog", UNIX_BACKLOG_HOOKS[0]),
        ("tcp_accept_queue/tcp_syn_queue", TCP_HOOKS[0]),
        ("nofile/file_max", NOFILE_HOOKS[0]),
        ("ephemeral_ports", EPHEMERAL_PORTS_HOOKS[0]),
        (LISTEN, LISTEN_HOOKS[0]),
    ]
    .iter()
    .map(|(family, hook)| {
        format!(
            "export DROPTRACE_EXPECT_{}_HOOK='{hook}'\n",
            hook_variable(family)
        )
    })
    .collect::<String>();
    fast + &packets
}

/// Run the test binaries listed in $`list` inside Linux `series`.
fn tests_in_guest(series: &str, list: &str) {
    require_root(series);
    let dir = guest::kernel_dir(series);
    let binaries = std::env::var(list).unwrap_or_else(|_| {
        panic!("{list} is unset: run the kernel matrix through `cargo xtask test`")
    });
    let droptrace = std::env::var("DROPTRACE_BIN").expect("DROPTRACE_BIN is unset");
    let script = format!(
        "export DROPTRACE_BIN='{droptrace}' CI=true RUST_BACKTRACE=1\n{}\
         cd /tmp\n\
         for t in {binaries}; do echo \"== $t\"; \"$t\" --test-threads=1 --color never 2>&1; done\n",
        expected_hooks(series)
    );
    let run = guest::run(series, &dir, &script, GUEST_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let release = run
        .console
        .lines()
        .find_map(|l| l.split("GUEST-START ").nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let (passed, failed, failing) = guest::libtest_results(&run.console);
    if failed == 0 && run.exit == Some(0) {
        // What ran, one line each (the whole console only on failure).
        for line in run.console.lines().filter(|l| l.starts_with("test ")) {
            eprintln!("  Linux {series}: {line}");
        }
    } else {
        eprintln!("{}", run.console);
    }
    eprintln!("Linux {series} ({release}): {passed} passed, {failed} failed");
    assert_eq!(
        run.exit,
        Some(0),
        "Linux {series}: the test script did not finish"
    );
    assert!(
        failing.is_empty(),
        "Linux {series} ({release}): {failed} failed: {failing:?}"
    );
    let expected = binaries.split_whitespace().count();
    assert_eq!(
        run.console.matches("test result: ok.").count(),
        expected,
        "Linux {series}: not every test binary reported its result"
    );
    assert!(passed > 0, "Linux {series}: no test ran");
}

/// The kernel integration tests.
fn kernel_tests(series: &str) {
    tests_in_guest(series, "DROPTRACE_GUEST_TESTS");
}

#[test]
fn linux_5_10() {
    kernel_tests("5.10");
}

#[test]
fn linux_6_1() {
    kernel_tests("6.1");
}

#[test]
fn linux_6_12() {
    kernel_tests("6.12");
}

/// nginx in front of uWSGI over TCP, a real burst, on Debian 12's kernel:
/// the accept-queue overflows at both listeners equal the namespace's
/// TcpExtListenOverflows there too.
#[test]
fn linux_6_1_nginx_uwsgi_over_tcp() {
    tests_in_guest("6.1", "DROPTRACE_GUEST_E2E_TESTS");
}
