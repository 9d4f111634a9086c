//! Processes: who they are (role), who their parent is, and the --pid filter.
use std::{
    collections::HashMap,
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::{mpsc, Mutex},
    time::Duration,
};

use crate::config::files::Readers;
pub use crate::contract::Role;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Program {
    Nginx,
    Uwsgi,
    Other,
}

/// Debian installs uWSGI as /usr/bin/uwsgi-core behind alternatives.
fn program_of(exe_name: &str) -> Program {
    if exe_name == "nginx" || exe_name.starts_with("nginx-") {
        Program::Nginx
    } else if exe_name == "uwsgi"
        || exe_name.starts_with("uwsgi-")
        || exe_name.starts_with("uwsgi_")
    {
        Program::Uwsgi
    } else {
        Program::Other
    }
}

/// `argv0` is what the process shows in ps: nginx rewrites it to
/// "nginx: master process ..." / "nginx: worker process".
pub fn classify_role(exe_name: &str, argv0: &str, parent_exe_name: Option<&str>) -> Role {
    let same_program_as_parent = parent_exe_name.map(program_of) == Some(program_of(exe_name));
    match program_of(exe_name) {
        Program::Nginx if argv0.starts_with("nginx: worker") => Role::NginxWorker,
        Program::Nginx if argv0.starts_with("nginx: master") => Role::NginxMaster,
        Program::Nginx if same_program_as_parent => Role::NginxWorker,
        Program::Nginx => Role::NginxMaster,
        Program::Uwsgi if same_program_as_parent => Role::UwsgiWorker,
        Program::Uwsgi => Role::UwsgiMaster,
        Program::Other => Role::Other,
    }
}

/// A live process as /proc shows it.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub role: Role,
}

fn proc_path(pid: u32, entry: &str) -> PathBuf {
    Path::new("/proc").join(pid.to_string()).join(entry)
}

/// Parent pid from /proc/PID/stat (the comm field may hold spaces and ')').
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    after_comm.split(' ').nth(1)?.parse().ok()
}

/// A process's working directory; "/" when it cannot be read.
/// The working directory of `pid` (bytes that are not UTF-8 replaced: the
/// paths built on it end up in JSON).
pub fn cwd_of(pid: u32) -> PathBuf {
    fs::read_link(proc_path(pid, "cwd"))
        .map(|cwd| cwd.to_string_lossy().into_owned().into())
        .unwrap_or_else(|_| "/".into())
}

/// True when `pid` runs an nginx binary (cheaper than `inspect`).
pub fn runs_nginx(pid: u32) -> bool {
    exe_name(pid).is_some_and(|name| program_of(&name) == Program::Nginx)
}

/// When the process started (clock ticks after boot, /proc/PID/stat field
/// 22): with the pid, it names a process even after pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    // Field 3 (state) is the first after comm; field 22 is 19 further.
    after_comm.split(' ').nth(19)?.parse().ok()
}

fn exe_name(pid: u32) -> Option<String> {
    let exe = fs::read_link(proc_path(pid, "exe")).ok()?;
    Some(
        exe.file_name()?
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string(),
    )
}

/// Inspect a process; `None` when it has exited.
pub fn inspect(pid: u32) -> Option<Process> {
    let comm = fs::read_to_string(proc_path(pid, "comm"))
        .ok()?
        .trim_end()
        .to_string();
    let ppid = parent_of(pid).unwrap_or(0);
    let cmdline: Vec<String> = read_cmdline(pid)
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect()
        })
        .unwrap_or_default();
    // Kernel threads and zombies have no exe: fall back to comm.
    let name = exe_name(pid).unwrap_or_else(|| comm.clone());
    let parent_name = exe_name(ppid);
    let argv0 = cmdline.first().map(String::as_str).unwrap_or("");
    let role = classify_role(&name, argv0, parent_name.as_deref());
    Some(Process {
        pid,
        comm,
        cmdline,
        role,
    })
}

/// How long a /proc/PID/cmdline read may hold up the caller.
const CMDLINE_DEADLINE: Duration = Duration::from_millis(200);
/// A command line longer than this is cut (argv can hold megabytes).
const MAX_CMDLINE: u64 = 64 << 10;

/// /proc/PID/cmdline, or None within CMDLINE_DEADLINE. Reading it takes
/// the process's memory-map lock, which a process stuck on a filesystem
/// that does not answer may hold for ever (the reason `ps` hangs): the read
/// runs on a reader thread, and a reader that does not answer in time is
/// left behind and replaced.
fn read_cmdline(pid: u32) -> Option<Vec<u8>> {
    bounded_read(&proc_path(pid, "cmdline"), CMDLINE_DEADLINE)
}

type ReadJob = (PathBuf, mpsc::SyncSender<std::io::Result<Vec<u8>>>);

