//! What a drop family declares about its kernel hooks: the mechanisms it can
//! use, in order of preference, each a set of eBPF programs and what it
//! needs from the running kernel. The loader tries them in turn and says on
//! one line which one each family got, and why the others were skipped.
use std::collections::{HashMap, HashSet};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{
        trace_point::TracePointLink, BtfTracePoint, CgroupAttachMode, CgroupSkb,
        CgroupSkbAttachType, CgroupSockAddr, TracePoint,
    },
    Ebpf,
};

use super::{btf::Btf, cgroup2_root, offsets, short};

/// Where one program of the eBPF object attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A classic tracepoint (tracefs).
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
    /// A BTF-typed raw tracepoint (`tp_btf/NAME`).
    BtfTracepoint { name: &'static str },
    /// cgroup_skb/ingress on the root of the cgroup v2 hierarchy.
    CgroupIngress,
    /// cgroup/connect4 or connect6 on the cgroup v2 root (the attach type
    /// is the program's own).
    CgroupConnect,
    /// fexit on a kernel function (a BPF trampoline: needs the kernel's
    /// ftrace direct calls, refused on some machines).
    Fexit { function: &'static str },
    /// fentry on a kernel function (the same trampoline as fexit).
    Fentry { function: &'static str },
    /// A uretprobe on a symbol of a user binary, attached per binary once
    /// a process running it is seen (not at start-up).
    Uretprobe { symbol: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// The program's name in the eBPF object.
    pub name: &'static str,
    pub attach: Attach,
    /// Loaded and attached only when its family needs it, not at start-up
    /// (tp_btf programs, see `OnDemand`).
    pub on_demand: bool,
}

impl Program {
    pub const fn tracepoint(
        name: &'static str,
        category: &'static str,
        event: &'static str,
    ) -> Self {
        Self {
            name,
            attach: Attach::Tracepoint {
                category,
                name: event,
            },
            on_demand: false,
        }
    }

    pub const fn btf_tracepoint(name: &'static str, event: &'static str) -> Self {
        Self {
            name,
            attach: Attach::BtfTracepoint { name: event },
            on_demand: false,
        }
    }

    /// This program, attached only while its family needs it.
    pub const fn on_demand(self) -> Self {
        Self {
            on_demand: true,
            ..self
        }
    }

    pub const fn cgroup_ingress(name: &'static str) -> Self {
        Self {
            name,
            attach: Attach::CgroupIngress,
            on_demand: false,
        }
    }

    pub const fn cgroup_connect(name: &'static str) -> Self {
        Self {
            name,
            attach: Attach::CgroupConnect,
            on_demand: false,
        }
    }

    pub const fn fexit(name: &'static str, function: &'static str) -> Self {
        Self {
            name,
            attach: Attach::Fexit { function },
            on_demand: false,
        }
    }

    pub const fn fentry(name: &'static str, function: &'static str) -> Self {
        Self {
            name,
            attach: Attach::Fentry { function },
            on_demand: false,
        }
    }

    pub const fn uretprobe(name: &'static str, symbol: &'static str) -> Self {
        Self {
            name,
            attach: Attach::Uretprobe { symbol },
            on_demand: false,
        }
    }
}

/// What a mechanism needs from the running kernel beyond its programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Need {
    /// An enumerator in the kernel's BTF (values differ across kernels and
    /// are read from BTF, never written as numbers).
    EnumValue {
        enumeration: &'static str,
        value: &'static str,
    },
}

/// One way for a family to see its drops.
#[derive(Clone, Copy, Debug)]
pub struct Mechanism {
    pub name: &'static str,
    pub programs: &'static [Program],
    pub needs: &'static [Need],
    /// The FAST_PATH slot (tracer_common::FAST_PATH_*) that tells the
    /// shared syscall tracepoints this family is served here: set before
    /// the programs attach (so no event is counted twice), cleared if they
    /// fail.
    pub fast_path: Option<u32>,
    /// Ways to add detail to this mechanism when the kernel allows them, in
    /// order of preference (the first that attaches; their failure costs
    /// no drop).
    pub extras: &'static [Mechanism],
}

/// A family's hooks: mechanisms in order of preference.
#[derive(Clone, Copy, Debug)]
pub struct FamilyHooks {
    pub family: &'static str,
    pub mechanisms: &'static [Mechanism],
}

/// What the loader did for one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub family: &'static str,
    /// The mechanism in use, if any worked.
    pub mechanism: Option<&'static str>,
    /// The way of adding detail in use, if any.
    pub extra: Option<&'static str>,
    /// Mechanisms skipped and extras refused, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl Choice {
    /// "unix_backlog: tracepoints ... (skipped X: why)".
    pub fn describe(&self) -> String {
        let skipped = self
            .skipped
            .iter()
            .map(|(what, why)| format!("skipped {what}: {why}"))
            .collect::<Vec<_>>();
        let mut mechanism = self
            .mechanism
            .unwrap_or("NONE, its drops will not be seen")
            .to_string();
        if let Some(extra) = self.extra {
            mechanism = format!("{mechanism}, with {extra}");
        }
        if skipped.is_empty() {
            format!("{}: {mechanism}", self.family)
        } else {
            format!("{}: {mechanism} ({})", self.family, skipped.join("; "))
        }
    }
}

/// Programs to leave out, by name, comma-separated: what a kernel that
/// refuses them would do (the tests use it to run the fallbacks here).
const AVOID: &str = "DROPTRACE_AVOID";

fn avoided(program: &str) -> bool {
    std::env::var(AVOID).is_ok_and(|names| names.split(',').any(|n| n.trim() == program))
}

/// aya's parse of the kernel's BTF, which tp_btf and fexit programs need:
/// made once, on first use.
fn parsed_btf(slot: &mut Option<aya::Btf>) -> Result<&aya::Btf> {
    if slot.is_none() {
        *slot = Some(aya::Btf::from_sys_fs().context("cannot read the kernel's BTF")?);
    }
    Ok(slot.as_ref().expect("parsed above"))
}

impl Need {
    fn met(&self, btf: &Btf) -> bool {
        match self {
            Need::EnumValue { enumeration, value } => {
                offsets::enum_value(btf, enumeration, value).is_some()
            }
        }
    }
}

/// The needs of `families`' mechanisms that this kernel meets, decided
/// while its BTF is at hand (it is dropped before anything is attached).
pub fn met_needs(families: &[FamilyHooks], btf: &Btf) -> HashSet<Need> {
    families
        .iter()
        .flat_map(|family| family.mechanisms)
        .flat_map(|mechanism| mechanism.needs)
        .filter(|need| need.met(btf))
        .copied()
        .collect()
}

/// Load and attach a fentry or fexit `$program` (their APIs are alike but
/// share no trait) on kernel function `$function`.
macro_rules! trampoline {
    ($program:expr, $kind:ty, $btf:expr, $prefix:literal, $function:expr) => {{
        let program: &mut $kind = $program.try_into()?;
        program
            .load($function, $btf)
            .with_context(|| format!(concat!("cannot load ", $prefix, "/{}"), $function))?;
        program
            .attach()
            .with_context(|| format!(concat!("cannot attach ", $prefix, "/{}"), $function))?;
    }};
}

/// Attaches programs, each once however many families share it.
pub struct Attacher<'a> {
    ebpf: &'a mut Ebpf,
    met: HashSet<Need>,
    aya_btf: Option<aya::Btf>,
    attached: HashMap<&'static str, Result<(), String>>,
    /// The classic tracepoints' links, held apart (see `Tracepoints`).
    tracepoints: Vec<TracePointLink>,
}

