//! Files read on behalf of a watched process, the way that process could
//! read them and no further.
//!
//! droptrace runs as root beside processes it must not trust; their command
//! lines and configurations name files. Every such file is:
//! - resolved inside the process's root, as the kernel would resolve it for
//!   that process (`openat2` with `RESOLVE_IN_ROOT`, no magic links), so an
//!   absolute symlink in a container stays in the container;
//! - opened only if it is a regular file (it is first opened `O_PATH`, which
//!   wakes no device and waits for no FIFO writer);
//! - read with the process's filesystem uid, gid and groups, on a thread of
//!   its own: what the process could not read, droptrace does not read;
//! - capped at [`MAX_FILE_BYTES`];
//! - read under a deadline: a file on a filesystem that never answers costs
//!   the caller the deadline, not the loop.
use std::{
    ffi::{CString, OsString},
    fs::File,
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Component, Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

/// No configuration file of nginx or uWSGI is near this size.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Entries read from one directory when expanding an include pattern.
const MAX_DIRECTORY_ENTRIES: usize = 10_000;
/// Reader threads of files; past 16 left waiting on a filesystem that does
/// not answer, reads are refused rather than piling up threads.
static FILE_READERS: Readers = Readers::new(16);

/// Reads made on threads of their own, so that one that never answers
/// costs its caller a deadline: the thread is left behind, counted until it
/// answers, and past `max` of those no more reads start.
pub struct Readers {
    stuck: AtomicUsize,
    max: usize,
}

impl Readers {
    pub const fn new(max: usize) -> Self {
        Self {
            stuck: AtomicUsize::new(0),
            max,
        }
    }

    /// How long a new read may be waited for, or why none may start.
    pub fn admit(&self, deadline: Duration) -> Result<Duration, String> {
        let deadline = wait_allowed(deadline);
        if deadline.is_zero() {
            return Err("not read: droptrace is stopping".into());
        }
        if self.stuck.load(Ordering::Relaxed) >= self.max {
            return Err(format!(
                "{} earlier reads never finished (a filesystem that does not answer?); not reading more",
                self.max
            ));
        }
        Ok(deadline)
    }

    /// The reader's answer within `deadline`; a reader that does not
    /// answer in time is left behind, and counted as stuck until it does.
    pub fn wait<T: Send + 'static>(
        &'static self,
        answer: mpsc::Receiver<T>,
        deadline: Duration,
    ) -> Result<T, String> {
        match answer.recv_timeout(deadline) {
            Ok(answer) => Ok(answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stuck.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    let _ = answer.recv();
                    self.stuck.fetch_sub(1, Ordering::Relaxed);
                });
                Err(format!(
                    "no answer within {} ms (a filesystem that does not answer?)",
                    deadline.as_millis()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the reader thread failed".into()),
        }
    }
}

/// Once droptrace is told to stop, reads have this long to finish; after
/// it, none waits and none starts, so Ctrl-C is answered within a second
/// whatever the watched processes do.
const STOP_GRACE: Duration = Duration::from_millis(500);
/// CLOCK_MONOTONIC in ms when droptrace was told to stop; 0 until then.
static STOP_AT_MS: AtomicU64 = AtomicU64::new(0);

/// CLOCK_MONOTONIC now (the clock bpf_ktime_get_ns reads too). A clock
/// read only: safe in a signal handler.
pub fn monotonic() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; clock_gettime is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

fn monotonic_ms() -> u64 {
    monotonic().as_millis() as u64
}

/// droptrace is stopping (Ctrl-C, SIGTERM). Called from the signal handler:
/// a clock read and an atomic store, both async-signal-safe.
pub fn stopping() {
    let _ = STOP_AT_MS.compare_exchange(
        0,
        monotonic_ms().max(1),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
}

/// True once droptrace was told to stop.
pub fn is_stopping() -> bool {
    STOP_AT_MS.load(Ordering::Relaxed) != 0
}

/// True once the grace after the stop has passed: long scans (every
/// process's fds, every namespace) give up rather than hold the summary.
pub fn gave_up() -> bool {
    wait_allowed(Duration::MAX).is_zero()
}

/// How long a read for a watched process may still be waited for.
pub fn wait_allowed(wanted: Duration) -> Duration {
    allowed(wanted, STOP_AT_MS.load(Ordering::Relaxed), monotonic_ms())
}

/// `wanted`, cut to what is left of the grace after `stop_at_ms` (0: not
/// stopping).
fn allowed(wanted: Duration, stop_at_ms: u64, now_ms: u64) -> Duration {
    if stop_at_ms == 0 {
        return wanted;
    }
    let ends = stop_at_ms + STOP_GRACE.as_millis() as u64;
    wanted.min(Duration::from_millis(ends.saturating_sub(now_ms)))
}

/// The filesystem identity of a process: who the kernel checks its file
/// accesses as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Credentials {
    /// The filesystem uid, gid and supplementary groups of `pid`.
    pub fn of(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    /// From /proc/PID/status: "Uid:\treal\teffective\tsaved\tfs".
    fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|rest| {
                    rest.split_whitespace()
                        .filter_map(|n| n.parse::<u32>().ok())
                        .collect::<Vec<_>>()
                })
        };
        Some(Self {
            uid: *field("Uid:")?.get(3)?,
            gid: *field("Gid:")?.get(3)?,
            groups: field("Groups:").unwrap_or_default(),
        })
    }
}

