//! The splice(2) relay (`splice-ceiling`): kpscd's splice path without Kafka. tokio, as
//! kpscd runs it (a multi-threaded runtime); per connection and direction, nonblocking
//! splice socket -> pipe when the socket is readable, then pipe -> socket when the other
//! is writable, whatever arrived, in chunks of up to the pipe's capacity.

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::Arc};

use anyhow::Context as _;
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
};

use crate::relay_ceiling::{
    counters::Counters,
    pipe::{Pipe, splice_nonblocking},
};

/// Moves `from` to `to` until `from` ends, then half-closes `to`. The pipe is empty
/// whenever a fill starts, so "would block" on the fill can only mean `from` has nothing.
async fn relay(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counters: &Counters,
) -> io::Result<()> {
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice_nonblocking(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => break result?,
            }
        };
        if filled == 0 {
            return half_close(to);
        }
        counters.chunk();
        let mut in_pipe = filled;
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice_nonblocking(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => in_pipe -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counters.relayed(filled as u64);
    }
}

/// Half-closes `to` (tokio's stream has no shutdown taking `&self`).
fn half_close(to: &TcpStream) -> io::Result<()> {
    // SAFETY: shutdown(2) on a live descriptor borrowed for the call.
    if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

async fn connection(client: TcpStream, sink: SocketAddr, counters: &Counters) -> io::Result<()> {
    let upstream = TcpStream::connect(sink).await?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (up, down) = (Pipe::new(true)?, Pipe::new(true)?);
    tokio::try_join!(
        relay(&client, &upstream, &up, counters),
        relay(&upstream, &client, &down, counters),
    )?;
    Ok(())
}

pub fn run(
    listener: std::net::TcpListener,
    sink: SocketAddr,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        loop {
            let (client, _) = listener.accept().await.context("accepting")?;
            let counters = Arc::clone(&counters);
            tokio::spawn(async move {
                if let Err(e) = connection(client, sink, &counters).await {
                    eprintln!("kpsc-relay-ceiling: connection ended: {e}");
                }
            });
        }
    })
}
