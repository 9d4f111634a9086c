//! The UNIX listener registry: every listening socket droptrace knows, found
//! by the address a refused client asked for.
//!
//! A refused connect does not reach the listener in the kernel
//! (unix_stream_connect fails before linking the two), so we keep our own
//! table: filled from sock_diag at start-up and on a miss, kept current by
//! the listen() records of the eBPF side.
use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracer_common::ListenRecord;

use super::shrink;
use crate::config::files::View;

use super::{
    address::UnixAddress,
    owners::{Owned, Owner, OwnerScans},
    process,
    sock_diag::{self, FileId, Netns, NetnsView, UnixListenerEntry},
};

/// What a negative listen() backlog ("as large as allowed") is recorded
/// as: listen() takes an int, the kernel reads it as unsigned.
pub const LISTEN_MAX_REQUEST: u32 = i32::MAX as u32;

/// A listener that closed keeps its identity, owner and limit this long:
/// a refusal recorded while it was full may be handled after its owner
/// exited (a storm's records wait in the ring buffer).
const CLOSED_KEPT: Duration = Duration::from_secs(60);
/// At most this many closed listeners are remembered.
const MAX_CLOSED: usize = 4096;

/// Rescans of every namespace on a lookup miss, at most this often (drops
/// come in storms).
const MISS_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Tables are rescanned at least this often (see `Registry::maintain`).
const MAINTAIN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Listener {
    pub inode: u64,
    pub netns: u32,
    pub address: UnixAddress,
    pub file: Option<FileId>,
    /// Effective backlog (sk_max_ack_backlog).
    pub backlog: u32,
    /// The listen() argument, when droptrace saw the call.
    pub requested: Option<u32>,
    pub somaxconn: Option<u32>,
    /// The process that owns the socket (the topmost of those holding it).
    pub owner: Option<Owner>,
}

#[derive(Default)]
pub struct Registry {
    listeners: HashMap<u64, Listener>,
    by_file: HashMap<FileId, u64>,
    by_abstract: HashMap<(u32, Vec<u8>), u64>,
    views: HashMap<u32, NetnsView>,
    last_rescan: Option<Instant>,
    owner_scans: OwnerScans,
    retired_overflows: HashMap<u32, u64>,
    /// The listing failed and the operator was told.
    warned_unix_listing: bool,
    /// Listeners that closed, with when droptrace noticed.
    closed: HashMap<u64, (Instant, Listener)>,
}

impl Registry {
    /// TcpExtListenOverflows of every network namespace seen so far, by
    /// namespace inode; for a namespace that went away, its last reading.
    pub fn listen_overflows(&mut self) -> HashMap<u32, u64> {
        for netns in sock_diag::namespaces() {
            self.view_for(&netns);
        }
        let mut readings = self.retired_overflows.clone();
        for (inode, view) in &self.views {
            if let Some(count) = view.listen_overflows() {
                readings.insert(*inode, count);
            }
        }
        readings
    }

    /// The inodes of every listening TCP socket of every network namespace
    /// (sock_diag, one dump per namespace: no /proc scan); None when a
    /// namespace's table could not be read.
    pub fn open_tcp_listeners(&mut self) -> Option<HashSet<u64>> {
        let mut open = HashSet::new();
        for netns in sock_diag::namespaces() {
            let listeners = self.view_for(&netns)?.tcp_listeners().ok()?;
            open.extend(listeners.iter().map(|l| l.inode));
        }
        Some(open)
    }

    /// net.ipv4.ip_local_port_range of the namespace with inode `netns`.
    pub fn ip_local_port_range(&mut self, netns: u32) -> Option<(u32, u32)> {
        if !self.views.contains_key(&netns) {
            let found = sock_diag::namespaces()
                .into_iter()
                .find(|n| n.inode == netns)?;
            self.view_for(&found);
        }
        self.views.get(&netns)?.ip_local_port_range()
    }

    /// The view of `netns`, opened on first use.
    fn view_for(&mut self, netns: &Netns) -> Option<&NetnsView> {
        match self.views.entry(netns.inode) {
            Entry::Occupied(entry) => Some(entry.into_mut()),
            Entry::Vacant(entry) => match NetnsView::open(netns) {
                Ok(view) => Some(entry.insert(view)),
                Err(err) => {
                    tracing::warn!("skipping network namespace {}: {err:#}", netns.inode);
                    None
                }
            },
        }
    }