/// The reader thread's queue; replaced when its reader is stuck.
static READER: Mutex<Option<mpsc::SyncSender<ReadJob>>> = Mutex::new(None);
/// Past 8 readers left behind, stuck, no more are started.
static PROC_READERS: Readers = Readers::new(8);

fn bounded_read(path: &Path, deadline: Duration) -> Option<Vec<u8>> {
    let deadline = PROC_READERS.admit(deadline).ok()?;
    let mut reader = READER.lock().unwrap_or_else(|e| e.into_inner());
    if reader.is_none() {
        let (jobs, queue) = mpsc::sync_channel::<ReadJob>(1);
        std::thread::Builder::new()
            .name("droptrace-proc".into())
            .spawn(move || {
                for (path, answer) in queue {
                    let read = fs::File::open(&path).and_then(|file| {
                        let mut bytes = Vec::new();
                        file.take(MAX_CMDLINE).read_to_end(&mut bytes)?;
                        Ok(bytes)
                    });
                    let _ = answer.send(read);
                }
            })
            .ok()?;
        *reader = Some(jobs);
    }
    let (answer, result) = mpsc::sync_channel(1);
    reader.as_ref()?.send((path.to_path_buf(), answer)).ok()?;
    let read = PROC_READERS.wait(result, deadline);
    if read.is_err() {
        // Left behind (it ends when its read does): the next call starts
        // another.
        *reader = None;
    }
    read.ok()?.ok()
}

/// Pids of every process, from /proc.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Something known of a process, remembered by pid for as long as that pid
/// names the same process: a pid reused by a new process (another start
/// time) is a stranger. An exited process keeps what was known of it, for
/// its late events. At most `cap` entries.
pub struct PerProcess<T> {
    entries: HashMap<u32, (Option<u64>, T)>,
    cap: usize,
}

impl<T: Clone> PerProcess<T> {
    pub fn new(cap: usize) -> Self {
        Self {
            entries: HashMap::new(),
            cap,
        }
    }

    pub fn get(&self, pid: u32) -> Option<T> {
        let (started, known) = self.entries.get(&pid)?;
        let now = start_time(pid);
        (now.is_none() || now == *started).then(|| known.clone())
    }

    pub fn insert(&mut self, pid: u32, known: T) {
        if self.entries.len() >= self.cap {
            // Keep the processes still running as they were.
            self.entries
                .retain(|&pid, (started, _)| started.is_some() && start_time(pid) == *started);
            if self.entries.len() >= self.cap {
                self.entries.clear();
            }
        }
        self.entries.insert(pid, (start_time(pid), known));
    }
}

/// `--pid` and `--process`: the given processes, the processes with the
/// given names (also ones started later), and all their descendants.
pub struct PidFilter {
    /// The --pid processes, with their start times.
    roots: HashMap<u32, Option<u64>>,
    names: Vec<String>,
    verdicts: PerProcess<bool>,
}

impl PidFilter {
    /// Fails naming the first pid that does not exist.
    pub fn new(pids: &[u32], names: &[String]) -> Result<Self> {
        for &pid in pids {
            if !proc_path(pid, "").exists() {
                bail!("--pid {pid}: no such process");
            }
        }
        Ok(Self {
            roots: pids.iter().map(|&pid| (pid, start_time(pid))).collect(),
            names: names.to_vec(),
            verdicts: PerProcess::new(65_536),
        })
    }

    pub fn watches_everything(&self) -> bool {
        self.roots.is_empty() && self.names.is_empty()
    }

    /// "pids [1, 2] and processes named nginx, and their descendants".
    pub fn describe(&self) -> String {
        if self.watches_everything() {
            return "every process".into();
        }
        let mut parts = Vec::new();
        if !self.roots.is_empty() {
            let mut pids: Vec<u32> = self.roots.keys().copied().collect();
            pids.sort_unstable();
            parts.push(format!("pids {pids:?}"));
        }
        if !self.names.is_empty() {
            parts.push(format!("processes named {}", self.names.join(", ")));
        }
        format!("{} and their descendants", parts.join(" and "))
    }

    /// A --pid process (not a later one that took its pid), or one named
    /// by --process.
    fn is_given(&self, pid: u32) -> bool {
        self.roots.get(&pid).is_some_and(|&started| {
            let now = start_time(pid);
            now.is_none() || now == started
        })
    }

    fn is_root(&self, pid: u32) -> bool {
        self.is_given(pid)
            || (!self.names.is_empty() && {
                let comm = fs::read_to_string(proc_path(pid, "comm")).unwrap_or_default();
                let exe = exe_name(pid).unwrap_or_default();
                self.names
                    .iter()
                    .any(|name| name == comm.trim_end() || *name == exe)
            })
    }

