//! The socket facts the kernel path needs that std and tokio do not expose.

use std::{io, os::fd::AsRawFd};

fn getsockopt<T>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    // SAFETY: T is one of the plain-data option types below; the kernel fills at most
    // `len` bytes of it.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: an out-buffer of `len` bytes and its length.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ioctl_int(fd: &impl AsRawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCINQ and SIOCOUTQ write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut value) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// A socket's cookie: the key a BPF program computes for it.
pub fn cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// Bytes received and not yet read (SIOCINQ).
pub fn unread_bytes(fd: &impl AsRawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Bytes written into a socket's TCP stream so far, by its own writes and the kernel's
/// redirects alike: acknowledged + still queued (SIOCOUTQ). Read in that order, so a
/// concurrent acknowledgement can only make it an underestimate: waiting until it reaches
/// a count never returns early.
pub fn stream_bytes_written(fd: &impl AsRawFd) -> io::Result<u64> {
    Ok(stream_progress(fd)?.written)
}

/// A socket's stream as a writer sees it.
pub struct StreamProgress {
    /// See `stream_bytes_written`.
    pub written: u64,
    /// Of those, still queued: the peer has not acknowledged them (a slow reader).
    pub queued: u64,
    /// The connection can still carry bytes to its peer (not reset, not closed).
    pub open: bool,
}

pub fn stream_progress(fd: &impl AsRawFd) -> io::Result<StreamProgress> {
    let info: libc::tcp_info = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    let queued = ioctl_int(fd, libc::TIOCOUTQ)?;
    // ESTABLISHED, or CLOSE_WAIT (the peer half-closed; it still reads).
    let open = matches!(i32::from(info.tcpi_state), 1 | 8);
    Ok(StreamProgress {
        written: info.tcpi_bytes_acked + queued,
        queued,
        open,
    })
}

/// Returns once no verdict on `fd` is running: a verdict runs under the socket's lock
/// (in the softirq that queues a segment, or where the lock's owner releases it), and
/// TCP_INFO takes that lock. A verdict that starts later sees what was stored before.
pub fn wait_out_running_verdict(fd: &impl AsRawFd) -> io::Result<()> {
    getsockopt::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO).map(drop)
}

/// Bytes that reached a socket before it entered a verdict's map sit in its TCP queue,
/// where the verdict never sees them; setting SO_RCVLOWAT runs the socket's data-ready
/// callback, which (now the verdict's) takes them.
pub fn hand_queued_bytes_to_verdict(fd: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