    /// Scan every network namespace's socket table. Listeners that closed
    /// and namespaces that went away are forgotten (a gone namespace's last
    /// ListenOverflows reading is kept).
    pub fn rescan(&mut self) {
        self.last_rescan = Some(Instant::now());
        let live = sock_diag::namespaces();
        let gone: Vec<u32> = self
            .views
            .keys()
            .filter(|inode| !live.iter().any(|netns| netns.inode == **inode))
            .copied()
            .collect();
        for inode in gone {
            if let Some(count) = self
                .views
                .remove(&inode)
                .and_then(|view| view.listen_overflows())
            {
                self.retired_overflows.insert(inode, count);
            }
        }
        for netns in live {
            // Hundreds of namespaces take a while: not after Ctrl-C (what
            // was not rescanned keeps what it had).
            if crate::config::files::gave_up() {
                break;
            }
            let Some(view) = self.view_for(&netns) else {
                continue;
            };
            let somaxconn = view.somaxconn;
            let entries = match view.unix_listeners() {
                Ok(entries) => entries,
                Err(err) => {
                    // Once: a missing module stays missing on every rescan.
                    if !self.warned_unix_listing {
                        self.warned_unix_listing = true;
                        tracing::warn!(
                            "cannot list UNIX listeners of netns {}: {err:#}; refused connects will be counted, with their listener unknown",
                            netns.inode
                        );
                    }
                    continue;
                }
            };
            let open: HashSet<u64> = entries.iter().map(|e| e.inode).collect();
            self.retire_closed(netns.inode, &open);
            for entry in entries {
                self.upsert_from_diag(netns.inode, somaxconn, entry);
            }
        }
        self.owner_scans.fill(&mut self.listeners);
    }

    /// The listeners of `netns` that are not `open` any more move to the
    /// closed ones, which keep them for CLOSED_KEPT.
    fn retire_closed(&mut self, netns: u32, open: &HashSet<u64>) {
        let gone: Vec<u64> = self
            .listeners
            .iter()
            .filter(|(inode, l)| l.netns == netns && !open.contains(inode))
            .map(|(inode, _)| *inode)
            .collect();
        for inode in gone {
            if let Some(listener) = self.listeners.remove(&inode) {
                self.closed.insert(inode, (Instant::now(), listener));
            }
        }
        let mut expired: Vec<u64> = self
            .closed
            .iter()
            .filter(|(_, (at, _))| at.elapsed() >= CLOSED_KEPT)
            .map(|(inode, _)| *inode)
            .collect();
        if self.closed.len() - expired.len() > MAX_CLOSED {
            let mut by_age: Vec<(Instant, u64)> = self
                .closed
                .iter()
                .filter(|(_, (at, _))| at.elapsed() < CLOSED_KEPT)
                .map(|(inode, (at, _))| (*at, *inode))
                .collect();
            by_age.sort_unstable();
            let excess = by_age.len() - MAX_CLOSED;
            expired.extend(by_age.into_iter().take(excess).map(|(_, inode)| inode));
        }
        for inode in expired {
            if let Some((_, listener)) = self.closed.remove(&inode) {
                self.unindex(&listener);
            }
        }
        // A burst of listeners leaves no lasting memory behind.
        shrink(&mut self.listeners);
        shrink(&mut self.closed);
        shrink(&mut self.by_file);
        shrink(&mut self.by_abstract);
    }

