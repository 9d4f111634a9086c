//! Real nginx in front of real uWSGI (Debian's packages), each with its own
//! config and files in a temp dir, stopped by PID when dropped.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// A WSGI app that answers after `delay` seconds.
fn app(delay: f64) -> String {
    format!("import time\n\ndef application(env, start_response):\n    time.sleep({delay})\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'ok\\n']\n")
}

/// What nginx and uWSGI need that is not installed.
fn missing() -> Vec<&'static str> {
    [
        "/usr/sbin/nginx",
        "/usr/bin/uwsgi",
        "/usr/lib/uwsgi/plugins/python3_plugin.so",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect()
}

/// True when nginx and uWSGI are installed (the benchmark's question).
pub fn available() -> bool {
    missing().is_empty()
}

/// Fails the test unless nginx and uWSGI are installed (`cargo xtask test`
/// installs them on Debian, and leaves these tests out, as skipped, where
/// it cannot).
pub fn require(test: &str) {
    let missing = missing();
    assert!(
        missing.is_empty(),
        "{test}: {missing:?} missing: apt-get install nginx uwsgi uwsgi-plugin-python3 (cargo xtask test does it on Debian as root)"
    );
}

pub struct StackConfig<'a> {
    pub netns: Option<&'a Netns>,
    /// uWSGI `--listen`; None leaves uWSGI's default (100).
    pub uwsgi_listen: Option<u32>,
    /// uWSGI on 127.0.0.1:PORT instead of a UNIX socket.
    pub uwsgi_tcp_port: Option<u16>,
    /// nginx `listen ... backlog=N`; None leaves nginx's default (511).
    pub nginx_backlog: Option<u32>,
    /// nginx `worker_connections`.
    pub worker_connections: u32,
    /// nginx `listen ... deferred` (TCP_DEFER_ACCEPT): a connection is
    /// accepted with its request already there, so nginx starts on it at
    /// once instead of parking it as reusable.
    pub deferred_accept: bool,
    /// nginx `worker_rlimit_nofile`; None leaves the directive out.
    pub worker_rlimit_nofile: Option<u32>,
    /// Start nginx under `prlimit --nofile=N:N`.
    pub prlimit_nofile: Option<u32>,
    /// Run a copy of nginx whose ngx_get_connection symbol is hidden, as
    /// in a stripped or static build.
    pub nginx_without_symbol: bool,
    pub port: u16,
    /// How long the app takes per request: 100 ms by default, slow enough
    /// for a burst to fill uWSGI's queue; 0 for throughput.
    pub app_delay_ms: u32,
}

impl Default for StackConfig<'_> {
    fn default() -> Self {
        Self {
            netns: None,
            uwsgi_listen: None,
            uwsgi_tcp_port: None,
            nginx_backlog: None,
            worker_connections: 8192,
            deferred_accept: false,
            worker_rlimit_nofile: Some(16384),
            prlimit_nofile: None,
            nginx_without_symbol: false,
            port: 18080,
            app_delay_ms: 100,
        }
    }
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub port: u16,
    pub uwsgi: Child,
    pub nginx: Child,
}

fn command_in(netns: Option<&Netns>, program: &str) -> Command {
    match netns {
        Some(netns) => netns.command(program),
        None => Command::new(program),
    }
}