    /// True when `pid` is a root or descends from one. A process that has
    /// already exited cannot be placed in the tree and is not covered.
    pub fn covers(&mut self, pid: u32) -> bool {
        if self.watches_everything() || self.is_given(pid) {
            return true;
        }
        if let Some(known) = self.verdicts.get(pid) {
            return known;
        }
        let mut current = pid;
        let mut covered = self.is_root(pid);
        // A process tree deeper than this is not a tree we are looking for.
        for _ in 0..64 {
            if covered {
                break;
            }
            match parent_of(current) {
                Some(parent) if self.is_root(parent) => covered = true,
                Some(parent) if parent > 1 => current = parent,
                _ => break,
            }
        }
        self.verdicts.insert(pid, covered);
        covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_blocks_is_left_behind_and_the_next_one_answers() {
        let dir = std::env::temp_dir().join(format!("droptrace-stuck-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // Opening a FIFO for reading waits for a writer: a read that hangs.
        let fifo = dir.join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        assert_eq!(bounded_read(&fifo, Duration::from_millis(100)), None);
        assert!(started.elapsed() < Duration::from_millis(500));
        let me = bounded_read(&proc_path(std::process::id(), "cmdline"), CMDLINE_DEADLINE);
        assert!(me.is_some_and(|bytes| !bytes.is_empty()));
        // Unblock the one left behind so it ends.
        let _ = fs::OpenOptions::new().write(true).open(&fifo);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reused_pid_is_a_stranger_and_an_exited_one_is_remembered() {
        let me = std::process::id();
        let mut known = PerProcess::new(4);
        known.insert(me, "me");
        assert_eq!(known.get(me), Some("me"));
        // The same pid, started at another time: another process.
        known.entries.get_mut(&me).unwrap().0 = Some(1);
        assert_eq!(known.get(me), None);
        // A pid no process has now: what was known of it stays.
        let gone = u32::MAX - 1;
        known.insert(gone, "gone");
        assert_eq!(known.get(gone), Some("gone"));
        // Full: the exited and the reused go first.
        for pid in [u32::MAX - 2, u32::MAX - 3] {
            known.insert(pid, "more");
        }
        known.insert(me, "me again");
        assert_eq!(known.entries.len(), 1);
        assert_eq!(known.get(me), Some("me again"));
    }

    #[test]
    fn roles_come_from_the_executable_its_title_and_its_parent() {
        // (exe name, argv0, parent's exe name, role)
        let cases = [
            (
                "nginx",
                "nginx: master process nginx -c x",
                Some("bash"),
                Role::NginxMaster,
            ),
            (
                "nginx",
                "nginx: worker process",
                Some("nginx"),
                Role::NginxWorker,
            ),
            ("nginx", "nginx", Some("nginx"), Role::NginxWorker),
            (
                "nginx",
                "/usr/sbin/nginx",
                Some("systemd"),
                Role::NginxMaster,
            ),
            // uWSGI's master is the one whose parent is not uWSGI.
            ("uwsgi-core", "uwsgi", Some("bash"), Role::UwsgiMaster),
            ("uwsgi-core", "uwsgi", Some("uwsgi-core"), Role::UwsgiWorker),
            ("uwsgi", "uwsgi", None, Role::UwsgiMaster),
            ("python3.11", "gunicorn: master", Some("bash"), Role::Other),
            ("nginxish", "x", None, Role::Other),
        ];
        for (exe, argv0, parent, role) in cases {
            assert_eq!(
                classify_role(exe, argv0, parent),
                role,
                "{exe} {argv0} (parent {parent:?})"
            );
        }
    }

    #[test]
    fn our_own_process_is_covered_by_its_parent_but_not_by_a_stranger() {
        let me = std::process::id();
        let parent = parent_of(me).unwrap();
        assert!(PidFilter::new(&[parent], &[]).unwrap().covers(me));
        assert!(PidFilter::new(&[me], &[]).unwrap().covers(me));
        assert!(!PidFilter::new(&[me], &[]).unwrap().covers(parent));
    }

    #[test]
    fn a_pid_that_does_not_exist_is_an_error() {
        let err = PidFilter::new(&[u32::MAX - 1], &[])
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, format!("--pid {}: no such process", u32::MAX - 1));
    }

    #[test]
    fn a_name_covers_its_processes_and_their_descendants() {
        let me = std::process::id();
        let parent = parent_of(me).unwrap();
        let parent_comm = fs::read_to_string(proc_path(parent, "comm")).unwrap();
        let mut filter = PidFilter::new(&[], &[parent_comm.trim_end().to_string()]).unwrap();
        assert!(filter.covers(parent) && filter.covers(me));
        let mut filter = PidFilter::new(&[], &["no-such-program".into()]).unwrap();
        assert!(!filter.covers(me));
        assert_eq!(
            filter.describe(),
            "processes named no-such-program and their descendants"
        );
    }
}