    /// Rescan now and then even when nothing asks (every `every`, at most
    /// MAINTAIN_INTERVAL): namespaces that went away are let go
    /// (droptrace's netlink socket in one would keep it alive), and closed
    /// listeners leave the tables.
    pub fn maintain(&mut self, every: Duration) {
        let every = every.min(MAINTAIN_INTERVAL);
        if self.last_rescan.is_none_or(|at| at.elapsed() >= every) {
            self.rescan();
            tracing::debug!(
                listeners = self.listeners.len(),
                closed = self.closed.len(),
                by_file = self.by_file.len(),
                by_abstract = self.by_abstract.len(),
                namespaces = self.views.len(),
                "tables after a rescan"
            );
            // What the burst freed goes back to the system, not to a
            // fragmented heap.
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Listeners, closed ones, and index entries held (for tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize, usize) {
        (
            self.listeners.len(),
            self.closed.len(),
            self.by_file.len() + self.by_abstract.len(),
        )
    }

    fn upsert_from_diag(&mut self, netns: u32, somaxconn: Option<u32>, entry: UnixListenerEntry) {
        let Some(address) = entry.address else { return };
        let listener = self
            .listeners
            .entry(entry.inode)
            .or_insert_with(|| Listener {
                inode: entry.inode,
                netns,
                address,
                file: entry.file,
                backlog: entry.backlog,
                requested: None,
                somaxconn,
                owner: None,
            });
        listener.backlog = entry.backlog;
        listener.file = listener.file.or(entry.file);
        let listener = listener.clone();
        self.index(&listener);
    }

    /// A listen() the eBPF side saw succeed.
    pub fn on_listen(&mut self, record: &ListenRecord) {
        let raw = &record.path[..(record.path_len as usize).min(record.path.len())];
        let Some(address) = UnixAddress::from_sun_path(raw) else {
            return;
        };
        let file = match &address {
            UnixAddress::Path(path) => Task {
                pid: record.pid,
                tid: record.tid,
                netns: record.netns,
            }
            .file_id(path),
            UnixAddress::Abstract(_) => None,
        };
        let owner = process::inspect(record.pid).map(Owner::of);
        let listener = Listener {
            inode: record.sock_inode,
            netns: record.netns,
            address,
            file,
            backlog: record.effective_backlog,
            // listen() takes an int; a negative one means "as large as allowed".
            requested: Some(record.requested_backlog.min(LISTEN_MAX_REQUEST)),
            somaxconn: Some(record.somaxconn),
            owner,
        };
        tracing::debug!(inode = listener.inode, address = %listener.address, backlog = listener.backlog, "new listener");
        self.index(&listener);
        self.listeners.insert(listener.inode, listener);
    }

    /// The index entries of a listener forgotten, unless another socket
    /// took its address since.
    fn unindex(&mut self, listener: &Listener) {
        if let Some(file) = listener.file {
            if self.by_file.get(&file) == Some(&listener.inode) {
                self.by_file.remove(&file);
            }
        }
        if let UnixAddress::Abstract(name) = &listener.address {
            let key = (listener.netns, name.clone());
            if self.by_abstract.get(&key) == Some(&listener.inode) {
                self.by_abstract.remove(&key);
            }
        }
    }

    fn index(&mut self, listener: &Listener) {
        // An inode number reused by a new socket is that socket's.
        self.closed.remove(&listener.inode);
        if let Some(file) = listener.file {
            self.by_file.insert(file, listener.inode);
        }
        if let UnixAddress::Abstract(name) = &listener.address {
            self.by_abstract
                .insert((listener.netns, name.clone()), listener.inode);
        }
    }

    /// The listener behind `address` as thread `client` (a tid: threads may
    /// sit in different network namespaces) would reach it: relative paths
    /// from its cwd, absolute ones from its root, abstract names in its
    /// network namespace.
    pub fn find(&mut self, client: Task, address: &UnixAddress) -> Option<&Listener> {
        let inode = match self.lookup(client, address) {
            Some(inode) => inode,
            None if self
                .last_rescan
                .is_none_or(|t| t.elapsed() >= MISS_RESCAN_INTERVAL) =>
            {
                self.rescan();
                self.lookup(client, address)?
            }
            None => return None,
        };
        if let Some((_, closed)) = self.closed.get(&inode) {
            return Some(closed);
        }
        if self.listeners.get(&inode)?.owner.is_none() {
            self.owner_scans.fill(&mut self.listeners);
        }
        self.listeners.get(&inode)
    }

    fn lookup(&self, client: Task, address: &UnixAddress) -> Option<u64> {
        let indexed = match address {
            UnixAddress::Path(path) => client
                .file_id(path)
                .or_else(|| FileId::of(path))
                .and_then(|file| self.by_file.get(&file)),
            UnixAddress::Abstract(name) => self.by_abstract.get(&(client.netns, name.clone())),
        };
        match indexed.copied() {
            // A live listener, or one that closed since (its index entry
            // stays until another socket takes the address).
            Some(inode)
                if self.listeners.contains_key(&inode) || self.closed.contains_key(&inode) =>
            {
                Some(inode)
            }
            // The socket file is gone too: the latest listener that closed
            // at that address.
            _ => self
                .closed
                .iter()
                .filter(|(_, (_, l))| {
                    l.address == *address
                        && (matches!(address, UnixAddress::Path(p) if p.is_absolute())
                            || l.netns == client.netns)
                })
                .max_by_key(|(_, (at, _))| *at)
                .map(|(inode, _)| *inode),
        }
    }

    /// The listener's queue length now, from its namespace's socket table.
    pub fn queue_now(&self, listener: &Listener) -> Option<u32> {
        let view = self.views.get(&listener.netns)?;
        let entries = view.unix_listeners().ok()?;
        entries
            .iter()
            .find(|e| e.inode == listener.inode)
            .map(|e| e.queue)
    }
}

impl Owned for Listener {
    fn inode(&self) -> u64 {
        self.inode
    }

    fn owner_slot(&mut self) -> &mut Option<Owner> {
        &mut self.owner
    }
}

/// A thread, as the kernel records name it.
#[derive(Clone, Copy, Debug)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    /// Its network namespace when the record was made.
    pub netns: u32,
}

impl Task {
    fn proc_dir(self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/task/{}", self.pid, self.tid))
    }

