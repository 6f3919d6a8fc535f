//! Layout tables of structs several APIs share (only reached in versions that have them).

use crate::kafka::layout::{Field, HOST, I32, NODE_ID, PORT, STR, all};

/// Test support: the endpoints of a `node_endpoints` list, as the fixtures declare them.
#[cfg(test)]
macro_rules! node_endpoint_list {
    ($endpoints:expr) => {
        $endpoints
            .iter()
            .map(|e| $crate::proxy::rewrite::testkit::ep(e.node_id.0, &e.host, e.port))
            .collect()
    };
}
#[cfg(test)]
pub(crate) use node_endpoint_list;

/// KIP-951 `node_endpoints` entry: Produce, Fetch, ShareFetch, ShareAcknowledge.
pub const NODE_ENDPOINT: &[Field] = &[
    all("node_id", NODE_ID),
    all("host", HOST),
    all("port", PORT),
    all("rack", STR),
];

pub const LEADER_ID_AND_EPOCH: &[Field] = &[all("leader_id", I32), all("leader_epoch", I32)];