impl<'a> Attacher<'a> {
    pub fn new(ebpf: &'a mut Ebpf, met: HashSet<Need>) -> Self {
        Self {
            ebpf,
            met,
            aya_btf: None,
            attached: HashMap::new(),
            tracepoints: Vec::new(),
        }
    }

    /// The links of the classic tracepoints attached.
    pub fn into_tracepoints(self) -> Vec<TracePointLink> {
        self.tracepoints
    }

    /// Try each family's mechanisms in order; the first that attaches wins.
    pub fn choose(&mut self, families: &[FamilyHooks]) -> Vec<Choice> {
        families
            .iter()
            .map(|family| {
                let mut choice = Choice {
                    family: family.family,
                    mechanism: None,
                    extra: None,
                    skipped: Vec::new(),
                };
                let chosen =
                    family
                        .mechanisms
                        .iter()
                        .find(|mechanism| match self.mechanism(mechanism) {
                            Ok(()) => true,
                            Err(why) => {
                                choice.skipped.push((mechanism.name.into(), why));
                                false
                            }
                        });
                if let Some(mechanism) = chosen {
                    choice.mechanism = Some(mechanism.name);
                    for extra in mechanism.extras {
                        match self.mechanism(extra) {
                            Ok(()) => {
                                choice.extra = Some(extra.name);
                                break;
                            }
                            Err(why) => choice.skipped.push((extra.name.into(), why)),
                        }
                    }
                }
                choice
            })
            .collect()
    }

