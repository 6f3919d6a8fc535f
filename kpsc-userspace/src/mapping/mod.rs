//! The broker/port map shared by both modes: addresses and their syntax (`addr`), and the
//! map itself with its deterministic port assignment (`map`).
pub mod addr;
pub mod dial;
pub mod map;
