//! `kpscd portmap --allow-source`: the kernel program drops a SYN from outside every
//! allowed network before any flow state exists for it, and counts it; a reload that
//! changes the list applies to new connections only. Real kernels in namespaces, a real
//! tansu broker, under both hooks.

use std::{path::Path, time::Duration};

use kpsc_tests::{
    TansuHost,
    datapath::PinnedMaps,
    kpscd_bin,
    netns::{Topology, client_ip, in_netns},
    portmap::{
        Attach, BROKER_PORT, FIRST_PORT, cluster_id, connect_bound, mapping_on, pins, portmap_args,
        start_portmap,
    },
};

/// Connects from `src_ip` and asks the broker behind the node's first port who it is.
fn reaches_broker(topo: &Topology, src_ip: &str) -> anyhow::Result<String> {
    in_netns(&topo.client, || {
        let mut conn = connect_bound(src_ip, 0, FIRST_PORT, Duration::from_secs(2))?;
        cluster_id(&mut conn)
    })?
}

fn write_allow(path: &Path, sources: &[String]) {
    let list: Vec<String> = sources.iter().map(|s| format!("{s:?}")).collect();
    std::fs::write(path, format!("allow_source = [{}]\n", list.join(", "))).unwrap();
}

/// Client 0 is allowed, client 1 (another address of the client host) is not: its
/// connect times out, its SYNs are counted as `source_denied` on /metrics and in
/// `kpscctl maps`, and it left no half-open flow. Then the list (from the config file) is
/// swapped by SIGHUP: client 0's open connection keeps working, its new connections are
/// refused, client 1's are served. About 10 s per hook (two connect timeouts).
fn allow_source(attach: Attach) {
    let mut topo = attach.topology(2, 1).unwrap();
    topo.start_advertising_node(0, BROKER_PORT, FIRST_PORT)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("kpsc-allow-{}-{attach:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kpsc.toml");
    let (allowed, denied) = (client_ip(0), client_ip(1));
    write_allow(&file, &[format!("{allowed}/32")]);
    let config = file.to_str().unwrap();
    let args = portmap_args(
        &topo,
        &[mapping_on(0, "0.0.0.0")],
        &[&attach.args()[..], &["--config", config]].concat(),
    );
    let kpscd = start_portmap(&topo, &args);

    assert_eq!(reaches_broker(&topo, &allowed).unwrap(), "cluster-0");
    let refused = reaches_broker(&topo, &denied);
    assert!(refused.is_err(), "{denied} got through: {refused:?}");
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let denied_ip = kpsc_common::ip_bits(denied.parse().unwrap());
    assert!(
        maps.embryos().iter().all(|(k, _)| k.src_ip != denied_ip),
        "a refused SYN left a half-open flow"
    );
    assert_eq!(maps.stats(FIRST_PORT).embryos, 1, "only the allowed SYN");
    let metric = kpscd.metric("kpsc_portmap_drops_total", "reason=\"source_denied\"");
    assert!(metric >= 1.0, "source_denied = {metric}\n{}", kpscd.log());
    let ctl = kpsc_tests::portmap::kpscctl_maps(&topo.node, &["--json"]);
    assert!(ctl.contains("\"source_denied\""), "{ctl}");

    // Swap the list while client 0 has an open connection.
    let mut open = in_netns(&topo.client, || {
        connect_bound(&allowed, 0, FIRST_PORT, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    write_allow(&file, &[format!("{denied}/32")]);
    // SAFETY: a plain kill(2) of the kpscd this test started.
    unsafe { libc::kill(kpscd.pid() as i32, libc::SIGHUP) };
    kpsc_tests::eventually(Duration::from_secs(5), || {
        anyhow::ensure!(
            kpscd
                .log()
                .contains("port map reloaded, --allow-source too")
        );
        Ok(())
    })
    .unwrap();
    assert_eq!(
        cluster_id(&mut open).unwrap(),
        "cluster-0",
        "an established flow from a now-refused source was cut"
    );
    assert_eq!(reaches_broker(&topo, &denied).unwrap(), "cluster-0");
    assert!(reaches_broker(&topo, &allowed).is_err());
    assert_eq!(cluster_id(&mut open).unwrap(), "cluster-0");
    drop(open);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn tc_allow_source_drops_other_syns_and_reload_spares_open_flows() {
    allow_source(Attach::Tc);
}

#[test]
fn xdp_allow_source_drops_other_syns_and_reload_spares_open_flows() {
    allow_source(Attach::Xdp);
}

/// A malformed network is a configuration error naming the flag (exit 2).
#[test]
fn allow_source_that_portmap_cannot_enforce_is_refused() {
    for bad in ["2001:2::/129", "198.18.0.0/33", "nonsense"] {
        let out = std::process::Command::new(kpscd_bin())
            .args([
                "portmap",
                "--bootstrap-server-mapping",
                "a:1,0.0.0.0:2,b:2",
                "--interface",
                "lo",
                "--allow-source",
                bad,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--allow-source"), "{bad}: {stderr}");
    }
}
