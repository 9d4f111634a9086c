//! Local TCP clients: the process behind each connect(), so that a refused
//! SYN or ACK names it. Every connect is remembered, whatever the state of
//! its listener then: a connect made while the listener was far from full
//! can still be refused, its SYN queued behind others that filled the
//! listener (under a burst, by hundreds of packets).
//!
//! A connect is a store into an array, by a 64-bit fingerprint: of the
//! connection's addresses and ports where the calls see it (calls.rs), of
//! the client's socket on the packet path. No lookup and no eviction,
//! which remembering every connect in an LRU table cost (0.8 µs each here,
//! 11 µs under emulation); socket storage cost 0.7 µs here. The process is
//! kept by its pid alone, its name read in userspace: bpf_get_current_comm
//! cost 1.8 µs per connect under emulation (tcp_connect's program: 3.6 µs
//! with it, 1.8 without, in a 6.12 guest).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, PerCpuArray},
};

/// Ways per set.
const WAYS: usize = 4;
/// Sets: a fingerprint's low 16 bits pick its set.
const SETS: u32 = 1 << 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClientWay {
    fingerprint: u64,
    /// The process (its name is read in userspace).
    pid: u32,
}

/// The last WAYS connects whose fingerprints share their low 16 bits, the
/// oldest replaced first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClientSet {
    ways: [ClientWay; WAYS],
    next: u32,
}

/// A connect is forgotten once four later connects fell in its set: with
/// 65,536 sets, even 7,000 connects in the seconds a SYN is retried put
/// four more in a given set about once in 200,000. (Sets by the client's
/// port alone did not hold: Linux gives one port to connections to
/// different listeners, and a nginx in front of uWSGI connects from the
/// ports its own clients use.)
#[map]
static CLIENTS: Array<ClientSet> = Array::with_max_entries(SETS, 0);

/// The set a connect with `fingerprint` belongs to.
#[inline(always)]
fn set_of(fingerprint: u64) -> Option<*mut ClientSet> {
    CLIENTS.get_ptr_mut(fingerprint as u32 % SETS)
}

/// 64 bits mixed from `words`: they pick a set and tell a connect from the
/// others there (two alike in all 64 bits and in one set: 1 in 2^48).
#[inline(always)]
pub fn fingerprint(words: &[u64]) -> u64 {
    let mut hash: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in words {
        hash = (hash ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 32;
    }
    hash
}

/// A socket's address, as a number. The verifier refuses arithmetic on a
/// socket pointer, even to hash it; a value loaded from a map is a plain
/// number to it (root may store a pointer there). One slot per context:
/// a packet's program (softirq) may interrupt a connect's between its
/// store and its load, never the other way round.
#[map]
static SOCKET_ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Where `of_socket` runs: a connect (process context), or a packet.
pub const AT_CONNECT: u32 = 0;
pub const AT_PACKET: u32 = 1;

/// The fingerprint of the socket at `sk`, from a program running `at`.
#[inline(always)]
pub fn of_socket(sk: u64, at: u32) -> Option<u64> {
    let slot = SOCKET_ADDRESS.get_ptr_mut(at)?;
    // SAFETY: this CPU's slot for this context; stored and loaded back at once.
    let address = unsafe {
        core::ptr::write_volatile(slot, sk);
        core::ptr::read_volatile(slot)
    };
    Some(fingerprint(&[address]))
}

/// The current process made the connect with `fingerprint`. A way with the
/// same fingerprint is taken over: a port, or a socket's memory, used
/// again must not leave the earlier process to be found.
#[inline(always)]
pub fn remember(fingerprint: u64) {
    let Some(set) = set_of(fingerprint) else {
        return;
    };
    // SAFETY: an element of our own array. Two CPUs storing into one set
    // at once may take the same way: one connect is then forgotten (its
    // drops are counted all the same, unnamed).
    unsafe {
        let same = (*set)
            .ways
            .iter()
            .position(|way| way.fingerprint == fingerprint);
        let index = match same {
            Some(index) => index,
            None => {
                let next = (*set).next as usize % WAYS;
                (*set).next = (*set).next.wrapping_add(1);
                next
            }
        };
        let Some(way) = (*set).ways.get_mut(index) else {
            return;
        };
        way.fingerprint = fingerprint;
        way.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    }
}

/// The process that made the connect with `fingerprint`, if it is still
/// remembered.
#[inline(always)]
pub fn find(fingerprint: u64) -> Option<u32> {
    // SAFETY: an element of our own array, copied at once.
    let set = unsafe { &*set_of(fingerprint)? };
    set.ways
        .iter()
        .find(|way| way.fingerprint == fingerprint && way.pid != 0)
        .map(|way| way.pid)
}
