//! droptrace's kernel side. Each module is one drop family; the entry points
//! here are thin and only name the tracepoint they hang on.
#![no_std]
#![no_main]

mod connect;
mod fd_limits;
mod kernel;
mod listen;
mod maps;
mod nginx;
mod syscalls;
mod tcp_listen;

use aya_ebpf::{
    macros::{
        btf_tracepoint, cgroup_skb, cgroup_sock_addr, fentry, fexit, raw_tracepoint, tracepoint,
        uretprobe,
    },
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, RawTracePointContext, RetProbeContext,
        SkBuffContext, SockAddrContext, TracePointContext,
    },
};
use tcp_listen::calls::{CHECK_REQ, CONN_REQUEST, COOKIE_CHECK};
use tracer_common::fd_syscall;

/// syscalls/sys_enter_connect: remember the address being connected to.
#[tracepoint]
pub fn connect_enter(ctx: TracePointContext) -> u32 {
    connect::on_enter(&ctx);
    0
}

/// syscalls/sys_exit_connect: report the connect if it was refused.
#[tracepoint]
pub fn connect_exit(ctx: TracePointContext) -> u32 {
    connect::on_exit(&ctx);
    0
}

/// syscalls/sys_exit_connect without an enter program: the address comes
/// from the caller's registers (bpf_task_pt_regs, 5.15+). Where fexit is
/// refused, this and the other exit tracepoints below are the cheapest
/// hooks: a syscall nobody watches costs the kernel one bit test, no
/// program run (closing them is slow: see tracer's families/mod.rs).
#[tracepoint]
pub fn connect_exit_regs(ctx: TracePointContext) -> u32 {
    connect::on_exit_with_regs(&ctx);
    0
}

/// fexit/__sys_connect_file: a refused UNIX connect, where the kernel
/// allows fexit (the connect tracepoints then leave UNIX sockets to it).
#[fexit(function = "__sys_connect_file")]
pub fn unix_connect_refused(ctx: FExitContext) -> i32 {
    connect::on_connect_file_exit(&ctx);
    0
}

/// fexit on the syscalls' own entry points (x86-64: __x64_sys_NAME, called
/// through the syscall table, so never inlined): only those calls pay, not
/// every syscall of every process. The return value follows the one
/// argument (the caller's registers).
macro_rules! fd_syscall_fexit {
    ($($program:ident => $function:literal, $syscall:expr),* $(,)?) => {$(
        #[fexit(function = $function)]
        pub fn $program(ctx: FExitContext) -> i32 {
            fd_limits::report(ctx.arg(1), $syscall);
            0
        }
    )*};
}

fd_syscall_fexit! {
    accept_fexit => "__x64_sys_accept", fd_syscall::ACCEPT,
    accept4_fexit => "__x64_sys_accept4", fd_syscall::ACCEPT4,
    socket_fexit => "__x64_sys_socket", fd_syscall::SOCKET,
    open_fexit => "__x64_sys_open", fd_syscall::OPEN,
    openat_fexit => "__x64_sys_openat", fd_syscall::OPENAT,
}

