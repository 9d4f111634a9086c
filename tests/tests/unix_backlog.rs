//! Kernel integration: real UNIX listeners with tiny backlogs that never
//! accept, real non-blocking connects, and droptrace must report exactly the
//! refused ones, with the listener's path, owner, queue and backlog.
use droptrace_tests::{
    droptrace::{Droptrace, UNIX_BACKLOG_HOOKS},
    netns::Netns,
    require_root, unix,
};

/// Refuse `extra` connects to a listener of `backlog` at `name`, return what
/// droptrace reported about it.
fn refuse(name: &str, backlog: i32, extra: usize) -> (usize, droptrace_tests::droptrace::Report) {
    refuse_with(name, backlog, extra, &[])
}

/// `refuse`, droptrace started with `env`.
fn refuse_with(
    name: &str,
    backlog: i32,
    extra: usize,
    env: &[(&str, &str)],
) -> (usize, droptrace_tests::droptrace::Report) {
    let me = std::process::id().to_string();
    let tracer = Droptrace::start_with_env(&["--pid", &me], env);
    // Programs left out by `env` make another mechanism, which the test checks.
    if env.is_empty() {
        tracer.assert_mechanism("unix_backlog", UNIX_BACKLOG_HOOKS);
    }
    let listener = unix::Listener::bind(name, backlog);
    // The queue takes backlog + 1 (unix_recvq_full: queue > backlog).
    let (queued, refused) = unix::connect_many(name, backlog as usize + 1 + extra);
    assert_eq!(
        queued.len(),
        backlog as usize + 1,
        "the kernel queued an unexpected number of connects"
    );
    let report = tracer.stop();
    unix::close_all(queued);
    drop(listener);
    (refused, report)
}

fn assert_attributed(
    name: &str,
    backlog: u64,
    refused: usize,
    report: &droptrace_tests::droptrace::Report,
) {
    let me = u64::from(std::process::id());
    assert!(refused > 0);
    assert_eq!(
        report.count_at(name),
        refused as u64,
        "drop lines for {name}: {:#?}",
        report.drops
    );
    assert_eq!(
        report.total_at(name),
        refused as u64,
        "summary: {}",
        report.summary
    );
    assert_eq!(report.lost(), 0);
    for drop in report.drops_at(name) {
        assert_eq!(drop["kind"], "unix_backlog");
        assert_eq!(drop["client"]["pid"], me);
        assert_eq!(drop["listener"]["family"], "unix");
        assert_eq!(drop["listener"]["pid"], me, "owner: {drop}");
        assert_eq!(drop["listener"]["backlog"], backlog, "{drop}");
        assert_eq!(drop["listener"]["queue"], backlog + 1, "{drop}");
        assert_eq!(drop["listener"]["role"], "other");
        assert_eq!(drop["limit"]["name"], "app_backlog", "{drop}");
        assert_eq!(drop["limit"]["value"], backlog);
        assert_eq!(
            drop["limit"]["source"],
            format!(
                "{}[{me}] called listen(fd, {backlog})",
                drop["listener"]["comm"].as_str().unwrap()
            )
        );
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .contains("raise the backlog"),
            "{drop}"
        );
    }
}

#[test]
fn refused_connects_to_a_path_socket_are_each_reported() {
    require_root("refused_connects_to_a_path_socket_are_each_reported");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backlog1.sock").display().to_string();
    let (refused, report) = refuse(&path, 1, 9);
    assert_eq!(refused, 9);
    assert_attributed(&path, 1, refused, &report);
}

