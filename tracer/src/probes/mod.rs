//! Loading droptrace's eBPF programs: what the machine must offer, the
//! offsets the programs need, and where their records come out.
mod btf;
pub mod hooks;
pub mod offsets;

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        tp_btf::BtfTracePointLinkId, trace_point::TracePointLink, uprobe::UProbeScope,
        BtfTracePoint, RawTracePoint, TestRun, UProbe,
    },
    Ebpf, EbpfLoader,
};
use tracer_common::{
    ConnectKey, Counter, FdLimitKey, TcpOverflowKey, LOST_COUNTERS_FULL, LOST_PENDING_FULL,
    LOST_RINGBUF_FULL,
};

use crate::contract::Lost;
use hooks::{Attacher, Choice, FamilyHooks};

/// The object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf.o"));

const TRACEFS: &str = "/sys/kernel/tracing";

pub struct Probes {
    /// Keeps the programs attached for as long as it lives, but the classic
    /// tracepoints.
    pub ebpf: Ebpf,
    pub tracepoints: Tracepoints,
    pub records: RingBuf<MapData>,
    pub lost: LostCounters,
    pub counters: Counters,
    /// Which mechanism each family uses on this kernel.
    pub choices: Vec<Choice>,
}

/// The kernel's exact per-CPU drop counts, by family.
pub struct Counters {
    /// TCP listeners, by listener and stage.
    tcp: PerCpuHashMap<MapData, TcpOverflowKey, u64>,
    connects: PerCpuHashMap<MapData, ConnectKey, Counter>,
    fd_limits: PerCpuHashMap<MapData, FdLimitKey, Counter>,
    /// nginx workers out of connection slots, by pid.
    no_connection: PerCpuHashMap<MapData, u32, Counter>,
}

/// Every key's count so far, summed over CPUs.
#[derive(Default)]
pub struct Totals {
    pub tcp: Vec<(TcpOverflowKey, u64)>,
    pub connects: Vec<(ConnectKey, u64)>,
    pub fd_limits: Vec<(FdLimitKey, u64)>,
    pub no_connection: Vec<(u32, u64)>,
}

/// Keys that no longer need holding (their drops were all shown and their
/// process or listener is gone): deleted from the kernel's tables.
#[derive(Debug, Default)]
pub struct Retired {
    pub tcp: Vec<TcpOverflowKey>,
    pub connects: Vec<ConnectKey>,
    pub fd_limits: Vec<FdLimitKey>,
    pub no_connection: Vec<u32>,
}

impl Counters {
    /// Delete retired keys from the kernel's tables.
    pub fn forget(&mut self, retired: &Retired) {
        // A key already gone is no error.
        for key in &retired.tcp {
            let _ = self.tcp.remove(key);
        }
        for key in &retired.connects {
            let _ = self.connects.remove(key);
        }
        for key in &retired.fd_limits {
            let _ = self.fd_limits.remove(key);
        }
        for key in &retired.no_connection {
            let _ = self.no_connection.remove(key);
        }
    }

    pub fn read(&self) -> Totals {
        fn counted<K: aya::Pod>(map: &PerCpuHashMap<MapData, K, Counter>) -> Vec<(K, u64)> {
            map.iter()
                .filter_map(|entry| entry.ok())
                .map(|(key, per_cpu)| (key, per_cpu.iter().map(|c| c.count).sum()))
                .collect()
        }
        Totals {
            tcp: self
                .tcp
                .iter()
                .filter_map(|entry| entry.ok())
                .map(|(key, per_cpu)| (key, per_cpu.iter().sum()))
                .collect(),
            connects: counted(&self.connects),
            fd_limits: counted(&self.fd_limits),
            no_connection: counted(&self.no_connection),
        }
    }
}

/// The kernel side's count of records userspace never saw.
pub struct LostCounters(PerCpuArray<MapData, u64>);

/// The oldest kernel droptrace supports: BPF ring buffers (5.8),
/// bpf_skc_to_tcp_sock (5.9), and the oldest LTS kernel it is tested on
/// (Debian 11's 5.10).
pub const OLDEST_KERNEL: (u32, u32) = (5, 10);

/// "5.10.0-46-cloud-amd64" -> (5, 10).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Checks what droptrace needs before touching the kernel, so that a user
/// gets one line naming what is missing instead of a raw errno.
pub fn preflight() -> Result<()> {
    let release = kernel_release();
    if let Some(version) = kernel_version(&release).filter(|v| *v < OLDEST_KERNEL) {
        bail!(
            "Linux {}.{} ({release}) is older than {}.{}, the oldest kernel droptrace supports (it needs BPF ring buffers, BTF and bpf_skc_to_tcp_sock)",
            version.0,
            version.1,
            OLDEST_KERNEL.0,
            OLDEST_KERNEL.1
        );
    }
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

/// How close to full a TCP accept queue must be for its packets to be
/// watched: while one CPU processes a packet, each other CPU completes a
/// few handshakes at most; 16 each leaves room to spare.
fn queue_margin() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
    16 * cpus
}

