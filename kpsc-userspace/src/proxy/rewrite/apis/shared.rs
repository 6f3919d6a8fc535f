//! Layout tables of structs several APIs share (only reached in versions that have them).

use crate::kafka::layout::{Field, I32, STR, all};

/// The slots of a KIP-951 `node_endpoints` list. Each API has its own generated
/// NodeEndpoint type with the same fields, hence a macro rather than a function.
macro_rules! node_endpoint_slots {
    ($endpoints:expr) => {
        $endpoints
            .iter_mut()
            .map(|e| {
                $crate::proxy::rewrite::declaration::Slot::new(
                    e.node_id.0,
                    &mut e.host,
                    $crate::proxy::rewrite::declaration::Port::I32(&mut e.port),
                )
            })
            .collect()
    };
}
pub(crate) use node_endpoint_slots;

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
    all("node_id", I32),
    all("host", STR),
    all("port", I32),
    all("rack", STR),
];

pub const LEADER_ID_AND_EPOCH: &[Field] = &[all("leader_id", I32), all("leader_epoch", I32)];
