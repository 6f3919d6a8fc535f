//! kpscd's pinned portmap maps, read as kpscctl reads them: the one place the kit (and
//! through it the tests) names kpsc's own library.

pub use kpsc::portmap::datapath::{DEFAULT_PIN_ROOT, FlowState, PinnedMaps, pin_dir};