    fn mechanism(&mut self, mechanism: &Mechanism) -> Result<(), String> {
        if let Some(Need::EnumValue { enumeration, value }) =
            mechanism.needs.iter().find(|need| !self.met.contains(need))
        {
            return Err(format!("this kernel's enum {enumeration} has no {value}"));
        }
        if let Some(slot) = mechanism.fast_path {
            self.set_fast_path(slot, true)?;
        }
        let tracepoints = self.tracepoints.len();
        let mut new = Vec::new();
        let attached = mechanism.programs.iter().try_for_each(|program| {
            let fresh = !self.attached.contains_key(program.name);
            self.program(program)?;
            if fresh {
                new.push(program.name);
            }
            Ok(())
        });
        if attached.is_err() {
            if let Some(slot) = mechanism.fast_path {
                self.set_fast_path(slot, false)?;
            }
            // A mechanism is all or nothing: what it attached before one
            // of its programs was refused would count beside the next.
            self.tracepoints.truncate(tracepoints);
            for name in new {
                self.attached.remove(name);
                if let Some(program) = self.ebpf.program_mut(name) {
                    unload(program);
                }
            }
        }
        attached
    }

    fn set_fast_path(&mut self, slot: u32, on: bool) -> Result<(), String> {
        let map = self
            .ebpf
            .map_mut("FAST_PATH")
            .ok_or("eBPF object lacks map FAST_PATH")?;
        let mut array: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(map).map_err(|e| e.to_string())?;
        array
            .set(slot, u32::from(on), 0)
            .map_err(|e| format!("cannot set FAST_PATH[{slot}]: {e}"))
    }

    fn program(&mut self, program: &Program) -> Result<(), String> {
        if let Some(done) = self.attached.get(program.name) {
            return done.clone();
        }
        if avoided(program.name) {
            return Err(format!("{} left out by {AVOID}", program.name));
        }
        // A refusal without a verifier log repeats the errno after "Verifier
        // output:": once is enough.
        let result = self.attach(program).map_err(|err| {
            let text = short(&err);
            match text.split_once(". Verifier output: :") {
                Some((head, _)) => head.to_string(),
                None => text,
            }
        });
        self.attached.insert(program.name, result.clone());
        result
    }

