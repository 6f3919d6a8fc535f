//! Client sockets for tests that open many connections: each from a source address of
//! its own in 127.0.0.0/8, so TIME_WAIT and the ephemeral ports of one address never run
//! out, and closed either with a FIN or with a reset.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use socket2::{Domain, SockRef, Socket, Type};

/// A connection to `to` from `from` (any port), with a 10 s read timeout.
pub fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .unwrap_or_else(|e| panic!("binding {from:?}: {e}"));
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting {from:?} to {to}: {e}"));
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of a FIN.
pub fn close_with_reset(stream: TcpStream) {
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// Room for this process's sockets and the mock brokers' (and kpscd's, which inherits
/// the limit).
pub fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            // Root may raise the hard limit too.
            limit.rlim_cur = wanted;
            limit.rlim_max = limit.rlim_max.max(wanted);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
                0,
                "raising the descriptor limit to {wanted}"
            );
        }
    }
}
