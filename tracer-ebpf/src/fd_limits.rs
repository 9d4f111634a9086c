//! Syscalls that needed a file descriptor and hit a limit on open files:
//! EMFILE (the process's RLIMIT_NOFILE) or ENFILE (fs.file-max).
//!
//! Only the exit tracepoints are needed: the return value says it all, and
//! the limit is read from the task at that moment (task->signal->rlim).
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::map,
    maps::PerCpuHashMap,
    programs::TracePointContext,
};
use tracer_common::{Counter, FdLimitKey, FdLimitRecord, COMM_LEN};

use crate::{
    kernel::{current_netns, offsets, read, read_ptr},
    maps::{count, emit},
};

/// Exact counts, keyed by process, syscall and the limit it hit (read by
/// userspace); a sample of them is sent with the thread and its name.
#[map]
static FD_LIMIT_HITS: PerCpuHashMap<FdLimitKey, Counter> = PerCpuHashMap::with_max_entries(4096, 0);

pub const ENFILE: i64 = 23;
pub const EMFILE: i64 = 24;
/// RLIMIT_NOFILE's index in signal_struct.rlim (asm-generic/resource.h;
/// the same on x86 and arm64).
const RLIMIT_NOFILE: u32 = 7;
/// sizeof(struct rlimit): two unsigned longs.
const RLIMIT_SIZE: u32 = 16;

/// sys_exit_<syscall>: report the call if it failed for lack of a file descriptor.
pub fn on_exit(ctx: &TracePointContext, syscall: u32) {
    report(crate::kernel::exit_ret(ctx), syscall);
}

/// `syscall` returned `ret` (from its exit tracepoint, or fexit on its
/// entry point): report it if it failed for lack of a file descriptor.
#[inline(always)]
pub fn report(ret: i64, syscall: u32) {
    if ret != -EMFILE && ret != -ENFILE {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (nofile_soft, nofile_hard) = current_nofile().unwrap_or((0, 0));
    let key = FdLimitKey {
        pid: (pid_tgid >> 32) as u32,
        ret: ret as i32,
        syscall,
        netns: current_netns().unwrap_or(0),
        nofile_soft,
        nofile_hard,
    };
    if let Some(now) = count(&FD_LIMIT_HITS, &key) {
        let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        emit(&FdLimitRecord::new(&key, pid_tgid as u32, now, comm));
    }
}

/// The current task's RLIMIT_NOFILE (soft, hard).
fn current_nofile() -> Option<(u64, u64)> {
    let off = offsets();
    let task = unsafe { bpf_get_current_task() } as usize;
    let signal = read_ptr(task, off.task_signal)?;
    let rlimit = off.signal_rlim + RLIMIT_NOFILE * RLIMIT_SIZE;
    Some((read(signal, rlimit)?, read(signal, rlimit + 8)?))
}
