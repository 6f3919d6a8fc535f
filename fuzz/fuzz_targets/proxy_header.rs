#![no_main]
//! `kpsc::proxy::proxy_header`: the PROXY protocol header a client connection starts with
//! (v1 text or v2 binary with the cloud endpoint TLVs), read from the raw bytes the way
//! kpscd reads a socket. Checked: never a panic; a header is never more than its own bytes
//! (what follows stays unread for the broker), and the bytes taken parse again to the same
//! header; a truncated header has read everything there was; an AWS endpoint id is only
//! the characters such ids have.

use std::{
    pin::pin,
    task::{Context, Poll, Waker},
};

use kpsc::proxy::proxy_header::{
    EndpointId, HeaderError, parse_v1, parse_v2, read_header, starts_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(&first) = data.first() else { return };
    if !starts_header(first) {
        return; // kpscd does not read a header from such a connection
    }
    let mut rest = data;
    let result = now(read_header(&mut rest));
    let consumed = data.len() - rest.len();
    match result {
        Ok(header) => {
            let taken = &data[..consumed];
            let again = if header.version == 2 {
                assert_eq!(
                    consumed,
                    16 + usize::from(u16::from_be_bytes([data[14], data[15]]))
                );
                parse_v2(taken)
            } else {
                assert!(taken.ends_with(b"\r\n") && consumed <= 107);
                parse_v1(taken)
            };
            assert_eq!(again.unwrap(), header);
            if let Some(EndpointId::AwsVpce(id)) = &header.endpoint {
                assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            }
            let _ = header.endpoint.map(|id| id.to_string());
        }
        Err(HeaderError::Truncated) => assert!(rest.is_empty()),
        Err(HeaderError::Malformed(_)) => {}
        Err(HeaderError::Io(e)) => panic!("a byte slice cannot fail to read: {e}"),
    }
});

/// Runs a future that cannot be pending (a byte slice never is) to completion.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("a byte slice is never pending"),
    }
}
