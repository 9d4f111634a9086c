//! Typed reads of kernel structures through offsets resolved from BTF by
//! userspace (aya has no CO-RE relocations for Rust programs). Every read
//! goes through bpf_probe_read_kernel and returns `None` on failure; but
//! the caller's syscall arguments and return value, which the verifier
//! lets us load directly.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    programs::TracePointContext,
    EbpfContext,
};
use tracer_common::KernelOffsets;

/// Filled by userspace before load (EbpfLoader::override_global).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::zeroed();

#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    // SAFETY: a read-only global. Its address is read back through a
    // volatile load, so the compiler cannot fold the zero initialiser
    // behind it, and each field costs one load where it is used (a
    // volatile copy of the whole struct cost 38 loads per call).
    unsafe { &*core::ptr::read_volatile(&(&raw const OFFSETS)) }
}

#[inline(always)]
pub fn read<T>(base: usize, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel((base + offset as usize) as *const T).ok() }
}

/// A field of a kernel object whose pointer the verifier knows by its BTF
/// type: an argument of a fentry/fexit program, or a pointer field loaded
/// through one. One load instruction, where `read` calls a helper (1.3 µs
/// a call under QEMU's emulation, measured in a 6.1 guest). The verifier
/// checks the load against the kernel's type at that offset (it sees the
/// offsets as constants: they are in frozen read-only data), and a fault
/// reads 0.
/// Tracing programs only: elsewhere the verifier refuses the load.
#[inline(always)]
pub fn load<T: Copy>(base: usize, offset: u32) -> T {
    // SAFETY: the verifier checks this load, and the JIT makes a faulting
    // one read 0.
    unsafe { core::ptr::read_volatile((base + offset as usize) as *const T) }
}

#[inline(always)]
pub fn read_ptr(base: usize, offset: u32) -> Option<usize> {
    if base == 0 {
        return None;
    }
    read::<usize>(base, offset).filter(|&p| p != 0)
}

/// The current task's network namespace inode: task->nsproxy->net_ns->ns.inum.
#[inline(always)]
pub fn current_netns() -> Option<u32> {
    let off = offsets();
    let task = unsafe { bpf_get_current_task() } as usize;
    let nsproxy = read_ptr(task, off.task_nsproxy)?;
    let net = read_ptr(nsproxy, off.nsproxy_net_ns)?;
    read(net, off.net_ns_inum)
}

/// A `struct sock *` found through the current task's fd table.
#[derive(Clone, Copy)]
pub struct Sock {
    pub addr: usize,
    /// Inode number of the socket file, as in /proc/PID/fd.
    pub inode: u64,
}

/// The socket behind `fd` in the current task: task->files->fdt->fd[fd]
/// ->private_data (struct socket) ->sk.
#[inline(always)]
pub fn current_task_sock(fd: i32) -> Option<Sock> {
    let off = offsets();
    let task = unsafe { bpf_get_current_task() } as usize;
    let files = read_ptr(task, off.task_files)?;
    let fdt = read_ptr(files, off.files_fdt)?;
    let max_fds: u32 = read(fdt, off.fdtable_max_fds)?;
    if fd < 0 || fd as u32 >= max_fds {
        return None;
    }
    let fd_array = read_ptr(fdt, off.fdtable_fd)?;
    let file: usize = read(fd_array, fd as u32 * 8).filter(|&p: &usize| p != 0)?;
    let socket = read_ptr(file, off.file_private_data)?;
    let sk = read_ptr(socket, off.socket_sk)?;
    let inode = read_ptr(file, off.file_inode)?;
    let ino: u64 = read(inode, off.inode_ino)?;
    Some(Sock {
        addr: sk,
        inode: ino,
    })
}

impl Sock {
    /// A socket reached from a packet or a tracepoint argument.
    #[inline(always)]
    pub fn at(addr: usize) -> Option<Self> {
        if addr == 0 {
            return None;
        }
        let off = offsets();
        let socket = read_ptr(addr, off.sock_socket)?;
        let file = read_ptr(socket, off.socket_file)?;
        let inode = read_ptr(file, off.file_inode)?;
        Some(Sock {
            addr,
            inode: read(inode, off.inode_ino)?,
        })
    }

    /// sk_ack_backlog: connections waiting in the accept queue.
    pub fn ack_backlog(&self) -> Option<u32> {
        read(self.addr, offsets().sock_ack_backlog)
    }

