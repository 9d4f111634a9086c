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

/// Tag at the start of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// [`ConnectFailure`]
    ConnectFailure = 1,
    /// [`ListenRecord`]
    Listen = 2,
}

impl RecordKind {
    pub fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::ConnectFailure),
            2 => Some(Self::Listen),
            _ => None,
        }
    }
}

/// A `connect()` that failed with an errno droptrace reports (only failures
/// cross to userspace). Filled at `sys_exit_connect` from what
/// `sys_enter_connect` saw.
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
    /// Bytes of `path` that are meaningful (abstract names may hold NULs).
    pub path_len: u16,
    /// The caller's network namespace (inode), where abstract names live.
    pub netns: u32,
    pub comm: [u8; COMM_LEN],
    /// `sun_path` as the caller passed it: a leading NUL means abstract.
    pub path: [u8; UNIX_PATH_MAX],
    pub _pad: [u8; 4],
}

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
}

// Both records are exchanged byte for byte: keep them free of implicit padding.
const _: () = assert!(core::mem::size_of::<ConnectFailure>() == 160);
const _: () = assert!(core::mem::size_of::<ListenRecord>() == 184);

/// Indexes of the `LOST` per-CPU array: records userspace never saw, by cause.
/// The ring buffer was full.
pub const LOST_RINGBUF_FULL: u32 = 0;
/// A syscall could not be followed from entry to exit (pending map full).
pub const LOST_PENDING_FULL: u32 = 1;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers and byte arrays, no padding holes
    // (explicit `_pad` fields), valid for any bit pattern.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ConnectFailure {}
    unsafe impl aya::Pod for super::ListenRecord {}
}
