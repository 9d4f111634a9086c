//! Loading droptrace's eBPF programs: what the machine must offer, the
//! offsets the programs need, and where their records come out.
pub mod hooks;
pub mod offsets;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{uprobe::UProbeScope, UProbe},
    Ebpf, EbpfLoader,
};
use tracer_common::{TcpOverflowKey, LOST_COUNTERS_FULL, LOST_PENDING_FULL, LOST_RINGBUF_FULL};

use crate::contract::Lost;
use hooks::{Attacher, Choice, FamilyHooks};

/// The object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf.o"));

const TRACEFS: &str = "/sys/kernel/tracing";

pub struct Probes {
    /// Keeps the programs attached for as long as it lives.
    pub ebpf: Ebpf,
    pub records: RingBuf<MapData>,
    pub lost: LostCounters,
    /// Exact per-CPU drop counts of TCP listeners, by listener and stage.
    pub tcp_overflows: PerCpuHashMap<MapData, TcpOverflowKey, u64>,
    /// Which mechanism each family uses on this kernel.
    pub choices: Vec<Choice>,
}

/// The kernel side's count of records userspace never saw.
pub struct LostCounters(PerCpuArray<MapData, u64>);

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

/// Load the eBPF object and attach, for each family, the first of its
/// mechanisms this kernel allows; one line on stderr says which.
pub fn load(families: &[FamilyHooks]) -> Result<Probes> {
    preflight()?;
    let btf = offsets::load_vmlinux_btf()?;
    let kernel_offsets =
        offsets::resolve(&btf).context("this kernel's layout is not one droptrace can read")?;
    tracing::debug!(?kernel_offsets, "resolved kernel field offsets from BTF");
    let drop_reasons = offsets::drop_reasons(&btf);
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &kernel_offsets, true)
        .override_global("DROP_REASONS", &drop_reasons, true)
        .load(EBPF_OBJECT)
        .context("the kernel refused droptrace's eBPF programs")?;
    let choices = Attacher::new(&mut ebpf, &btf).choose(families);
    Attacher::require(&choices)?;
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("eBPF object lacks map {name}"))
    };
    let records = RingBuf::try_from(take("EVENTS")?)?;
    let lost = LostCounters(PerCpuArray::try_from(take("LOST")?)?);
    let tcp_overflows = PerCpuHashMap::try_from(take("TCP_OVERFLOWS")?)?;
    Ok(Probes {
        ebpf,
        records,
        lost,
        tcp_overflows,
        choices,
    })
}

/// An error in one line. A verifier refusal carries the whole verifier
/// log; the operator needs its first line and the verifier's verdict (the
/// last line before its statistics). The full log goes to debug.
pub(crate) fn short(err: &anyhow::Error) -> String {
    const STATISTICS: [&str; 4] = ["verification time", "stack depth", "processed", ":"];
    let full = format!("{err:#}");
    tracing::debug!("{full}");
    let mut lines = full.lines().map(str::trim).filter(|line| !line.is_empty());
    let first = lines.next().unwrap_or_default();
    let verdict = lines.rfind(|line| !STATISTICS.iter().any(|s| line.starts_with(s)));
    match verdict {
        Some(verdict) => format!("{first} ... {verdict} (RUST_LOG=debug shows the verifier log)"),
        None => first.to_string(),
    }
}

/// The cgroup v2 hierarchy's root, where one cgroup_skb program sees every
/// socket of the machine (hybrid systems mount it at /sys/fs/cgroup/unified).
pub(crate) fn cgroup2_root() -> Result<std::path::PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| std::path::PathBuf::from(path))
        })
        .min_by_key(|path| path.components().count())
        .ok_or_else(|| {
            anyhow!(
                "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)"
            )
        })
}

/// Attach uretprobe `program` to `symbol` of the binary at `exe`, for every
/// process running it (the program was loaded at start-up).
pub fn attach_uretprobe(ebpf: &mut Ebpf, program: &str, symbol: &str, exe: &Path) -> Result<()> {
    let probe: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("eBPF object lacks program {program}"))?
        .try_into()?;
    if probe.fd().is_err() {
        probe.load().context("cannot load the uretprobe program")?;
    }
    probe
        .attach(symbol, exe, UProbeScope::AllProcesses)
        .with_context(|| format!("cannot attach a uretprobe to {symbol}"))?;
    Ok(())
}

impl LostCounters {
    pub fn read(&self) -> Result<Lost> {
        let sum = |index| -> Result<u64> { Ok(self.0.get(&index, 0)?.iter().sum()) };
        Ok(Lost {
            ring_buffer_full: sum(LOST_RINGBUF_FULL)?,
            pending_map_full: sum(LOST_PENDING_FULL)?,
            counter_map_full: sum(LOST_COUNTERS_FULL)?,
        })
    }
}
