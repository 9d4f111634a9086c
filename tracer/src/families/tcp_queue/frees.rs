//! The free tracepoints (consume_skb, kfree_skb) of the TCP family, attached
//! only while a listener is near full.
//!
//! Every packet the machine frees runs them (about 80 ns each here, twice:
//! each is attached as two copies), yet they only matter for a packet that
//! reached a listener near full. Without them a drop is still counted, from
//! the kernel's own counters: when the next packet reaches a listener on
//! that CPU, or when droptrace stops. They make it counted at once, and
//! tell a SYN-cookie ACK from a plain one (the drop reason). The ingress
//! program counts packets to a listener near full (NEAR_FULL_SEEN); while
//! that count grows, they are attached, and for IDLE after. They are loaded
//! (verified: tens of milliseconds, a third of a second under emulation)
//! when first needed, not at start-up.
use std::time::{Duration, Instant};

use aya::{maps::PerCpuArray, Ebpf};

use super::HOOKS;
use crate::probes::{hooks::Choice, short, OnDemand};

/// How long the free tracepoints stay attached after the last packet to a
/// listener near full.
const IDLE: Duration = Duration::from_secs(5);

pub struct FreeWatch {
    programs: OnDemand,
    /// NEAR_FULL_SEEN summed over CPUs when last read.
    seen: u64,
    last_near_full: Option<Instant>,
    /// Loading or attaching failed: do not retry at every tick.
    failed: bool,
}

impl FreeWatch {
    pub fn new(choices: &[Choice]) -> Self {
        Self {
            programs: OnDemand::of(&HOOKS, choices),
            seen: 0,
            last_near_full: None,
            failed: false,
        }
    }

    /// Attach or detach the free tracepoints as the listeners need.
    pub fn tick(&mut self, ebpf: &mut Ebpf, now: Instant) {
        if self.failed {
            return;
        }
        let seen = near_full_seen(ebpf);
        if seen != self.seen {
            self.seen = seen;
            self.last_near_full = Some(now);
            if !self.programs.attached() {
                match self.programs.attach(ebpf) {
                    Ok(()) => {
                        tracing::debug!("a TCP listener is near full: free tracepoints attached")
                    }
                    Err(err) => self.fail(&err),
                }
            }
        } else if self.programs.attached()
            && self.last_near_full.is_none_or(|last| now - last >= IDLE)
        {
            self.programs.detach(ebpf);
            tracing::debug!("no TCP listener near full for {IDLE:?}: free tracepoints detached");
        }
    }

    fn fail(&mut self, err: &anyhow::Error) {
        self.failed = true;
        tracing::warn!(
            "TCP drops will be counted at the next packet to a listener instead of at once: {}",
            short(err)
        );
    }
}

/// Packets to a listener near full so far, all CPUs (0 if unreadable).
fn near_full_seen(ebpf: &Ebpf) -> u64 {
    ebpf.map("NEAR_FULL_SEEN")
        .and_then(|map| PerCpuArray::<_, u64>::try_from(map).ok())
        .and_then(|array| array.get(&0, 0).ok())
        .map_or(0, |per_cpu| per_cpu.iter().sum())
}