/// This kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// Where fexit is refused, the exit tracepoints with the caller's registers
/// count the same (bpf_task_pt_regs: 5.15+; before, the loader falls back
/// to tp_btf/sys_exit); without them, tp_btf/sys_exit does; without it
/// too, the enter/exit tracepoints do.
#[test]
fn the_fallbacks_report_each_refused_connect() {
    require_root("the_fallbacks_report_each_refused_connect");
    let dir = tempfile::tempdir().unwrap();
    let no_fexit = "unix_connect_refused,listen_fexit";
    let no_regs = format!("{no_fexit},connect_exit_regs,listen_exit_regs");
    let syscall_exit = [
        "unix_backlog: tp_btf/sys_exit (skipped fexit/__sys_connect_file",
        "listen (backlog_clamped, listener tables): tp_btf/sys_exit",
    ];
    let exit_tracepoints = if kernel_version() >= (5, 15) {
        [
            "unix_backlog: tracepoint syscalls/sys_exit_connect (64-bit callers, arguments from their registers) (skipped fexit/__sys_connect_file",
            "listen (backlog_clamped, listener tables): tracepoint syscalls/sys_exit_listen (64-bit callers, arguments from their registers)",
        ]
    } else {
        syscall_exit
    };
    for (avoid, mechanisms) in [
        (no_fexit.to_string(), exit_tracepoints),
        (no_regs.clone(), syscall_exit),
        (
            format!("{no_regs},syscall_exit"),
            [
                "unix_backlog: tracepoints syscalls/sys_{enter,exit}_connect (64-bit callers) (skipped fexit/__sys_connect_file",
                "listen (backlog_clamped, listener tables): tracepoints syscalls/sys_{enter,exit}_listen (64-bit callers)",
            ],
        ),
    ] {
        let path = dir.path().join("fallback.sock").display().to_string();
        let (refused, report) = refuse_with(&path, 1, 9, &[("DROPTRACE_AVOID", &avoid)]);
        assert_eq!(refused, 9);
        assert_attributed(&path, 1, refused, &report);
        for mechanism in mechanisms {
            assert!(report.stderr.contains(mechanism), "{}", report.stderr);
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn refused_connects_to_an_abstract_socket_are_each_reported() {
    require_root("refused_connects_to_an_abstract_socket_are_each_reported");
    let name = format!("@droptrace-test-{}", std::process::id());
    let (refused, report) = refuse(&name, 1, 5);
    assert_eq!(refused, 5);
    assert_attributed(&name, 1, refused, &report);
}

/// The kernel's copy of the address is read eight bytes at a time where
/// fexit is allowed: names ending on either side of a word, up to the
/// longest path a sockaddr_un holds, are each told from a name of the
/// same length that differs in its last byte.
#[test]
fn names_of_every_length_are_told_apart_to_the_last_byte() {
    require_root("names_of_every_length_are_told_apart_to_the_last_byte");
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    // Bytes of sun_path used: an abstract name has a leading 0 and no
    // terminator; a path has its terminating 0.
    let abstract_name = |bytes: usize, last: char| {
        let stem = format!("@dt{pid}-");
        format!("{stem:x<width$}{last}", width = bytes - 1)
    };
    let path = |bytes: usize, last: char| {
        let stem = format!("{}/", dir.path().display());
        format!("{stem:x<width$}{last}", width = bytes - 2)
    };
    let mut names = Vec::new();
    for bytes in [15, 16, 17, 24] {
        names.push(abstract_name(bytes, 'a'));
        names.push(abstract_name(bytes, 'b'));
    }
    for bytes in [63, 64, 65, 107, 108] {
        names.push(path(bytes, 'a'));
        names.push(path(bytes, 'b'));
    }
    let me = pid.to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    tracer.assert_mechanism("unix_backlog", UNIX_BACKLOG_HOOKS);
    let mut refused = Vec::new();
    let mut held = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let listener = unix::Listener::bind(name, 1);
        // 2, 3, 4... refusals: a merged pair would count their sum.
        let (queued, n) = unix::connect_many(name, 2 + 2 + i);
        assert_eq!((queued.len(), n), (2, 2 + i), "{name}");
        refused.push(n as u64);
        held.push((listener, queued));
    }
    let report = tracer.stop();
    for (name, refused) in names.iter().zip(refused) {
        assert_eq!(
            report.count_at(name),
            refused,
            "{name}: {:#?}",
            report.drops
        );
        assert_eq!(report.total_at(name), refused, "{name}: {}", report.summary);
    }
    assert_eq!(report.lost(), 0);
    for (listener, queued) in held {
        unix::close_all(queued);
        drop(listener);
    }
}

/// The backlog droptrace reports is read from the kernel's socket through
/// BTF-resolved offsets: listen(7) must read back as 7.
#[test]
fn the_backlog_read_from_the_kernel_is_the_one_listen_set() {
    require_root("the_backlog_read_from_the_kernel_is_the_one_listen_set");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backlog7.sock").display().to_string();
    let (refused, report) = refuse(&path, 7, 3);
    assert_eq!(refused, 3);
    assert_attributed(&path, 7, refused, &report);
}

/// --pid watches that process tree only: drops between strangers are not shown.
#[test]
fn drops_outside_the_watched_processes_are_not_reported() {
    require_root("drops_outside_the_watched_processes_are_not_reported");
    let mut stranger = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let tracer = Droptrace::start(&["--pid", &stranger.id().to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unwatched.sock").display().to_string();
    let listener = unix::Listener::bind(&path, 1);
    let (queued, refused) = unix::connect_many(&path, 6);
    let report = tracer.stop();
    droptrace_tests::signal(stranger.id(), libc::SIGKILL);
    stranger.wait().unwrap();
    assert_eq!(refused, 4);
    assert!(report.drops.is_empty(), "{:#?}", report.drops);
    unix::close_all(queued);
    drop(listener);
}

/// Connects that succeed are not reported at all.
#[test]
fn successful_connects_are_not_reported() {
    require_root("successful_connects_are_not_reported");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roomy.sock").display().to_string();
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    let listener = unix::Listener::bind(&path, 64);
    let (queued, refused) = unix::connect_many(&path, 20);
    let report = tracer.stop();
    assert_eq!((queued.len(), refused), (20, 0));
    assert!(report.drops.is_empty(), "{:#?}", report.drops);
    assert_eq!(report.summary["totals"].as_array().unwrap().len(), 0);
    unix::close_all(queued);
    drop(listener);
}

/// In a namespace whose somaxconn is below the requested backlog, the
/// kernel clamps it and droptrace blames somaxconn, with the namespace's value.
#[test]
fn a_backlog_clamped_by_somaxconn_blames_somaxconn() {
    require_root("a_backlog_clamped_by_somaxconn_blames_somaxconn");
    let netns = Netns::create("clamp", &[("net.core.somaxconn", "4")]);
    let name = format!("@droptrace-clamp-{}", std::process::id());
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    // Abstract names live per namespace: bind and connect from inside it.
    let (refused, queued) = std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_on_this_thread();
            let listener = unix::Listener::bind(&name, 64);
            let (queued, refused) = unix::connect_many(&name, 10);
            std::mem::forget(listener);
            (refused, queued)
        })
        .join()
        .unwrap()
    });
    let report = tracer.stop();
    assert_eq!(queued.len(), 5, "somaxconn 4 queues 5");
    assert_eq!(refused, 5);
    assert_eq!(report.count_at(&name), 5, "{:#?}", report.drops);
    // Before the first refusal, listen() itself was reported as clamped.
    assert_eq!(report.notices.len(), 1, "{:#?}", report.notices);
    let notice = &report.notices[0];
    assert_eq!(notice["kind"], "backlog_clamped");
    assert_eq!(notice["listener"]["path"], name.as_str(), "{notice}");
    assert_eq!(
        (notice["requested"].as_u64(), notice["effective"].as_u64()),
        (Some(64), Some(4)),
        "{notice}"
    );
    for drop in report.drops_at(&name) {
        assert_eq!(drop["listener"]["netns"], netns.inode(), "{drop}");
        assert_eq!(drop["listener"]["backlog"], 4);
        assert_eq!(drop["limit"]["name"], "somaxconn", "{drop}");
        assert_eq!(drop["limit"]["value"], 4);
        assert!(
            drop["limit"]["source"]
                .as_str()
                .unwrap()
                .contains("asked listen(64), the kernel clamped it to 4"),
            "{drop}"
        );
        assert!(
            drop["limit"]["fix"]
                .as_str()
                .unwrap()
                .starts_with("sysctl -w net.core.somaxconn=64"),
            "{drop}"
        );
    }
    unix::close_all(queued);
}

