//! How worker_connections shortages are seen, per nginx master (the first
//! way that works):
//! - nginx's own error log: the `[alert]` line nginx writes for every
//!   shortage, read as it is written (exact: one line per NULL returned by
//!   ngx_get_connection), at no cost to nginx;
//! - where nginx logs to no file (stderr, syslog), or with
//!   `--nginx-uretprobe` first: a uretprobe on `ngx_get_connection` (an
//!   exported symbol of Debian's and most distributions' nginx) returning
//!   NULL, counted in the kernel. It costs a trap on every connection
//!   nginx opens.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::Ebpf;

use crate::{
    config::files,
    contract::Role,
    host::{configs, process, sock_diag::FileId},
    probes,
};

/// The uretprobe's program in the eBPF object, and the symbol it watches.
pub const NGINX_PROGRAM: &str = "nginx_get_connection";
pub const NGINX_SYMBOL: &str = "ngx_get_connection";
/// nginx processes started after droptrace are looked for this often.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);
const ALERT: &str = "worker_connections are not enough";

/// How shortages of one nginx master are seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Uretprobe {
        exe: PathBuf,
    },
    ErrorLog {
        path: PathBuf,
    },
    /// Neither: the symbol is missing and the config names no error log file.
    None {
        why: String,
    },
}

impl Method {
    pub fn describe(&self) -> String {
        match self {
            Method::Uretprobe { exe } => {
                format!("a uretprobe on ngx_get_connection in {}", exe.display())
            }
            Method::ErrorLog { path } => format!("nginx's error log {}", path.display()),
            Method::None { why } => format!("nothing ({why})"),
        }
    }
}

/// An error log read from where it ended when droptrace started.
struct LogTail {
    reader: BufReader<File>,
    partial: String,
}

/// A line longer than this is no nginx alert; it is skipped.
const MAX_LINE: usize = 64 << 10;

impl LogTail {
    fn open(mut file: File) -> std::io::Result<Self> {
        file.seek(SeekFrom::End(0))?;
        Ok(Self {
            reader: BufReader::new(file),
            partial: String::new(),
        })
    }

    /// Pids of the alert lines written since the last call.
    fn alerts(&mut self) -> Vec<u32> {
        let mut pids = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if !line.ends_with('\n') => {
                    // Half-written: keep it for next time (not without end).
                    if self.partial.len() + line.len() <= MAX_LINE {
                        self.partial.push_str(&line);
                    }
                    break;
                }
                Ok(_) => {
                    let line = std::mem::take(&mut self.partial) + &line;
                    if let Some(pid) = alert_pid(&line) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }
}

/// "2026/11/26 10:00:00 [alert] 1234#1234: *5 64 worker_connections are
/// not enough ..." -> 1234
fn alert_pid(line: &str) -> Option<u32> {
    // "[warn] ... are not enough, reusing connections" is not a refusal.
    if !line.contains("[alert]") || !line.contains(ALERT) {
        return None;
    }
    let after = line.split_once("] ")?.1;
    after.split('#').next()?.trim().parse().ok()
}

#[derive(Default)]
pub struct WorkerConnections {
    /// Try the uretprobe before the error log (--nginx-uretprobe).
    pub uretprobe_first: bool,
    /// nginx binaries with the uretprobe attached, by file identity.
    probed: HashSet<FileId>,
    /// Binaries without the symbol.
    unprobeable: HashSet<FileId>,
    tails: HashMap<PathBuf, LogTail>,
    /// By master pid, with the master's start time (a pid reused by a new
    /// master is watched anew).
    methods: HashMap<u32, (u64, Method)>,
    last_scan: Option<Instant>,
}

impl WorkerConnections {
    /// Find nginx masters not seen yet and start watching them.
    pub fn scan(&mut self, ebpf: &mut Ebpf) {
        if self.last_scan.is_some_and(|t| t.elapsed() < SCAN_INTERVAL) {
            return;
        }
        self.last_scan = Some(Instant::now());
        self.methods
            .retain(|&pid, (started, _)| process::start_time(pid) == Some(*started));
        // Logs no master writes any more are closed.
        let logs: HashSet<&PathBuf> = self
            .methods
            .values()
            .filter_map(|(_, method)| match method {
                Method::ErrorLog { path } => Some(path),
                _ => None,
            })
            .collect();
        self.tails.retain(|path, _| logs.contains(path));
        for pid in process::all_pids() {
            if self.methods.contains_key(&pid) || !process::runs_nginx(pid) {
                continue;
            }
            let Some(started) = process::start_time(pid) else {
                continue;
            };
            let Some(master) = process::inspect(pid).filter(|p| p.role == Role::NginxMaster) else {
                continue;
            };
            let method = self.watch(ebpf, &master);
            tracing::info!(
                "nginx[{}]: worker_connections shortages are seen through {}",
                master.pid,
                method.describe()
            );
            self.methods.insert(master.pid, (started, method));
        }
    }

