//! TCP sockets as /proc/PID/task/TID/net/tcp{,6} shows them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The local address of TCP socket `inode`, from /proc/PID/task/TID/net/tcp{,6}
/// (the sockets of that thread's network namespace, which may differ from
/// its process's).
pub fn local_address_of(pid: u32, tid: u32, inode: u64) -> Option<(IpAddr, u16)> {
    ["tcp", "tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/net/{table}")).ok()?;
        text.lines()
            .skip(1)
            .find_map(|line| proc_net_tcp_entry(line, inode))
    })
}

/// "  0: 0100007F:4E98 00000000:0000 0A ... 0 12345 ..." -> 127.0.0.1:20120
/// when the inode (10th field) is `inode`. Addresses are 32-bit words in
/// host byte order.
fn proc_net_tcp_entry(line: &str, inode: u64) -> Option<(IpAddr, u16)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(9)?.parse::<u64>().ok()? != inode {
        return None;
    }
    let (addr, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..addr.len() / 8 {
        let value = u32::from_str_radix(addr.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_listener_is_found_in_proc_net_tcp() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode = super::super::owners::socket_inode(&link).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            local_address_of(std::process::id(), std::process::id(), inode),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        );
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1";
        assert_eq!(
            proc_net_tcp_entry(v6, 777),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 8080))
        );
    }
}
