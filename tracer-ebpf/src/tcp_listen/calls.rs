//! The same counts, paid per connection instead of per packet, where the
//! kernel allows fentry/fexit (Debian's and Ubuntu's kernels; not this
//! project's development VM).
//!
//! The kernel's two MIB increments for a listener happen inside these
//! calls, on the CPU that processes the packet, in one softirq:
//!
//! - tcp_conn_request(rsk_ops, af_ops, sk, skb): a SYN to a listener. A
//!   full accept queue or SYN queue refuses it here.
//! - tcp_check_req(sk, skb, req, fastopen, req_stolen): the final ACK of a
//!   request in the SYN queue makes the child socket (through
//!   tcp_v4/v6_syn_recv_sock, which Linux 6.1 refuses to trace: six
//!   arguments); a full accept queue refuses it there.
//! - cookie_v4_check / cookie_v6_check(sk, skb): the same for the ACK of
//!   a SYN answered with a cookie.
//!
//! fentry reads this CPU's counters when the listener is near full
//! (`may_drop`, as the packet path does), fexit reads them again: the
//! difference is what this call cost. Only SYNs and final ACKs to
//! listeners run these programs, once each, and a listener far from full
//! costs four loads, made straight from the typed `struct sock *` argument
//! (`kernel::load`: no helper call; in a 6.1 guest this cut fentry on
//! tcp_conn_request from 2.3-2.6 to 1.6 µs per run under emulation, and
//! fentry on tcp_connect from 1.9 to 0.6-0.8 µs, its floor there). Local
//! clients are named from fentry/tcp_connect, by the connection's
//! addresses and ports (a tracing program cannot look sockets up as the
//! packet path does).
use aya_ebpf::{helpers::bpf_probe_read_kernel_buf, macros::map, maps::PerCpuArray};
use tracer_common::{stage, AF_INET, AF_INET6};

use super::{
    catch_up, clients, may_drop, parse, snapshot, InFlight, Listener, Packet, TCP_FLAG_ACK,
    TCP_FLAG_SYN,
};
use crate::kernel::{load, offsets, read, Sock};

/// The calls that own this CPU's slot (0: none).
pub const CONN_REQUEST: u32 = 1;
pub const CHECK_REQ: u32 = 2;
pub const COOKIE_CHECK: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct InCall {
    /// The call the snapshot belongs to (0: none taken).
    owner: u32,
    /// What an overflow in this call counts as, when it is not a SYN's.
    ack_stage: u32,
    flight: InFlight,
}

/// The call in progress on this CPU, from fentry to fexit.
#[map]
static IN_CALL: PerCpuArray<InCall> = PerCpuArray::with_max_entries(1, 0);

/// A connection as both ends see it: the local client's address and port
/// and the listener's, IPv4 in the first 4 bytes (an IPv6 socket talking
/// IPv4 is keyed as IPv4, as its packets are). Ports in host order.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Connection {
    family: u16,
    client_port: u16,
    listener_port: u16,
    _pad: u16,
    client_addr: [u8; 16],
    listener_addr: [u8; 16],
}

impl Connection {
    /// Its fingerprint in `clients`.
    #[inline(always)]
    fn fingerprint(&self) -> u64 {
        // SAFETY: 40 bytes, 8-aligned, every byte written (`_pad` as 0).
        clients::fingerprint(unsafe { &*(self as *const Connection).cast::<[u64; 5]>() })
    }
}

/// fentry/tcp_conn_request(rsk_ops, af_ops, sk, skb).
pub fn on_conn_request_entry(sk: usize, skb: usize) {
    enter(CONN_REQUEST, stage::ACK, sk, skb);
}

/// fentry/tcp_check_req(sk, skb, req, fastopen, req_stolen). With
/// `fastopen`, `sk` is a Fast Open child, not a listener: nothing to count.
pub fn on_check_req_entry(sk: usize, skb: usize, fastopen: bool) {
    if !fastopen {
        enter(CHECK_REQ, stage::ACK, sk, skb);
    }
}

/// fentry/cookie_v4_check, cookie_v6_check(sk, skb).
pub fn on_cookie_check_entry(sk: usize, skb: usize) {
    enter(COOKIE_CHECK, stage::ACK_SYNCOOKIE, sk, skb);
}

/// A listener read with plain loads: `sk` is each call's `struct sock *`
/// argument, typed by BTF (see `kernel::load`).
struct Typed;

