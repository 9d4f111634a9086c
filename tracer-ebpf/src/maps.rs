//! Maps shared by every drop family.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    Counter, FAST_PATHS, LOST_COUNTERS_FULL, LOST_RINGBUF_FULL, SAMPLE_INTERVAL_NS,
};

/// Records for userspace. Userspace may resize it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records that could not be handed over, by cause (see tracer_common::LOST_*).
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Which families a fast hook serves (tracer_common::FAST_PATH_*): set by
/// userspace after load, read by the shared syscall tracepoints.
#[map]
pub static FAST_PATH: aya_ebpf::maps::Array<u32> =
    aya_ebpf::maps::Array::with_max_entries(FAST_PATHS, 0);

/// True when the fast hook of `slot` is attached.
#[inline(always)]
pub fn fast_path(slot: u32) -> bool {
    FAST_PATH.get(slot).is_some_and(|on| *on != 0)
}

/// Count one record that userspace will never see.
pub fn count_lost(cause: u32) {
    if let Some(counter) = LOST.get_ptr_mut(cause) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Copy `record` into the ring buffer, counting it as lost when full.
pub fn emit<T: 'static>(record: &T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            // SAFETY: `entry` is sized for T; copying POD bytes.
            unsafe { core::ptr::copy_nonoverlapping(record, entry.as_mut_ptr(), 1) };
            entry.submit(0);
        }
        None => count_lost(LOST_RINGBUF_FULL),
    }
}

/// Count one drop under `key` in this CPU's slot of `counters`. Returns the
/// time when a sampled record of it is due: this CPU's first drop of the
/// key, then one of every CLOCK_EVERY drops if SAMPLE_INTERVAL_NS has
/// passed (the clock is read only then). A drop is counted whether or not
/// its record then finds room in the ring buffer.
#[inline(always)]
pub fn count<K>(counters: &PerCpuHashMap<K, Counter>, key: &K) -> Option<u64> {
    for _ in 0..2 {
        if let Some(counter) = counters.get_ptr_mut(key) {
            // SAFETY: this CPU's slot. Programs run with migration off, and
            // the kernels servers run do not preempt them (no PREEMPT_RT).
            unsafe {
                (*counter).count += 1;
                if (*counter).count % CLOCK_EVERY != 0 {
                    return None;
                }
                let now = bpf_ktime_get_ns();
                if now.wrapping_sub((*counter).sampled_ns) < SAMPLE_INTERVAL_NS {
                    return None;
                }
                (*counter).sampled_ns = now;
                return Some(now);
            }
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let first = Counter {
            count: 1,
            sampled_ns: now,
        };
        // NOEXIST: if another program inserted the key meanwhile, add to it.
        if counters.insert(key, &first, BPF_NOEXIST as u64).is_ok() {
            return Some(now);
        }
    }
    count_lost(LOST_COUNTERS_FULL);
    None
}

/// In a storm, the clock is read for one drop in this many.
const CLOCK_EVERY: u64 = 256;
