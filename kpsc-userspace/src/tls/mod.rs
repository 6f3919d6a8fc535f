//! TLS on both sides of the proxy, with rustls (ring): the listeners' reloadable
//! certificate and client-certificate checks (`listener`, `subject`), kpscd's connections
//! to brokers (`upstream`), and reading PEM files (`pem`). Nothing here reads flags:
//! `config` turns flags into these types and names the flag when one is wrong.
pub mod listener;
pub mod pem;
pub mod subject;
pub mod upstream;

use std::sync::Arc;

use tokio_rustls::rustls::crypto::{CryptoProvider, ring};

/// The one crypto provider kpscd uses (ring: no C toolchain beyond what cc needs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}
