//! Refused connects to UNIX stream sockets.
//!
//! unix_stream_connect() returns -EAGAIN to a non-blocking caller when the
//! listener's queue is full (`unix_recvq_full_lockless`: queue > backlog).
//! Nothing else in the kernel records it: no drop reason, no counter. The
//! listener is not reachable from here either, so we send the path the
//! caller asked for and userspace finds the listener.
//!
//! Only failures cross to userspace; a successful connect costs one hash
//! insert and delete.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::map,
    maps::HashMap,
    programs::TracePointContext,
};
use tracer_common::{ConnectFailure, RecordKind, AF_UNIX, COMM_LEN, LOST_PENDING_FULL, UNIX_PATH_MAX};

use crate::{
    kernel::current_netns,
    maps::{count_lost, emit},
};

const EAGAIN: i64 = 11;

/// What sys_enter_connect saw, keyed by thread id until sys_exit_connect.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingConnect {
    family: u16,
    path_len: u16,
    path: [u8; UNIX_PATH_MAX],
}

#[map]
static PENDING_CONNECT: HashMap<u32, PendingConnect> = HashMap::with_max_entries(16384, 0);

// Offsets of the syscall tracepoint arguments (stable ABI, see
// /sys/kernel/tracing/events/syscalls/sys_enter_connect/format).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;

pub fn on_enter(ctx: &TracePointContext) {
    let Ok(uservaddr) = (unsafe { ctx.read_at::<u64>(ARG1) }) else { return };
    let Ok(addrlen) = (unsafe { ctx.read_at::<u64>(ARG2) }) else { return };
    let Ok(family) = (unsafe { bpf_probe_read_user(uservaddr as *const u16) }) else { return };
    if family != AF_UNIX {
        return;
    }
    let mut pending = PendingConnect { family, path_len: 0, path: [0; UNIX_PATH_MAX] };
    // sun_path follows the 2-byte family; addrlen bounds it.
    let path_len = (addrlen as usize).saturating_sub(2).min(UNIX_PATH_MAX);
    let src = (uservaddr + 2) as *const u8;
    if unsafe { bpf_probe_read_user_buf(src, &mut pending.path) }.is_err() {
        // The path may end near the end of a mapping: read only what was given.
        let _ = unsafe { bpf_probe_read_user_buf(src, &mut pending.path[..path_len]) };
    }
    pending.path_len = path_len as u16;
    let tid = bpf_get_current_pid_tgid() as u32;
    if PENDING_CONNECT.insert(&tid, &pending, 0).is_err() {
        count_lost(LOST_PENDING_FULL);
    }
}

pub fn on_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(pending) = (unsafe { PENDING_CONNECT.get(&tid) }).copied() else { return };
    let _ = PENDING_CONNECT.remove(&tid);
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(ARG0) }) else { return };
    if ret != -EAGAIN {
        return;
    }
    let record = ConnectFailure {
        kind: RecordKind::ConnectFailure as u32,
        pid: (pid_tgid >> 32) as u32,
        tid,
        ret: ret as i32,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        family: pending.family,
        path_len: pending.path_len,
        netns: current_netns().unwrap_or(0),
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        path: pending.path,
        _pad: [0; 4],
    };
    emit(&record);
}
