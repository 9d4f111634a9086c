//! Refused connects: a full UNIX listener, or no ephemeral port left.
//!
//! - unix_stream_connect() returns -EAGAIN to a non-blocking caller when the
//!   listener's queue is full (`unix_recvq_full_lockless`: queue > backlog).
//!   Nothing else in the kernel records it: no drop reason, no counter. The
//!   listener is not reachable from here either, so we send the path the
//!   caller asked for and userspace finds the listener.
//! - inet_hash_connect() returns -EADDRNOTAVAIL when every port of
//!   net.ipv4.ip_local_port_range is in use towards that destination. An
//!   connect() from a socket bound to a port whose four-tuple is taken, or
//!   IPv6 to a destination no source address fits, returns it as well, no
//!   port sought: not counted (sought_a_port).
//!
//! Failures are counted in the kernel, per CPU, keyed by the caller's
//! process, namespace and address (`CONNECT_FAILURES`): exact in any storm.
//! Only a sample of them crosses to userspace with the caller's thread and
//! name. With sys_exit_connect and the caller's registers, or with
//! tp_btf/sys_exit, any other connect costs one comparison; with the
//! enter/exit tracepoints, one hash insert and delete. The
//! address is read from the caller's memory at exit, when the kernel has
//! just copied it (so it is resident), and only then. Where fexit is
//! allowed, from the kernel's own copy, with plain loads.
use core::mem::offset_of;

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user_buf},
    macros::map,
    maps::{HashMap, PerCpuHashMap},
    programs::{FExitContext, TracePointContext},
};
use tracer_common::{
    ConnectFailure, ConnectKey, Counter, AF_INET, AF_INET6, AF_UNIX, COMM_LEN,
    FAST_PATH_INET_CONNECT, FAST_PATH_UNIX_CONNECT, LOST_PENDING_FULL, UNIX_PATH_MAX,
};

use crate::{
    kernel::{current_netns, current_task_sock, load, offsets, read},
    maps::{count, count_lost, emit, fast_path},
};

pub const EAGAIN: i64 = 11;
pub const EADDRNOTAVAIL: i64 = 99;

/// The caller's sockaddr, kept by thread id from sys_enter_connect to
/// sys_exit_connect.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingConnect {
    uservaddr: u64,
    addrlen: u32,
    fd: i32,
}

#[map]
static PENDING_CONNECT: HashMap<u32, PendingConnect> = HashMap::with_max_entries(16384, 0);

/// Exact counts of refused connects (read by userspace).
#[map]
static CONNECT_FAILURES: PerCpuHashMap<ConnectKey, Counter> =
    PerCpuHashMap::with_max_entries(4096, 0);

// Offsets of the syscall tracepoint arguments (stable ABI, see
// /sys/kernel/tracing/events/syscalls/sys_enter_connect/format).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;

pub fn on_enter(ctx: &TracePointContext) {
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return;
    };
    let Ok(uservaddr) = (unsafe { ctx.read_at::<u64>(ARG1) }) else {
        return;
    };
    let Ok(addrlen) = (unsafe { ctx.read_at::<u64>(ARG2) }) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    if PENDING_CONNECT
        .insert(
            &tid,
            &PendingConnect {
                uservaddr,
                addrlen: addrlen as u32,
                fd: fd as i32,
            },
            0,
        )
        .is_err()
    {
        count_lost(LOST_PENDING_FULL);
    }
}

pub fn on_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(pending) = (unsafe { PENDING_CONNECT.get(&tid) }).copied() else {
        return;
    };
    let _ = PENDING_CONNECT.remove(&tid);
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(ARG0) }) else {
        return;
    };
    if ret != -EAGAIN && ret != -EADDRNOTAVAIL {
        return;
    }
    report_user_connect(
        pid_tgid,
        ret,
        pending.fd,
        pending.uservaddr,
        pending.addrlen,
    );
}

/// sys_exit_connect alone: the address comes from the caller's registers.
pub fn on_exit_with_regs(ctx: &TracePointContext) {
    let ret = crate::kernel::exit_ret(ctx);
    if ret != -EAGAIN && ret != -EADDRNOTAVAIL {
        return;
    }
    let (fd, uservaddr, addrlen) = crate::kernel::caller_args();
    on_failed(ret, fd, uservaddr, addrlen);
}

