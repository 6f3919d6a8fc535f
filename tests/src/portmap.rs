//! What the portmap tests share: the namespace topology's port plan (broker i behind node
//! port `FIRST_PORT + i`), kpscd portmap's command line, and where its maps are pinned.

use std::{path::PathBuf, time::Duration};

use kpsc_testkit::{
    Kpscd,
    datapath::{DEFAULT_PIN_ROOT, pin_dir},
    netns::{NODE_CLIENT_IP, Topology, broker_ip},
};

use crate::tansu::TansuHost;

/// Where each tansu broker listens in the broker namespace.
pub const BROKER_PORT: u16 = 39092;
/// Broker i is served on node port FIRST_PORT + i (the guide's 9093, 9094, ...).
pub const FIRST_PORT: u16 = 9093;

/// `--bootstrap-server-mapping` of broker `i`, listening on `listen_host`.
pub fn mapping_on(i: usize, listen_host: &str) -> String {
    let port = FIRST_PORT + i as u16;
    format!(
        "{}:{BROKER_PORT},{listen_host}:{port},{NODE_CLIENT_IP}:{port}",
        broker_ip(i)
    )
}

/// `--bootstrap-server-mapping` of broker `i` on every node address (the README's form).
pub fn mapping(i: usize) -> String {
    mapping_on(i, "0.0.0.0")
}

/// `kpscd portmap` on both node interfaces, instance named after the node namespace.
pub fn portmap_args(topo: &Topology, mappings: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["portmap".to_owned()];
    for m in mappings {
        args.push("--bootstrap-server-mapping".into());
        args.push(m.clone());
    }
    args.extend(
        [
            "--interface",
            "n0,n1",
            "--instance",
            &topo.node,
            "--metadata-refresh-interval",
            "1s",
            "--kafka-dial-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts kpscd portmap in the node namespace and waits until it reports ready.
pub fn start_portmap(topo: &Topology, args: &[String]) -> Kpscd {
    let k = Kpscd::spawn_mode(args, Some(&topo.node)).unwrap();
    k.wait_ready(Duration::from_secs(20)).unwrap();
    k
}

/// One client namespace, one tansu broker advertising the node's first port, and kpscd
/// portmap mapping `FIRST_PORT` on every node address: where most flow tests start.
pub fn one_broker_behind_portmap() -> (Topology, Kpscd) {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[mapping_on(0, "0.0.0.0")], &[]),
    );
    (topo, kpscd)
}

/// Where the instance of `topo` pins its maps.
pub fn pins(topo: &Topology) -> PathBuf {
    pin_dir(std::path::Path::new(DEFAULT_PIN_ROOT), &topo.node)
}