fn wait_for(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < deadline,
            "{what} not ready after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Stack {
    pub fn start(config: StackConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("droptrace-e2e-")
            .tempdir()
            .unwrap();
        // nginx workers run as nobody: they must reach the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path();
        let socket = d.join("app.sock");
        fs::write(
            d.join("app.py"),
            app(f64::from(config.app_delay_ms) / 1000.0),
        )
        .unwrap();
        // What uWSGI listens on, as uWSGI and nginx each spell it.
        let (uwsgi_socket, upstream) = match config.uwsgi_tcp_port {
            Some(port) => (format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
            None => (
                socket.display().to_string(),
                format!("unix:{}", socket.display()),
            ),
        };

        let mut uwsgi = command_in(config.netns, "uwsgi");
        uwsgi
            .args([
                "--plugin",
                "python3",
                "--master",
                "--processes",
                "2",
                "--die-on-term",
                "--chmod-socket=666",
            ])
            .args(["--socket", &uwsgi_socket])
            .arg("--wsgi-file")
            .arg(d.join("app.py"))
            .arg("--logto")
            .arg(d.join("uwsgi.log"));
        if let Some(listen) = config.uwsgi_listen {
            uwsgi.args(["--listen", &listen.to_string()]);
        }
        let uwsgi = uwsgi
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start uwsgi");
        let uwsgi_log = d.join("uwsgi.log");
        wait_for("uWSGI's workers", Duration::from_secs(20), || {
            fs::read_to_string(&uwsgi_log).is_ok_and(|log| log.contains("spawned uWSGI worker 2"))
        });

        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\n{rlimit}pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections {connections}; }}\nhttp {{\n  access_log off;\n\
             client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port}{backlog}{deferred};\n\
             location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass {upstream}; uwsgi_connect_timeout 3s; }}\n\
             location = /ping {{ return 200 \"pong\\n\"; }}\n  }}\n}}\n",
            d = d.display(),
            port = config.port,
            backlog = config.nginx_backlog.map_or(String::new(), |n| format!(" backlog={n}")),
            rlimit = config.worker_rlimit_nofile.map_or(String::new(), |n| format!("worker_rlimit_nofile {n};\n")),
            connections = config.worker_connections,
            deferred = if config.deferred_accept { " deferred" } else { "" },
        );
        fs::write(d.join("nginx.conf"), conf).unwrap();
        let binary = if config.nginx_without_symbol {
            nginx_without_symbol(d).display().to_string()
        } else {
            "nginx".to_string()
        };
        // prlimit sets the limit and execs nginx: the child's pid is nginx's.
        let mut nginx = match config.prlimit_nofile {
            Some(n) => {
                let mut prlimit = command_in(config.netns, "prlimit");
                prlimit.arg(format!("--nofile={n}:{n}")).arg(&binary);
                prlimit
            }
            None => command_in(config.netns, &binary),
        };
        let nginx = nginx
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start nginx");
        let pid_file = d.join("nginx.pid");
        wait_for("nginx", Duration::from_secs(20), || pid_file.exists());
        Self {
            dir,
            socket,
            port: config.port,
            uwsgi,
            nginx,
        }
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Lines of nginx's error log that contain `needle`.
    pub fn error_lines_with(&self, needle: &str) -> usize {
        self.error_lines_where(|l| l.contains(needle))
    }

    /// Lines of nginx's error log that `select` keeps.
    pub fn error_lines_where(&self, select: impl Fn(&str) -> bool) -> usize {
        self.error_log().lines().filter(|l| select(l)).count()
    }

    pub fn socket_path(&self) -> String {
        self.socket.display().to_string()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in [&mut self.nginx, &mut self.uwsgi] {
            crate::signal(child.id(), libc::SIGTERM);
        }
        for child in [&mut self.nginx, &mut self.uwsgi] {
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) {
                if start.elapsed() > Duration::from_secs(10) {
                    crate::signal(child.id(), libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A copy of Debian's nginx in `dir` whose exported ngx_get_connection is
/// renamed in its dynamic string table (same length, so nothing moves).
/// nginx never looks itself up by name; only dynamic modules would, and the
/// tests load none. Debian strips .symtab, so the symbol is gone.
fn nginx_without_symbol(dir: &Path) -> PathBuf {
    const NAME: &[u8] = b"\0ngx_get_connection\0";
    const HIDDEN: &[u8] = b"\0ngx_get_connectioX\0";
    let mut binary = fs::read("/usr/sbin/nginx").unwrap();
    let at: Vec<usize> = binary
        .windows(NAME.len())
        .enumerate()
        .filter(|(_, w)| *w == NAME)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "expected one ngx_get_connection in nginx's string table"
    );
    binary[at[0]..at[0] + HIDDEN.len()].copy_from_slice(HIDDEN);
    let path = dir.join("nginx-nosym");
    fs::write(&path, binary).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
