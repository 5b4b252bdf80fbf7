//! The operator console: what Kensa sees, in a browser, with no build step and no external
//! assets (server-rendered HTML, one embedded stylesheet and a little embedded JavaScript).
//!
//! # Layout
//! - [`board`]: the frames held for it: a ring of the latest scored frames per camera and a
//!   ring of recent anomalous ones, filled by the verdict stage without ever blocking it.
//! - [`render`]: the pictures (frame, heat overlay with regions outlined, map, small tiles),
//!   encoded as JPEG on request and once per frame.
//! - [`pages`]: the HTML of the live view, the defect gallery and detail, and the products.
//! - [`routes`]: the `/console` routes merged into the telemetry listener, and the live
//!   updates pushed to each viewer (Server-Sent Events, at most `console.push_hz`).
//!
//! Read-only views are open like `/metrics`; the feedback buttons post to `/v1/feedback` and
//! the question box to `/v1/frames/{event_id}/ask`, which need the token beyond localhost and
//! are rate-limited (`kensa-telemetry`).

pub mod board;
pub mod pages;
pub mod render;
pub mod routes;

pub use board::{Board, Said, Shot};
pub use routes::{router, Access, Products};

/// What the console could not do.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("product `{product}`: {msg}")]
    Bank { product: String, msg: String },
}
