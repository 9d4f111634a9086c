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