impl Listener for Typed {
    #[inline(always)]
    fn accept_queue(sk: usize) -> (Option<u32>, Option<u32>) {
        let off = offsets();
        (
            Some(load(sk, off.sock_ack_backlog)),
            Some(load(sk, off.sock_max_ack_backlog)),
        )
    }

    #[inline(always)]
    fn syncookies(sk: usize) -> Option<u8> {
        let off = offsets();
        // sk->__sk_common.skc_net.net: typed too (struct net *). A null one
        // reads 0, "off", which only makes the listener watched.
        let net: usize = load(sk, off.sock_net);
        Some(load(net, off.net_syncookies))
    }
}

/// fexit of each: count what the call cost.
pub fn on_exit(owner: u32) {
    let Some(slot) = IN_CALL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let call = unsafe { &mut *slot };
    if call.owner != owner {
        return;
    }
    call.owner = 0;
    let ack_stage = call.ack_stage;
    catch_up(&mut call.flight, ack_stage);
}

#[inline(always)]
fn enter(owner: u32, ack_stage: u32, sk: usize, skb: usize) {
    let Some(slot) = IN_CALL.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot.
    let call = unsafe { &mut *slot };
    call.owner = 0;
    if !may_drop::<Typed>(sk) {
        return;
    }
    let Some(sock) = Sock::at(sk) else {
        return;
    };
    // As the packet path: a packet whose headers cannot be read is not
    // watched (a kernel's own skb on its way to a listener always can).
    let Some(mut packet) = packet_of(skb) else {
        return;
    };
    // The call tells a SYN from an ACK.
    packet.flags = if owner == CONN_REQUEST {
        TCP_FLAG_SYN
    } else {
        TCP_FLAG_ACK
    };
    if let Some(flight) = snapshot(&sock, skb as u64, packet, client_of) {
        call.flight = flight;
        call.ack_stage = ack_stage;
        call.owner = owner;
    }
}

/// The packet's IP and TCP headers, read from skb->head + network_header.
#[inline(always)]
fn packet_of(skb: usize) -> Option<Packet> {
    let off = offsets();
    let head: usize = read(skb, off.skb_head)?;
    let network: u16 = read(skb, off.skb_network_header)?;
    let ip = head.wrapping_add(network as usize);
    parse(|at: usize, buf: &mut [u8]| {
        // SAFETY: the helper checks the address.
        unsafe { bpf_probe_read_kernel_buf((ip + at) as *const u8, buf).is_ok() }
    })
}

/// The local process that connected from the packet's source to its
/// destination, if tcp_connect saw it.
#[inline(always)]
fn client_of(packet: &Packet) -> Option<u32> {
    clients::find(
        Connection {
            family: packet.family,
            client_port: packet.remote_port,
            listener_port: packet.local_port,
            _pad: 0,
            client_addr: packet.remote_addr,
            listener_addr: packet.local_addr,
        }
        .fingerprint(),
    )
}

/// fentry/tcp_connect(sk): a local TCP connect, its addresses and ports
/// chosen, its SYN about to leave: remembered by its connection. Read with
/// plain loads from the typed argument, except an IPv6 socket's addresses.
pub fn on_tcp_connect(sk: usize) {
    let off = offsets();
    let mut key = Connection {
        family: AF_INET,
        client_port: load(sk, off.sock_num),
        listener_port: u16::from_be(load(sk, off.sock_dport)),
        _pad: 0,
        client_addr: [0; 16],
        listener_addr: [0; 16],
    };
    let v6 = if load::<u16>(sk, off.sock_family) == AF_INET6 {
        read::<[u8; 16]>(sk, off.sock_v6_daddr).filter(|daddr| !is_v4_mapped(daddr))
    } else {
        None
    };
    match v6 {
        Some(daddr) => {
            key.family = AF_INET6;
            key.listener_addr = daddr;
            Sock { addr: sk, inode: 0 }.local_addr(AF_INET6, &mut key.client_addr);
        }
        None => {
            key.listener_addr[..4].copy_from_slice(&load::<[u8; 4]>(sk, off.sock_daddr));
            key.client_addr[..4].copy_from_slice(&load::<[u8; 4]>(sk, off.sock_rcv_saddr));
        }
    }
    clients::remember(key.fingerprint());
}

/// ::ffff:a.b.c.d: an IPv6 socket talking IPv4.
#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|&b| b == 0) && addr[10] == 0xff && addr[11] == 0xff
}
