//! Makes the kernel refuse a process for lack of a resource, and prints
//! what the process itself saw, as `syscall=count` words, for the tests to
//! compare with droptrace:
//!
//!   exhaust nofile N [NAME]
//!                      RLIMIT_NOFILE = N, then one socket(), one accept4()
//!                      and one openat() that fail with EMFILE (named NAME,
//!                      any bytes, through prctl(PR_SET_NAME))
//!   exhaust ports N    N connects to a listener on 127.0.0.1:18094, which
//!                      fail with EADDRNOTAVAIL once the ephemeral ports are
//!                      used up (run it in a netns with a tiny
//!                      ip_local_port_range)
//!   exhaust ports6 N   the same to [::1]:18094
//!   exhaust noaddr N   N TCP and N UDP connects to [::1]:18094 that fail
//!                      with EADDRNOTAVAIL for want of a source address, no
//!                      port taken yet (run it where lo has IPv6 disabled);
//!                      N connects from sockets bound to 127.0.0.1:18095,
//!                      all but the first refused with EADDRNOTAVAIL (that
//!                      four-tuple is taken: no port was sought either);
//!                      then `ports N`, then N connects from IPv6 sockets
//!                      to [::ffff:127.0.0.1]:18094 (tcp_v4_connect's port
//!                      search, refused as well)
//!   exhaust listen ADDR BACKLOG
//!                      listen on TCP ADDR with BACKLOG, never accept,
//!                      print `listening` and sleep (at most a minute)
//!   exhaust fds N      hold N more fds (copies of /dev/null; the hard
//!                      RLIMIT_NOFILE must allow them), print
//!                      `held=N`, and sleep (at most a minute): every scan
//!                      of every process's fds takes long
//!
//! Copied to a file named `nginx`, it is a hostile nginx instead: it
//! listens on `app.sock` beside itself and sleeps (at most a minute). Run
//! with `-V`, `-T` or `-t` (as droptrace once ran nginx), it only appends
//! its uid and arguments to `executed` beside itself: that file existing is
//! the proof it was run.
use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
};

const IPV4: &str = "127.0.0.1:18094";

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn nofile(limit: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: a valid rlimit for this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) }, 0);
    let mut held = Vec::new();
    let (mut socket, mut accept4, mut openat) = (0, 0, 0);
    loop {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            held.push(fd);
            continue;
        }
        assert_eq!(errno(), libc::EMFILE, "socket() failed otherwise");
        socket += 1;
        break;
    }
    // SAFETY: plain syscall on our listener; the client waits in its queue.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    assert!(
        fd < 0 && errno() == libc::EMFILE,
        "accept4() should fail with EMFILE"
    );
    accept4 += 1;
    if std::fs::File::open("/proc/self/status").is_err() && errno() == libc::EMFILE {
        openat += 1;
    }
    println!("socket={socket} accept4={accept4} openat={openat}");
}

fn ports(attempts: usize, listen_on: &str) {
    let (_listener, held, refused, port) = use_up_ports(attempts, listen_on);
    println!("connected={} connect={refused} port={port}", held.len());
}

/// `attempts` connects to a listener on `listen_on`: the listener (the
/// streams hold their ports while it lives), the streams that got a port,
/// the number refused with EADDRNOTAVAIL, and the port.
fn use_up_ports(attempts: usize, listen_on: &str) -> (TcpListener, Vec<TcpStream>, usize, u16) {
    // A fixed port: port 0 would take one of the few ephemeral ones.
    let listener = TcpListener::bind(listen_on).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..attempts {
        match TcpStream::connect(addr) {
            Ok(stream) => held.push(stream),
            Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => refused += 1,
            Err(err) => panic!("connect: {err}"),
        }
    }
    (listener, held, refused, addr.port())
}