/// A connect() on `fd` that returned `ret` (EAGAIN or EADDRNOTAVAIL) for
/// the address at `uservaddr` in the caller's memory: report it unless a
/// fast hook does.
#[inline(always)]
fn report_user_connect(pid_tgid: u64, ret: i64, fd: i32, uservaddr: u64, addrlen: u32) {
    let wanted = |key: &ConnectKey| match key.family {
        // With fexit on __sys_connect_file attached, it reports these.
        AF_UNIX => ret == -EAGAIN && !fast_path(FAST_PATH_UNIX_CONNECT),
        // With fexit on inet_hash_connect attached, it reports these.
        AF_INET | AF_INET6 => {
            ret == -EADDRNOTAVAIL && !fast_path(FAST_PATH_INET_CONNECT) && sought_a_port(fd, key)
        }
        _ => false,
    };
    report(pid_tgid, ret as i32, uservaddr, addrlen, wanted);
}

/// Whether a connect() on `fd` refused with EADDRNOTAVAIL searched for a
/// local port (and found none). It is refused so as well
/// - when its socket was bound to a port before, and that port's
///   four-tuple with the destination is taken: the port stays bound after
///   the failure (SOCK_BINDPORT_LOCK), where a search leaves none;
/// - for IPv6, when no source address fits the destination (IPv6 off on
///   lo, and "localhost" is ::1): ip6_dst_lookup_flow fails before any
///   port is sought, for TCP and UDP alike. tcp_v6_connect sets
///   SKB_GSO_TCPV6 in sk_gso_type only once that lookup succeeded, and no
///   failure clears it; UDP never sets it. An IPv4 or IPv4-mapped
///   destination goes through tcp_v4_connect, which has no such failure.
/// A socket that cannot be read (closed by another thread meanwhile) is
/// counted: a refusal is never left out for want of its details.
#[inline(always)]
fn sought_a_port(fd: i32, key: &ConnectKey) -> bool {
    let Some(sock) = current_task_sock(fd) else {
        return true;
    };
    let off = offsets();
    if read::<u16>(sock.addr, off.sock_num).is_some_and(|port| port != 0) {
        return false;
    }
    // sockaddr_in6 after its family: port, flow label, address.
    let ipv4_mapped = key.addr[6..16] == [0; 10] && key.addr[16..18] == [0xff; 2];
    if key.family == AF_INET || ipv4_mapped {
        return true;
    }
    read::<u16>(sock.addr, off.sock_gso_type).is_none_or(|gso| u32::from(gso) & off.gso_tcpv6 != 0)
}

/// tp_btf/sys_exit saw connect(fd, uservaddr, addrlen) return `ret`
/// (EAGAIN or EADDRNOTAVAIL), its arguments from the caller's registers.
#[inline(always)]
pub fn on_failed(ret: i64, fd: u64, uservaddr: u64, addrlen: u64) {
    report_user_connect(
        bpf_get_current_pid_tgid(),
        ret,
        fd as i32,
        uservaddr,
        addrlen as u32,
    );
}

/// Count a refused connect to the sockaddr at `sockaddr` in the caller's
/// memory (`addrlen` bytes), read in one copy, if `wanted(its key)`.
/// Its details are sent when a sample is due.
#[inline(always)]
fn report(
    pid_tgid: u64,
    ret: i32,
    sockaddr: u64,
    addrlen: u32,
    wanted: impl Fn(&ConnectKey) -> bool,
) {
    let mut key = ConnectKey {
        pid: (pid_tgid >> 32) as u32,
        netns: 0,
        ret,
        addr_len: 0,
        family: 0,
        addr: [0; UNIX_PATH_MAX],
    };
    // Exactly the bytes given, family first: the rest stays zero (it is
    // part of the key).
    let len = (addrlen as usize).clamp(2, 2 + UNIX_PATH_MAX);
    // SAFETY: `family` and `addr` are adjacent (asserted in tracer-common);
    // the slice stays within `key`.
    let sockaddr_bytes = unsafe {
        let start = (&raw mut key)
            .cast::<u8>()
            .add(offset_of!(ConnectKey, family));
        core::slice::from_raw_parts_mut(start, len)
    };
    // SAFETY: the helper checks the address.
    let read = unsafe { bpf_probe_read_user_buf(sockaddr as *const u8, sockaddr_bytes) };
    if read.is_err() || !wanted(&key) {
        return;
    }
    key.addr_len = (len - 2) as u16;
    set_namespace(&mut key);
    count_and_sample(pid_tgid, &key);
}

/// Abstract UNIX names and IP addresses depend on the caller's network
/// namespace; an absolute path does not (its key keeps netns 0).
#[inline(always)]
fn set_namespace(key: &mut ConnectKey) {
    if key.family != AF_UNIX || key.addr[0] != b'/' {
        key.netns = current_netns().unwrap_or(0);
    }
}

