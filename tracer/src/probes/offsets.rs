//! Kernel struct field offsets, resolved from the running kernel's BTF.
//!
//! aya does not relocate field accesses of Rust eBPF programs (no CO-RE), so
//! the programs read fields at offsets we hand them in `KernelOffsets`.
use anyhow::{anyhow, bail, Context, Result};
use tracer_common::{DropReasons, KernelOffsets};

use super::btf::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn load_vmlinux_btf() -> Result<Btf> {
    Btf::from_file(VMLINUX_BTF)
}

/// Resolve every offset the programs need; fails naming the missing field.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets> {
    let at = |path: &str| field_offset(btf, path);
    // The MIB indexes live in one anonymous enum (uapi snmp.h): find it
    // once, a scan of every type, then read both from it.
    let mib = enum_having(btf, "LINUX_MIB_LISTENOVERFLOWS")
        .ok_or_else(|| anyhow!("kernel BTF has no LINUX_MIB_LISTENOVERFLOWS"))?;
    let mib_index =
        |name: &str| enumerator(btf, &mib, name).ok_or_else(|| anyhow!("kernel BTF has no {name}"));
    Ok(KernelOffsets {
        task_files: at("task_struct.files")?,
        task_nsproxy: at("task_struct.nsproxy")?,
        task_signal: at("task_struct.signal")?,
        signal_rlim: at("signal_struct.rlim")?,
        nsproxy_net_ns: at("nsproxy.net_ns")?,
        files_fdt: at("files_struct.fdt")?,
        fdtable_fd: at("fdtable.fd")?,
        fdtable_max_fds: at("fdtable.max_fds")?,
        file_private_data: at("file.private_data")?,
        file_inode: at("file.f_inode")?,
        inode_ino: at("inode.i_ino")?,
        socket_sk: at("socket.sk")?,
        sock_family: at("sock.__sk_common.skc_family")?,
        sock_net: at("sock.__sk_common.skc_net.net")?,
        sock_max_ack_backlog: at("sock.sk_max_ack_backlog")?,
        net_ns_inum: at("net.ns.inum")?,
        net_somaxconn: at("net.core.sysctl_somaxconn")?,
        unix_sock_addr: at("unix_sock.addr")?,
        unix_address_len: at("unix_address.len")?,
        unix_address_name: at("unix_address.name")?,
        sock_num: at("sock.__sk_common.skc_num")?,
        sock_rcv_saddr: at("sock.__sk_common.skc_rcv_saddr")?,
        sock_v6_rcv_saddr: at("sock.__sk_common.skc_v6_rcv_saddr")?,
        sock_daddr: at("sock.__sk_common.skc_daddr")?,
        sock_dport: at("sock.__sk_common.skc_dport")?,
        sock_v6_daddr: at("sock.__sk_common.skc_v6_daddr")?,
        sock_ack_backlog: at("sock.sk_ack_backlog")?,
        sock_socket: at("sock.sk_socket")?,
        socket_file: at("socket.file")?,
        icsk_syn_qlen: at("inet_connection_sock.icsk_accept_queue.qlen")?,
        net_max_syn_backlog: at("net.ipv4.sysctl_max_syn_backlog")?,
        net_syncookies: at("net.ipv4.sysctl_tcp_syncookies")?,
        bpf_array_pptrs: at("bpf_array.pptrs")?,
        net_mib_statistics: at("net.mib.net_statistics")?,
        mib_listen_overflows: mib_index("LINUX_MIB_LISTENOVERFLOWS")?,
        mib_listen_drops: mib_index("LINUX_MIB_LISTENDROPS")?,
        skb_head: at("sk_buff.head")?,
        skb_network_header: at("sk_buff.network_header")?,
        sock_gso_type: at("sock.sk_gso_type")?,
        gso_tcpv6: enum_having(btf, "SKB_GSO_TCPV6")
            .and_then(|gso| enumerator(btf, &gso, "SKB_GSO_TCPV6"))
            .ok_or_else(|| anyhow!("kernel BTF has no SKB_GSO_TCPV6"))?,
    })
}

