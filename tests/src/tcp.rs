//! Real TCP listeners with chosen backlogs that never accept, and
//! non-blocking clients whose SYNs pile up against them.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, RawFd},
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
    // SAFETY: valid fd and option value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_DEFER_ACCEPT: {}",
        std::io::Error::last_os_error()
    );
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
