//! The kernel's socket table through NETLINK_SOCK_DIAG, per network
//! namespace (what `ss -xl` shows): listeners with their queue and backlog.
use std::{
    collections::HashMap,
    fs::{self, File},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags as InetStates},
    unix::{nlas::Nla, ShowFlags, StateFlags, UnixRequest},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use super::address::UnixAddress;
use crate::contract::ListenCounters;

/// The file a bound socket lives at, as (major, minor, inode): the same
/// for every spelling of its path (relative, through symlinks, other mount
/// namespaces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).ok()?;
        Some(Self::from_stat(meta.dev(), meta.ino()))
    }

    /// From stat's st_dev and st_ino.
    pub fn from_stat(dev: u64, ino: u64) -> Self {
        Self {
            major: libc::major(dev),
            minor: libc::minor(dev),
            ino,
        }
    }

    /// From unix_diag's udiag_vfs_dev, which is the kernel's internal dev_t
    /// (MAJOR << 20 | MINOR, see include/linux/kdev_t.h), not stat's encoding.
    fn from_kernel_dev(dev: u32, ino: u32) -> Self {
        Self {
            major: dev >> 20,
            minor: dev & 0xfffff,
            ino: ino.into(),
        }
    }
}

/// One listening UNIX socket as sock_diag reports it.
#[derive(Clone, Debug)]
pub struct UnixListenerEntry {
    pub inode: u64,
    pub address: Option<UnixAddress>,
    pub file: Option<FileId>,
    /// Connections waiting to be accepted.
    pub queue: u32,
    /// sk_max_ack_backlog: the effective backlog.
    pub backlog: u32,
}

/// One listening TCP socket as sock_diag reports it.
#[derive(Clone, Debug)]
pub struct TcpListenerEntry {
    pub inode: u64,
    pub address: (std::net::IpAddr, u16),
    /// Connections waiting to be accepted.
    pub queue: u32,
    /// sk_max_ack_backlog: the effective backlog.
    pub backlog: u32,
}

/// A network namespace: its inode and something to setns() into.
#[derive(Clone, Debug)]
pub struct Netns {
    pub inode: u32,
    pub handle: PathBuf,
}

/// Network namespaces in use: every process's, and `ip netns` ones.
pub fn namespaces() -> Vec<Netns> {
    let mut found: HashMap<u32, PathBuf> = HashMap::new();
    let mut handles: Vec<PathBuf> = super::process::all_pids()
        .into_iter()
        .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        .collect();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        handles.extend(entries.filter_map(|e| Some(e.ok()?.path())));
    }
    for handle in handles {
        if let Some(inode) = netns_inode(&handle) {
            found.entry(inode).or_insert(handle);
        }
    }
    found
        .into_iter()
        .map(|(inode, handle)| Netns { inode, handle })
        .collect()
}

/// The inode of the network namespace behind /proc/PID/ns/net or a bind mount.
pub fn netns_inode(handle: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(handle).ok().map(|m| m.ino() as u32)
}

/// A sock_diag socket bound to one network namespace, that namespace's
/// net.core.somaxconn, and its /proc/net/netstat.
pub struct NetnsView {
    socket: Socket,
    pub somaxconn: Option<u32>,
    /// Opened inside the namespace: reads keep showing that namespace.
    netstat: Option<File>,
    port_range: Option<File>,
}

impl NetnsView {
    /// Open the netlink socket inside `netns`, read somaxconn there. A
    /// socket stays in the namespace it was created in, so it can be used
    /// from any thread.
    pub fn open(netns: &Netns) -> Result<Self> {
        in_netns(netns, Self::open_here)?
    }

    /// The same, in the namespace of the calling thread (inside `in_netns`).
    pub fn open_here() -> Result<Self> {
        let mut socket =
            Socket::new(NETLINK_SOCK_DIAG).context("cannot open a NETLINK_SOCK_DIAG socket")?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let somaxconn = fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let netstat = File::open("/proc/thread-self/net/netstat").ok();
        let port_range = File::open("/proc/sys/net/ipv4/ip_local_port_range").ok();
        Ok(Self {
            socket,
            somaxconn,
            netstat,
            port_range,
        })
    }

