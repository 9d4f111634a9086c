//! Records shared by the eBPF programs (`tracer-ebpf`) and userspace (`tracer`).
//!
//! Every record that crosses the ring buffer starts with a [`RecordKind`] tag
//! (a `u32`), so userspace can tell them apart before decoding the rest.
//! Everything here is `#[repr(C)]`, plain old data, and nothing else.
#![no_std]

/// Longest `sun_path` of a `sockaddr_un` (`UNIX_PATH_MAX`).
pub const UNIX_PATH_MAX: usize = 108;
/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Slots of the `FAST_PATHS` array: set to 1 by userspace when a family's
/// faster hook attached, so the syscall programs it shares with other
/// families leave that family's events to it (counted once).
pub const FAST_PATH_UNIX_CONNECT: u32 = 0;
/// EADDRNOTAVAIL from connect() to IPv4/IPv6 (fexit on inet_hash_connect).
pub const FAST_PATH_INET_CONNECT: u32 = 1;
/// EMFILE/ENFILE (fexit on __x64_sys_{accept,accept4,socket,open,openat},
/// or their exit tracepoints: tp_btf/sys_exit leaves them alone).
pub const FAST_PATH_FD_LIMITS: u32 = 2;
/// listen() (fexit on __sys_listen, or sys_exit_listen with the caller's
/// registers: tp_btf/sys_exit leaves it alone).
pub const FAST_PATH_LISTEN: u32 = 3;
/// Failed connect() calls seen by sys_exit_connect with the caller's
/// registers: tp_btf/sys_exit leaves them alone.
pub const FAST_PATH_CONNECT_EXIT: u32 = 4;
pub const FAST_PATHS: u32 = 5;

/// Tag at the start of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// [`ConnectFailure`]
    ConnectFailure = 1,
    /// [`ListenRecord`]
    Listen = 2,
    /// [`TcpOverflowRecord`]
    TcpOverflow = 3,
    /// [`FdLimitRecord`]
    FdLimit = 4,
    /// [`NoConnectionRecord`]
    NoConnection = 5,
}

impl RecordKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::ConnectFailure),
            2 => Some(Self::Listen),
            3 => Some(Self::TcpOverflow),
            4 => Some(Self::FdLimit),
            5 => Some(Self::NoConnection),
            _ => None,
        }
    }
}

/// A `connect()` that failed with an errno droptrace reports (only failures
/// cross to userspace): EAGAIN to a UNIX socket (the listener's queue is
/// full), EADDRNOTAVAIL to an IPv4/IPv6 address (no ephemeral port left).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectFailure {
    pub kind: u32,
    /// Thread-group id (the "pid" users know) and thread id.
    pub pid: u32,
    pub tid: u32,
    /// Negative errno returned by connect(), e.g. -11 (EAGAIN).
    pub ret: i32,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) when connect() returned.
    pub ktime_ns: u64,
    pub family: u16,
    /// Bytes of `addr` that are meaningful (abstract names may hold NULs).
    pub addr_len: u16,
    /// The caller's network namespace (inode), where abstract names live.
    pub netns: u32,
    pub comm: [u8; COMM_LEN],
    /// The caller's sockaddr after its 2-byte family: `sun_path` for
    /// AF_UNIX (a leading NUL means abstract), `sin_port` + `sin_addr` for
    /// AF_INET, `sin6_port` + `sin6_flowinfo` + `sin6_addr` for AF_INET6.
    pub addr: [u8; UNIX_PATH_MAX],
    pub _pad: [u8; 4],
}

/// What a refused connect's explanation depends on: the key of its exact
/// per-CPU count (`CONNECT_FAILURES`). The record adds who and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectKey {
    pub pid: u32,
    /// 0 for an absolute UNIX path, which no network namespace changes.
    pub netns: u32,
    pub ret: i32,
    pub addr_len: u16,
    /// `family` and `addr` are the caller's sockaddr as it lies in memory
    /// (read in one copy); bytes past `addr_len` are zero.
    pub family: u16,
    /// As [`ConnectFailure::addr`].
    pub addr: [u8; UNIX_PATH_MAX],
}

impl ConnectFailure {
    /// The sampled record of a count: `key` plus who and when.
    #[inline(always)]
    pub fn new(key: &ConnectKey, tid: u32, ktime_ns: u64, comm: [u8; COMM_LEN]) -> Self {
        Self {
            kind: RecordKind::ConnectFailure as u32,
            pid: key.pid,
            tid,
            ret: key.ret,
            ktime_ns,
            family: key.family,
            addr_len: key.addr_len,
            netns: key.netns,
            comm,
            addr: key.addr,
            _pad: [0; 4],
        }
    }

