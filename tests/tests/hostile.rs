//! droptrace runs as root beside processes it must not trust. Each test
//! starts real processes owned by nobody that pretend to be nginx, and
//! checks what the system shows, not what droptrace says: whether the
//! pretender's binary was run (it leaves a file when it is), how long
//! droptrace took to finish, and which bytes reached the operator.
use std::{
    ffi::CString,
    net::SocketAddr,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::mpsc,
    time::{Duration, Instant},
};

use droptrace_tests::{
    droptrace::{self, Droptrace},
    netns::Netns,
    require_root, signal, spawn_and_read_line, tcp,
};

const NOBODY: u32 = 65534;

/// A directory owned by nobody holding a pretend nginx: a copy of the
/// `exhaust` helper named `nginx`, which records being run.
struct Pretender {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Pretender {
    /// Start `./nginx -p ./ -c n.conf` as nobody in its directory, titled like an
    /// nginx master; `prepare` lays out its files first.
    fn start(prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("droptrace-hostile-")
            .tempdir()
            .unwrap();
        let path = dir.path();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(path, NOBODY);
        let nginx = path.join("nginx");
        std::fs::copy(env!("CARGO_BIN_EXE_exhaust"), &nginx).unwrap();
        std::fs::set_permissions(&nginx, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(path);
        let mut child = Command::new(&nginx);
        // SAFETY: setrlimit is async-signal-safe. A soft limit of 1024 makes
        // worker_connections above it a risk doctor names.
        unsafe {
            child.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: 4096,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, line) = spawn_and_read_line(
            child
                .arg0("nginx: master process ./nginx")
                .args(["-p", "./", "-c", "n.conf"])
                .current_dir(path)
                .uid(NOBODY)
                .gid(NOBODY),
        );
        assert_eq!(line, "listening", "the pretender did not start");
        Self {
            dir,
            child: Some(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Who ran the pretender's binary, and with what (nobody, we hope).
    fn runs(&self) -> Option<String> {
        std::fs::read_to_string(self.path("executed")).ok()
    }
}

impl Drop for Pretender {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

fn chown(path: &Path, uid: u32) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::chown(name.as_ptr(), uid, uid) }, 0);
}

fn mkfifo(path: &Path) {
    let name = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o644) }, 0);
    chown(path, NOBODY);
}

/// Its configuration is a FIFO nobody writes to: reading it would wait
/// for ever. Neither live droptrace nor doctor may run the pretender, wait
/// on the FIFO, or be slow to stop.
#[test]
fn a_pretend_nginx_with_a_fifo_for_a_config_is_never_run_and_never_waited_for() {
    let test = "a_pretend_nginx_with_a_fifo_for_a_config_is_never_run_and_never_waited_for";
    require_root(test);
    let nginx = Pretender::start(|dir| mkfifo(&dir.join("n.conf")));
    let pid = nginx.pid().to_string();

    // Live, watching everything: the pretender's listen() and the scan of
    // nginx masters (every 2 s) both look at its configuration.
    let tracer = Droptrace::start_human(&[]);
    std::thread::sleep(Duration::from_secs(3));
    let stopping = Instant::now();
    let out = tracer.stop_raw();
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "droptrace took {took:?} to stop after Ctrl-C"
    );
    assert!(
        String::from_utf8_lossy(&out).contains("summary"),
        "no summary after Ctrl-C:\n{}",
        String::from_utf8_lossy(&out)
    );

    let started = Instant::now();
    let doctor = droptrace::run(&["doctor", "--pid", &pid]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "doctor took {took:?}:\n{}\n{}",
        doctor.stdout,
        doctor.stderr
    );
    assert!(
        doctor.stderr.contains("n.conf") && doctor.stderr.contains("not a regular file"),
        "doctor does not say why it could not read the configuration:\n{}",
        doctor.stderr
    );
    assert_eq!(nginx.runs(), None, "droptrace ran the pretender's binary");
}

