//! TCP listen-queue overflows, at SYN time and at ACK time.
//!
//! - SYN time: tcp_conn_request() consumes a SYN silently when the accept
//!   queue is full (sk_acceptq_is_full), or when the SYN queue nears
//!   tcp_max_syn_backlog with syncookies off. No drop reason, no kfree_skb
//!   with the listener. We see the SYN just before, in the cgroup ingress
//!   filter that tcp_v4_rcv()/tcp_v6_rcv() run on the listener
//!   (tcp_filter -> BPF_CGROUP_RUN_PROG_INET_INGRESS), with skb->sk = the
//!   listener, and apply the kernel's own test. Chosen over
//!   tp_btf/netif_receive_skb because the listener comes with the packet:
//!   no userspace registry lookup by port, and every network namespace is
//!   covered by one attachment on the cgroup v2 root. The program always
//!   lets the packet through.
//! - ACK time: kfree_skb with reason TCP_LISTEN_OVERFLOW (rx_sk is the
//!   listener), or NO_SOCKET with rx_sk a listener when the ACK carried a
//!   SYN cookie and no child could be made (cookie_v4_check). Reason values
//!   come from BTF.
//!
//! Counts are exact (per-CPU counters per listener and stage); a detailed
//! record is sent for at most one drop per listener per SAMPLE_INTERVAL_NS.
use aya_ebpf::{
    bindings::BPF_F_CURRENT_NETNS,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf,
        generated::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_to_tcp_sock},
    },
    macros::map,
    maps::{LruHashMap, PerCpuHashMap},
    programs::{BtfTracePointContext, SkBuffContext},
};
use tracer_common::{
    stage, DropReasons, LocalClient, RecordKind, TcpOverflowKey, TcpOverflowRecord,
    AF_INET, AF_INET6, LOST_COUNTERS_FULL,
};

use crate::{
    kernel::{offsets, read, Sock},
    maps::{count_lost, emit},
};

/// Filled by userspace from the kernel's BTF (enum skb_drop_reason).
#[unsafe(no_mangle)]
static DROP_REASONS: DropReasons = DropReasons { tcp_listen_overflow: u32::MAX, no_socket: u32::MAX };

#[map]
static TCP_OVERFLOWS: PerCpuHashMap<TcpOverflowKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Local TCP clients by socket address, from their connect().
#[map]
static LOCAL_CLIENTS: LruHashMap<u64, LocalClient> = LruHashMap::with_max_entries(65536, 0);

const TCP_SYN_SENT: i32 = 2;

