//! What kpsc knows of the Kafka wire protocol, shared by both modes: framing, the request
//! header, api names, the guarded response decoder (layout walker first, kafka-protocol
//! second), and the discovery client that asks a broker for the cluster's brokers.
pub mod discovery;
pub mod frame;
pub mod guarded;
pub mod layout;
pub mod names;
pub mod request;