    pub fn key(&self) -> ConnectKey {
        ConnectKey {
            pid: self.pid,
            netns: self.netns,
            ret: self.ret,
            family: self.family,
            addr_len: self.addr_len,
            addr: self.addr,
        }
    }
}

/// The syscalls that need a new file descriptor and are watched for EMFILE
/// and ENFILE (`FdLimitRecord::syscall`).
pub mod fd_syscall {
    pub const ACCEPT: u32 = 1;
    pub const ACCEPT4: u32 = 2;
    pub const SOCKET: u32 = 3;
    pub const OPEN: u32 = 4;
    pub const OPENAT: u32 = 5;

    pub fn name(syscall: u32) -> &'static str {
        match syscall {
            ACCEPT => "accept",
            ACCEPT4 => "accept4",
            SOCKET => "socket",
            OPEN => "open",
            OPENAT => "openat",
            _ => "unknown",
        }
    }
}

/// A syscall that needed a new file descriptor and failed with EMFILE (the
/// process's RLIMIT_NOFILE was reached) or ENFILE (fs.file-max).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FdLimitRecord {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// -24 (EMFILE) or -23 (ENFILE).
    pub ret: i32,
    pub ktime_ns: u64,
    /// One of [`fd_syscall`].
    pub syscall: u32,
    pub netns: u32,
    /// RLIMIT_NOFILE of the process when the call failed.
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub comm: [u8; COMM_LEN],
}

/// What an open-file limit hit's explanation depends on: the key of its
/// exact per-CPU count (`FD_LIMIT_HITS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdLimitKey {
    pub pid: u32,
    pub ret: i32,
    pub syscall: u32,
    pub netns: u32,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

impl FdLimitRecord {
    /// The sampled record of a count: `key` plus who and when.
    #[inline(always)]
    pub fn new(key: &FdLimitKey, tid: u32, ktime_ns: u64, comm: [u8; COMM_LEN]) -> Self {
        Self {
            kind: RecordKind::FdLimit as u32,
            pid: key.pid,
            tid,
            ret: key.ret,
            ktime_ns,
            syscall: key.syscall,
            netns: key.netns,
            nofile_soft: key.nofile_soft,
            nofile_hard: key.nofile_hard,
            comm,
        }
    }

    pub fn key(&self) -> FdLimitKey {
        FdLimitKey {
            pid: self.pid,
            ret: self.ret,
            syscall: self.syscall,
            netns: self.netns,
            nofile_soft: self.nofile_soft,
            nofile_hard: self.nofile_hard,
        }
    }
}

/// nginx's `ngx_get_connection()` returned NULL: a worker had no free
/// connection slot left (`worker_connections are not enough`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NoConnectionRecord {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub ktime_ns: u64,
    pub comm: [u8; COMM_LEN],
}

impl NoConnectionRecord {
    /// The sampled record of a count (keyed by the worker's pid alone).
    #[inline(always)]
    pub fn new(pid: u32, tid: u32, ktime_ns: u64, comm: [u8; COMM_LEN]) -> Self {
        Self {
            kind: RecordKind::NoConnection as u32,
            pid,
            tid,
            _pad: 0,
            ktime_ns,
            comm,
        }
    }
}

/// The value of an exact per-CPU count: the drops this CPU saw under the
/// key, and when it last sent a sampled record of them (the first drop is
/// sampled at once, then at most one per [`SAMPLE_INTERVAL_NS`], in a
/// storm). Counts never depend on the ring buffer; only the details are
/// sampled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub count: u64,
    pub sampled_ns: u64,
}

/// At most one sampled record per key, per CPU, per this interval.
pub const SAMPLE_INTERVAL_NS: u64 = 250_000_000;

/// A successful `listen()`: what the process asked for, and what the kernel
/// made of it, read from the socket itself right after the call returned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenRecord {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    pub ktime_ns: u64,
    /// The backlog argument of listen().
    pub requested_backlog: u32,
    /// `sk->sk_max_ack_backlog`: the backlog the kernel enforces.
    pub effective_backlog: u32,
    /// `net->core.sysctl_somaxconn` of the socket's network namespace.
    pub somaxconn: u32,
    /// `net->ns.inum`: the network namespace inode, as in /proc/PID/ns/net.
    pub netns: u32,
    /// Inode of the socket (as in /proc/PID/fd -> socket:[INODE]).
    pub sock_inode: u64,
    /// `sk->__sk_common.skc_family`.
    pub family: u16,
    /// Meaningful bytes of `path` (UNIX sockets only).
    pub path_len: u16,
    pub comm: [u8; COMM_LEN],
    /// Bound `sun_path` of a UNIX listener; a leading NUL means abstract.
    pub path: [u8; UNIX_PATH_MAX],
    pub _pad: [u8; 8],
}