    /// The namespace's listen-queue counters now (what `nstat` shows).
    pub fn counters(&self) -> Option<ListenCounters> {
        let text = read_again(self.netstat.as_ref()?)?;
        let value = |name| netstat_value(&text, "TcpExt", name).unwrap_or(0);
        Some(ListenCounters {
            listen_overflows: value("ListenOverflows"),
            listen_drops: value("ListenDrops"),
            req_q_full_drop: value("TCPReqQFullDrop"),
            req_q_full_do_cookies: value("TCPReqQFullDoCookies"),
        })
    }

    /// The namespace's TcpExtListenOverflows counter now (what `nstat` shows).
    pub fn listen_overflows(&self) -> Option<u64> {
        netstat_value(
            &read_again(self.netstat.as_ref()?)?,
            "TcpExt",
            "ListenOverflows",
        )
    }

    /// The namespace's net.ipv4.ip_local_port_range now: (low, high).
    pub fn ip_local_port_range(&self) -> Option<(u32, u32)> {
        let text = read_again(self.port_range.as_ref()?)?;
        let mut numbers = text.split_whitespace().map(|n| n.parse().ok());
        Some((numbers.next()??, numbers.next()??))
    }

    /// Every listening UNIX socket of this namespace.
    pub fn unix_listeners(&self) -> Result<Vec<UnixListenerEntry>> {
        let request = UnixRequest {
            state_flags: StateFlags::LISTEN,
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::VFS | ShowFlags::RQLEN,
            cookie: [0xff; 8],
        };
        let mut listeners = Vec::new();
        self.dump(
            SockDiagMessage::UnixRequest(request),
            "unix_diag",
            |message| {
                if let SockDiagMessage::UnixResponse(response) = message {
                    listeners.push(entry_from(&response));
                }
            },
        )?;
        Ok(listeners)
    }

    /// Every listening TCP socket (IPv4 and IPv6) of this namespace.
    pub fn tcp_listeners(&self) -> Result<Vec<TcpListenerEntry>> {
        let mut listeners = Vec::new();
        for (family, socket_id) in [
            (libc::AF_INET as u8, SocketId::new_v4()),
            (libc::AF_INET6 as u8, SocketId::new_v6()),
        ] {
            let request = InetRequest {
                family,
                protocol: libc::IPPROTO_TCP as u8,
                extensions: ExtensionFlags::empty(),
                states: InetStates::LISTEN,
                socket_id,
            };
            self.dump(
                SockDiagMessage::InetRequest(request),
                "inet_diag",
                |message| {
                    if let SockDiagMessage::InetResponse(response) = message {
                        let header = &response.header;
                        listeners.push(TcpListenerEntry {
                            inode: header.inode.into(),
                            address: (
                                header.socket_id.source_address,
                                header.socket_id.source_port,
                            ),
                            // For a listener, inet_diag reports (accept queue
                            // length, max backlog), as `ss -lt` shows them.
                            queue: header.recv_queue,
                            backlog: header.send_queue,
                        });
                    }
                },
            )?;
        }
        Ok(listeners)
    }

    /// Send one dump request and hand every reply message to `each`.
    /// `module` is the kernel module that answers it (ENOENT without it).
    fn dump(
        &self,
        request: SockDiagMessage,
        module: &str,
        mut each: impl FnMut(SockDiagMessage),
    ) -> Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .context("sock_diag request failed")?;

