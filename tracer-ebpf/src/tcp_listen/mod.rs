//! TCP listen-queue drops, counted exactly as the kernel counts them.
//!
//! The kernel counts every listen-queue overflow in its per-CPU MIB
//! (LINUX_MIB_LISTENOVERFLOWS, shown as TcpExtListenOverflows) and every
//! listener drop in LINUX_MIB_LISTENDROPS, on the CPU that processes the
//! packet, in the same softirq. So:
//!
//! 1. cgroup_skb/ingress on the cgroup v2 root sees each TCP packet that
//!    reaches a listener (tcp_v4_rcv()/tcp_v6_rcv() run the cgroup filter
//!    on the listener: tcp_filter -> BPF_CGROUP_RUN_PROG_INET_INGRESS) and
//!    snapshots this CPU's two counters. The program always lets the packet
//!    through.
//! 2. tp_btf/consume_skb or tp_btf/kfree_skb of that same skb, on the same
//!    CPU, reads them again: the difference is what this packet cost. A
//!    SYN refused by a full accept queue is consumed (tcp_conn_request);
//!    a final ACK with no room for the child is freed (with reason NO_SOCKET
//!    when it carried a SYN cookie, on kernels whose kfree_skb has a reason:
//!    5.17+; before, a cookie ACK is counted as an ACK). Every freed packet
//!    of the machine runs these, so userspace attaches them only while
//!    packets reach a listener near full (NEAR_FULL_SEEN). Without them a
//!    drop is counted all the same, later: the next packet to a listener
//!    on that CPU settles what the one before cost (`catch_up`), and so
//!    does droptrace's stop.
//!
//! Counts are exact; the stage and the limit come from the packet and the
//! queue state. Counts live in per-CPU counters per listener and stage; a
//! detailed record is sent for at most one drop per listener per 10 ms.
//! Drop reason values come from BTF. Where the kernel allows fentry/fexit,
//! `calls` counts the same increments per connection instead.
pub mod calls;
mod clients;

use aya_ebpf::{
    bindings::BPF_F_CURRENT_NETNS,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_skc_to_tcp_sock},
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, SkBuffContext, SockAddrContext},
};
use tracer_common::{
    stage, DropReasons, RecordKind, TcpOverflowKey, TcpOverflowRecord, AF_INET, AF_INET6,
    LOST_COUNTERS_FULL,
};

use crate::{
    kernel::{offsets, read, read_ptr, Sock},
    maps::{count_lost, emit},
};

/// Filled by userspace from the kernel's BTF (enum skb_drop_reason).
#[unsafe(no_mangle)]
static DROP_REASONS: DropReasons = DropReasons {
    tcp_listen_overflow: u32::MAX,
    no_socket: u32::MAX,
};

/// How close to full an accept queue must be for a packet to be watched:
/// 16 per possible CPU, set by userspace.
#[unsafe(no_mangle)]
static QUEUE_MARGIN: u32 = 256;

#[map]
static TCP_OVERFLOWS: PerCpuHashMap<TcpOverflowKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Last detailed record per listener inode.
#[map]
static LAST_SAMPLE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Packets that reached a listener near full, on this CPU. Userspace
/// attaches the free tracepoints (consume_skb, kfree_skb) only while this
/// grows: every freed packet of the machine runs them, and without them a
/// drop is still counted, when the next packet reaches a listener on that
/// CPU (`catch_up`) or when droptrace stops.
#[map]
static NEAR_FULL_SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The packet a listener is processing on this CPU, from ingress to free.
#[map]
static IN_FLIGHT: PerCpuArray<InFlight> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's per-CPU offset, found once (see `this_cpu_offset`).
#[map]
static CPU_OFFSET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const SAMPLE_INTERVAL_NS: u64 = 10_000_000;
const BPF_TCP_LISTEN: u32 = 10;
const TCP_SYN_SENT: i32 = 2;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const IPPROTO_TCP: u8 = 6;