/// When a TCP listener dropped a connection attempt (`TcpOverflowKey::stage`).
pub mod stage {
    /// SYN consumed in tcp_conn_request: accept queue full (sk_acceptq_is_full).
    pub const SYN: u32 = 1;
    /// Final ACK dropped: accept queue full when the child socket was to be
    /// created (tcp_v4_syn_recv_sock, reason TCP_LISTEN_OVERFLOW).
    pub const ACK: u32 = 2;
    /// Final ACK of a SYN cookie dropped: accept queue full
    /// (cookie_v4_check, reason NO_SOCKET with a full listener).
    pub const ACK_SYNCOOKIE: u32 = 3;
    /// SYN dropped with syncookies off because fewer than a quarter of
    /// tcp_max_syn_backlog was left in the SYN queue (tcp_conn_request).
    pub const SYN_QUEUE: u32 = 4;
    /// SYN dropped with syncookies off because the SYN queue already held
    /// more than the listener's backlog (inet_csk_reqsk_queue_is_full).
    pub const SYN_QUEUE_BACKLOG: u32 = 5;
}

/// Per-CPU exact drop counters of TCP listeners, keyed by listener and stage.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpOverflowKey {
    /// Inode of the listening socket.
    pub inode: u64,
    pub stage: u32,
    pub _pad: u32,
}

/// A sampled TCP listener drop with everything needed to explain it. The
/// exact counts are in the `TCP_OVERFLOWS` counters, not in these records.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpOverflowRecord {
    pub kind: u32,
    pub stage: u32,
    pub ktime_ns: u64,
    pub inode: u64,
    pub netns: u32,
    pub family: u16,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad0: u16,
    /// sk_max_ack_backlog and sk_ack_backlog of the listener.
    pub backlog: u32,
    pub queue: u32,
    /// The namespace's net.core.somaxconn.
    pub somaxconn: u32,
    /// The namespace's tcp_max_syn_backlog.
    pub max_syn_backlog: u32,
    /// IPv4 addresses use the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// The local process whose connect() sent the packet (0: not local, or
    /// it connected before droptrace started). Its name is read in
    /// userspace (why: tracer-ebpf's tcp_listen/clients.rs).
    pub client_pid: u32,
}

/// `enum skb_drop_reason` values of the running kernel, read from BTF
/// (they differ between kernels). `u32::MAX` when the kernel lacks one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropReasons {
    pub tcp_listen_overflow: u32,
    pub no_socket: u32,
}

