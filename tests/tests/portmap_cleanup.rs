//! The cleanup of `kpscd portmap`'s established-flow tables against entries that lost their
//! other half (a tuple reused between the cleanup's walk and its delete left the reply side
//! of a flow behind). Real kernel in namespaces, real tansu broker.

use std::{net::SocketAddr, time::Duration};

use kpsc_common::{FlowKey, FlowNat};
use kpsc_tests::{
    RawClient,
    datapath::PinnedMaps,
    eventually,
    netns::{NODE_CLIENT_IP, client_ip, in_netns},
    portmap::{FIRST_PORT, one_broker_behind_portmap, pins},
};

fn connect(addr: &str) -> anyhow::Result<RawClient> {
    let addr: SocketAddr = addr.parse()?;
    RawClient::from_stream(std::net::TcpStream::connect_timeout(
        &addr,
        Duration::from_secs(5),
    )?)
}

/// A reply entry whose flow entry is gone (removed here behind kpscd's back, as the race
/// did) is swept once it has been silent for the grace period, and a live flow next to it
/// keeps both entries and works. Before, such an entry stayed for good, holding its tuple.
/// About 20-30 s (the cleanup runs every 10 s, the grace is 10 s).
#[test]
fn orphaned_reply_entries_are_swept_and_live_flows_kept() {
    let (topo, kpscd) = one_broker_behind_portmap();
    let bootstrap = format!("{NODE_CLIENT_IP}:{FIRST_PORT}");
    let mut orphaned = in_netns(&topo.client, || connect(&bootstrap))
        .unwrap()
        .unwrap();
    orphaned.api_versions().unwrap();
    let maps = PinnedMaps::open(&pins(&topo)).unwrap();
    let (key, flow) = maps.flows()[0];
    let mut live = in_netns(&topo.client, || connect(&bootstrap))
        .unwrap()
        .unwrap();
    live.api_versions().unwrap();
    let flows = maps.flows();
    assert_eq!(flows.len(), 2, "{flows:?}");
    let (live_key, live_flow) = *flows.iter().find(|(k, _)| *k != key).unwrap();
    assert_eq!(
        kpsc_tests::portmap::v4_of(&key.src_ip).to_string(),
        client_ip(0)
    );

    let data = aya::maps::MapData::from_pin(pins(&topo).join("PORTMAP_FLOWS")).unwrap();
    let mut table: aya::maps::HashMap<_, FlowKey, FlowNat> =
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    table.remove(&key).unwrap();
    let reply_key = flow.translated.reversed();
    assert!(
        maps.established_replies()
            .iter()
            .any(|(k, _)| *k == reply_key),
        "the orphan to be swept"
    );

    eventually(Duration::from_secs(40), || {
        // The live flow stays busy: its silence would not matter, but its traffic must go on.
        live.api_versions()?;
        anyhow::ensure!(
            !maps
                .established_replies()
                .iter()
                .any(|(k, _)| *k == reply_key),
            "orphaned reply entry {reply_key:?} still there"
        );
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlog:\n{}", kpscd.log()));
    let replies = maps.established_replies();
    assert!(
        replies
            .iter()
            .any(|(k, r)| *k == live_flow.translated.reversed()
                && r.translated == live_key.reversed()),
        "the live flow's reply entry went: {replies:?}"
    );
    assert!(maps.flows().iter().any(|(k, _)| *k == live_key));
    live.api_versions().unwrap();
    drop(orphaned);
}
