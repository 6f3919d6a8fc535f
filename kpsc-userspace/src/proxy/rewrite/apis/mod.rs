//! The registry of address-bearing APIs. Adding one is a new file in this folder (its
//! `static API` declaration, layout table, `Addresses` impl and tests) plus its name in the
//! list below; dispatch, ApiVersions caps and the cross-API tests follow from the list.

use bytes::Bytes;

use crate::proxy::rewrite::{
    declaration::{AddressApi, RewriteError},
    response::AddressResponse,
};

macro_rules! address_apis {
    ($($api:ident),* $(,)?) => {
        $(pub mod $api;)*
        /// Every address-bearing API kpsc rewrites.
        pub static ALL: &[&AddressApi] = &[$(&$api::API),*];
    };
}

address_apis!(
    metadata,
    find_coordinator,
    describe_cluster,
    produce,
    fetch,
    share_fetch,
    share_acknowledge,
    describe_quorum,
);

pub mod shared;

/// The declaration of `api_key`, if its responses can carry addresses.
pub fn find(api_key: i16) -> Option<&'static AddressApi> {
    ALL.iter().copied().find(|api| api.key as i16 == api_key)
}

/// Decodes a response to (`api_key`, `version`) as the registry declares it.
pub fn decode(api_key: i16, version: i16, body: Bytes) -> Result<AddressResponse, RewriteError> {
    let api = find(api_key).ok_or(RewriteError::Unsupported { api_key, version })?;
    AddressResponse::decode(api, version, body)
}
