//! A captured frame.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// One RGB frame from one camera, tightly packed (`width * 3` bytes a row).
#[derive(Clone, Debug)]
pub struct Frame {
    /// Camera id from the config: the Kafka key, so events stay ordered per camera.
    pub camera: Arc<str>,
    /// Per-camera sequence number, counted at the appsink: a gap means a dropped frame.
    pub seq: u64,
    /// Wall-clock capture time, carried into the event.
    pub capture_time: SystemTime,
    /// Monotonic capture instant, for latency histograms.
    pub captured_at: Instant,
    pub width: u32,
    pub height: u32,
    /// RGB8 pixels, row-major, no padding.
    pub data: Vec<u8>,
    /// The part in the picture, when something names it: the image file's name (folder
    /// sources) or a control message announcing the next part (`{"camera", "part_id"}`).
    pub part_id: Option<Arc<str>>,
}

impl Frame {
    /// Checks that the pixel buffer matches the declared size.
    pub fn is_consistent(&self) -> bool {
        self.width > 0 && self.height > 0 && self.data.len() == self.width as usize * self.height as usize * 3
    }
}