/// tp_btf/inet_sock_set_state(sk, oldstate, newstate): a socket entering
/// SYN_SENT is a local connect() (its port is not chosen yet: it is keyed
/// by the socket itself). Remember who made it, so that a drop of its SYN
/// names the process.
pub fn on_set_state(ctx: &BtfTracePointContext) {
    let newstate: i32 = ctx.arg(2);
    if newstate != TCP_SYN_SENT {
        return;
    }
    let sk: u64 = ctx.arg(0);
    let client = LocalClient {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    let _ = LOCAL_CLIENTS.insert(&sk, &client, 0);
}

/// The local process that sent `packet`, found through its own socket: the
/// one a packet from the listener back to the sender would be delivered to.
#[inline(always)]
fn local_client(ctx: &SkBuffContext, packet: &Packet) -> Option<LocalClient> {
    // struct bpf_sock_tuple: saddr, daddr, sport, dport (network order).
    let mut tuple = [0u8; 36];
    let size = if packet.family == AF_INET6 {
        tuple[..16].copy_from_slice(&packet.local_addr);
        tuple[16..32].copy_from_slice(&packet.remote_addr);
        tuple[32..34].copy_from_slice(&packet.local_port.to_be_bytes());
        tuple[34..36].copy_from_slice(&packet.remote_port.to_be_bytes());
        36
    } else {
        tuple[..4].copy_from_slice(&packet.local_addr[..4]);
        tuple[4..8].copy_from_slice(&packet.remote_addr[..4]);
        tuple[8..10].copy_from_slice(&packet.local_port.to_be_bytes());
        tuple[10..12].copy_from_slice(&packet.remote_port.to_be_bytes());
        12
    };
    let sk = unsafe {
        bpf_sk_lookup_tcp(ctx.skb.skb.cast(), tuple.as_mut_ptr().cast(), size, BPF_F_CURRENT_NETNS as u64, 0)
    };
    if sk.is_null() {
        return None;
    }
    let key = sk as u64;
    unsafe { bpf_sk_release(sk.cast()) };
    unsafe { LOCAL_CLIENTS.get(&key) }.copied()
}

/// Last detailed record per listener inode.
#[map]
static LAST_SAMPLE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

const SAMPLE_INTERVAL_NS: u64 = 10_000_000;

const BPF_TCP_LISTEN: u32 = 10;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;

/// The IP and TCP headers of the dropped packet that matter here.
struct Packet {
    family: u16,
    remote_addr: [u8; 16],
    remote_port: u16,
    /// The packet's destination (the listener as the client addressed it).
    local_addr: [u8; 16],
    local_port: u16,
    flags: u8,
}

/// Parse from a reader of the packet's bytes: `load(offset, buf)` from the
/// IP header, asked for 20 or 14 bytes at a time; `transport` is the TCP header's offset when the kernel knows
/// it (sk_buff), else it is computed from the IP header.
#[inline(always)]
fn parse(load: impl Fn(usize, &mut [u8]) -> bool, transport: Option<usize>) -> Option<Packet> {
    let mut ip = [0u8; 40];
    if !load(0, &mut ip[..20]) {
        return None;
    }
    let mut packet =
        Packet { family: 0, remote_addr: [0; 16], remote_port: 0, local_addr: [0; 16], local_port: 0, flags: 0 };
    let tcp_at = match ip[0] >> 4 {
        4 if ip[9] == IPPROTO_TCP => {
            packet.family = AF_INET;
            packet.remote_addr[..4].copy_from_slice(&ip[12..16]);
            packet.local_addr[..4].copy_from_slice(&ip[16..20]);
            transport.unwrap_or(((ip[0] & 0x0f) as usize) * 4)
        }
        6 => {
            if !load(20, &mut ip[20..40]) || ip[6] != IPPROTO_TCP {
                return None;
            }
            packet.family = AF_INET6;
            packet.remote_addr.copy_from_slice(&ip[8..24]);
            packet.local_addr.copy_from_slice(&ip[24..40]);
            transport.unwrap_or(40)
        }
        _ => return None,
    };
    let mut tcp = [0u8; 14];
    if !load(tcp_at & 0xff, &mut tcp) {
        return None;
    }
    packet.remote_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    packet.local_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    packet.flags = tcp[13];
    Some(packet)
}

/// cgroup_skb/ingress: a SYN about to be refused by a full listener.
pub fn on_ingress(ctx: &SkBuffContext) {
    // SAFETY: reading the context field the verifier rewrites to skb->sk.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    // Most packets belong to established connections: leave before any
    // parsing (bpf_sock.state is a field the verifier lets us read).
    if sk.is_null() || unsafe { (*sk).state } != BPF_TCP_LISTEN {
        return;
    }
    // Fixed-size loads: the verifier refuses a length that may be zero.
    let load = |at: usize, buf: &mut [u8]| match buf.len() {
        20 => ctx.load::<[u8; 20]>(at).map(|bytes| buf.copy_from_slice(&bytes)).is_ok(),
        14 => ctx.load::<[u8; 14]>(at).map(|bytes| buf.copy_from_slice(&bytes)).is_ok(),
        _ => false,
    };
    let Some(packet) = parse(load, None) else { return };
    if packet.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return;
    }
    // A typed pointer we may read through with runtime offsets.
    let tcp_sock = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as usize;
    let Some(sock) = Sock::at(tcp_sock) else { return };
    if !sock.is_listening() {
        return;
    }
    if let Some(stage) = syn_drop_stage(&sock) {
        count(&sock, stage, &packet, || local_client(ctx, &packet));
    }
}

/// tcp_conn_request()'s tests, in its order: with syncookies off a SYN
/// queue longer than the backlog drops; then a full accept queue drops;
/// then, with syncookies off, fewer than a quarter of tcp_max_syn_backlog
/// left drops (unless the peer is proven by tcp_metrics, which a flood's
/// peers are not). With syncookies on, a full SYN queue is answered.
#[inline(always)]
fn syn_drop_stage(sock: &Sock) -> Option<u32> {
    let cookies_off = sock.syncookies()? == 0;
    let syn_queued = sock.syn_queue()?;
    if cookies_off && syn_queued > sock.max_ack_backlog()? {
        return Some(stage::SYN_QUEUE_BACKLOG);
    }
    if sock.accept_queue_full() {
        return Some(stage::SYN);
    }
    let max = sock.max_syn_backlog()?;
    (cookies_off && max.saturating_sub(syn_queued) < (max >> 2)).then_some(stage::SYN_QUEUE)
}