    /// (sk_ack_backlog, sk_max_ack_backlog): the accept queue and its limit.
    pub fn accept_queue(&self) -> (Option<u32>, Option<u32>) {
        let off = offsets();
        // Neighbours in struct sock since 5.x: one read.
        if off.sock_max_ack_backlog == off.sock_ack_backlog + 4 {
            return match read::<[u32; 2]>(self.addr, off.sock_ack_backlog) {
                Some([queue, max]) => (Some(queue), Some(max)),
                None => (None, None),
            };
        }
        (self.ack_backlog(), self.max_ack_backlog())
    }

    /// Length of the SYN queue (icsk_accept_queue.qlen).
    pub fn syn_queue(&self) -> Option<u32> {
        read(self.addr, offsets().icsk_syn_qlen)
    }

    pub fn local_port(&self) -> Option<u16> {
        read(self.addr, offsets().sock_num)
    }

    /// Bound address: 4 bytes for IPv4, 16 for IPv6.
    pub fn local_addr(&self, family: u16, out: &mut [u8; 16]) {
        let off = offsets();
        if family == tracer_common::AF_INET6 {
            if let Some(addr) = read::<[u8; 16]>(self.addr, off.sock_v6_rcv_saddr) {
                *out = addr;
            }
        } else if let Some(addr) = read::<[u8; 4]>(self.addr, off.sock_rcv_saddr) {
            out[..4].copy_from_slice(&addr);
        }
    }

    /// The network namespace's net.ipv4.tcp_max_syn_backlog.
    pub fn max_syn_backlog(&self) -> Option<u32> {
        let off = offsets();
        let net = read_ptr(self.addr, off.sock_net)?;
        read(net, off.net_max_syn_backlog)
    }

    /// The network namespace's net.ipv4.tcp_syncookies.
    pub fn syncookies(&self) -> Option<u8> {
        let off = offsets();
        let net = read_ptr(self.addr, off.sock_net)?;
        read(net, off.net_syncookies)
    }

    pub fn family(&self) -> Option<u16> {
        read(self.addr, offsets().sock_family)
    }

    pub fn max_ack_backlog(&self) -> Option<u32> {
        read(self.addr, offsets().sock_max_ack_backlog)
    }

    /// (netns inode, net.core.somaxconn) of the socket's network namespace.
    pub fn netns(&self) -> Option<(u32, u32)> {
        let off = offsets();
        let net = read_ptr(self.addr, off.sock_net)?;
        Some((read(net, off.net_ns_inum)?, read(net, off.net_somaxconn)?))
    }

    /// The bound address of a UNIX socket (`struct unix_sock` starts with its
    /// `struct sock`): copies `sun_path` into `path`, returns its length.
    pub fn unix_path(&self, path: &mut [u8; tracer_common::UNIX_PATH_MAX]) -> Option<u16> {
        let off = offsets();
        let addr = read_ptr(self.addr, off.unix_sock_addr)?;
        let len: i32 = read(addr, off.unix_address_len)?;
        // unix_address.name is a sockaddr_un: sun_family (2 bytes), sun_path.
        let sun_path = addr + off.unix_address_name as usize + 2;
        unsafe { bpf_probe_read_kernel_buf(sun_path as *const u8, path).ok()? };
        let path_len = (len - 2).clamp(0, tracer_common::UNIX_PATH_MAX as i32);
        Some(path_len as u16)
    }
}

/// The first three arguments of the current task's syscall (x86-64: rdi,
/// rsi, rdx), from the registers saved at its entry. bpf_task_pt_regs
/// (5.15+) returns a pointer typed by the kernel's BTF: the fields are
/// loaded directly, no helper copies them. The syscall tracepoints never
/// fire for i386 (compat) calls, so the x86-64 registers are the ones.
#[inline(always)]
pub fn caller_args() -> (u64, u64, u64) {
    // SAFETY: the verifier checks each load against struct pt_regs.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        ((*regs).rdi, (*regs).rsi, (*regs).rdx)
    }
}

/// The return value in a syscalls/sys_exit_NAME record (offset 16, see
/// /sys/kernel/tracing/events/syscalls/sys_exit_connect/format), loaded
/// directly: the verifier allows reads of the tracepoint's record.
#[inline(always)]
pub fn exit_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: inside the record, aligned; the verifier checks the bounds.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(16).cast::<i64>()) }
}