/// fexit/inet_hash_connect and inet6_hash_connect: EADDRNOTAVAIL, on TCP
/// connects only (no other connect pays).
#[fexit(function = "inet_hash_connect")]
pub fn hash_connect_fexit(ctx: FExitContext) -> i32 {
    connect::on_hash_connect_exit(&ctx, tracer_common::AF_INET);
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn hash_connect6_fexit(ctx: FExitContext) -> i32 {
    connect::on_hash_connect_exit(&ctx, tracer_common::AF_INET6);
    0
}

/// fexit/__sys_listen: new listeners, on listen() calls only.
#[fexit(function = "__sys_listen")]
pub fn listen_fexit(ctx: FExitContext) -> i32 {
    listen::on_sys_listen_exit(&ctx);
    0
}

/// tp_btf/sys_exit (the raw tracepoint every syscall passes on its way
/// out), where neither fexit nor the exit tracepoints with the caller's
/// registers can be had: one program for every syscall family. It
/// runs for every syscall of every process; a call that succeeds, or fails
/// otherwise, costs one comparison beyond the run.
#[btf_tracepoint(function = "sys_exit")]
pub fn syscall_exit(ctx: BtfTracePointContext) -> i32 {
    syscalls::on_exit(&ctx);
    0
}

/// syscalls/sys_exit_{accept,accept4,socket,open,openat}: report calls that
/// failed for lack of a file descriptor (EMFILE, ENFILE).
macro_rules! fd_syscall_exit {
    ($($program:ident => $syscall:expr),* $(,)?) => {$(
        #[tracepoint]
        pub fn $program(ctx: TracePointContext) -> u32 {
            fd_limits::on_exit(&ctx, $syscall);
            0
        }
    )*};
}

fd_syscall_exit! {
    accept_exit => fd_syscall::ACCEPT,
    accept4_exit => fd_syscall::ACCEPT4,
    socket_exit => fd_syscall::SOCKET,
    open_exit => fd_syscall::OPEN,
    openat_exit => fd_syscall::OPENAT,
}

/// uretprobe on nginx's ngx_get_connection: a worker out of connections.
#[uretprobe]
pub fn nginx_get_connection(ctx: RetProbeContext) -> u32 {
    nginx::on_get_connection_return(&ctx);
    0
}

/// syscalls/sys_enter_listen: remember the requested backlog.
#[tracepoint]
pub fn listen_enter(ctx: TracePointContext) -> u32 {
    listen::on_enter(&ctx);
    0
}

/// syscalls/sys_exit_listen without an enter program: fd and backlog come
/// from the caller's registers (as connect_exit_regs).
#[tracepoint]
pub fn listen_exit_regs(ctx: TracePointContext) -> u32 {
    listen::on_exit_with_regs(&ctx);
    0
}

/// syscalls/sys_exit_listen: report the new listener as the kernel sees it.
#[tracepoint]
pub fn listen_exit(ctx: TracePointContext) -> u32 {
    listen::on_exit(&ctx);
    0
}

/// cgroup_skb/ingress on the cgroup v2 root: a TCP packet reaches a
/// listener. Always returns 1: the packet is never dropped here.
#[cgroup_skb]
pub fn tcp_syn_ingress(ctx: SkBuffContext) -> i32 {
    tcp_listen::on_ingress(&ctx);
    1
}

/// tp_btf/kfree_skb: a packet a listener was processing was dropped.
#[btf_tracepoint(function = "kfree_skb")]
pub fn tcp_ack_drop(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_kfree_skb(&ctx);
    0
}

/// Second copies of the kfree_skb programs (see tcp_syn_done_nested).
#[btf_tracepoint(function = "kfree_skb")]
pub fn tcp_ack_drop_nested(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_kfree_skb(&ctx);
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn tcp_ack_drop_noreason_nested(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_freed(&ctx);
    0
}

/// tp_btf/kfree_skb on kernels whose tracepoint has no drop reason (before
/// 5.17): the stage comes from the packet alone.
#[btf_tracepoint(function = "kfree_skb")]
pub fn tcp_ack_drop_noreason(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_freed(&ctx);
    0
}

/// tp_btf/consume_skb: a packet a listener was processing was consumed
/// (a refused SYN is consumed, not dropped).
#[btf_tracepoint(function = "consume_skb")]
pub fn tcp_syn_done(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_freed(&ctx);
    0
}

/// The same program twice: the kernel skips a tracing program that is
/// already running on this CPU (a softirq freeing our packet while a task's
/// consume_skb runs it), never both copies; the second settle is a no-op.
#[btf_tracepoint(function = "consume_skb")]
pub fn tcp_syn_done_nested(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_freed(&ctx);
    0
}

/// fentry/fexit tcp_conn_request: a SYN to a listener, where the kernel
/// allows fentry (the packet programs above are then not attached).
#[fentry(function = "tcp_conn_request")]
pub fn tcp_conn_request_entry(ctx: FEntryContext) -> i32 {
    tcp_listen::calls::on_conn_request_entry(ctx.arg(2), ctx.arg(3));
    0
}

#[fexit(function = "tcp_conn_request")]
pub fn tcp_conn_request_exit(_ctx: FExitContext) -> i32 {
    tcp_listen::calls::on_exit(CONN_REQUEST);
    0
}

/// fentry/fexit tcp_check_req: a final ACK making the child socket.
#[fentry(function = "tcp_check_req")]
pub fn tcp_check_req_entry(ctx: FEntryContext) -> i32 {
    let fastopen: u64 = ctx.arg(3);
    tcp_listen::calls::on_check_req_entry(ctx.arg(0), ctx.arg(1), fastopen & 0xff != 0);
    0
}

#[fexit(function = "tcp_check_req")]
pub fn tcp_check_req_exit(_ctx: FExitContext) -> i32 {
    tcp_listen::calls::on_exit(CHECK_REQ);
    0
}

/// fentry/fexit cookie_v4_check and cookie_v6_check: a SYN cookie's ACK.
macro_rules! cookie_check {
    ($($entry:ident, $exit:ident => $function:literal),* $(,)?) => {$(
        #[fentry(function = $function)]
        pub fn $entry(ctx: FEntryContext) -> i32 {
            tcp_listen::calls::on_cookie_check_entry(ctx.arg(0), ctx.arg(1));
            0
        }

        #[fexit(function = $function)]
        pub fn $exit(_ctx: FExitContext) -> i32 {
            tcp_listen::calls::on_exit(COOKIE_CHECK);
            0
        }
    )*};
}

cookie_check! {
    tcp_cookie_check4_entry, tcp_cookie_check4_exit => "cookie_v4_check",
    tcp_cookie_check6_entry, tcp_cookie_check6_exit => "cookie_v6_check",
}

/// fentry/tcp_connect: a local TCP client, so that a dropped SYN or ACK
/// names it (with the fentry programs above).
#[fentry(function = "tcp_connect")]
pub fn tcp_client_connect_entry(ctx: FEntryContext) -> i32 {
    tcp_listen::calls::on_tcp_connect(ctx.arg(0));
    0
}

/// Never attached: run on each CPU through BPF_PROG_TEST_RUN when droptrace
/// stops, to count what a packet in flight there has cost so far.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn tcp_catch_up(_ctx: RawTracePointContext) -> i32 {
    tcp_listen::catch_up_this_cpu();
    0
}

/// cgroup/connect4 and cgroup/connect6 on the cgroup v2 root: a local
/// process connecting a TCP socket, so that a dropped SYN names it. Always
/// returns 1: the connect is never refused here.
#[cgroup_sock_addr(connect4)]
pub fn tcp_client_connect4(ctx: SockAddrContext) -> i32 {
    tcp_listen::on_connect(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn tcp_client_connect6(ctx: SockAddrContext) -> i32 {
    tcp_listen::on_connect(&ctx);
    1
}

/// tp_btf/inet_sock_set_state: local TCP clients entering SYN_SENT, so
/// that a dropped SYN names the process that sent it.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_client_connect(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_set_state(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