/// The pretender's configuration includes a file only root may read:
/// droptrace reads as the pretender (nobody) could, so it never learns,
/// or shows, what that file says; and it still does not run the binary.
#[test]
fn a_pretend_nginx_cannot_make_droptrace_read_what_it_could_not() {
    let test = "a_pretend_nginx_cannot_make_droptrace_read_what_it_could_not";
    require_root(test);
    let nginx = Pretender::start(|dir| {
        std::fs::write(dir.join("n.conf"), "include secret.conf;\n").unwrap();
        chown(&dir.join("n.conf"), NOBODY);
        let secret = dir.join("secret.conf");
        std::fs::write(&secret, "events { worker_connections 7777; }\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    let pid = nginx.pid().to_string();
    let doctor = droptrace::run(&["doctor", "--json", "--pid", &pid]);
    let everything = format!("{}\n{}", doctor.stdout, doctor.stderr);
    assert!(
        !everything.contains("7777"),
        "droptrace read a file nobody may not read:\n{everything}"
    );
    assert!(
        doctor.stderr.contains("secret.conf") && doctor.stderr.contains("Permission denied"),
        "doctor does not say it could not read secret.conf:\n{}",
        doctor.stderr
    );
    // The same file, readable by nobody, is read: the refusal above is the
    // pretender's permission, not a broken reader.
    std::fs::set_permissions(
        nginx.path("secret.conf"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let doctor = droptrace::run(&["doctor", "--json", "--pid", &pid]);
    assert!(
        doctor.stdout.contains("worker_connections 7777"),
        "a readable include was not read:\n{}\n{}",
        doctor.stdout,
        doctor.stderr
    );
    assert_eq!(nginx.runs(), None, "droptrace ran the pretender's binary");
}

/// Any bytes but NUL and "/" make a file name: a capture path that is not
/// UTF-8 is recorded to and reported from like any other (it once made
/// droptrace panic after it had created the file).
#[test]
fn a_capture_path_that_is_not_utf8_is_recorded_and_reported() {
    let test = "a_capture_path_that_is_not_utf8_is_recorded_and_reported";
    require_root(test);
    let dir = tempfile::tempdir().unwrap();
    let capture = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"drops-\xff\x1b.cap"));
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(droptrace::binary())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "droptrace {args:?} failed: {stderr}");
        out.stdout
    };
    let capture = capture.as_os_str();
    run(&[
        "record".as_ref(),
        "-o".as_ref(),
        capture,
        "--duration".as_ref(),
        "1".as_ref(),
        "--pid".as_ref(),
        "1".as_ref(),
    ]);
    let report = run(&["report".as_ref(), "--json".as_ref(), capture]);
    let json: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(json["drops"], 0, "{json}");
    let path = json["files"][0]["path"].as_str().unwrap_or_default();
    assert!(path.ends_with("drops-\u{fffd}\u{1b}.cap"), "{json}");
}

/// A hundred processes holding 19,000 fds each make every scan of every
/// process's fds (how a TCP listener's owner is found) take seconds. A
/// drop that starts such a scan must not hold Ctrl-C: droptrace ends within
/// a second with its summary, and the drops, their owner not yet known, are
/// counted as the namespace's own TcpExtListenOverflows counts them.
#[test]
fn a_scan_of_two_million_fds_does_not_hold_ctrl_c() {
    require_root("a_scan_of_two_million_fds_does_not_hold_ctrl_c");
    let holders = FdHolders::start(100, 19_000);
    // What one scan of the holders' fds costs, measured here.
    let scan = holders.scan();
    assert!(
        scan > Duration::from_secs(2),
        "a scan of the holders' fds took only {scan:?} here: too short to hold anything"
    );

    let netns = Netns::create("longscan", &[]);
    let addr: SocketAddr = "127.0.0.1:19091".parse().unwrap();
    let (ready, listening) = mpsc::channel();
    let (go, flood) = mpsc::channel();
    let (closed, clients_closed) = mpsc::channel();
    let (done, stopped) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let netns = &netns;
        s.spawn(move || {
            netns.enter_on_this_thread();
            // Listening before droptrace starts: its owner is found by a scan.
            let listener = tcp::listener(addr, 1);
            ready.send(()).unwrap();
            flood.recv().unwrap();
            let clients = tcp::connect_many(addr, 20);
            std::thread::sleep(Duration::from_millis(300));
            tcp::close_all(clients);
            closed.send(()).unwrap();
            // Until droptrace stopped (or the test failed).
            let _ = stopped.recv_timeout(Duration::from_secs(30));
            drop(listener);
        });
        listening.recv().unwrap();
        let before = netns.tcp_ext();
        let tracer = Droptrace::start(&[]);
        go.send(()).unwrap();
        clients_closed.recv().unwrap();
        let grew = netns.tcp_ext().since(before);
        // The drops reached droptrace's tick (every 250 ms) and their
        // owner scan is under way; it has seconds to go.
        std::thread::sleep(Duration::from_millis(300));
        let stopping = Instant::now();
        let report = tracer.stop();
        let took = stopping.elapsed();
        done.send(()).unwrap();
        assert!(
            took < Duration::from_secs(1),
            "droptrace took {took:?} to stop after Ctrl-C in a scan of {scan:?}"
        );
        let counted = report.tcp_count_at("127.0.0.1", addr.port(), "tcp_accept_queue");
        assert!(grew.listen_overflows > 0, "the flood overflowed nothing");
        assert_eq!(
            counted, grew.listen_overflows,
            "droptrace's tcp_accept_queue vs the namespace's TcpExtListenOverflows; stderr:\n{}",
            report.stderr
        );
        assert_eq!(report.lost(), 0);
        eprintln!(
            "a scan took {scan:?} here; droptrace stopped in {took:?}, {counted} drops counted"
        );
    });

    // doctor looks for every listener's owner the same way: --timeout
    // cuts the look short, and doctor says so.
    let started = Instant::now();
    let doctor = droptrace::run(&["doctor", "--json", "--timeout", "1"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "doctor --timeout 1 took {took:?} (a scan takes {scan:?}):\n{}",
        doctor.stderr
    );
    assert!(
        doctor.stderr.contains("cut short at --timeout 1 s"),
        "doctor does not say its look was cut short:\n{}",
        doctor.stderr
    );
    let json: serde_json::Value = serde_json::from_str(doctor.stdout.trim()).unwrap();
    assert_eq!(json["cut_short"], true, "{json}");
}

/// Processes that hold many fds (copies of /dev/null) each, within the
/// hard RLIMIT_NOFILE they inherit (20,000 here, and root may not raise
/// it in this machine's container).
struct FdHolders(Vec<Child>);

impl FdHolders {
    fn start(processes: usize, fds: u64) -> Self {
        Self(
            (0..processes)
                .map(|_| {
                    let (child, said) = spawn_and_read_line(
                        Command::new(env!("CARGO_BIN_EXE_exhaust"))
                            .args(["fds", &fds.to_string()])
                            .stdin(std::process::Stdio::null()),
                    );
                    assert_eq!(said, format!("held={fds}"));
                    child
                })
                .collect(),
        )
    }

    /// How long one look at every fd of every holder takes.
    fn scan(&self) -> Duration {
        let scanning = Instant::now();
        for child in &self.0 {
            let links = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
                .unwrap()
                .flatten()
                .filter(|fd| std::fs::read_link(fd.path()).is_ok())
                .count();
            assert!(links > 1_000, "{links} fds");
        }
        scanning.elapsed()
    }
}

impl Drop for FdHolders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
