//! Running droptrace as a child process and collecting its JSON Lines.
use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

/// The binary `cargo xtask test` built (with its eBPF object embedded).
pub fn binary() -> PathBuf {
    match std::env::var_os("DROPTRACE_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/droptrace"),
    }
}

pub struct Droptrace {
    child: Child,
    /// What it said on stderr while starting.
    startup: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

/// What droptrace printed: its drop lines, its notices and its closing summary.
#[derive(Debug)]
pub struct Report {
    pub drops: Vec<Value>,
    pub notices: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
}

/// Start droptrace and wait until it says its probes are attached: the
/// child, what it said until then, and the rest of its stderr as it comes.
pub fn spawn_until_watching(command: &mut Command) -> (Child, Vec<String>, mpsc::Receiver<String>) {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start {} (build it with `cargo xtask build`): {err}",
                binary().display()
            )
        });
    let (tx, stderr) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match stderr.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("watching") => {
                seen.push(line);
                return (child, seen, stderr);
            }
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "droptrace did not start within 30 s; it said:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// "tcp_accept_queue/tcp_syn_queue" -> "TCP_ACCEPT_QUEUE_TCP_SYN_QUEUE".
pub fn hook_variable(family: &str) -> String {
    family
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The mechanisms droptrace declares, as its start-up line names them.
pub const UNIX_BACKLOG_HOOKS: &[&str] = &[
    "fexit/__sys_connect_file",
    "tracepoint syscalls/sys_exit_connect (64-bit callers, arguments from their registers)",
    "tp_btf/sys_exit",
    "tracepoints syscalls/sys_{enter,exit}_connect (64-bit callers)",
];
pub const NOFILE_HOOKS: &[&str] = &[
    "fexit/__x64_sys_{accept,accept4,socket,open,openat}",
    "tracepoints syscalls/sys_exit_{accept,accept4,socket,open,openat} (64-bit callers)",
    "tp_btf/sys_exit",
];
pub const EPHEMERAL_PORTS_HOOKS: &[&str] = &[
    "fexit/inet_hash_connect + inet6_hash_connect",
    "tracepoint syscalls/sys_exit_connect (64-bit callers, arguments from their registers)",
    "tp_btf/sys_exit",
    "tracepoints syscalls/sys_{enter,exit}_connect (64-bit callers)",
];
pub const LISTEN: &str = "listen (backlog_clamped, listener tables)";
pub const LISTEN_HOOKS: &[&str] = &[
    "fexit/__sys_listen",
    "tracepoint syscalls/sys_exit_listen (64-bit callers, arguments from their registers)",
    "tp_btf/sys_exit",
    "tracepoints syscalls/sys_{enter,exit}_listen (64-bit callers)",
];
/// Leaves out the TCP family's per-connection mechanism (TCP_HOOKS[0]), as
/// a kernel refusing fentry would: the packet programs count instead. It
/// is the mechanism's last program, so where fentry is allowed the others
/// are attached first and must be taken back (counted beside the packet
/// programs, every drop would be counted twice).
pub const AVOID_TCP_CALLS: &str = "tcp_client_connect_entry";
/// The variable naming the packet mechanism (TCP_HOOKS[1..]) a kernel of
/// the matrix must pick when AVOID_TCP_CALLS leaves the calls out.
pub const TCP_PACKET_HOOK: &str = "DROPTRACE_EXPECT_TCP_PACKET_HOOK";
/// How the TCP family's packet programs name the local process that sent a
/// dropped SYN (the per-connection mechanism names it itself).
pub const TCP_CLIENT_HOOKS: &[&str] = &[
    "cgroup/connect4 + cgroup/connect6 (local TCP clients)",
    "tp_btf/inet_sock_set_state (local TCP clients)",
];
pub const TCP_HOOKS: &[&str] = &[
    "fentry+fexit tcp_conn_request + tcp_check_req + cookie_v4_check + cookie_v6_check, fentry/tcp_connect (local TCP clients)",
    "cgroup_skb/ingress + tp_btf/consume_skb + tp_btf/kfree_skb with drop reasons",
    "cgroup_skb/ingress + tp_btf/consume_skb + tp_btf/kfree_skb (no drop reasons: SYN-cookie ACKs counted as ack)",
];

impl Droptrace {
    /// Start `droptrace --json ARGS` and wait until its probes are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_log(args, "info")
    }

    /// Like `start`, with RUST_LOG=`log` (its stderr is in the report).
    pub fn start_with_log(args: &[&str], log: &str) -> Self {
        Self::start_with_env(args, &[("RUST_LOG", log)])
    }

    /// Like `start`, with more environment (RUST_LOG=info unless given).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        Self::spawn(&with_json, env)
    }

    /// `droptrace ARGS` as an operator runs it: lines for a terminal (read
    /// them with `stop_raw`).
    pub fn start_human(args: &[&str]) -> Self {
        Self::spawn(args, &[])
    }

    /// Ctrl-C; the bytes droptrace wrote to stdout.
    pub fn stop_raw(mut self) -> Vec<u8> {
        crate::signal(self.child.id(), libc::SIGINT);
        let mut stdout = Vec::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut stdout)
            .unwrap();
        assert!(self.child.wait().unwrap().success(), "droptrace failed");
        stdout
    }

    /// `droptrace --json ARGS` run by `wrapper` (e.g. setpriv with its
    /// options), the binary's path appended to it.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let mut command = Command::new(wrapper[0]);
        command
            .args(&wrapper[1..])
            .arg(binary())
            .arg("--json")
            .args(args);
        Self::spawn_command(command, &[])
    }

    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary());
        command.args(args);
        Self::spawn_command(command, env)
    }

    fn spawn_command(mut command: Command, env: &[(&str, &str)]) -> Self {
        command
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped());
        let (child, seen, stderr) = spawn_until_watching(&mut command);
        Self {
            child,
            startup: seen,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What droptrace's start-up line says after "hooks on this kernel: ".
    fn hooks(&self) -> Option<&str> {
        self.startup.iter().find_map(|l| {
            l.split_once("hooks on this kernel: ")
                .map(|(_, hooks)| hooks)
        })
    }

    /// `family`'s entry on that line without what it skipped: "MECHANISM"
    /// or "MECHANISM, with EXTRA".
    fn used_by(&self, family: &str) -> Option<&str> {
        let entry = self
            .hooks()?
            .split("; ")
            .find_map(|e| e.strip_prefix(&format!("{family}: ")))?;
        Some(entry.split(" (skipped ").next().unwrap_or(entry))
    }

    /// The mechanism droptrace's start-up line says `family` uses on this
    /// kernel ("fexit/__sys_connect_file", "tracepoints ...").
    pub fn mechanism_of(&self, family: &str) -> String {
        let used = self.used_by(family).unwrap_or_else(|| {
            panic!(
                "the hooks line names no {family}: {}; start-up: {:?}",
                self.hooks_line(),
                self.startup
            )
        });
        used.split(", with ").next().unwrap_or(used).to_string()
    }

    /// The way `family` adds detail on this kernel, if any ("MECHANISM,
    /// with EXTRA" in the start-up line).
    pub fn extra_of(&self, family: &str) -> Option<String> {
        self.used_by(family)?
            .split(", with ")
            .nth(1)
            .map(str::to_string)
    }

    /// The start-up line's list of each family's mechanism and why others
    /// were skipped.
    pub fn hooks_line(&self) -> &str {
        self.hooks().unwrap_or("(no hooks line)")
    }

    /// Assert the mechanism of `family` is the one the environment expects
    /// ($DROPTRACE_EXPECT_<FAMILY>_HOOK, set by the kernel matrix where the
    /// kernel allows fexit); otherwise only that it has one. Returns it.
    pub fn assert_mechanism(&self, family: &str, declared: &[&str]) -> String {
        let used = self.mechanism_of(family);
        let variable = format!("DROPTRACE_EXPECT_{}_HOOK", hook_variable(family));
        match std::env::var(&variable) {
            Ok(expected) => assert_eq!(
                used,
                expected,
                "{family}: {variable}; droptrace said: {}",
                self.hooks_line()
            ),
            Err(_) => assert!(declared.contains(&used.as_str()), "{family} uses {used}"),
        }
        used
    }

    /// Ctrl-C, then parse everything it printed.
    pub fn stop(mut self) -> Report {
        crate::signal(self.child.id(), libc::SIGINT);
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let status = self.child.wait().unwrap();
        let stderr: Vec<String> = self
            .startup
            .drain(..)
            .chain(self.stderr.try_iter())
            .collect();
        let stderr = stderr.join("\n");
        assert!(
            status.success(),
            "droptrace exited with {status}; stderr:\n{stderr}"
        );
        let records: Vec<Value> = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
            })
            .collect();
        let (summary, lines) = records
            .split_last()
            .expect("droptrace printed nothing, not even its summary");
        assert_eq!(
            summary["type"], "summary",
            "the last line must be the summary: {summary}"
        );
        let (drops, notices): (Vec<Value>, Vec<Value>) = lines
            .iter()
            .cloned()
            .partition(|line| line["type"] == "drop");
        for notice in &notices {
            assert_eq!(notice["type"], "notice", "{notice}");
        }
        Report {
            drops,
            notices,
            summary: summary.clone(),
            stderr,
        }
    }
}