/// Load the eBPF object and attach, for each family, the first of its
/// mechanisms this kernel allows; one line on stderr says which.
pub fn load(families: &[FamilyHooks]) -> Result<Probes> {
    preflight()?;
    one_heap_for_all_threads();
    // The kernel's BTF, read once for what the programs need, dropped
    // before aya parses its own copy to attach the BTF-typed programs.
    let btf = offsets::load_vmlinux_btf()?;
    let kernel_offsets =
        offsets::resolve(&btf).context("this kernel's layout is not one droptrace can read")?;
    tracing::debug!(?kernel_offsets, "resolved kernel field offsets from BTF");
    let drop_reasons = offsets::drop_reasons(&btf);
    let met = hooks::met_needs(families, &btf);
    drop(btf);
    let mut ebpf = EbpfLoader::new()
        // No CO-RE relocations in the object: the kernel's BTF is not needed.
        .btf(None)
        .override_global("OFFSETS", &kernel_offsets, true)
        .override_global("DROP_REASONS", &drop_reasons, true)
        .override_global("QUEUE_MARGIN", &queue_margin(), true)
        .load(EBPF_OBJECT)
        .context("the kernel refused droptrace's eBPF programs")?;
    let mut attacher = Attacher::new(&mut ebpf, met);
    let choices = attacher.choose(families);
    let tracepoints = Tracepoints(Arc::new(Mutex::new(attacher.into_tracepoints())));
    Attacher::require(&choices)?;
    load_catch_up(&mut ebpf);
    // aya 0.14's EbpfLoader::new() parses the kernel's BTF whatever
    // .btf(None) says after (aya issue #1172; lazy from aya 0.15, which
    // needs a newer rustc than this toolchain's), and the attacher parses
    // it once more for fexit: both are freed by now.
    give_back_freed_memory();
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("eBPF object lacks map {name}"))
    };
    let records = RingBuf::try_from(take("EVENTS")?)?;
    let lost = LostCounters(PerCpuArray::try_from(take("LOST")?)?);
    let counters = Counters {
        tcp: PerCpuHashMap::try_from(take("TCP_OVERFLOWS")?)?,
        connects: PerCpuHashMap::try_from(take("CONNECT_FAILURES")?)?,
        fd_limits: PerCpuHashMap::try_from(take("FD_LIMIT_HITS")?)?,
        no_connection: PerCpuHashMap::try_from(take("NO_CONNECTION")?)?,
    };
    Ok(Probes {
        ebpf,
        tracepoints,
        records,
        lost,
        counters,
        choices,
    })
}

/// The program that counts, on one CPU, what its packet in flight has cost
/// (tcp_listen.rs): run on every CPU when droptrace stops. Needs
/// BPF_PROG_TEST_RUN on a chosen CPU (5.10+); without it, a drop whose
/// packet left through a path with no free tracepoint waits for the next
/// packet on that CPU, as during the run.
fn load_catch_up(ebpf: &mut Ebpf) {
    let loaded = (|| -> Result<()> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(CATCH_UP)
            .ok_or_else(|| anyhow!("eBPF object lacks program {CATCH_UP}"))?
            .try_into()?;
        program.load()?;
        Ok(())
    })();
    if let Err(err) = &loaded {
        tracing::debug!("no final TCP catch-up: {}", short(err));
    }
}

/// The links of the classic tracepoints, shared by the signal's thread and
/// the watcher. Closing a syscall tracepoint's perf event waits for RCU
/// grace periods in the kernel, partly under a kernel-wide mutex
/// (event_mutex): the seven took 0.5 s closed on one thread here, 0.3 s
/// each on its own. So they are closed each on a thread, as soon as Ctrl-C
/// or SIGTERM comes (while the watcher finishes), or when the watcher stops
/// on its own.
#[derive(Clone)]
pub struct Tracepoints(Arc<Mutex<Vec<TracePointLink>>>);

/// Tracepoints being detached.
#[must_use = "wait for the detach to end"]
pub struct Detaching(Vec<std::thread::JoinHandle<()>>);

impl Tracepoints {
    /// Start detaching every tracepoint not detached yet.
    pub fn detach(&self) -> Detaching {
        let links = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        Detaching(
            links
                .into_iter()
                .filter_map(|link| std::thread::Builder::new().spawn(move || drop(link)).ok())
                .collect(),
        )
    }
}

impl Detaching {
    pub fn wait(self) {
        for thread in self.0 {
            let _ = thread.join();
        }
    }
}