/// The IP and TCP headers of a packet that matter here.
#[repr(C)]
#[derive(Clone, Copy)]
struct Packet {
    remote_addr: [u8; 16],
    /// The destination: the listener as the client addressed it.
    local_addr: [u8; 16],
    family: u16,
    remote_port: u16,
    local_port: u16,
    flags: u8,
    _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct InFlight {
    /// The sk_buff (0: nothing in flight).
    skb: u64,
    /// The listener (struct sock *) and its inode.
    sk: u64,
    inode: u64,
    /// This CPU's LISTENOVERFLOWS and LISTENDROPS when the packet arrived,
    /// then when it was last settled.
    overflows: u64,
    drops: u64,
    /// The listener's namespace (struct net *), its inode number, and its
    /// per-CPU MIB: read again from here, not through the listener, which
    /// may be closed before its last drop is settled.
    net: u64,
    mib: u64,
    netns: u32,
    /// For a SYN, which SYN-queue limit would refuse it (a name, not a count).
    syn_queue_stage: u32,
    packet: Packet,
    /// The local process that connected (0: none known).
    client_pid: u32,
}

/// Parse from a reader of the packet's bytes: `load(offset, buf)` from the
/// IP header, asked for 40 or 14 bytes at a time. An IPv4 packet without
/// IP options (nearly all) takes one load: its IP and TCP headers.
#[inline(always)]
fn parse(load: impl Fn(usize, &mut [u8]) -> bool) -> Option<Packet> {
    let mut ip = [0u8; 40];
    if !load(0, &mut ip) {
        return None;
    }
    let mut packet = Packet {
        remote_addr: [0; 16],
        local_addr: [0; 16],
        family: 0,
        remote_port: 0,
        local_port: 0,
        flags: 0,
        _pad: 0,
    };
    let mut tcp = [0u8; 14];
    match ip[0] >> 4 {
        4 if ip[9] == IPPROTO_TCP => {
            packet.family = AF_INET;
            packet.remote_addr[..4].copy_from_slice(&ip[12..16]);
            packet.local_addr[..4].copy_from_slice(&ip[16..20]);
            let tcp_at = ((ip[0] & 0x0f) as usize) * 4;
            if tcp_at == 20 {
                tcp.copy_from_slice(&ip[20..34]);
            } else if !load(tcp_at & 0x3f, &mut tcp) {
                return None;
            }
        }
        6 if ip[6] == IPPROTO_TCP => {
            packet.family = AF_INET6;
            packet.remote_addr.copy_from_slice(&ip[8..24]);
            packet.local_addr.copy_from_slice(&ip[24..40]);
            if !load(40, &mut tcp) {
                return None;
            }
        }
        _ => return None,
    }
    packet.remote_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    packet.local_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    packet.flags = tcp[13];
    Some(packet)
}

/// This CPU's per-CPU offset (`__per_cpu_offset[cpu]`), which BPF has no
/// helper for here: the address of our own per-CPU array element on this
/// CPU, minus the array's per-CPU base pointer (bpf_array.pptrs[0]).
/// Pointers are turned into numbers by storing them in the map (root may).
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
    let slot = CPU_OFFSET.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of our own map.
    unsafe {
        let known = core::ptr::read_volatile(slot);
        if known != 0 {
            return Some(known);
        }
        core::ptr::write_volatile(slot, slot as u64);
        let element = core::ptr::read_volatile(slot);
        core::ptr::write_volatile(slot, &CPU_OFFSET as *const _ as u64);
        let map = core::ptr::read_volatile(slot);
        let base: u64 = read(map as usize, offsets().bpf_array_pptrs)?;
        let offset = element.wrapping_sub(base);
        core::ptr::write_volatile(slot, offset);
        Some(offset)
    }
}

/// The listener's namespace: (struct net *, its inode number, the per-CPU
/// base of its MIB).
#[inline(always)]
fn namespace_of(sock: &Sock) -> Option<(u64, u32, u64)> {
    let off = offsets();
    let net = read_ptr(sock.addr, off.sock_net)?;
    Some((
        net as u64,
        read(net, off.net_ns_inum)?,
        read(net, off.net_mib_statistics)?,
    ))
}