/// EADDRNOTAVAIL that is not a port shortage, then one that is.
fn no_source_address(attempts: usize) {
    let refused = |result: std::io::Result<()>| match result {
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => true,
        other => panic!("connect: {other:?}, where EADDRNOTAVAIL was due"),
    };
    let v6: std::net::SocketAddr = "[::1]:18094".parse().unwrap();
    let tcp6 = (0..attempts)
        .filter(|_| refused(TcpStream::connect(v6).map(drop)))
        .count();
    let udp6 = (0..attempts)
        .filter(|_| {
            let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
            refused(socket.connect(v6))
        })
        .count();
    let (listener, held, ports_refused, port) = use_up_ports(attempts, IPV4);
    let from: std::net::SocketAddr = "127.0.0.1:18095".parse().unwrap();
    let to = listener.local_addr().unwrap();
    let _first = droptrace_tests::tcp::connect_from(from, to).expect("the first from 18095");
    let bound_refused = (1..attempts)
        .filter(|_| match droptrace_tests::tcp::connect_from(from, to) {
            Err(err) => refused(Err(err)),
            Ok(_) => panic!("{from} connected twice to {to}"),
        })
        .count();
    let mapped: std::net::SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
    let mapped_refused = (0..attempts)
        .filter(|_| match TcpStream::connect(mapped) {
            Err(err) => err.raw_os_error() == Some(libc::EADDRNOTAVAIL),
            Ok(_) => panic!("a port was left for {mapped}"),
        })
        .count();
    println!(
        "noaddr_tcp6={tcp6} noaddr_udp6={udp6} bound={bound_refused} connected={} \
         connect={ports_refused} mapped={mapped_refused} port={port}",
        held.len()
    );
}

fn listen(addr: &str, backlog: i32) {
    let addr = addr.parse().expect("an address like 127.0.0.1:80");
    let _listener = droptrace_tests::tcp::listener(addr, backlog);
    println!("listening");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

fn hold(fds: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimits for this process.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let null = std::fs::File::open("/dev/null").unwrap();
    for _ in 0..fds {
        // SAFETY: a copy of an fd we own, kept until exit.
        assert!(
            unsafe { libc::dup(null.as_raw_fd()) } >= 0,
            "dup: errno {}",
            errno()
        );
    }
    println!("held={fds}");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

fn pretend_nginx(args: &[String]) {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if args
        .iter()
        .any(|a| ["-V", "-T", "-t"].contains(&a.as_str()))
    {
        use std::io::Write;
        let mut proof = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("executed"))
            .unwrap();
        // SAFETY: no preconditions.
        let uid = unsafe { libc::geteuid() };
        writeln!(proof, "uid={uid} args={args:?}").unwrap();
        return;
    }
    let socket = std::os::unix::net::UnixListener::bind(dir.join("app.sock")).unwrap();
    println!("listening");
    std::thread::sleep(std::time::Duration::from_secs(60));
    drop(socket);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let exe = std::env::current_exe().unwrap();
    if exe.file_name().is_some_and(|name| name == "nginx") {
        return pretend_nginx(&args);
    }
    if args.get(1).map(String::as_str) == Some("listen") {
        let backlog = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
        return listen(args.get(2).expect("exhaust listen ADDR BACKLOG"), backlog);
    }
    let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(16);
    if let Some(name) = args.get(3) {
        let name = std::ffi::CString::new(name.as_bytes()).expect("a name without NUL");
        // SAFETY: a NUL-terminated name; the kernel keeps 15 bytes.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0);
    }
    match args.get(1).map(String::as_str) {
        Some("nofile") => nofile(n),
        Some("ports") => ports(n as usize, IPV4),
        Some("ports6") => ports(n as usize, "[::1]:18094"),
        Some("noaddr") => no_source_address(n as usize),
        Some("fds") => hold(n),
        _ => {
            eprintln!("usage: exhaust nofile N | exhaust ports N | exhaust ports6 N | exhaust noaddr N | exhaust fds N | exhaust listen ADDR BACKLOG");
            std::process::exit(2);
        }
    }
}