const CATCH_UP: &str = "tcp_catch_up";

/// Count the TCP drops of packets still in flight on every CPU (when the
/// catch-up program loaded).
pub fn catch_up_tcp(ebpf: &mut Ebpf) {
    let Some(program) = ebpf.program_mut(CATCH_UP) else {
        return;
    };
    let Ok(program): Result<&mut RawTracePoint, _> = program.try_into() else {
        return;
    };
    if program.fd().is_err() {
        return;
    }
    for cpu in aya::util::online_cpus().unwrap_or_default() {
        let options = aya::programs::RawTracePointRunOptions {
            cpu: Some(cpu),
            ..Default::default()
        };
        if let Err(err) = program.test_run(options) {
            tracing::debug!("TCP catch-up on CPU {cpu}: {err}");
        }
    }
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

/// Return the heap's free pages to the kernel. Each parse of the kernel's
/// BTF by aya takes 17 MB for a moment, the peak of droptrace's memory;
/// glibc keeps those pages once they are freed. Given back, droptrace runs
/// in a third of the memory, and what it allocates later (nginx's
/// configuration, say) does not stack on top of that peak.
fn give_back_freed_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// One glibc heap for every thread, set before the watcher thread starts.
/// malloc_trim gives back the free top of the main heap only: the watcher,
/// which parses the BTF again when the TCP free programs are first needed,
/// kept 9.5 MB in a heap of its own. droptrace's few threads do not
/// contend for one.
fn one_heap_for_all_threads() {
    // SAFETY: mallopt has no preconditions; glibc ignores what it cannot do.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
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

/// The programs of `family`'s mechanism in use that attach only while the
/// family needs them (`Program::on_demand`). Start-up leaves them out: they
/// are loaded (verified) when first needed, then attached and detached.
pub struct OnDemand {
    /// Names and tp_btf events.
    programs: Vec<(&'static str, &'static str)>,
    loaded: bool,
    links: Vec<(&'static str, BtfTracePointLinkId)>,
}

impl OnDemand {
    pub fn of(family: &FamilyHooks, choices: &[Choice]) -> Self {
        let chosen = choices
            .iter()
            .find(|choice| choice.family == family.family)
            .and_then(|choice| choice.mechanism);
        let programs = family
            .mechanisms
            .iter()
            .filter(|mechanism| Some(mechanism.name) == chosen)
            .flat_map(|mechanism| mechanism.programs)
            .filter(|program| program.on_demand)
            .filter_map(|program| match program.attach {
                hooks::Attach::BtfTracepoint { name } => Some((program.name, name)),
                _ => None,
            })
            .collect();
        Self {
            programs,
            loaded: false,
            links: Vec::new(),
        }
    }

    /// Load them all (the verifier runs here), with a parse of the
    /// kernel's BTF dropped after.
    fn load(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        if self.programs.is_empty() {
            return Ok(());
        }
        let btf = aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?;
        for &(name, event) in &self.programs {
            btf_tracepoint(ebpf, name)?
                .load(event, &btf)
                .with_context(|| format!("cannot load tp_btf/{event}"))?;
        }
        self.loaded = true;
        drop(btf);
        give_back_freed_memory();
        Ok(())
    }

    pub fn attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Attach them all (loaded first if they are not yet), or none.
    pub fn attach(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        if !self.loaded {
            self.load(ebpf)?;
        }
        for &(name, event) in &self.programs {
            let attached = btf_tracepoint(ebpf, name).and_then(|program| Ok(program.attach()?));
            match attached {
                Ok(link) => self.links.push((name, link)),
                Err(err) => {
                    self.detach(ebpf);
                    return Err(err.context(format!("cannot attach tp_btf/{event}")));
                }
            }
        }
        Ok(())
    }

    pub fn detach(&mut self, ebpf: &mut Ebpf) {
        for (name, link) in self.links.drain(..) {
            if let Err(err) = btf_tracepoint(ebpf, name).and_then(|p| Ok(p.detach(link)?)) {
                tracing::debug!("cannot detach {name}: {err:#}");
            }
        }
    }
}

fn btf_tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?
        .try_into()?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_read_as_major_and_minor() {
        assert_eq!(kernel_version("5.10.0-46-cloud-amd64"), Some((5, 10)));
        assert_eq!(kernel_version("6.12.117+deb13-cloud-amd64"), Some((6, 12)));
        assert_eq!(kernel_version("4.19.0"), Some((4, 19)));
        assert!(kernel_version("4.19.0").unwrap() < OLDEST_KERNEL);
        assert!(kernel_version("5.9.1").unwrap() < OLDEST_KERNEL);
        assert!(kernel_version("6.1.0").unwrap() >= OLDEST_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }
}