    fn attach(&mut self, program: &Program) -> Result<()> {
        let name = program.name;
        let found = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF object lacks program {name}"))?;
        match program.attach {
            Attach::Tracepoint {
                category,
                name: event,
            } => {
                let tracepoint: &mut TracePoint = found.try_into()?;
                tracepoint
                    .load()
                    .with_context(|| format!("cannot load {name}"))?;
                let link = tracepoint
                    .attach(category, event)
                    .with_context(|| format!("cannot attach to tracepoint {category}/{event}"))?;
                self.tracepoints.push(tracepoint.take_link(link)?);
            }
            // Loaded (verified) and attached later, by its family: not
            // on the way to "watching".
            Attach::BtfTracepoint { .. } if program.on_demand => {}
            Attach::BtfTracepoint { name: event } => {
                let btf = parsed_btf(&mut self.aya_btf)?;
                let tracepoint: &mut BtfTracePoint = self
                    .ebpf
                    .program_mut(name)
                    .expect("found above")
                    .try_into()?;
                tracepoint
                    .load(event, btf)
                    .with_context(|| format!("cannot load tp_btf/{event}"))?;
                tracepoint
                    .attach()
                    .with_context(|| format!("cannot attach tp_btf/{event}"))?;
            }
            Attach::CgroupIngress => {
                let root = cgroup2_root()?;
                let cgroup = std::fs::File::open(&root)
                    .with_context(|| format!("cannot open {}", root.display()))?;
                let skb: &mut CgroupSkb = found.try_into()?;
                skb.load().context("cannot load the cgroup_skb program")?;
                // aya attaches through a bpf_link (Linux 5.7+), which takes
                // no flags and always joins the programs already there
                // (BPF_F_ALLOW_MULTI): the root's other programs (systemd's)
                // are neither displaced nor blocked.
                skb.attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .with_context(|| {
                    format!("cannot attach cgroup_skb/ingress to {}", root.display())
                })?;
            }
            Attach::CgroupConnect => {
                let root = cgroup2_root()?;
                let cgroup = std::fs::File::open(&root)
                    .with_context(|| format!("cannot open {}", root.display()))?;
                let connect: &mut CgroupSockAddr = found.try_into()?;
                connect
                    .load()
                    .with_context(|| format!("cannot load {name}"))?;
                // A bpf_link joins the root's other programs; ours always
                // lets the connect through.
                connect
                    .attach(cgroup, CgroupAttachMode::Single)
                    .with_context(|| format!("cannot attach {name} to {}", root.display()))?;
            }
            // The same trampoline, on either side of the call.
            Attach::Fexit { function } => {
                let btf = parsed_btf(&mut self.aya_btf)?;
                let program = self.ebpf.program_mut(name).expect("found above");
                trampoline!(program, aya::programs::FExit, btf, "fexit", function);
            }
            Attach::Fentry { function } => {
                let btf = parsed_btf(&mut self.aya_btf)?;
                let program = self.ebpf.program_mut(name).expect("found above");
                trampoline!(program, aya::programs::FEntry, btf, "fentry", function);
            }
            Attach::Uretprobe { .. } => {
                // Attached per nginx binary when one is seen; loading it now
                // tells whether this kernel takes it.
                let probe: &mut aya::programs::UProbe = found.try_into()?;
                if probe.fd().is_err() {
                    probe.load().context("cannot load the uretprobe program")?;
                }
            }
        }
        Ok(())
    }

    /// Fails when a program every family needs could not be attached.
    pub fn require(choices: &[Choice]) -> Result<()> {
        if choices.iter().all(|c| c.mechanism.is_none()) {
            bail!(
                "no drop family could attach its programs: {}",
                choices
                    .iter()
                    .map(Choice::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Ok(())
    }
}

/// Detach and unload a program (its classic tracepoint links are held
/// apart, in `Attacher::tracepoints`).
fn unload(program: &mut aya::programs::Program) {
    use aya::programs::Program as P;
    let unloaded = match program {
        P::TracePoint(p) => p.unload(),
        P::BtfTracePoint(p) => p.unload(),
        P::CgroupSkb(p) => p.unload(),
        P::CgroupSockAddr(p) => p.unload(),
        P::FEntry(p) => p.unload(),
        P::FExit(p) => p.unload(),
        P::UProbe(p) => p.unload(),
        _ => Ok(()),
    };
    if let Err(err) = unloaded {
        tracing::debug!("unloading a program of a refused mechanism: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_says_what_is_used_and_why_the_rest_was_skipped() {
        let choice = Choice {
            family: "tcp_accept_queue",
            mechanism: None,
            extra: None,
            skipped: vec![(
                "cgroup_skb/ingress + tp_btf/kfree_skb".into(),
                "this kernel's enum skb_drop_reason has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"
                    .into(),
            )],
        };
        assert_eq!(
            choice.describe(),
            "tcp_accept_queue: NONE, its drops will not be seen (skipped cgroup_skb/ingress + tp_btf/kfree_skb: this kernel's enum skb_drop_reason has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW)"
        );
        let used = Choice {
            family: "unix_backlog",
            mechanism: Some("tracepoints syscalls/sys_{enter,exit}_connect"),
            extra: None,
            skipped: vec![],
        };
        assert_eq!(
            used.describe(),
            "unix_backlog: tracepoints syscalls/sys_{enter,exit}_connect"
        );
        let detailed = Choice {
            family: "tcp",
            mechanism: Some("cgroup_skb"),
            extra: Some("cgroup/connect4"),
            skipped: vec![("tp_btf/x".into(), "refused".into())],
        };
        assert_eq!(
            detailed.describe(),
            "tcp: cgroup_skb, with cgroup/connect4 (skipped tp_btf/x: refused)"
        );
    }
}
