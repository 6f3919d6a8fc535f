//! Flow tracking of `kpscd portmap` against what real networks send: clients on any
//! source port (a cloud endpoint's NAT picks them at random, mapped port numbers included)
//! and a SYN flood from spoofed sources while a long-lived connection streams. Real
//! kernels in namespaces, real tansu brokers.

use std::{net::SocketAddr, time::Duration};

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
use kpsc_tests::{
    RawClient, TansuHost,
    netns::{NODE_CLIENT_IP, Topology, client_ip, in_netns},
    portmap::{BROKER_PORT, FIRST_PORT, mapping_on, portmap_args, start_portmap},
};

const BROKERS: usize = 3;

/// Connects from `client_ip(0):src_port` to the node's `port`, within `timeout`.
fn connect_from(src_port: u16, port: u16, timeout: Duration) -> anyhow::Result<RawClient> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    // Earlier connections from this source port linger in TIME_WAIT (other destinations).
    socket.set_reuseaddr(true)?;
    socket.bind(format!("{}:{src_port}", client_ip(0)).parse()?)?;
    let remote: SocketAddr = format!("{NODE_CLIENT_IP}:{port}").parse()?;
    // into_std deregisters from the runtime's reactor: inside the runtime.
    let stream = rt.block_on(async {
        tokio::time::timeout(timeout, socket.connect(remote))
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out after {timeout:?}"))??
            .into_std()
            .map_err(anyhow::Error::from)
    })?;
    stream.set_nonblocking(false)?;
    RawClient::from_stream(stream)
}

/// The cluster id the broker behind a connection reports (tansu broker i: `cluster-i`).
fn cluster_id(conn: &mut RawClient) -> anyhow::Result<String> {
    let (r, _): (MetadataResponse, _) = conn.call(
        ApiKey::Metadata,
        4,
        &MetadataRequest::default().with_topics(Some(vec![])),
    )?;
    Ok(r.cluster_id.map(|c| c.to_string()).unwrap_or_default())
}

/// From every mapped port as source port, to every mapped port: each connection reaches
/// the broker of its destination port. A broker's reply to a translated source port that
/// equals a mapped port used to be taken for a client packet to that port and dropped.
fn every_mapped_source_port_connects(listen_host: &str) {
    let mut topo = Topology::new(1, BROKERS).unwrap();
    for i in 0..BROKERS {
        topo.start_advertising_node(i, BROKER_PORT, FIRST_PORT + i as u16)
            .unwrap();
    }
    let mappings: Vec<String> = (0..BROKERS).map(|i| mapping_on(i, listen_host)).collect();
    let kpscd = start_portmap(&topo, &portmap_args(&topo, &mappings, &[]));
    let ports: Vec<u16> = (0..BROKERS).map(|i| FIRST_PORT + i as u16).collect();
    let mut failures = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        for &src_port in &ports {
            let got = in_netns(&topo.client, || {
                let mut conn = connect_from(src_port, port, Duration::from_secs(3))?;
                cluster_id(&mut conn)
            })
            .unwrap()
            .map_err(|e| format!("{e:#}"));
            match got {
                Ok(id) if id == format!("cluster-{i}") => {}
                other => failures.push(format!("{src_port} -> {port}: {other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "listen {listen_host}: {failures:#?}\nkpscd log:\n{}",
        kpscd.log()
    );
}

#[test]
fn clients_on_mapped_source_ports_connect_to_a_wildcard_listener() {
    every_mapped_source_port_connects("0.0.0.0");
}

#[test]
fn clients_on_mapped_source_ports_connect_to_a_specific_listener() {
    every_mapped_source_port_connects(NODE_CLIENT_IP);
}