/// This CPU's (LISTENOVERFLOWS, LISTENDROPS) in the MIB at `per_cpu`.
#[inline(always)]
fn listen_counters(per_cpu: u64) -> Option<(u64, u64)> {
    let off = offsets();
    let mib = per_cpu.wrapping_add(this_cpu_offset()?) as usize;
    // Neighbours in enum linux_mib on every kernel so far: one read.
    if off.mib_listen_drops == off.mib_listen_overflows + 1 {
        let [overflows, drops]: [u64; 2] = read(mib, off.mib_listen_overflows * 8)?;
        return Some((overflows, drops));
    }
    Some((
        read(mib, off.mib_listen_overflows * 8)?,
        read(mib, off.mib_listen_drops * 8)?,
    ))
}

/// cgroup_skb/ingress: a TCP packet reaches a listener.
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
        40 => ctx
            .load::<[u8; 40]>(at)
            .map(|bytes| buf.copy_from_slice(&bytes))
            .is_ok(),
        14 => ctx
            .load::<[u8; 14]>(at)
            .map(|bytes| buf.copy_from_slice(&bytes))
            .is_ok(),
        _ => false,
    };
    // A typed pointer we may read through with runtime offsets.
    let tcp_sock = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as usize;
    if tcp_sock == 0 {
        return;
    }
    let Some(in_flight) = IN_FLIGHT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let previous = unsafe { &mut *in_flight };
    // A packet that left without a free tracepoint: count what it cost.
    if previous.skb != 0 {
        catch_up(previous, stage::ACK);
    }
    if !may_drop::<Probed>(tcp_sock) {
        return;
    }
    if let Some(seen) = NEAR_FULL_SEEN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *seen += 1 };
    }
    let Some(packet) = parse(load) else { return };
    let Some(sock) = Sock::at(tcp_sock) else {
        return;
    };
    // SAFETY: storing the skb's address (root may).
    if let Some(flight) = snapshot(&sock, ctx.skb.skb as u64, packet, |packet| {
        local_client(ctx, packet)
    }) {
        *previous = flight;
    }
}

/// What a packet to a listener near full starts with: this CPU's two
/// counters, the SYN-queue test a SYN would fail, and the local process
/// that sent it (found by `client_of`). The process is looked up for
/// every packet watched, not only once the queue is full: other CPUs fill
/// it while this one works on the packet (a SYN cookie's check, a hash,
/// is long enough: looked up only at a full queue, a refused cookie ACK
/// went unnamed in one nginx → uWSGI burst of three in a 6.1 guest, and
/// in one of about ten here).
#[inline(always)]
fn snapshot(
    sock: &Sock,
    skb: u64,
    packet: Packet,
    client_of: impl FnOnce(&Packet) -> Option<u32>,
) -> Option<InFlight> {
    let (net, netns, mib) = namespace_of(sock)?;
    let (overflows, drops) = listen_counters(mib)?;
    let is_syn = packet.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let syn_queue_stage = if is_syn { syn_queue_stage(sock) } else { 0 };
    let client = client_of(&packet);
    Some(InFlight {
        skb,
        sk: sock.addr as u64,
        inode: sock.inode,
        overflows,
        drops,
        net,
        mib,
        netns,
        syn_queue_stage,
        packet,
        client_pid: client.unwrap_or(0),
    })
}

/// Whether a packet to this listener may be dropped: its accept queue is
/// within QUEUE_MARGIN of full (other CPUs complete handshakes while this
/// one processes the packet, a few at most), or syncookies are off (the
/// SYN queue may refuse). A listener far from full, the usual case, costs
/// three reads and no snapshot.
#[inline(always)]
fn may_drop<L: Listener>(tcp_sock: usize) -> bool {
    let margin = unsafe { core::ptr::read_volatile(&QUEUE_MARGIN) };
    let (Some(queue), Some(max)) = L::accept_queue(tcp_sock) else {
        return true;
    };
    queue.saturating_add(margin) > max || !matches!(L::syncookies(tcp_sock), Some(1 | 2))
}