/// Run `work` on a thread of its own with `who`'s filesystem credentials,
/// waiting at most `deadline` for it. When droptrace is not root it cannot
/// take another identity, and reads as itself (it can read no more than an
/// unprivileged user then).
pub fn as_process<T: Send + 'static>(
    who: &Credentials,
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let deadline = FILE_READERS.admit(deadline)?;
    let who = who.clone();
    let (done, result) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("droptrace-read".into())
        .spawn(move || {
            // The thread ends with its credentials: nothing else runs as them.
            let outcome = become_(&who).map(|()| work());
            let _ = done.send(outcome);
        })
        .map_err(|err| format!("cannot start a reader thread: {err}"))?;
    FILE_READERS.wait(result, deadline)?
}

/// `work` on the files of process `pid`, seen and read as it sees and
/// reads them (see `View::of_pid` and `as_process`), within `deadline`.
pub fn as_process_of<T: Send + 'static>(
    pid: u32,
    deadline: Duration,
    work: impl FnOnce(View) -> T + Send + 'static,
) -> Result<T, String> {
    let who = Credentials::of(pid).ok_or("the process is gone")?;
    let view = View::of_pid(pid).map_err(|err| format!("cannot see the process's files: {err}"))?;
    as_process(&who, deadline, move || work(view))
}

/// Take `who`'s filesystem identity on this thread only. The raw system
/// calls change the calling thread's credentials alone (the C library's
/// wrappers would change every thread's).
fn become_(who: &Credentials) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // SAFETY: the pointer and length describe `who.groups`; the calls take
    // integers otherwise and change only this thread.
    unsafe {
        if libc::syscall(
            libc::SYS_setgroups,
            who.groups.len(),
            who.groups.as_ptr() as *const libc::gid_t,
        ) != 0
        {
            return Err(format!(
                "cannot take the groups of uid {}: {}",
                who.uid,
                io::Error::last_os_error()
            ));
        }
        libc::syscall(libc::SYS_setfsgid, who.gid);
        libc::syscall(libc::SYS_setfsuid, who.uid);
        // Each returns the previous value; asking with an invalid id is
        // how to read the current one.
        let fsuid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
        let fsgid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
        if fsuid != who.uid || fsgid != who.gid {
            return Err(format!("cannot take uid {} gid {}", who.uid, who.gid));
        }
    }
    Ok(())
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A process's view of the file system: paths resolve inside its root.
#[derive(Debug)]
pub struct View {
    root: OwnedFd,
}

impl View {
    /// The root directory of `pid`.
    pub fn of_pid(pid: u32) -> io::Result<Self> {
        Self::at(Path::new(&format!("/proc/{pid}/root")))
    }

    /// `dir` taken as the root ("/" for droptrace's own view).
    pub fn at(dir: &Path) -> io::Result<Self> {
        Ok(Self {
            root: open(dir, libc::O_PATH | libc::O_DIRECTORY)?,
        })
    }

    /// `path` resolved inside the root, opened `O_PATH` (nothing is read,
    /// no device is woken, no FIFO waited for).
    fn locate(&self, path: &Path) -> io::Result<(OwnedFd, std::fs::Metadata)> {
        let name = CString::new(path.as_os_str().as_bytes())?;
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: valid fd, C string and open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let metadata = File::from(fd.try_clone()?).metadata()?;
        Ok((fd, metadata))
    }