impl Drop for Droptrace {
    fn drop(&mut self) {
        // A test that panicked before stop() still leaves no tracer behind.
        if let Ok(None) = self.child.try_wait() {
            crate::signal(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl Report {
    /// Drop lines about the listener at `path`.
    pub fn drops_at(&self, path: &str) -> Vec<&Value> {
        self.drops
            .iter()
            .filter(|d| d["listener"]["path"] == path)
            .collect()
    }

    /// Sum of the `count` of the drop lines about `path`.
    pub fn count_at(&self, path: &str) -> u64 {
        self.drops_at(path)
            .iter()
            .map(|d| d["count"].as_u64().unwrap())
            .sum()
    }

    /// The summary's total for `path`.
    pub fn total_at(&self, path: &str) -> u64 {
        self.summary["totals"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["listener"]["path"] == path)
            .map(|t| t["count"].as_u64().unwrap())
            .sum()
    }

    /// Drop lines about the TCP listener at `addr`:`port`.
    pub fn tcp_drops_at(&self, addr: &str, port: u16) -> Vec<&Value> {
        self.drops
            .iter()
            .filter(|d| d["listener"]["addr"] == addr && d["listener"]["port"] == port)
            .collect()
    }

    /// Sum of the `count` of the `kind` drop lines about the TCP listener at
    /// `addr`:`port`.
    pub fn tcp_count_at(&self, addr: &str, port: u16, kind: &str) -> u64 {
        self.count_of(kind, |d| {
            d["listener"]["addr"] == addr && d["listener"]["port"] == port
        })
    }

    /// The summary's TCP overflow totals for one namespace: (droptrace, kernel).
    pub fn reconciliation(&self, netns: u64) -> (u64, u64) {
        let entry = self.summary["kernel_listen_overflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["netns"] == netns)
            .unwrap_or_else(|| panic!("no reconciliation for netns {netns}: {}", self.summary));
        (
            entry["droptrace"].as_u64().unwrap(),
            entry["kernel"].as_u64().unwrap(),
        )
    }

    /// Drop lines of one kind ("nofile", "worker_connections", ...).
    pub fn drops_of(&self, kind: &str) -> Vec<&Value> {
        self.drops.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// Sum of the `count` of the drop lines of `kind` that `select` keeps.
    pub fn count_of(&self, kind: &str, select: impl Fn(&Value) -> bool) -> u64 {
        self.drops_of(kind)
            .into_iter()
            .filter(|d| select(d))
            .map(|d| d["count"].as_u64().unwrap())
            .sum()
    }

    /// The summary's total of one kind.
    pub fn total_of(&self, kind: &str) -> u64 {
        self.summary["totals"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == kind)
            .map(|t| t["count"].as_u64().unwrap())
            .sum()
    }

    pub fn lost(&self) -> u64 {
        self.summary["lost"].as_u64().unwrap()
    }
}

/// `droptrace record -o FILE ARGS` running in the background.
pub struct Recording {
    child: Child,
    pub path: PathBuf,
    stderr: mpsc::Receiver<String>,
}

/// What a finished `droptrace` subcommand printed and how it exited.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!(
                "not one JSON object ({err}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Run droptrace with `args` to the end.
pub fn run(args: &[&str]) -> Finished {
    let output = Command::new(binary())
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", binary().display()));
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Recording {
    /// Start recording and wait until the probes are attached.
    pub fn start(path: &std::path::Path, args: &[&str]) -> Self {
        let mut command = Command::new(binary());
        command
            .arg("record")
            .arg("-o")
            .arg(path)
            .args(args)
            .stdout(Stdio::null());
        let (child, _, stderr) = spawn_until_watching(&mut command);
        Self {
            child,
            path: path.to_owned(),
            stderr,
        }
    }

    /// Wait for it to stop by itself (--duration, --max-size).
    pub fn wait(mut self) -> String {
        let status = self.child.wait().unwrap();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            status.success(),
            "droptrace record exited with {status}:\n{}",
            stderr.join("\n")
        );
        stderr.join("\n")
    }

    /// Ctrl-C and wait for the summary to be written.
    pub fn stop(self) -> String {
        crate::signal(self.child.id(), libc::SIGINT);
        self.wait()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            crate::signal(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