    /// The file `path` names as this thread sees it: resolved inside its
    /// root (a relative path from its cwd), symlinks included, never
    /// escaping to the host's files.
    fn file_id(self, path: &Path) -> Option<FileId> {
        let base = self
            .proc_dir()
            .join(if path.is_absolute() { "root" } else { "cwd" });
        let (dev, ino) = View::at(&base).ok()?.file_id(path)?;
        Some(FileId::from_stat(dev, ino))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_that_closed_keeps_its_identity_for_late_records() {
        use std::os::{fd::AsRawFd, unix::net::UnixListener};
        let dir = std::env::temp_dir().join(format!("droptrace-closed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let socket = UnixListener::bind(&path).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).unwrap();
        let inode = super::super::owners::socket_inode(&link).unwrap();
        let pid = std::process::id();
        let mut raw = [0u8; tracer_common::UNIX_PATH_MAX];
        let bytes = path.as_os_str().as_encoded_bytes();
        raw[..bytes.len()].copy_from_slice(bytes);
        let mut registry = Registry::default();
        registry.on_listen(&ListenRecord {
            kind: tracer_common::RecordKind::Listen as u32,
            pid,
            tid: pid,
            fd: socket.as_raw_fd(),
            ktime_ns: 0,
            requested_backlog: 100,
            effective_backlog: 100,
            somaxconn: 4096,
            netns: 7,
            sock_inode: inode,
            family: tracer_common::AF_UNIX,
            path_len: bytes.len() as u16,
            comm: [0; 16],
            path: raw,
            _pad: [0; 8],
        });
        let client = Task {
            pid,
            tid: pid,
            netns: 7,
        };
        let address = UnixAddress::Path(path.clone());
        assert_eq!(registry.lookup(client, &address), Some(inode));
        // The owner exits: the socket table no longer lists it.
        drop(socket);
        registry.retire_closed(7, &HashSet::new());
        assert!(registry.listeners.is_empty());
        assert_eq!(
            registry.lookup(client, &address),
            Some(inode),
            "by its file"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            registry.lookup(client, &address),
            Some(inode),
            "by its path"
        );
        let found = registry.find(client, &address).unwrap();
        assert_eq!((found.backlog, found.requested), (100, Some(100)));
        let other = UnixAddress::Path(dir.join("other.sock"));
        assert_eq!(registry.lookup(client, &other), None);
        assert_eq!(registry.held(), (0, 1, 1));
        // CLOSED_KEPT later it is forgotten, index entries included.
        registry.closed.get_mut(&inode).unwrap().0 -= CLOSED_KEPT;
        registry.retire_closed(7, &HashSet::new());
        assert_eq!(registry.held(), (0, 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_are_seen_through_the_process_root() {
        let me = std::process::id();
        let task = Task {
            pid: me,
            tid: me,
            netns: 1,
        };
        let file = std::env::temp_dir().join(format!("droptrace-task-{me}"));
        std::fs::write(&file, "").unwrap();
        assert_eq!(task.file_id(&file), FileId::of(&file));
        assert!(task.file_id(&file).is_some());
        std::fs::remove_file(&file).unwrap();
        assert_eq!(task.file_id(&file), None);
    }
}
