//! tp_btf/sys_exit: every syscall's exit, for the families that watch
//! syscalls where fexit is refused. It hands each failure to its family:
//! connect() to connect.rs, the calls needing a new file descriptor to
//! fd_limits.rs. The syscall and its arguments come from the caller's
//! saved registers.
use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};
use tracer_common::{fd_syscall, FAST_PATH_FD_LIMITS};

use crate::{
    connect::{self, EADDRNOTAVAIL, EAGAIN},
    fd_limits::{self, EMFILE, ENFILE},
    maps::fast_path,
};

/// Code segments of 64-bit and of i386 (compat) user code.
const USER_CS: u64 = 0x33;
const USER32_CS: u64 = 0x23;
/// x32 syscalls have the x86-64 numbers with this bit set.
const X32_SYSCALL_BIT: u64 = 0x4000_0000;

/// A syscall of the x86-64 or i386 ABI, as the families know it.
enum Syscall {
    Connect,
    NeedsFd(u32),
    Other,
}

#[inline(always)]
fn syscall(nr: u64, cs: u64) -> Syscall {
    match (cs, nr) {
        (USER_CS, nr) => match nr & !X32_SYSCALL_BIT {
            42 => Syscall::Connect,
            43 => Syscall::NeedsFd(fd_syscall::ACCEPT),
            288 => Syscall::NeedsFd(fd_syscall::ACCEPT4),
            41 => Syscall::NeedsFd(fd_syscall::SOCKET),
            2 => Syscall::NeedsFd(fd_syscall::OPEN),
            257 => Syscall::NeedsFd(fd_syscall::OPENAT),
            _ => Syscall::Other,
        },
        (USER32_CS, 362) => Syscall::Connect,
        (USER32_CS, 364) => Syscall::NeedsFd(fd_syscall::ACCEPT4),
        (USER32_CS, 359) => Syscall::NeedsFd(fd_syscall::SOCKET),
        (USER32_CS, 5) => Syscall::NeedsFd(fd_syscall::OPEN),
        (USER32_CS, 295) => Syscall::NeedsFd(fd_syscall::OPENAT),
        _ => Syscall::Other,
    }
}

/// tp_btf/sys_exit(regs, ret).
#[inline(always)]
pub fn on_exit(ctx: &BtfTracePointContext) {
    let ret: i64 = ctx.arg(1);
    if ret != -EAGAIN && ret != -EADDRNOTAVAIL && ret != -EMFILE && ret != -ENFILE {
        return;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // rcx, rdx, rsi, rdi, orig_rax, rip, cs in one copy.
    // SAFETY: bpf_probe_read_kernel checks the address.
    let Ok([rcx, rdx, rsi, _rdi, nr, _rip, cs]) =
        (unsafe { bpf_probe_read_kernel((&raw const (*regs).rcx).cast::<[u64; 7]>()) })
    else {
        return;
    };
    match syscall(nr, cs) {
        // connect(fd, uservaddr, addrlen): i386 passes them in ebx, ecx, edx.
        Syscall::Connect if cs == USER32_CS => connect::on_failed(ret, rcx, rdx),
        Syscall::Connect => connect::on_failed(ret, rsi, rdx),
        Syscall::NeedsFd(which) if !fast_path(FAST_PATH_FD_LIMITS) => fd_limits::report(ret, which),
        _ => {}
    }
}
