//! Loading droptrace's eBPF programs: what the machine must offer, the
//! offsets the programs need, and where their records come out.
pub mod offsets;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use tracer_common::{LOST_PENDING_FULL, LOST_RINGBUF_FULL};

/// The object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf.o"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// (program name in the object, tracepoint category, tracepoint name)
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("connect_enter", "syscalls", "sys_enter_connect"),
    ("connect_exit", "syscalls", "sys_exit_connect"),
    ("listen_enter", "syscalls", "sys_enter_listen"),
    ("listen_exit", "syscalls", "sys_exit_listen"),
];

pub struct Probes {
    /// Keeps the programs attached for as long as it lives.
    pub ebpf: Ebpf,
    pub records: RingBuf<MapData>,
    pub lost: LostCounters,
}

/// The kernel side's count of records userspace never saw.
pub struct LostCounters(PerCpuArray<MapData, u64>);

/// Everything the kernel could not hand over, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    pub ring_buffer_full: u64,
    pub pending_map_full: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.ring_buffer_full + self.pending_map_full
    }
}

/// Checks what droptrace needs before touching the kernel, so that a user
/// gets one line naming what is missing instead of a raw errno.
pub fn preflight() -> Result<()> {
    if EBPF_OBJECT.is_empty() {
        bail!("this droptrace was built without its eBPF programs: build it with `cargo xtask build` (or run `cargo xtask run -- ARGS`)");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("droptrace loads eBPF programs and needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN): run it with sudo");
    }
    if !Path::new(offsets::VMLINUX_BTF).exists() {
        bail!("this kernel exposes no BTF ({} is missing): droptrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian and Ubuntu kernels since 2021 have it)", offsets::VMLINUX_BTF);
    }
    ensure_tracefs()
}

fn ensure_tracefs() -> Result<()> {
    let events = Path::new(TRACEFS).join("events");
    if events.exists() {
        return Ok(());
    }
    tracing::info!("tracefs is not mounted; mounting it at {TRACEFS}");
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .context("cannot run mount to mount tracefs")?;
    if !status.success() || !events.exists() {
        bail!("tracefs is not available at {TRACEFS} and could not be mounted: run `mount -t tracefs tracefs {TRACEFS}` (needs CONFIG_TRACING)");
    }
    Ok(())
}

pub fn load() -> Result<Probes> {
    preflight()?;
    let btf = offsets::load_vmlinux_btf()?;
    let kernel_offsets =
        offsets::resolve(&btf).context("this kernel's layout is not one droptrace can read")?;
    tracing::debug!(?kernel_offsets, "resolved kernel field offsets from BTF");
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &kernel_offsets, true)
        .load(EBPF_OBJECT)
        .context("the kernel refused droptrace's eBPF programs")?;
    for &(program, category, name) in TRACEPOINTS {
        let tracepoint: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object lacks program {program}"))?
            .try_into()?;
        tracepoint
            .load()
            .with_context(|| format!("cannot load {program}"))?;
        tracepoint
            .attach(category, name)
            .with_context(|| format!("cannot attach to tracepoint {category}/{name}"))?;
    }
    let records = RingBuf::try_from(
        ebpf.take_map("EVENTS")
            .ok_or_else(|| anyhow!("no EVENTS map"))?,
    )?;
    let lost = PerCpuArray::try_from(
        ebpf.take_map("LOST")
            .ok_or_else(|| anyhow!("no LOST map"))?,
    )?;
    Ok(Probes {
        ebpf,
        records,
        lost: LostCounters(lost),
    })
}

impl LostCounters {
    pub fn read(&self) -> Result<Lost> {
        let sum = |index| -> Result<u64> { Ok(self.0.get(&index, 0)?.iter().sum()) };
        Ok(Lost {
            ring_buffer_full: sum(LOST_RINGBUF_FULL)?,
            pending_map_full: sum(LOST_PENDING_FULL)?,
        })
    }
}
