//! What kpsc knows of the Kafka wire protocol, shared by both modes: framing, the request
//! header, api names, the guarded response decoder (layout walker first, kafka-protocol
//! second), the discovery client that asks a broker for the cluster's brokers, and SASL
//! authentication for kpscd's own broker connections.
pub mod discovery;
pub mod frame;
pub mod guarded;
pub mod layout;
pub mod names;
pub mod request;
pub mod sasl;
pub mod scram;
