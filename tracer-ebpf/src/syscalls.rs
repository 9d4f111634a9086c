//! tp_btf/sys_exit: every syscall's exit, for the families that watch
//! syscalls where neither fexit nor the per-syscall exit tracepoints can
//! be had. It hands each call to its family:
//! failed connect() calls to connect.rs, the calls needing a new file
//! descriptor that failed to fd_limits.rs, successful listen() calls to
//! listen.rs. The syscall and its arguments come from the caller's saved
//! registers.
use aya_ebpf::{bindings::pt_regs, programs::BtfTracePointContext};
use tracer_common::{fd_syscall, FAST_PATH_CONNECT_EXIT, FAST_PATH_FD_LIMITS, FAST_PATH_LISTEN};

use crate::{
    connect::{self, EADDRNOTAVAIL, EAGAIN},
    fd_limits::{self, EMFILE, ENFILE},
    listen,
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
    Listen,
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
            50 => Syscall::Listen,
            _ => Syscall::Other,
        },
        (USER32_CS, 362) => Syscall::Connect,
        (USER32_CS, 363) => Syscall::Listen,
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
    // Failures the families count, and 0 (listen() succeeded, among many).
    if ret != -EAGAIN && ret != -EADDRNOTAVAIL && ret != -EMFILE && ret != -ENFILE && ret != 0 {
        return;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // tp_btf arguments are typed by the kernel's BTF: the verifier lets the
    // caller's registers be loaded directly (no helper call), field by
    // field, and only those a family needs.
    // SAFETY: the verifier checks each load against struct pt_regs.
    let (nr, cs) = unsafe { ((*regs).orig_rax, (*regs).cs) };
    // The i386 ABI passes arguments in ebx, ecx, edx; x86-64 in rdi, rsi, rdx.
    let args = || unsafe {
        if cs == USER32_CS {
            ((*regs).rbx, (*regs).rcx, (*regs).rdx)
        } else {
            ((*regs).rdi, (*regs).rsi, (*regs).rdx)
        }
    };
    match syscall(nr, cs) {
        Syscall::Connect if ret < 0 && !fast_path(FAST_PATH_CONNECT_EXIT) => {
            let (fd, uservaddr, addrlen) = args();
            connect::on_failed(ret, fd, uservaddr, addrlen)
        }
        Syscall::NeedsFd(which) if ret < 0 && !fast_path(FAST_PATH_FD_LIMITS) => {
            fd_limits::report(ret, which)
        }
        Syscall::Listen if ret == 0 && !fast_path(FAST_PATH_LISTEN) => {
            let (fd, backlog, _) = args();
            listen::on_listened(fd, backlog)
        }
        _ => {}
    }
}