    /// Reopen an `O_PATH` handle for reading: the permission check is made
    /// now, with this thread's credentials, on the very inode located.
    fn reopen(fd: &OwnedFd, flags: i32) -> io::Result<File> {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        open(Path::new(&path), flags | libc::O_NONBLOCK | libc::O_NOCTTY).map(File::from)
    }

    /// A regular file, open for reading from its start.
    pub fn open(&self, path: &Path) -> io::Result<File> {
        let (fd, metadata) = self.locate(path)?;
        Located(fd).open_as(&metadata)
    }

    /// A regular file's text, at most MAX_FILE_BYTES.
    pub fn read(&self, path: &Path) -> io::Result<String> {
        let file = self.open(path)?;
        if file.metadata()?.len() > MAX_FILE_BYTES {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(too_large());
        }
        String::from_utf8(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
    }

    /// The names in a directory, sorted, at most MAX_DIRECTORY_ENTRIES.
    pub fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let (fd, metadata) = self.locate(dir)?;
        if !metadata.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory",
            ));
        }
        let dir = Self::reopen(&fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let mut names: Vec<OsString> =
            std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
                .take(MAX_DIRECTORY_ENTRIES)
                .filter_map(|entry| Some(entry.ok()?.file_name()))
                .collect();
        names.sort();
        Ok(names)
    }

    /// The device and inode `path` names inside the root, if it exists.
    pub fn file_id(&self, path: &Path) -> Option<(u64, u64)> {
        let (_, metadata) = self.locate(path).ok()?;
        Some((metadata.dev(), metadata.ino()))
    }

    /// The paths matching a glob `pattern` (absolute, wildcards in any
    /// component), sorted as nginx sorts them.
    pub fn glob(&self, pattern: &Path) -> Vec<PathBuf> {
        let mut found = vec![PathBuf::from("/")];
        for component in pattern.components() {
            let part = match component {
                Component::Normal(part) => part,
                Component::ParentDir => {
                    found.iter_mut().for_each(|p| {
                        p.push("..");
                    });
                    continue;
                }
                _ => continue,
            };
            let text = part.to_string_lossy();
            if !text.contains(['*', '?', '[']) {
                found.iter_mut().for_each(|p| p.push(part));
                continue;
            }
            let Ok(wanted) = glob::Pattern::new(&text) else {
                return Vec::new();
            };
            found = found
                .iter()
                .flat_map(|dir| {
                    self.list(dir)
                        .unwrap_or_default()
                        .into_iter()
                        // Names that are not UTF-8 are left out: the paths
                        // of configuration files end up in JSON.
                        .filter(|name| {
                            name.to_str()
                                .is_some_and(|name| !name.starts_with('.') && wanted.matches(name))
                        })
                        .map(|name| dir.join(name))
                        .collect::<Vec<_>>()
                })
                .take(MAX_DIRECTORY_ENTRIES)
                .collect();
        }
        found.retain(|path| self.file_id(path).is_some());
        found.sort();
        found
    }
}

/// A file located without being opened for reading (`O_PATH`): opening it
/// for reading happens later, on the thread that reads it.
#[derive(Debug)]
pub struct Located(OwnedFd);

impl Located {
    /// The binary `pid` runs.
    pub fn exe_of(pid: u32) -> io::Result<Self> {
        open(Path::new(&format!("/proc/{pid}/exe")), libc::O_PATH).map(Self)
    }

    /// Open for reading, if it is a regular file.
    pub fn open(&self) -> io::Result<File> {
        self.open_as(&File::from(self.0.try_clone()?).metadata()?)
    }

    /// Open for reading, if `metadata` (its own) is a regular file's.
    fn open_as(&self, metadata: &std::fs::Metadata) -> io::Result<File> {
        if !metadata.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        View::reopen(&self.0, libc::O_RDONLY)
    }
}

