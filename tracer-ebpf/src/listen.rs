//! New listeners, as the kernel made them.
//!
//! listen(fd, N) clamps N to the network namespace's net.core.somaxconn
//! (__sys_listen) and stores it in sk->sk_max_ack_backlog. Once the call
//! succeeded (fexit, tp_btf/sys_exit or sys_exit_listen with the caller's
//! registers, or sys_enter_listen keeping N for sys_exit_listen) we read
//! the effective value, the namespace and the bound path from the socket
//! itself.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::HashMap,
    programs::{FExitContext, TracePointContext},
};
use tracer_common::{
    ListenRecord, RecordKind, AF_UNIX, COMM_LEN, LOST_PENDING_FULL, UNIX_PATH_MAX,
};

use crate::{
    kernel::current_task_sock,
    maps::{count_lost, emit},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingListen {
    fd: i32,
    backlog: u32,
}

#[map]
static PENDING_LISTEN: HashMap<u32, PendingListen> = HashMap::with_max_entries(4096, 0);

const ARG0: usize = 16;
const ARG1: usize = 24;

pub fn on_enter(ctx: &TracePointContext) {
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return;
    };
    let Ok(backlog) = (unsafe { ctx.read_at::<u64>(ARG1) }) else {
        return;
    };
    let pending = PendingListen {
        fd: fd as i32,
        backlog: backlog as u32,
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    if PENDING_LISTEN.insert(&tid, &pending, 0).is_err() {
        count_lost(LOST_PENDING_FULL);
    }
}

pub fn on_exit(ctx: &TracePointContext) {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(pending) = (unsafe { PENDING_LISTEN.get(&tid) }).copied() else {
        return;
    };
    let _ = PENDING_LISTEN.remove(&tid);
    if unsafe { ctx.read_at::<i64>(ARG0) } != Ok(0) {
        return;
    }
    report(pending);
}

/// sys_exit_listen alone: fd and backlog come from the caller's registers.
pub fn on_exit_with_regs(ctx: &TracePointContext) {
    if crate::kernel::exit_ret(ctx) != 0 {
        return;
    }
    let (fd, backlog, _) = crate::kernel::caller_args();
    on_listened(fd, backlog);
}

/// tp_btf/sys_exit saw listen(fd, backlog) succeed.
#[inline(always)]
pub fn on_listened(fd: u64, backlog: u64) {
    report(PendingListen {
        fd: fd as i32,
        backlog: backlog as u32,
    });
}

/// fexit/__sys_listen(fd, backlog) -> int: arguments and result at once.
pub fn on_sys_listen_exit(ctx: &FExitContext) {
    let ret: i32 = ctx.arg(2);
    if ret != 0 {
        return;
    }
    let fd: i32 = ctx.arg(0);
    let backlog: i32 = ctx.arg(1);
    report(PendingListen {
        fd,
        backlog: backlog as u32,
    });
}

/// A listen() that succeeded: what the kernel made of it.
#[inline(always)]
fn report(pending: PendingListen) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(sock) = current_task_sock(pending.fd) else {
        return;
    };
    let family = sock.family().unwrap_or(0);
    let (netns, somaxconn) = sock.netns().unwrap_or((0, 0));
    let mut record = ListenRecord {
        kind: RecordKind::Listen as u32,
        pid: (pid_tgid >> 32) as u32,
        tid,
        fd: pending.fd,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        // The syscall takes an int; negative values mean "as large as allowed".
        requested_backlog: pending.backlog,
        effective_backlog: sock.max_ack_backlog().unwrap_or(0),
        somaxconn,
        netns,
        sock_inode: sock.inode,
        family,
        path_len: 0,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        path: [0; UNIX_PATH_MAX],
        _pad: [0; 8],
    };
    if family == AF_UNIX {
        record.path_len = sock.unix_path(&mut record.path).unwrap_or(0);
    }
    emit(&record);
}
