//! Plays the cloud's private endpoint (Google PSC, AWS PrivateLink, Azure Private Link)
//! in front of kpscd: it listens where clients connect, opens one connection to kpscd per
//! client connection, sends first the PROXY protocol header the cloud would send (the
//! client's address and the cloud's endpoint-id TLV), then relays bytes both ways.
//!
//! The headers are encoded here from the HAProxy specification and the clouds' documented
//! TLV layouts, independently of kpscd's parser.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Which cloud's endpoint, and the id it stamps on every connection.
#[derive(Clone, Debug)]
pub enum Cloud {
    /// TLV 0xE0: the 8-byte PSC connection id, network order.
    GooglePsc(u64),
    /// TLV 0xEA: subtype 0x01 + the VPC endpoint id.
    AwsPrivateLink(String),
    /// TLV 0xEE: subtype 0x01 + the LinkID, 4 bytes little endian.
    AzurePrivateLink(u32),
}

/// What the endpoint puts in front of each connection.
#[derive(Clone, Debug)]
pub enum Header {
    /// v2 with `client` as the source and the cloud's TLV (and an ALPN TLV before it).
    V2 {
        client: SocketAddr,
        cloud: Option<Cloud>,
    },
    /// v1 text: `PROXY TCP4 <client> <destination> ...`.
    V1 { client: SocketAddr },
    /// Exactly these bytes (malformed headers).
    Raw(Vec<u8>),
}

impl Header {
    pub fn encode(&self, destination: SocketAddr) -> Vec<u8> {
        match self {
            Header::V2 { client, cloud } => encode_v2(*client, destination, cloud.as_ref()),
            Header::V1 { client } => format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                client.ip(),
                destination.ip(),
                client.port(),
                destination.port()
            )
            .into_bytes(),
            Header::Raw(bytes) => bytes.clone(),
        }
    }
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// A PROXY v2 header (IPv4, TCP): the specification's section 2.2.
pub fn encode_v2(client: SocketAddr, destination: SocketAddr, cloud: Option<&Cloud>) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (client, destination) else {
        panic!("the test endpoint speaks IPv4");
    };
    let mut body = Vec::new();
    body.extend_from_slice(&src.ip().octets());
    body.extend_from_slice(&dst.ip().octets());
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    body.extend(tlv(0x01, b"kafka")); // ALPN: not kpscd's business, skipped
    match cloud {
        Some(Cloud::GooglePsc(id)) => body.extend(tlv(0xE0, &id.to_be_bytes())),
        Some(Cloud::AwsPrivateLink(id)) => {
            body.extend(tlv(0xEA, &[&[0x01][..], id.as_bytes()].concat()))
        }
        Some(Cloud::AzurePrivateLink(id)) => {
            body.extend(tlv(0xEE, &[&[0x01][..], &id.to_le_bytes()[..]].concat()))
        }
        None => {}
    }
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11]); // v2 PROXY, TCP over IPv4
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend(body);
    header
}

/// The running endpoint: one listener per (endpoint address -> kpscd address) route.
pub struct CloudEndpoint {
    stop: Arc<AtomicBool>,
}

impl CloudEndpoint {
    pub fn start(routes: &[(SocketAddr, SocketAddr)], header: Header) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        for &(listen, target) in routes {
            let listener =
                TcpListener::bind(listen).with_context(|| format!("endpoint on {listen}"))?;
            listener.set_nonblocking(true)?;
            let (stop, header) = (Arc::clone(&stop), header.clone());
            thread::spawn(move || accept_loop(listener, target, header, stop));
        }
        Ok(Self { stop })
    }
}

impl Drop for CloudEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, header: Header, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let header = header.encode(target);
                thread::spawn(move || {
                    let _ = relay(client, target, &header);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn relay(client: TcpStream, target: SocketAddr, header: &[u8]) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let mut upstream = TcpStream::connect(target)?;
    upstream.set_nodelay(true)?;
    client.set_nodelay(true)?;
    upstream.write_all(header)?;
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = thread::spawn(move || {
        let _ = copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}