/// Byte offsets of the kernel struct fields the programs read, resolved from
/// /sys/kernel/btf/vmlinux by userspace at load time and handed to the
/// programs as a read-only global. Nothing is hard-coded: a kernel whose
/// layout differs gets its own offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// task_struct.files
    pub task_files: u32,
    /// task_struct.nsproxy
    pub task_nsproxy: u32,
    /// task_struct.signal
    pub task_signal: u32,
    /// signal_struct.rlim (a `struct rlimit[RLIM_NLIMITS]`)
    pub signal_rlim: u32,
    /// nsproxy.net_ns
    pub nsproxy_net_ns: u32,
    /// files_struct.fdt
    pub files_fdt: u32,
    /// fdtable.fd
    pub fdtable_fd: u32,
    /// fdtable.max_fds
    pub fdtable_max_fds: u32,
    /// file.private_data (a `struct socket *` for socket files)
    pub file_private_data: u32,
    /// file.f_inode
    pub file_inode: u32,
    /// inode.i_ino
    pub inode_ino: u32,
    /// socket.sk
    pub socket_sk: u32,
    /// sock.__sk_common.skc_family
    pub sock_family: u32,
    /// sock.__sk_common.skc_net.net
    pub sock_net: u32,
    /// sock.sk_max_ack_backlog
    pub sock_max_ack_backlog: u32,
    /// net.ns.inum
    pub net_ns_inum: u32,
    /// net.core.sysctl_somaxconn
    pub net_somaxconn: u32,
    /// unix_sock.addr
    pub unix_sock_addr: u32,
    /// unix_address.len
    pub unix_address_len: u32,
    /// unix_address.name (a `struct sockaddr_un[]`)
    pub unix_address_name: u32,
    /// sock.__sk_common.skc_num (local port, host order)
    pub sock_num: u32,
    /// sock.__sk_common.skc_rcv_saddr
    pub sock_rcv_saddr: u32,
    /// sock.__sk_common.skc_v6_rcv_saddr
    pub sock_v6_rcv_saddr: u32,
    /// sock.__sk_common.skc_daddr, skc_dport, skc_v6_daddr: the
    /// destination of a connecting socket (network byte order)
    pub sock_daddr: u32,
    pub sock_dport: u32,
    pub sock_v6_daddr: u32,
    /// sock.sk_ack_backlog
    pub sock_ack_backlog: u32,
    /// sock.sk_socket
    pub sock_socket: u32,
    /// socket.file
    pub socket_file: u32,
    /// inet_connection_sock.icsk_accept_queue.qlen (the SYN queue length)
    pub icsk_syn_qlen: u32,
    /// net.ipv4.sysctl_max_syn_backlog
    pub net_max_syn_backlog: u32,
    /// net.ipv4.sysctl_tcp_syncookies (u8)
    pub net_syncookies: u32,
    /// bpf_array.pptrs (the per-CPU pointers of a per-CPU array map)
    pub bpf_array_pptrs: u32,
    /// net.mib.net_statistics (a per-CPU `struct linux_mib`)
    pub net_mib_statistics: u32,
    /// Indexes into linux_mib.mibs: LINUX_MIB_LISTENOVERFLOWS and
    /// LINUX_MIB_LISTENDROPS (TcpExtListenOverflows, TcpExtListenDrops).
    pub mib_listen_overflows: u32,
    pub mib_listen_drops: u32,
    /// sk_buff.head and sk_buff.network_header (a u16 offset from head)
    pub skb_head: u32,
    pub skb_network_header: u32,
    /// sock.sk_gso_type, and the bit SKB_GSO_TCPV6 that tcp_v6_connect
    /// sets in it once a route and a source address were found
    pub sock_gso_type: u32,
    pub gso_tcpv6: u32,
}

// Records are exchanged byte for byte: keep them free of implicit padding.
const _: () = assert!(core::mem::size_of::<ConnectFailure>() == 160);
const _: () = assert!(core::mem::size_of::<ListenRecord>() == 184);
const _: () = assert!(core::mem::size_of::<TcpOverflowRecord>() == 88);
const _: () = assert!(core::mem::size_of::<FdLimitRecord>() == 64);
const _: () = assert!(core::mem::size_of::<NoConnectionRecord>() == 40);
const _: () = assert!(core::mem::size_of::<ConnectKey>() == 124);
const _: () = assert!(
    core::mem::offset_of!(ConnectKey, addr) == core::mem::offset_of!(ConnectKey, family) + 2
);
const _: () = assert!(core::mem::size_of::<FdLimitKey>() == 32);

impl KernelOffsets {
    /// All zero: the placeholder the eBPF object is compiled with.
    pub const fn zeroed() -> Self {
        // SAFETY: plain integers; all-zero is a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Indexes of the `LOST` per-CPU array: records userspace never saw, by cause.
/// The ring buffer was full.
pub const LOST_RINGBUF_FULL: u32 = 0;
/// A syscall could not be followed from entry to exit (pending map full).
pub const LOST_PENDING_FULL: u32 = 1;
/// Drops that could not be counted: a counter map was full (TCP listeners,
/// or the keys of refused connects, open-file limits, nginx workers).
pub const LOST_COUNTERS_FULL: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers and byte arrays, no padding holes
    // (explicit `_pad` fields), valid for any bit pattern.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ConnectFailure {}
    unsafe impl aya::Pod for super::ListenRecord {}
    unsafe impl aya::Pod for super::FdLimitRecord {}
    unsafe impl aya::Pod for super::NoConnectionRecord {}
    unsafe impl aya::Pod for super::TcpOverflowKey {}
    unsafe impl aya::Pod for super::TcpOverflowRecord {}
    unsafe impl aya::Pod for super::DropReasons {}
    unsafe impl aya::Pod for super::ConnectKey {}
    unsafe impl aya::Pod for super::FdLimitKey {}
    unsafe impl aya::Pod for super::Counter {}
}
