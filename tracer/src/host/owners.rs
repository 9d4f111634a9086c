//! Which process owns a socket: found in /proc/*/fd, as `ss -p` does.
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
    time::{Duration, Instant},
};

use std::sync::Arc;

use super::{
    configs,
    process::{self, Process},
};
use crate::config::{nginx::NginxConfig, uwsgi::UwsgiConfig, Setting};

/// A pass over every process's fds costs milliseconds; drops come in
/// storms. Owners are looked for at most this often.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The process that owns a listener, and its configuration.
#[derive(Clone, Debug)]
pub struct Owner {
    pub process: Process,
    /// When the owner is uWSGI.
    pub uwsgi: Option<UwsgiConfig>,
    /// When the owner is nginx.
    pub nginx: Option<Arc<NginxConfig>>,
}

impl Owner {
    pub fn of(process: Process) -> Self {
        let uwsgi = process.role.is_uwsgi().then(|| configs::uwsgi_of(&process));
        let nginx = configs::nginx_of(&process);
        Self {
            process,
            uwsgi,
            nginx,
        }
    }

    /// uWSGI's configured `listen`, when the owner is uWSGI.
    pub fn uwsgi_listen(&self) -> Option<Setting> {
        self.uwsgi.as_ref().map(|c| c.listen.clone())
    }

    /// "uwsgi[4242]"
    pub fn label(&self) -> String {
        format!("{}[{}]", self.process.comm, self.process.pid)
    }
}

/// A listener whose owner can be filled in.
pub trait Owned {
    fn inode(&self) -> u64;
    fn owner_slot(&mut self) -> &mut Option<Owner>;
}

/// Rate-limited owner lookups for a table of listeners.
#[derive(Default)]
pub struct OwnerScans {
    last: Option<Instant>,
}

impl OwnerScans {
    /// Give every listener without an owner the one /proc shows, unless the
    /// last pass was less than SCAN_INTERVAL ago.
    pub fn fill<L: Owned>(&mut self, listeners: &mut HashMap<u64, L>) {
        self.fill_from(listeners, |wanted| {
            owners_of(wanted)
                .into_iter()
                .map(|(inode, process)| (inode, Owner::of(process)))
                .collect()
        })
    }

    /// The same, with owners found by `owners`.
    pub fn fill_from<L: Owned>(
        &mut self,
        listeners: &mut HashMap<u64, L>,
        owners: impl FnOnce(&HashSet<u64>) -> HashMap<u64, Owner>,
    ) {
        if self.last.is_some_and(|t| t.elapsed() < SCAN_INTERVAL) {
            return;
        }
        let wanted: HashSet<u64> = listeners
            .values_mut()
            .filter_map(|l| l.owner_slot().is_none().then(|| l.inode()))
            .collect();
        if wanted.is_empty() {
            return;
        }
        self.last = Some(Instant::now());
        for (inode, owner) in owners(&wanted) {
            if let Some(listener) = listeners.get_mut(&inode) {
                *listener.owner_slot() = Some(owner);
            }
        }
    }
}

/// The owner of each socket inode in `wanted` that some process holds, in
/// one pass over every process's fds. Of the processes holding a socket the
/// owner is the one whose parent does not hold it (a master, not the
/// workers it forked).
pub fn owners_of(wanted: &HashSet<u64>) -> HashMap<u64, Process> {
    if wanted.is_empty() {
        return HashMap::new();
    }
    let mut holders: HashMap<u64, Vec<u32>> = HashMap::new();
    for pid in process::all_pids() {
        // Tens of thousands of processes take seconds: not after Ctrl-C.
        if crate::config::files::gave_up() {
            break;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for (n, fd) in fds.flatten().enumerate() {
            // One process may hold a million.
            if n % 4096 == 4095 && crate::config::files::gave_up() {
                break;
            }
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            match socket_inode(&target) {
                Some(inode) if wanted.contains(&inode) => {
                    holders.entry(inode).or_default().push(pid)
                }
                _ => {}
            }
        }
    }
    holders
        .into_iter()
        .filter_map(|(inode, pids)| Some((inode, process::inspect(topmost(&pids)?)?)))
        .collect()
}

/// "socket:[12345]" -> 12345
pub fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The holder whose parent does not hold the socket; the lowest pid on a tie.
fn topmost(pids: &[u32]) -> Option<u32> {
    let mut roots: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&pid| !process::parent_of(pid).is_some_and(|parent| pids.contains(&parent)))
        .collect();
    roots.sort_unstable();
    roots.first().or(pids.iter().min()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_parse() {
        assert_eq!(socket_inode(Path::new("socket:[4242]")), Some(4242));
        assert_eq!(socket_inode(Path::new("pipe:[4242]")), None);
    }

    #[test]
    fn the_owner_is_the_process_whose_parent_does_not_hold_the_socket() {
        let me = std::process::id();
        let parent = process::parent_of(me).unwrap();
        assert_eq!(topmost(&[me, parent]), Some(parent));
        assert_eq!(topmost(&[me]), Some(me));
    }

    #[test]
    fn finds_the_owner_of_our_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = socket_inode(&link).unwrap();
        let owners = owners_of(&HashSet::from([inode]));
        assert_eq!(owners[&inode].pid, std::process::id());
    }
}
