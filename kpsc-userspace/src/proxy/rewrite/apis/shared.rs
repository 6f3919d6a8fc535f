//! Layout tables of structs several APIs share (only reached in versions that have them).

use crate::kafka::layout::{Field, I32, STR, all};

/// KIP-951 `node_endpoints` entry: Produce, Fetch, ShareFetch, ShareAcknowledge.
pub const NODE_ENDPOINT: &[Field] = &[
    all("node_id", I32),
    all("host", STR),
    all("port", I32),
    all("rack", STR),
];

pub const LEADER_ID_AND_EPOCH: &[Field] = &[all("leader_id", I32), all("leader_epoch", I32)];