/// The running kernel's values of the drop reasons the programs match.
/// Values differ between kernels, so they are never written as literals;
/// a reason this kernel lacks becomes u32::MAX, which matches nothing.
pub fn drop_reasons(btf: &Btf) -> DropReasons {
    let value = |name: &str| enum_value(btf, "skb_drop_reason", name).unwrap_or(u32::MAX);
    DropReasons {
        tcp_listen_overflow: value("SKB_DROP_REASON_TCP_LISTEN_OVERFLOW"),
        no_socket: value("SKB_DROP_REASON_NO_SOCKET"),
    }
}

/// The enum (named or not) that has enumerator `member`.
fn enum_having(btf: &Btf, member: &str) -> Option<Type> {
    btf.types().find(|ty| enumerator(btf, ty, member).is_some())
}

pub fn enum_value(btf: &Btf, enum_name: &str, member: &str) -> Option<u32> {
    btf.types()
        .filter(|ty| btf.type_name(ty) == enum_name)
        .find_map(|ty| enumerator(btf, &ty, member))
}

/// `member`'s value when `ty` is an enum that has it.
fn enumerator(btf: &Btf, ty: &Type, member: &str) -> Option<u32> {
    btf.enumerators(ty)
        .find(|(name, _)| *name == member)
        .map(|(_, value)| value)
}

/// Byte offset of `struct.field.subfield...` from the start of `struct`,
/// looking through anonymous struct and union members as C does.
pub fn field_offset(btf: &Btf, path: &str) -> Result<u32> {
    let mut parts = path.split('.');
    let root = parts.next().unwrap_or_default();
    let mut current = btf
        .struct_named(root)
        .ok_or_else(|| anyhow!("kernel BTF has no struct {root}"))?;
    let mut bits = 0;
    let mut fields = parts.peekable();
    while let Some(field) = fields.next() {
        let (offset, ty) = find_member(btf, &current, field)
            .with_context(|| format!("kernel BTF has no field {path} (at {field})"))?;
        bits += offset;
        if fields.peek().is_some() {
            if !Btf::is_composite(&ty) {
                bail!("{path}: {field} is not a struct");
            }
            current = ty;
        }
    }
    if bits % 8 != 0 {
        bail!("{path} is a bitfield");
    }
    Ok(bits / 8)
}

/// (bit offset, type with typedefs and qualifiers peeled) of member `name`.
fn find_member(btf: &Btf, within: &Type, name: &str) -> Option<(u32, Type)> {
    for (member_name, type_id, offset) in btf.members(within) {
        let ty = btf.peel(type_id)?;
        if member_name == name {
            return Some((offset, ty));
        }
        if member_name.is_empty() && Btf::is_composite(&ty) {
            if let Some((inner, found)) = find_member(btf, &ty, name) {
                return Some((offset + inner, found));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF resolves every field; needs no root.
    #[test]
    fn resolves_every_field_of_the_running_kernel() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} missing (kernel without BTF)");
            return;
        }
        let offsets = resolve(&load_vmlinux_btf().unwrap()).unwrap();
        // skc_family is the 17th byte of sock_common on every 5.x/6.x kernel,
        // and a sockaddr_un array starts right after len's int.
        assert_eq!(offsets.sock_family, 16);
        assert!(offsets.sock_max_ack_backlog > offsets.sock_net);
        assert!(offsets.unix_address_name > offsets.unix_address_len);
    }

    #[test]
    fn listen_counters_are_found_in_the_kernels_mib_enum() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} missing (kernel without BTF)");
            return;
        }
        let offsets = resolve(&load_vmlinux_btf().unwrap()).unwrap();
        // /proc/net/netstat lists ListenOverflows right before ListenDrops,
        // as the kernel's enum does.
        assert_eq!(offsets.mib_listen_drops, offsets.mib_listen_overflows + 1);
        assert!(offsets.mib_listen_overflows > 0);
    }

    #[test]
    fn drop_reasons_come_from_the_kernels_enum() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIPPED: {VMLINUX_BTF} missing (kernel without BTF)");
            return;
        }
        let reasons = drop_reasons(&load_vmlinux_btf().unwrap());
        // NO_SOCKET is the third reason since 5.17; TCP_LISTEN_OVERFLOW
        // exists on this project's minimum kernel (6.11) and is not NO_SOCKET.
        assert_eq!(reasons.no_socket, 3);
        assert_ne!(reasons.tcp_listen_overflow, u32::MAX);
        assert_ne!(reasons.tcp_listen_overflow, reasons.no_socket);
    }
}
