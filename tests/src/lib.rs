//! Harness for kpsc's integration tests. Everything here drives real software:
//! - [`MockCluster`]: librdkafka's mock Kafka cluster (a real, independent broker
//!   implementation shipped with librdkafka), owned by this process;
//! - [`Tansu`]: tansu, an independent Kafka-compatible broker;
//! - [`TlsFront`]: stunnel terminating TLS in front of a broker, with a [`Pki`] made per test;
//! - [`CloudEndpoint`]: the cloud's private endpoint in front of kpscd, prepending the
//!   PROXY protocol header each cloud sends;
//! - from the shared kit (kpsc-testkit): [`Kpscd`], the real `kpscd` binary as an operator
//!   runs it, and [`RawClient`], a raw Kafka client for exact request versions.
//!
//! One fake, and only to inject a fault a real broker cannot produce on demand:
//! [`response_delay_shim::ResponseDelayShim`] relays to a real broker and holds one of its
//! responses back.
//!
//! Addresses: brokers listen on 127.0.0.1 (the mock cannot choose); kpscd advertises
//! 127.0.1.<broker id>, so any `127.0.0.1` in a client-visible answer is a leak.

pub mod client_sockets;
mod cloud_endpoint;
mod command;
mod confluent_client;
pub mod flood;
pub mod flow_ip;
pub mod ha;
pub mod kernel_path;
pub mod memory_use;
mod mock_cluster;
pub mod one_armed;
pub mod passthrough_lb;
mod pki;
pub mod portmap;
pub mod raw_pipeline;
mod rdkafka_client;
pub mod response_delay_shim;
pub mod soak;
mod tansu;
mod tls_peer;
mod unit;
mod xdp_pass;

pub use cloud_endpoint::{Cloud, CloudEndpoint, Header, encode_v2};
pub use command::run_with_timeout;
pub use confluent_client::confluent_produce_and_consume;
pub use mock_cluster::{
    ADVERTISED_PATTERN, MockCluster, REAL_BROKER_HOST, advertised_addresses, proxy_args,
};
pub use pki::{Pki, python};
pub use rdkafka_client::{Delivered, LeakWatch, create_topic, produce_acked, send_waiting};
pub use tansu::{Tansu, TansuHost, start_tansu_in, tansu_bin};
pub use tls_peer::{TlsClient, TlsFront, cert_der};
pub use unit::{Started, Unit};

/// The kit shared with kpsc-bench, re-exported so tests name one crate.
pub use kpsc_testkit::{
    Kpscd, Process, RAW_CLIENT_ID, RawClient, contains_bytes, datapath, eventually, expect_closed,
    free_port_base, http_get, kpsc_bench_bin, kpscctl_bin, kpscd_bin, netns, request_body,
    syn_flood, wait_listening,
};