/// What every SYN and final ACK reads of its listener, read as the
/// program may: through a helper from the packet path, with plain loads
/// from the calls' typed arguments (calls.rs).
pub trait Listener {
    /// (sk_ack_backlog, sk_max_ack_backlog).
    fn accept_queue(tcp_sock: usize) -> (Option<u32>, Option<u32>);
    /// The listener's namespace's net.ipv4.tcp_syncookies.
    fn syncookies(tcp_sock: usize) -> Option<u8>;
}

/// A listener read through bpf_probe_read_kernel.
struct Probed;

impl Listener for Probed {
    #[inline(always)]
    fn accept_queue(tcp_sock: usize) -> (Option<u32>, Option<u32>) {
        Sock {
            addr: tcp_sock,
            inode: 0,
        }
        .accept_queue()
    }

    #[inline(always)]
    fn syncookies(tcp_sock: usize) -> Option<u8> {
        Sock {
            addr: tcp_sock,
            inode: 0,
        }
        .syncookies()
    }
}

/// Which SYN-queue test of tcp_conn_request() would refuse a SYN (0: none).
/// With syncookies on, a full SYN queue is answered with a cookie.
#[inline(always)]
fn syn_queue_stage(sock: &Sock) -> u32 {
    // With syncookies on (the default) nothing more to read.
    if sock.syncookies() != Some(0) {
        return 0;
    }
    let (Some(queued), Some(backlog), Some(max)) = (
        sock.syn_queue(),
        sock.max_ack_backlog(),
        sock.max_syn_backlog(),
    ) else {
        return 0;
    };
    if queued > backlog {
        stage::SYN_QUEUE_BACKLOG
    } else if max.saturating_sub(queued) < (max >> 2) {
        stage::SYN_QUEUE
    } else {
        0
    }
}

/// tp_btf/consume_skb(skb, ...), and tp_btf/kfree_skb(skb, location) of
/// kernels before 5.17 (no reason argument): a packet the kernel is done
/// with; its stage comes from the packet alone.
pub fn on_freed(ctx: &BtfTracePointContext) {
    let skb: u64 = ctx.arg(0);
    settle(skb, None);
}

/// tp_btf/kfree_skb(skb, location, reason, rx_sk): a packet dropped.
pub fn on_kfree_skb(ctx: &BtfTracePointContext) {
    let skb: u64 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    settle(skb, Some(reason as u32));
}

/// Count what the packet in flight on this CPU has cost so far (run at stop,
/// when no later packet may come to catch it up).
pub fn catch_up_this_cpu() {
    let Some(in_flight) = IN_FLIGHT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let flight = unsafe { &mut *in_flight };
    if flight.sk != 0 {
        catch_up(flight, stage::ACK);
    }
}

/// If `skb` is the packet in flight on this CPU, count what it cost.
#[inline(always)]
fn settle(skb: u64, reason: Option<u32>) {
    let Some(in_flight) = IN_FLIGHT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let flight = unsafe { &mut *in_flight };
    if flight.skb != skb || skb == 0 {
        return;
    }
    flight.skb = 0;
    let reasons = unsafe { core::ptr::read_volatile(&DROP_REASONS) };
    let ack_stage = match reason {
        Some(reason) if reason == reasons.no_socket => stage::ACK_SYNCOOKIE,
        _ => stage::ACK,
    };
    catch_up(flight, ack_stage);
}