/// Count a refused connect under `key`; send its details when due.
#[inline(always)]
fn count_and_sample(pid_tgid: u64, key: &ConnectKey) {
    if let Some(now) = count(&CONNECT_FAILURES, key) {
        let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        emit(&ConnectFailure::new(key, pid_tgid as u32, now, comm));
    }
}

/// fexit/inet_hash_connect(death_row, sk) -> int, and inet6_hash_connect:
/// the only place a TCP connect finds no local port left (EADDRNOTAVAIL),
/// run for TCP connects alone. A socket bound to a port before was not
/// searched a port for: its four-tuple is taken (the port is still bound
/// here; a failed search binds none). The destination is read from the
/// socket, laid out as the caller's sockaddr_in or sockaddr_in6 after its
/// family.
pub fn on_hash_connect_exit(ctx: &FExitContext, family: u16) {
    let ret: i32 = ctx.arg(2);
    if ret as i64 != -EADDRNOTAVAIL {
        return;
    }
    let sk: usize = ctx.arg(1);
    let off = offsets();
    if sk == 0 || load::<u16>(sk, off.sock_num) != 0 {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut key = ConnectKey {
        pid: (pid_tgid >> 32) as u32,
        netns: current_netns().unwrap_or(0),
        ret,
        addr_len: 0,
        family,
        addr: [0; UNIX_PATH_MAX],
    };
    let Some(port) = read::<[u8; 2]>(sk, off.sock_dport) else {
        return;
    };
    key.addr[..2].copy_from_slice(&port);
    if family == AF_INET6 {
        // sin6_port, sin6_flowinfo, sin6_addr, sin6_scope_id.
        let Some(addr) = read::<[u8; 16]>(sk, off.sock_v6_daddr) else {
            return;
        };
        key.addr[6..22].copy_from_slice(&addr);
        key.addr_len = 26;
    } else {
        // sin_port, sin_addr, sin_zero.
        let Some(addr) = read::<[u8; 4]>(sk, off.sock_daddr) else {
            return;
        };
        key.addr[2..6].copy_from_slice(&addr);
        key.addr_len = 14;
    }
    count_and_sample(pid_tgid, &key);
}

/// fexit/__sys_connect_file(file, address, addrlen, file_flags) -> int:
/// every connect() (io_uring's too), once the kernel has copied the
/// caller's sockaddr into its own `struct __kernel_sockaddr_storage`. That
/// type is 128 bytes in BTF, so the path is read with plain loads the
/// verifier checks against it (`sockaddr`, the type unix_stream_connect
/// gets, is 16 bytes: there a helper read it, and the program's run in a
/// 6.12 guest's storm took 1,354 ns, against 924 to 1,139 now). Any other
/// connect costs one comparison.
pub fn on_connect_file_exit(ctx: &FExitContext) {
    let ret: i32 = ctx.arg(4);
    if ret as i64 != -EAGAIN {
        return;
    }
    let address: usize = ctx.arg(1);
    if load::<u16>(address, 0) != AF_UNIX {
        return;
    }
    let addr_len: i32 = ctx.arg(2);
    // unix_stream_connect refuses more than a sockaddr_un (110 bytes) with
    // EINVAL before it can refuse with EAGAIN.
    let len = (addr_len.max(0) as usize)
        .saturating_sub(2)
        .min(UNIX_PATH_MAX);
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut key = ConnectKey {
        pid: (pid_tgid >> 32) as u32,
        netns: 0,
        ret,
        addr_len: len as u16,
        family: AF_UNIX,
        addr: [0; UNIX_PATH_MAX],
    };
    // Eight bytes at a time after sa_family, each load at a constant offset
    // (the verifier refuses a variable one; a loop is unrolled by hand): 14
    // loads end at byte 114 of 128. Bytes past the path stay zero (they
    // are part of the key).
    macro_rules! words {
        ($($word:literal)*) => {$({
            const START: usize = $word * 8;
            const END: usize = if START + 8 < UNIX_PATH_MAX { START + 8 } else { UNIX_PATH_MAX };
            let word = load::<u64>(address, 2 + START as u32) & path_mask(len, START);
            key.addr[START..END].copy_from_slice(&word.to_le_bytes()[..END - START]);
        })*};
    }
    words!(0 1 2 3 4 5 6 7 8 9 10 11 12 13);
    set_namespace(&mut key);
    count_and_sample(pid_tgid, &key);
}

/// Which of the eight bytes from `start` on belong to a path of `len`
/// bytes (little-endian: the low ones).
#[inline(always)]
fn path_mask(len: usize, start: usize) -> u64 {
    match len.saturating_sub(start) {
        0 => 0,
        keep @ 1..8 => (1u64 << (keep * 8)) - 1,
        _ => u64::MAX,
    }
}
