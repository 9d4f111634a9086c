//! droptrace's kernel side. Each module is one drop family; the entry points
//! here are thin and only name the tracepoint they hang on.
#![no_std]
#![no_main]

mod kernel;
mod listen;
mod maps;
mod tcp_listen;
mod unix_connect;

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_skb, tracepoint},
    programs::{BtfTracePointContext, SkBuffContext, TracePointContext},
};

/// syscalls/sys_enter_connect: remember the UNIX address being connected to.
#[tracepoint]
pub fn connect_enter(ctx: TracePointContext) -> u32 {
    unix_connect::on_enter(&ctx);
    0
}

/// syscalls/sys_exit_connect: report the connect if it was refused.
#[tracepoint]
pub fn connect_exit(ctx: TracePointContext) -> u32 {
    unix_connect::on_exit(&ctx);
    0
}

/// syscalls/sys_enter_listen: remember the requested backlog.
#[tracepoint]
pub fn listen_enter(ctx: TracePointContext) -> u32 {
    listen::on_enter(&ctx);
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

/// tp_btf/consume_skb: a packet a listener was processing was consumed
/// (a refused SYN is consumed, not dropped).
#[btf_tracepoint(function = "consume_skb")]
pub fn tcp_syn_done(ctx: BtfTracePointContext) -> i32 {
    tcp_listen::on_consume_skb(&ctx);
    0
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