/// open(2) of `path` with `flags` (close-on-exec).
fn open(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the returned fd is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {} KiB; not read", MAX_FILE_BYTES / 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new directory under the temp dir, removed when the test ends.
    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("droptrace-files-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn credentials_are_the_filesystem_ids_and_groups() {
        let status = "Name:\tnginx\nUid:\t0\t33\t33\t34\nGid:\t0\t33\t33\t35\nGroups:\t4 33 \n";
        assert_eq!(
            Credentials::parse(status),
            Some(Credentials {
                uid: 34,
                gid: 35,
                groups: vec![4, 33]
            })
        );
        assert_eq!(Credentials::parse("Name:\tx\n"), None);
    }

    #[test]
    fn an_absolute_symlink_resolves_inside_the_root() {
        let scratch_root = scratch("symlink");
        let root = scratch_root.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/inside.conf"), "inside").unwrap();
        let scratch_outside = scratch("symlink-outside");
        let outside = scratch_outside.path();
        std::fs::write(outside.join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink("/etc/inside.conf", root.join("etc/link.conf")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("etc/escape.conf")).unwrap();
        std::os::unix::fs::symlink("../../../../../..", root.join("etc/up")).unwrap();
        let view = View::at(root).unwrap();
        assert_eq!(view.read(Path::new("/etc/link.conf")).unwrap(), "inside");
        // The host's path, taken inside the root, is not there.
        assert!(view.read(Path::new("/etc/escape.conf")).is_err());
        assert_eq!(
            view.read(Path::new("/etc/up/etc/inside.conf")).unwrap(),
            "inside"
        );
        assert!(view.read(Path::new("/../../../proc/self/status")).is_err());
    }

    #[test]
    fn only_regular_files_are_read_and_never_waited_for() {
        let scratch_root = scratch("fifo");
        let root = scratch_root.path();
        let fifo = CString::new(root.join("fifo.conf").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("/dev/zero", root.join("zero.conf")).unwrap();
        let view = View::at(root).unwrap();
        let started = std::time::Instant::now();
        let err = view.read(Path::new("/fifo.conf")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // /dev/zero is not inside this root at all.
        assert!(view.read(Path::new("/zero.conf")).is_err());
        let host = View::at(Path::new("/")).unwrap();
        let err = host.read(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_large_file_is_refused() {
        let scratch_root = scratch("large");
        let root = scratch_root.path();
        let file = File::create(root.join("big.conf")).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let err = View::at(root)
            .unwrap()
            .read(Path::new("/big.conf"))
            .unwrap_err();
        assert!(err.to_string().contains("larger than 1024 KiB"), "{err}");
    }

    #[test]
    fn glob_matches_inside_the_root_sorted() {
        let scratch_root = scratch("glob");
        let root = scratch_root.path();
        for dir in ["a", "b"] {
            std::fs::create_dir_all(root.join("conf.d").join(dir)).unwrap();
            std::fs::write(root.join("conf.d").join(dir).join("x.conf"), "").unwrap();
        }
        std::fs::write(root.join("conf.d/2.conf"), "").unwrap();
        std::fs::write(root.join("conf.d/1.conf"), "").unwrap();
        std::fs::write(root.join("conf.d/.hidden.conf"), "").unwrap();
        let view = View::at(root).unwrap();
        assert_eq!(
            view.glob(Path::new("/conf.d/*.conf")),
            vec![
                PathBuf::from("/conf.d/1.conf"),
                PathBuf::from("/conf.d/2.conf")
            ]
        );
        assert_eq!(
            view.glob(Path::new("/conf.d/*/x.conf")),
            vec![
                PathBuf::from("/conf.d/a/x.conf"),
                PathBuf::from("/conf.d/b/x.conf")
            ]
        );
        assert!(view.glob(Path::new("/none/*.conf")).is_empty());
    }

    #[test]
    fn once_stopping_reads_have_half_a_second_then_none() {
        let second = Duration::from_secs(1);
        assert_eq!(allowed(second, 0, 5_000), second);
        assert_eq!(allowed(second, 5_000, 5_100), Duration::from_millis(400));
        assert_eq!(
            allowed(Duration::from_millis(200), 5_000, 5_100),
            Duration::from_millis(200)
        );
        assert_eq!(allowed(second, 5_000, 5_600), Duration::ZERO);
    }

    #[test]
    fn work_runs_with_a_deadline() {
        let me = Credentials {
            // SAFETY: no preconditions.
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            groups: Vec::new(),
        };
        assert_eq!(as_process(&me, Duration::from_secs(5), || 7), Ok(7));
        let err = as_process(&me, Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500))
        })
        .unwrap_err();
        assert!(err.contains("no answer within 50 ms"), "{err}");
    }
}
