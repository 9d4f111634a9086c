//! Loading droptrace's eBPF programs: what the machine must offer, the
//! offsets the programs need, and where their records come out.
pub mod offsets;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        uprobe::UProbeScope, BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType,
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use tracer_common::{
    DropReasons, TcpOverflowKey, LOST_COUNTERS_FULL, LOST_PENDING_FULL, LOST_RINGBUF_FULL,
};

/// The object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf.o"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// (program name in the object, tracepoint category, tracepoint name)
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("connect_enter", "syscalls", "sys_enter_connect"),
    ("connect_exit", "syscalls", "sys_exit_connect"),
    ("listen_enter", "syscalls", "sys_enter_listen"),
    ("listen_exit", "syscalls", "sys_exit_listen"),
    ("accept_exit", "syscalls", "sys_exit_accept"),
    ("accept4_exit", "syscalls", "sys_exit_accept4"),
    ("socket_exit", "syscalls", "sys_exit_socket"),
    ("open_exit", "syscalls", "sys_exit_open"),
    ("openat_exit", "syscalls", "sys_exit_openat"),
];

/// The uretprobe on nginx's ngx_get_connection (see worker_connections.rs).
const NGINX_PROGRAM: &str = "nginx_get_connection";
const NGINX_SYMBOL: &str = "ngx_get_connection";

pub struct Probes {
    /// Keeps the programs attached for as long as it lives.
    pub ebpf: Ebpf,
    pub records: RingBuf<MapData>,
    pub lost: LostCounters,
    /// Exact per-CPU drop counts of TCP listeners, by listener and stage.
    pub tcp_overflows: PerCpuHashMap<MapData, TcpOverflowKey, u64>,
}

/// The kernel side's count of records userspace never saw.
pub struct LostCounters(PerCpuArray<MapData, u64>);

/// Everything the kernel could not hand over, by cause.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct Lost {
    pub ring_buffer_full: u64,
    pub pending_map_full: u64,
    pub counter_map_full: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.ring_buffer_full + self.pending_map_full + self.counter_map_full
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
    let drop_reasons = offsets::drop_reasons(&btf);
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &kernel_offsets, true)
        .override_global("DROP_REASONS", &drop_reasons, true)
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
    // aya parses the kernel's BTF for tp_btf programs: once is enough.
    let aya_btf = aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
    if let Err(err) = attach_tcp_listen_drops(&mut ebpf, &aya_btf, drop_reasons) {
        tracing::warn!("TCP listen-queue drops will not be seen: {}", short(&err));
    }
    if let Err(err) = attach_local_clients(&mut ebpf, &aya_btf) {
        tracing::warn!(
            "refused local TCP clients will be named by address only: {}",
            short(&err)
        );
    }
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
    })
}

/// An error in one line. A verifier refusal carries the whole verifier
/// log; the operator needs its first line and the verifier's verdict (the
/// last line before its statistics). The full log goes to debug.
fn short(err: &anyhow::Error) -> String {
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
fn cgroup2_root() -> Result<std::path::PathBuf> {
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

/// TCP listen-queue drops need all three: the ingress filter snapshots the
/// kernel's counters as a packet reaches a listener, consume_skb and
/// kfree_skb read them again when the kernel is done with it.
fn attach_tcp_listen_drops(ebpf: &mut Ebpf, btf: &aya::Btf, reasons: DropReasons) -> Result<()> {
    if reasons.tcp_listen_overflow == u32::MAX {
        bail!("this kernel has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (needs Linux 6.11+)");
    }
    attach_ingress_filter(ebpf)?;
    attach_btf_tracepoint(ebpf, btf, "tcp_syn_done", "consume_skb")?;
    attach_btf_tracepoint(ebpf, btf, "tcp_ack_drop", "kfree_skb")
}

fn attach_ingress_filter(ebpf: &mut Ebpf) -> Result<()> {
    let root = cgroup2_root()?;
    let cgroup =
        std::fs::File::open(&root).with_context(|| format!("cannot open {}", root.display()))?;
    let program: &mut CgroupSkb = ebpf
        .program_mut("tcp_syn_ingress")
        .ok_or_else(|| anyhow!("eBPF object lacks program tcp_syn_ingress"))?
        .try_into()?;
    program
        .load()
        .context("cannot load the cgroup_skb program")?;
    // aya attaches through a bpf_link (Linux 5.7+), which takes no flags
    // and always joins the programs already there (BPF_F_ALLOW_MULTI): the
    // root's other programs (systemd's) are neither displaced nor blocked.
    program
        .attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )
        .with_context(|| format!("cannot attach cgroup_skb/ingress to {}", root.display()))?;
    Ok(())
}

/// Local TCP clients (who sent a dropped SYN); without it drops name the
/// client's address only.
fn attach_local_clients(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    attach_btf_tracepoint(ebpf, btf, "tcp_client_connect", "inet_sock_set_state")
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    program: &str,
    tracepoint: &str,
) -> Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("eBPF object lacks program {program}"))?
        .try_into()?;
    program
        .load(tracepoint, btf)
        .with_context(|| format!("cannot load tp_btf/{tracepoint}"))?;
    program
        .attach()
        .with_context(|| format!("cannot attach tp_btf/{tracepoint}"))?;
    Ok(())
}

/// Attach the uretprobe on ngx_get_connection to the nginx binary at
/// `exe`, for every process running it (loading the program on first use).
pub fn attach_nginx_get_connection(ebpf: &mut Ebpf, exe: &Path) -> Result<()> {
    let program: &mut UProbe = ebpf
        .program_mut(NGINX_PROGRAM)
        .ok_or_else(|| anyhow!("eBPF object lacks program {NGINX_PROGRAM}"))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .context("cannot load the uretprobe program")?;
    }
    program
        .attach(NGINX_SYMBOL, exe, UProbeScope::AllProcesses)
        .with_context(|| format!("cannot attach a uretprobe to {NGINX_SYMBOL}"))?;
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
