//! Real UNIX sockets with chosen backlogs, and non-blocking connects.
use std::{ffi::CString, os::fd::RawFd};

/// `sockaddr_un` for a path, or an abstract name when it starts with '@'.
fn address(name: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes: Vec<u8> = match name.strip_prefix('@') {
        Some(abstract_name) => std::iter::once(0).chain(abstract_name.bytes()).collect(),
        None => CString::new(name).unwrap().into_bytes_with_nul(),
    };
    for (slot, byte) in addr.sun_path.iter_mut().zip(&bytes) {
        *slot = *byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    (addr, len as libc::socklen_t)
}

/// A listening UNIX stream socket that never accepts.
pub struct Listener {
    pub fd: RawFd,
}

impl Listener {
    pub fn bind(name: &str, backlog: i32) -> Self {
        if !name.starts_with('@') {
            let _ = std::fs::remove_file(name);
        }
        let (addr, len) = address(name);
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let rc = libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len);
            assert_eq!(rc, 0, "bind {name}: {}", std::io::Error::last_os_error());
            assert_eq!(
                libc::listen(fd, backlog),
                0,
                "listen: {}",
                std::io::Error::last_os_error()
            );
            Self { fd }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

/// Outcome of `n` non-blocking connects to `name`: (accepted into the
/// queue, refused with EAGAIN). Connected sockets are kept open in the
/// returned vector so the queue stays full.
pub fn connect_many(name: &str, n: usize) -> (Vec<RawFd>, usize) {
    let (addr, len) = address(name);
    let mut queued = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        unsafe {
            let fd = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0);
            if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) == 0 {
                queued.push(fd);
            } else {
                let err = std::io::Error::last_os_error();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EAGAIN),
                    "unexpected connect error: {err}"
                );
                refused += 1;
                libc::close(fd);
            }
        }
    }
    (queued, refused)
}

pub fn close_all(fds: Vec<RawFd>) {
    for fd in fds {
        unsafe { libc::close(fd) };
    }
}
