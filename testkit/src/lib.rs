//! What kpsc's integration tests and its benchmark (kpsc-bench) share:
//! - [`netns`]: client -> node -> broker topologies in network namespaces;
//! - [`cleanup`]: what a run started, removed at Ctrl-C as at a normal end.
pub mod cleanup;
pub mod netns;
