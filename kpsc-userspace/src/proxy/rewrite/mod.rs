//! Rewriting broker addresses inside Kafka responses: clients must only ever see kpsc's
//! advertised addresses, so every response that can carry one is decoded (guarded by the
//! layout walker), its endpoints are replaced, and it is re-encoded; everything else in it
//! is carried over verbatim.
//!
//! - `declaration`: what declaring an address-bearing API takes;
//! - `apis/`: one file per API, and the registry listing them;
//! - `response`: a decoded response, its endpoints, the rewrite and the re-encoding;
//! - `policy`: which responses need rewriting and which versions clients may negotiate;
//! - `api_versions`: the ApiVersions rewrite that enforces those versions.
pub mod api_versions;
pub mod apis;
pub mod declaration;
pub mod policy;
pub mod response;

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