/// A storm on both CPUs, far faster than any one-event-per-drop path could
/// hand over: the count is still exactly the number of EAGAINs the kernel
/// returned to the test's own connect() calls, and nothing is lost.
#[test]
fn a_storm_of_refused_connects_is_counted_exactly() {
    require_root("a_storm_of_refused_connects_is_counted_exactly");
    const THREADS: usize = 2;
    const CONNECTS: usize = 100_000;
    let me = std::process::id().to_string();
    let tracer = Droptrace::start(&["--pid", &me]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storm.sock").display().to_string();
    let listener = unix::Listener::bind(&path, 1);
    let (queued, refused) = unix::connect_many(&path, 2);
    assert_eq!((queued.len(), refused), (2, 0), "backlog 1 holds 2");
    let storm = std::time::Instant::now();
    let refused: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| scope.spawn(|| unix::connect_many(&path, CONNECTS)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                let (more, refused) = w.join().unwrap();
                assert!(more.is_empty(), "the full queue took a connect");
                refused
            })
            .sum()
    });
    let storm = storm.elapsed();
    let report = tracer.stop();
    unix::close_all(queued);
    drop(listener);
    assert_eq!(refused, THREADS * CONNECTS);
    eprintln!(
        "{refused} refused in {:.2} s ({:.0}/s); details dropped {}",
        storm.as_secs_f64(),
        refused as f64 / storm.as_secs_f64(),
        report.summary["details_dropped"]
    );
    assert_eq!(report.lost(), 0, "summary: {}", report.summary);
    assert_eq!(
        report.total_at(&path),
        refused as u64,
        "summary: {}",
        report.summary
    );
    assert_eq!(
        report.count_at(&path),
        refused as u64,
        "the drop lines add up to the total"
    );
}
