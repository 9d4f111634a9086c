//! What the kernel itself holds for a process's BPF objects, read with the
//! bpf(2) system call (no droptrace code involved): program names, and the
//! keys of a map. An object of another process is reached through a copy of
//! its fd (`crate::fd_of`).
use std::os::fd::{AsRawFd, OwnedFd};

use crate::fd_of;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// bpf(2) command `cmd` with `attr`, a union bpf_attr; true when it
/// succeeded.
///
/// # Safety
/// Every pointer in `attr` points at a buffer, large enough for `cmd`,
/// that outlives the call.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> bool {
    // SAFETY: the caller vouches for the pointers in attr.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) == 0 }
}

/// The name in a BPF object's info (struct bpf_prog_info: at 64; struct
/// bpf_map_info: at 24), through BPF_OBJ_GET_INFO_BY_FD.
fn object_name(fd: &OwnedFd, name_at: usize) -> Option<String> {
    let mut info = [0u8; 96];
    // union bpf_attr for OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr points at the info buffer, which outlives the call.
    if !unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) } {
        return None;
    }
    let name = &info[name_at..name_at + 16];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// The name of BPF program `fd` of process `pid`.
pub fn program_name(pid: u32, fd: i32) -> Option<String> {
    object_name(&fd_of(pid, fd)?, 64)
}

/// The fds of `pid` that are BPF objects with `field` in their fdinfo
/// ("prog_type:", "map_type:"), with that fdinfo.
pub fn objects(pid: u32, field: &str) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let info = std::fs::read_to_string(entry.path()).ok()?;
            let fd = entry.file_name().to_string_lossy().parse().ok()?;
            info.lines()
                .any(|l| l.starts_with(field))
                .then_some((fd, info))
        })
        .collect()
}

/// The keys map `name` of process `pid` holds now (kernel map names keep
/// 15 bytes), each as bytes of `key_size`; None if it has no such map.
pub fn map_keys(pid: u32, name: &str, key_size: usize) -> Option<Vec<Vec<u8>>> {
    let wanted: String = name.chars().take(15).collect();
    let map = objects(pid, "map_type:")
        .into_iter()
        .filter_map(|(fd, _)| fd_of(pid, fd))
        .find(|fd| object_name(fd, 24).as_deref() == Some(wanted.as_str()))?;
    let mut keys = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        // union bpf_attr for map element commands: map_fd, key, next_key.
        let mut attr = [0u8; 32];
        attr[..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
        let key_ptr = key.as_ref().map_or(0, |k| k.as_ptr() as u64);
        attr[8..16].copy_from_slice(&key_ptr.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: attr points at key and next (key_size bytes each), which
        // outlive the call.
        if !unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            // ENOENT: that was the last key.
            return Some(keys);
        }
        keys.push(next.clone());
        key = Some(next);
        if keys.len() > 1 << 20 {
            panic!("map {name} of {pid}: more keys than it can hold");
        }
    }
}

/// droptrace's links on the TCP free tracepoints (consume_skb, kfree_skb),
/// as the kernel lists them, sorted.
pub fn free_links(pid: u32) -> Vec<String> {
    let mut links: Vec<String> = tracepoint_links(pid)
        .into_iter()
        .filter(|name| name == "consume_skb" || name == "kfree_skb")
        .collect();
    links.sort();
    links
}

/// (run_time_ns, run_cnt) in a BPF program's fdinfo (counted while
/// kernel.bpf_stats_enabled=1).
pub fn run_stats(fdinfo: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("run_time_ns:"), field("run_cnt:"))
}

/// The tracepoints `pid`'s BPF links are attached to: `tp_name` of each
/// raw or BTF-typed tracepoint link, as the link's fdinfo shows it.
pub fn tracepoint_links(pid: u32) -> Vec<String> {
    objects(pid, "link_type:")
        .into_iter()
        .filter_map(|(_, info)| {
            let name = info.lines().find_map(|l| l.strip_prefix("tp_name:"))?;
            Some(name.trim().to_string())
        })
        .collect()
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// A cgroup_skb/ingress program that only lets the packet through
/// (`r0 = 1; exit`), attached to the cgroup v2 root beside droptrace's, so
/// that both run on the same packets: what the kernel's dispatch and the
/// `bpf_stats` clock reads cost a program that does nothing, the floor
/// under droptrace's per-run figure. Detached when dropped.
pub struct PassIngress {
    program: OwnedFd,
    cgroup: OwnedFd,
}

impl PassIngress {
    /// Load and attach it to the cgroup v2 root (needs root).
    pub fn attach() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // struct bpf_insn: code, dst/src registers, offset, immediate.
        let insns: [u8; 16] = [
            0xb7, 0, 0, 0, 1, 0, 0, 0, // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 1
            0x95, 0, 0, 0, 0, 0, 0, 0, // BPF_JMP | BPF_EXIT
        ];
        let license = b"GPL\0";
        // union bpf_attr for PROG_LOAD: prog_type, insn_cnt, insns, license,
        // log_level, log_size, log_buf, kern_version, prog_flags,
        // prog_name[16] (at 48), prog_ifindex, expected_attach_type (at 68).
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SKB.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..60].copy_from_slice(b"pass_ingress");
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET_INGRESS.to_ne_bytes());
        // SAFETY: attr points at insns and license, which outlive the call.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let program = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cgroup: OwnedFd = std::fs::File::open(cgroup2_root()?)?.into();
        let mut attr = Self::attach_attr(&cgroup, &program);
        // SAFETY: attr holds no pointers.
        if !unsafe { bpf(BPF_PROG_ATTACH, &mut attr) } {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { program, cgroup })
    }

    /// union bpf_attr for PROG_ATTACH and PROG_DETACH: target_fd,
    /// attach_bpf_fd, attach_type, attach_flags.
    fn attach_attr(cgroup: &OwnedFd, program: &OwnedFd) -> [u8; 20] {
        let mut attr = [0u8; 20];
        attr[..4].copy_from_slice(&(cgroup.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET_INGRESS.to_ne_bytes());
        attr[12..16].copy_from_slice(&BPF_F_ALLOW_MULTI.to_ne_bytes());
        attr
    }

    /// (run_time_ns, run_cnt) so far, from its fdinfo (counted while
    /// kernel.bpf_stats_enabled=1).
    pub fn stats(&self) -> (u64, u64) {
        let path = format!("/proc/self/fdinfo/{}", self.program.as_raw_fd());
        run_stats(&std::fs::read_to_string(path).unwrap_or_default())
    }
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mounts.
fn cgroup2_root() -> std::io::Result<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (path, fstype) = (fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| path.to_string())
        })
        .ok_or_else(|| std::io::Error::other("no cgroup v2 hierarchy is mounted"))
}

impl Drop for PassIngress {
    fn drop(&mut self) {
        let mut attr = Self::attach_attr(&self.cgroup, &self.program);
        // SAFETY: attr holds no pointers.
        unsafe { bpf(BPF_PROG_DETACH, &mut attr) };
    }
}