/// tp_btf/kfree_skb(skb, location, reason, rx_sk).
pub fn on_kfree_skb(ctx: &BtfTracePointContext) {
    let reasons = unsafe { core::ptr::read_volatile(&DROP_REASONS) };
    let reason: u64 = ctx.arg(2);
    let reason = reason as u32;
    let stage = if reason == reasons.tcp_listen_overflow {
        stage::ACK
    } else if reason == reasons.no_socket {
        stage::ACK_SYNCOOKIE
    } else {
        return;
    };
    let rx_sk: u64 = ctx.arg(3);
    let Some(sock) = Sock::at(rx_sk as usize) else { return };
    // A packet to a closed port is dropped as NO_SOCKET with no rx_sk. With
    // a listening rx_sk, NO_SOCKET comes from cookie_v4_check()/
    // cookie_v6_check() when tcp_get_cookie_sock() fails: the accept queue
    // was full (or, rarely, a child socket could not be allocated). Whether
    // the queue is full is NOT re-checked here: the owner may have accepted
    // in between, and the drop would be missed.
    if stage == stage::ACK_SYNCOOKIE && !sock.is_listening() {
        return;
    }
    let skb: u64 = ctx.arg(0);
    let off = offsets();
    let Some(head) = read::<u64>(skb as usize, off.skb_head) else { return };
    let Some(network) = read::<u16>(skb as usize, off.skb_network_header) else { return };
    let Some(transport) = read::<u16>(skb as usize, off.skb_transport_header) else { return };
    let ip = head as usize + network as usize;
    let load = |at: usize, buf: &mut [u8]| unsafe { bpf_probe_read_kernel_buf((ip + at) as *const u8, buf).is_ok() };
    let tcp_offset = (transport as usize).wrapping_sub(network as usize);
    let Some(packet) = parse(load, Some(tcp_offset)) else { return };
    // No socket lookup helper here: ACK-time samples name the address only.
    count(&sock, stage, &packet, || None);
}

#[inline(always)]
fn count(sock: &Sock, stage: u32, packet: &Packet, client: impl FnOnce() -> Option<LocalClient>) {
    let key = TcpOverflowKey { inode: sock.inode, stage, _pad: 0 };
    match TCP_OVERFLOWS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot.
        Some(counter) => unsafe { *counter += 1 },
        None => {
            if TCP_OVERFLOWS.insert(&key, &1, 0).is_err() {
                count_lost(LOST_COUNTERS_FULL);
            }
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match LAST_SAMPLE.get_ptr_mut(&sock.inode) {
        Some(last) if now.wrapping_sub(unsafe { *last }) < SAMPLE_INTERVAL_NS => return,
        Some(last) => unsafe { *last = now },
        None => {
            let _ = LAST_SAMPLE.insert(&sock.inode, &now, 0);
        }
    }
    let (netns, somaxconn) = sock.netns().unwrap_or((0, 0));
    let mut record = TcpOverflowRecord {
        kind: RecordKind::TcpOverflow as u32,
        stage,
        ktime_ns: now,
        inode: sock.inode,
        netns,
        family: packet.family,
        local_port: sock.local_port().unwrap_or(0),
        remote_port: packet.remote_port,
        syncookies: sock.syncookies().unwrap_or(0),
        _pad0: 0,
        backlog: sock.max_ack_backlog().unwrap_or(0),
        queue: sock.ack_backlog().unwrap_or(0),
        somaxconn,
        syn_queue: sock.syn_queue().unwrap_or(0),
        max_syn_backlog: sock.max_syn_backlog().unwrap_or(0),
        local_addr: [0; 16],
        remote_addr: packet.remote_addr,
        client_pid: 0,
        client_comm: [0; 16],
        _pad1: [0; 4],
    };
    sock.local_addr(packet.family, &mut record.local_addr);
    if let Some(client) = client() {
        record.client_pid = client.pid;
        record.client_comm = client.comm;
    }
    emit(&record);
}