/// Count what this CPU's counters gained since `flight` last looked, and
/// remember the new values. Called when the packet is freed, and again
/// when the next packet reaches a listener on this CPU: an increment the
/// first look missed (the packet left through a path without a free
/// tracepoint) is still counted, charged to the packet most likely to
/// have caused it. `ack_stage`: what an overflow of a packet other than a
/// SYN counts as (ACK, or ACK_SYNCOOKIE when known to be one).
#[inline(always)]
fn catch_up(flight: &mut InFlight, ack_stage: u32) {
    let sock = Sock {
        addr: flight.sk as usize,
        inode: flight.inode,
    };
    // Only through a namespace that is still the one recorded: a freed
    // one's memory may hold another now, and its counters would be
    // nonsense (a drop that did not happen must not be invented).
    let off = offsets();
    if read::<u32>(flight.net as usize, off.net_ns_inum) != Some(flight.netns) {
        return;
    }
    let Some((overflows, drops)) = listen_counters(flight.mib) else {
        return;
    };
    let overflowed = overflows.wrapping_sub(flight.overflows);
    let other_drops = drops.wrapping_sub(flight.drops).saturating_sub(overflowed);
    flight.overflows = overflows;
    flight.drops = drops;
    let is_syn = flight.packet.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    // A freed listener read through a stale pointer gives nonsense: bound it.
    if overflowed > 0 && overflowed < 1 << 20 {
        let stage = if is_syn { stage::SYN } else { ack_stage };
        count(&sock, stage, overflowed, flight);
    }
    if other_drops > 0 && other_drops < 1 << 20 && is_syn {
        let stage = if flight.syn_queue_stage != 0 {
            flight.syn_queue_stage
        } else {
            stage::SYN_QUEUE
        };
        count(&sock, stage, other_drops, flight);
    }
}

/// tp_btf/inet_sock_set_state(sk, oldstate, newstate): a socket entering
/// SYN_SENT is a local connect() (its port is not chosen yet: it is
/// remembered by the socket itself), so that a drop of its SYN names the
/// process.
pub fn on_set_state(ctx: &BtfTracePointContext) {
    let newstate: i32 = ctx.arg(2);
    if newstate == TCP_SYN_SENT {
        if let Some(fingerprint) = clients::of_socket(ctx.arg(0), clients::AT_CONNECT) {
            clients::remember(fingerprint);
        }
    }
}

/// cgroup/connect4, connect6: a local process connects a TCP socket:
/// remembered by the socket.
pub fn on_connect(ctx: &SockAddrContext) {
    // SAFETY: context fields the verifier lets us read.
    let (protocol, sk) = unsafe {
        (
            (*ctx.sock_addr).protocol,
            (*ctx.sock_addr).__bindgen_anon_1.sk,
        )
    };
    if protocol != IPPROTO_TCP as u32 || sk.is_null() {
        return;
    }
    if let Some(fingerprint) = clients::of_socket(sk as u64, clients::AT_CONNECT) {
        clients::remember(fingerprint);
    }
}

/// The local process that sent `packet`, found through its own socket: the
/// one a packet from the listener back to the sender would be delivered to.
#[inline(always)]
fn local_client(ctx: &SkBuffContext, packet: &Packet) -> Option<u32> {
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
        bpf_sk_lookup_tcp(
            ctx.skb.skb.cast(),
            tuple.as_mut_ptr().cast(),
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    let fingerprint = clients::of_socket(sk as u64, clients::AT_PACKET);
    unsafe { bpf_sk_release(sk.cast()) };
    clients::find(fingerprint?)
}

/// Add `n` drops of `sock` at `stage`; send the details when a sample is due.
#[inline(always)]
fn count(sock: &Sock, stage: u32, n: u64, flight: &InFlight) {
    let key = TcpOverflowKey {
        inode: sock.inode,
        stage,
        _pad: 0,
    };
    match TCP_OVERFLOWS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot.
        Some(counter) => unsafe { *counter += n },
        None => {
            if TCP_OVERFLOWS.insert(&key, &n, 0).is_err() {
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
    // The details are read through the listener: not once it is closed
    // (its drops are counted all the same, under its inode).
    if Sock::at(sock.addr).is_none_or(|s| s.inode != sock.inode) {
        return;
    }
    let packet = &flight.packet;
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
        _pad0: 0,
        backlog: sock.max_ack_backlog().unwrap_or(0),
        queue: sock.ack_backlog().unwrap_or(0),
        somaxconn,
        max_syn_backlog: sock.max_syn_backlog().unwrap_or(0),
        local_addr: [0; 16],
        remote_addr: packet.remote_addr,
        client_pid: flight.client_pid,
    };
    sock.local_addr(packet.family, &mut record.local_addr);
    emit(&record);
}
