//! Plain types shared by every Kensa stage.
//!
//! # Layout
//! - [`config`]: the daemon's configuration (serde, `deny_unknown_fields`), layered loading
//!   (defaults → file → `KENSA__SECTION__KEY` environment) and validation that reports every
//!   problem at once.
//! - [`fault`]: fault injection (`KENSA_FAULT`) for the tests of failing loudly.
//! - [`feedback`]: operator feedback about a frame (label, event id) and what became of it.
//! - [`frame`]: a captured frame and its identity.
//! - [`map`]: anomaly maps.
//! - [`grid`]: the 3×3 location grid and AnomalyGPT's exact answer grammar.
//! - [`batch`]: the cross-camera batcher (flush on size, on max wait, on shutdown).
//! - [`metrics`]: every metric name Kensa exports, in one place.
//! - [`regions`]: connected regions of binary masks and the cell of a region.
//! - [`npy`]: float32 `.npy` files (anomaly maps on disk).
//!
//! Nothing here depends on GStreamer, libtorch or librdkafka, so the logic is testable alone.

pub mod batch;
pub mod config;
pub mod fault;
pub mod feedback;
pub mod frame;
pub mod grid;
pub mod map;
pub mod metrics;
pub mod npy;
pub mod regions;

pub use frame::Frame;
pub use grid::Cell;
pub use map::AnomalyMap;
