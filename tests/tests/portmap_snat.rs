//! `--snat-address`: several node addresses as translated sources towards one broker, so
//! the translated tuples (source address and port towards one broker address and port) do
//! not run out where one address's ports would. Real kernels in namespaces, a real tansu
//! broker.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use kpsc_tests::{
    RawClient, TansuHost,
    datapath::PinnedMaps,
    netns::{
        NODE_BROKER_IP, NODE_CLIENT_IP, Topology, add_address, broker_ip, client_ip, in_netns,
    },
    portmap::{
        BROKER_PORT, FIRST_PORT, connect_to, kpscctl_maps_json, pins, portmap_args, reload,
        start_portmap,
    },
};

/// Translated source ports left once the node's ephemeral range is 1088-65535: 1024-1087.
const FREE_PORTS: usize = 64;
/// Node addresses added on the broker side for the second half.
const EXTRA_SNAT: [&str; 3] = ["198.18.2.201", "198.18.2.202", "198.18.2.203"];

/// With the node's ephemeral range leaving 64 translated ports, one SNAT address carries
/// at most 64 connections to the broker at once: the next SYNs are dropped as `no_port`.
/// A reload (SIGHUP) with four `--snat-address` entries, from the config file, lets the
/// same daemon carry twice as many, spread over all four addresses, and the first 64 keep
/// working. Before, one address per broker was all there was. About 15 s.
#[test]
fn more_snat_addresses_carry_more_connections_than_one_address_has_ports() {
    let mut topo = Topology::new(1, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    topo.sysctl(&topo.node, "net.ipv4.ip_local_port_range", "1088 65535")
        .unwrap();
    for addr in EXTRA_SNAT {
        add_address(&topo.node, &format!("{addr}/24"), "n1").unwrap();
    }
    let dir = std::env::temp_dir().join(format!("kpsc-snat-{}", topo.node));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portmap.toml");
    let mapping = format!(
        "bootstrap_server_mapping = [\"{}:{BROKER_PORT},0.0.0.0:{FIRST_PORT},{NODE_CLIENT_IP}:{FIRST_PORT}\"]\n",
        broker_ip(0)
    );
    std::fs::write(&config, &mapping).unwrap();
    let kpscd = start_portmap(
        &topo,
        &portmap_args(&topo, &[], &["--config", config.to_str().unwrap()]),
    );
    let connect = || {
        in_netns(&topo.client, || -> anyhow::Result<RawClient> {
            // 4 s: the first SYN and the kernel's retransmissions at 1 s and 3 s.
            let mut c = connect_to(
                SocketAddr::new(client_ip(0).parse()?, 0),
                format!("{NODE_CLIENT_IP}:{FIRST_PORT}").parse()?,
                Duration::from_secs(4),
            )?;
            c.api_versions()?;
            Ok(c)
        })
        .unwrap()
    };

    // One address (the route's choice): the port space ends the count.
    let mut conns = Vec::new();
    let refused = loop {
        match connect() {
            Ok(c) if conns.len() < FREE_PORTS => conns.push(c),
            Ok(_) => panic!("more than {FREE_PORTS} connections over one SNAT address"),
            Err(e) => break e,
        }
    };
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let stats = maps.stats(FIRST_PORT);
    eprintln!(
        "one SNAT address: {} connections, then {refused:#}; {stats:?}",
        conns.len()
    );
    // Random tries find a free port until very few are left (8 tries per SYN, 3 SYNs).
    assert!(
        (FREE_PORTS / 2..=FREE_PORTS).contains(&conns.len()),
        "{} connections over one address with {FREE_PORTS} ports",
        conns.len()
    );
    assert!(stats.drop_no_port > 0, "{stats:?}");

    // Four addresses, by reload.
    let all: Vec<&str> = std::iter::once(NODE_BROKER_IP).chain(EXTRA_SNAT).collect();
    std::fs::write(&config, format!("{mapping}snat_address = {:?}\n", all)).unwrap();
    reload(&kpscd);
    let target = FREE_PORTS * 2;
    while conns.len() < target {
        let n = conns.len();
        conns.push(connect().unwrap_or_else(|e| {
            panic!(
                "connection {n} with four SNAT addresses: {e:#}; {:?}",
                PinnedMaps::open(&pins(&topo)).unwrap().stats(FIRST_PORT)
            )
        }));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.api_versions()
            .unwrap_or_else(|e| panic!("connection {i} after the reload: {e:#}"));
    }
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let sources: BTreeSet<IpAddr> = maps
        .flows()
        .iter()
        .map(|(_, f)| kpsc_common::ip_addr(&f.translated.src_ip))
        .collect();
    let expected: BTreeSet<IpAddr> = all.iter().map(|a| a.parse().unwrap()).collect();
    assert_eq!(sources, expected, "translated sources");
    let (_, target_entry) = maps.targets()[0];
    assert_eq!(
        maps.snat_addresses(&target_entry)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        expected
    );

    // The operator sees the pool.
    let json = kpscctl_maps_json(&topo.node);
    let shown: BTreeSet<IpAddr> = json["ports"][0]["snat_ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(shown, expected, "{json}");
    assert!(kpscd.alive(), "log:\n{}", kpscd.log());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A `--snat-address` the node does not have is refused at start, naming the flag (the
/// brokers' replies to it would never reach the node). About 1 s.
#[test]
fn a_snat_address_the_node_lacks_is_refused_naming_the_flag() {
    let topo = Topology::new(1, 1).unwrap();
    let args = portmap_args(
        &topo,
        &[kpsc_tests::portmap::mapping_on(0, "0.0.0.0")],
        &["--snat-address", &format!("{NODE_BROKER_IP},198.18.2.250")],
    );
    let mut refused = kpsc_tests::Kpscd::spawn_mode(&args, Some(&topo.node)).unwrap();
    let code = refused.wait_exit(Duration::from_secs(20)).unwrap();
    let log = refused.log();
    assert!(
        code == 2 && log.contains("--snat-address") && log.contains("198.18.2.250"),
        "exit {code}, log:\n{log}"
    );
}