        let mut receive = vec![0u8; 64 * 1024];
        loop {
            let size = self
                .socket
                .recv(&mut &mut receive[..], 0)
                .context("sock_diag reply failed")?;
            let mut offset = 0;
            while offset < size {
                let message =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                        .map_err(|err| anyhow!("malformed sock_diag reply: {err}"))?;
                let length = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(err) => {
                        bail!(diag_error(err.code.map_or(0, |c| -c.get()), module))
                    }
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

/// A sock_diag error in words: ENOENT means the module that answers the
/// request is not loaded (unix_diag and inet_diag are modules on Debian).
fn diag_error(errno: i32, module: &str) -> String {
    if errno == libc::ENOENT {
        format!("this kernel has no {module} (load it: modprobe {module})")
    } else {
        format!(
            "sock_diag answered: {}",
            std::io::Error::from_raw_os_error(errno)
        )
    }
}

/// Run `work` on a short-lived thread inside `netns` (setns is per thread):
/// /proc/sys/net files and sockets opened there belong to that namespace.
pub fn in_netns<T: Send + 'static>(
    netns: &Netns,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let handle = netns.handle.clone();
    std::thread::spawn(move || -> Result<T> {
        let ns =
            File::open(&handle).with_context(|| format!("cannot open {}", handle.display()))?;
        // SAFETY: a valid fd and a namespace type; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "cannot enter network namespace {}: {}",
                handle.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(work())
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// The whole of a /proc file kept open, read again from its start.
fn read_again(mut file: &File) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A counter from /proc/net/netstat: pairs of lines, "Group: names..."
/// then "Group: values...".
pub fn netstat_value(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let position = names.split_whitespace().position(|n| n == name);
        if let Some(position) = position {
            return values.split_whitespace().nth(position)?.parse().ok();
        }
    }
    None
}

fn entry_from(response: &netlink_packet_sock_diag::unix::UnixResponse) -> UnixListenerEntry {
    let mut entry = UnixListenerEntry {
        inode: response.header.inode.into(),
        address: None,
        file: None,
        queue: 0,
        backlog: 0,
    };
    for nla in &response.nlas {
        match nla {
            Nla::Name(name) => {
                use netlink_packet_sock_diag::unix::nlas::UnixDiagName;
                entry.address = Some(match name {
                    UnixDiagName::Pathname(path) => UnixAddress::Path(path.into()),
                    UnixDiagName::Abstract(name) => UnixAddress::Abstract(name.clone()),
                });
            }
            Nla::Vfs(vfs) => {
                // The crate keeps the fields private; its wire form is
                // struct unix_diag_vfs { u32 ino; u32 dev; }.
                let mut raw = [0u8; 8];
                vfs.emit(&mut raw);
                let ino = u32::from_ne_bytes(raw[..4].try_into().unwrap());
                let dev = u32::from_ne_bytes(raw[4..].try_into().unwrap());
                entry.file = Some(FileId::from_kernel_dev(dev, ino));
            }
            // For a listener, unix_diag reports (queue length, max backlog).
            Nla::ReceiveQueueLength(queue, backlog) => {
                entry.queue = *queue;
                entry.backlog = *backlog;
            }
            _ => {}
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_diag_module_is_named_with_its_fix() {
        assert_eq!(
            diag_error(libc::ENOENT, "unix_diag"),
            "this kernel has no unix_diag (load it: modprobe unix_diag)"
        );
        assert!(diag_error(libc::EACCES, "inet_diag").contains("ermission denied"));
    }

    #[test]
    fn netstat_counters_are_found_by_group_and_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 13597 13600\nIpExt: InNoRoutes ListenOverflows\nIpExt: 1 99\n";
        assert_eq!(
            netstat_value(text, "TcpExt", "ListenOverflows"),
            Some(13597)
        );
        assert_eq!(netstat_value(text, "TcpExt", "ListenDrops"), Some(13600));
        assert_eq!(netstat_value(text, "IpExt", "ListenOverflows"), Some(99));
        assert_eq!(netstat_value(text, "TcpExt", "Nope"), None);
        assert_eq!(netstat_value("garbage", "TcpExt", "ListenOverflows"), None);
    }
    use std::os::unix::net::UnixListener;

    /// Needs no root: our own namespace's table shows a listener we made.
    #[test]
    fn sees_our_own_listener_with_its_file_and_backlog() {
        let dir = std::env::temp_dir().join(format!("droptrace-diag-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        // listen() again on a listening socket sets a new backlog.
        assert_eq!(
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 7) },
            0
        );
        let own = Netns {
            inode: 0,
            handle: "/proc/self/ns/net".into(),
        };
        let view = match NetnsView::open(&own) {
            Ok(view) => view,
            Err(err) => {
                eprintln!("SKIPPED: cannot open sock_diag here: {err:#}");
                return;
            }
        };
        let entries = view.unix_listeners().unwrap();
        let ours = entries
            .iter()
            .find(|e| e.address == Some(UnixAddress::Path(path.clone())))
            .unwrap();
        assert_eq!(ours.file, FileId::of(&path));
        assert_eq!(ours.backlog, 7);
        assert_eq!(ours.queue, 0);
        drop(listener);
        fs::remove_dir_all(&dir).unwrap();
    }
}