    fn watch(&mut self, ebpf: &mut Ebpf, master: &process::Process) -> Method {
        if self.uretprobe_first {
            return self
                .uretprobe(ebpf, master)
                .or_else(|why| {
                    tracing::info!(
                        "nginx[{}]: {why}; falling back to its error log",
                        master.pid
                    );
                    self.error_log(master)
                })
                .unwrap_or_else(|why| Method::None { why });
        }
        self.error_log(master)
            .or_else(|log| {
                self.uretprobe(ebpf, master)
                    .map_err(|probe| format!("{log}, and {probe}"))
            })
            .unwrap_or_else(|why| Method::None { why })
    }

    /// The first error_log file of `master`'s configuration, read from
    /// where it ends now.
    fn error_log(&mut self, master: &process::Process) -> Result<Method, String> {
        let config = configs::nginx_of(master)
            .ok_or_else(|| "its configuration could not be read".to_string())?;
        let path = config
            .error_logs
            .first()
            .ok_or_else(|| "its configuration names no error_log file".to_string())?;
        if !self.tails.contains_key(path) {
            let cannot = |why: String| format!("cannot read {}: {why}", path.display());
            // Opened as the master could open it, inside its root.
            let inside = path.clone();
            let file = files::as_process_of(master.pid, configs::READ_DEADLINE, move |view| {
                view.open(&inside)
            })
            .map_err(cannot)?
            .map_err(|err| cannot(err.to_string()))?;
            let tail = LogTail::open(file).map_err(|err| cannot(err.to_string()))?;
            self.tails.insert(path.clone(), tail);
        }
        Ok(Method::ErrorLog { path: path.clone() })
    }

    /// The uretprobe on ngx_get_connection of `master`'s binary.
    fn uretprobe(&mut self, ebpf: &mut Ebpf, master: &process::Process) -> Result<Method, String> {
        let exe_link = PathBuf::from(format!("/proc/{}/exe", master.pid));
        let exe = std::fs::read_link(&exe_link).unwrap_or_else(|_| exe_link.clone());
        let id = FileId::of(&exe_link)
            .ok_or_else(|| format!("cannot identify its binary {}", exe.display()))?;
        if self.probed.contains(&id) {
            return Ok(Method::Uretprobe { exe });
        }
        if self.unprobeable.contains(&id) {
            return Err(format!("no uretprobe on {}", exe.display()));
        }
        // The /proc link reaches the binary in any mount namespace.
        match probes::attach_uretprobe(ebpf, NGINX_PROGRAM, NGINX_SYMBOL, &exe_link) {
            Ok(()) => {
                self.probed.insert(id);
                Ok(Method::Uretprobe { exe })
            }
            Err(err) => {
                self.unprobeable.insert(id);
                Err(format!("no uretprobe on {}: {err:#}", exe.display()))
            }
        }
    }

    /// How shortages of `master`'s workers are seen.
    pub fn method_of(&self, master: u32) -> Option<&Method> {
        self.methods.get(&master).map(|(_, method)| method)
    }

    /// Worker pids of the alert lines written since the last call.
    pub fn logged_alerts(&mut self) -> Vec<u32> {
        self.tails.values_mut().flat_map(LogTail::alerts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn alert_lines_name_the_worker() {
        assert_eq!(
            alert_pid("2026/11/26 10:00:00 [alert] 1234#1234: *5 64 worker_connections are not enough while connecting to upstream, client: 127.0.0.1"),
            Some(1234)
        );
        assert_eq!(
            alert_pid("2026/11/26 10:00:00 [alert] 77#0: 64 worker_connections are not enough\n"),
            Some(77)
        );
        assert_eq!(alert_pid("2026/11/26 10:00:00 [warn] 77#0: 64 worker_connections are not enough, reusing connections"), None);
        assert_eq!(
            alert_pid(
                "2026/11/26 10:00:00 [crit] 77#0: accept4() failed (24: Too many open files)"
            ),
            None
        );
    }

    #[test]
    fn a_tail_sees_only_lines_written_after_it_opened() {
        let path = std::env::temp_dir().join(format!("droptrace-tail-{}.log", std::process::id()));
        let mut log = File::create(&path).unwrap();
        writeln!(
            log,
            "2026/11/26 10:00:00 [alert] 1#1: 8 worker_connections are not enough"
        )
        .unwrap();
        let mut tail = LogTail::open(File::open(&path).unwrap()).unwrap();
        assert!(tail.alerts().is_empty());
        writeln!(
            log,
            "2026/11/26 10:00:01 [alert] 2#2: 8 worker_connections are not enough"
        )
        .unwrap();
        write!(
            log,
            "2026/11/26 10:00:01 [alert] 3#3: 8 worker_connections are not"
        )
        .unwrap();
        log.flush().unwrap();
        assert_eq!(tail.alerts(), vec![2]);
        writeln!(log, " enough").unwrap();
        log.flush().unwrap();
        assert_eq!(tail.alerts(), vec![3]);
        std::fs::remove_file(&path).unwrap();
    }
}
