//! Real TCP listeners with chosen backlogs that never accept, and
//! non-blocking clients whose SYNs pile up against them.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// A listener on `addr` with `backlog`, never accepting.
pub fn listener(addr: SocketAddr, backlog: i32) -> TcpListener {
    let listener = TcpListener::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"));
    // listen() again on a listening socket sets its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), backlog) }, 0);
    listener
}

/// Hold handshakes without data in the SYN queue (TCP_DEFER_ACCEPT): the
/// final ACK of a client that sends nothing is ignored (tcp_check_req).
pub fn defer_accept(listener: &TcpListener) {
    let seconds: libc::c_int = 30;
    assert!(
        set_option(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            &seconds
        ),
        "TCP_DEFER_ACCEPT: {}",
        std::io::Error::last_os_error()
    );
}

/// setsockopt(fd, level, name, value): whether it succeeded.
fn set_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> bool {
    // SAFETY: a value of its own size; the kernel checks the fd and option.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        ) == 0
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A blocking connect to `remote` from a socket first bound to `local`
/// with SO_REUSEADDR (so several may share that local port).
pub fn connect_from(local: SocketAddr, remote: SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: a new socket, owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    let (here, here_len) = sockaddr(local);
    let (there, there_len) = sockaddr(remote);
    // SAFETY: valid fd and addresses of their lengths.
    let ok = set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &on)
        && unsafe {
            libc::bind(
                fd,
                (&here as *const libc::sockaddr_storage).cast(),
                here_len,
            ) == 0
                && libc::connect(
                    fd,
                    (&there as *const libc::sockaddr_storage).cast(),
                    there_len,
                ) == 0
        };
    if ok {
        Ok(socket)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `n` non-blocking connects to `addr`; the sockets stay open (and keep
/// retransmitting their SYNs) until `close_all`.
pub fn connect_many(addr: SocketAddr, n: usize) -> Vec<RawFd> {
    let (storage, len) = sockaddr(addr);
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    (0..n)
        .map(|_| unsafe {
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0);
            let rc = libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len);
            let err = std::io::Error::last_os_error();
            assert!(
                rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
                "connect {addr}: {err}"
            );
            fd
        })
        .collect()
}

pub fn close_all(fds: Vec<RawFd>) {
    for fd in fds {
        unsafe { libc::close(fd) };
    }
}

/// A handshake held half-way with a SYN cookie, its final ACK sent when the
/// test says: a raw IPv4 socket plays a client the kernel knows nothing of
/// (the listener's namespace must answer SYNs with cookies:
/// net.ipv4.tcp_syncookies=2, so no request is queued). Loopback only.
pub struct CookieHandshake {
    raw: std::os::fd::OwnedFd,
    listener: std::net::SocketAddrV4,
    port: u16,
    seq: u32,
    cookie: u32,
}

impl CookieHandshake {
    /// Send a SYN from 127.0.0.1:`port` to `listener`, and read the
    /// cookie from its SYN-ACK. (The kernel answers that SYN-ACK with a
    /// reset, which a listener answering with cookies keeps nothing of.)
    pub fn syn(listener: std::net::SocketAddrV4, port: u16) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: a new socket, owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let raw = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        assert!(set_option(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout
        ));
        let mut handshake = Self {
            raw,
            listener,
            port,
            seq: 0x1000_0000,
            cookie: 0,
        };
        handshake.send(TCP_SYN, handshake.seq, 0);
        let mut packet = [0u8; 1500];
        loop {
            // SAFETY: a buffer of its length.
            let n = unsafe { libc::recv(fd, packet.as_mut_ptr().cast(), packet.len(), 0) };
            assert!(n > 0, "no SYN-ACK: {}", std::io::Error::last_os_error());
            let ip_len = usize::from(packet[0] & 0x0f) * 4;
            let tcp = &packet[ip_len..n as usize];
            let (from, to) = (
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
            );
            if from == listener.port() && to == port && tcp[13] & 0x12 == 0x12 {
                handshake.cookie = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
                return handshake;
            }
        }
    }

    /// The final ACK: the listener makes the connection from the cookie,
    /// or refuses it if its accept queue is full.
    pub fn ack(&self) {
        self.send(
            TCP_ACK,
            self.seq.wrapping_add(1),
            self.cookie.wrapping_add(1),
        );
    }

    fn send(&self, flags: u8, seq: u32, ack: u32) {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.port.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.listener.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        let source = std::net::Ipv4Addr::LOCALHOST.octets();
        let checksum = tcp_checksum(source, self.listener.ip().octets(), &tcp);
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        let (to, len) = sockaddr(SocketAddr::V4(std::net::SocketAddrV4::new(
            *self.listener.ip(),
            0,
        )));
        // SAFETY: a buffer of its length, a valid address.
        let sent = unsafe {
            libc::sendto(
                self.raw.as_raw_fd(),
                tcp.as_ptr().cast(),
                tcp.len(),
                0,
                (&to as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        assert_eq!(sent, 20, "raw send: {}", std::io::Error::last_os_error());
    }
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The TCP checksum over the IPv4 pseudo-header and `segment`.
fn tcp_checksum(source: [u8; 4], destination: [u8; 4], segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&source);
    pseudo.extend_from_slice(&destination);
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
