//! Part ids announced on the control topic (`{"camera": "line-1", "part_id": "P-0042"}`): each
//! applies to the camera's next frame, the first one captured after the announcement, so an
//! MES that triggers the camera can join the verdict to the part it sent.

use kensa_core::Frame;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Announced part ids waiting for their frame, per camera (at most [`PENDING`] each: an
/// announcement whose frame never comes does not pile up).
#[derive(Clone, Default)]
pub struct PartIds {
    pending: Arc<Mutex<HashMap<String, VecDeque<(SystemTime, Arc<str>)>>>>,
}

/// Announcements kept per camera.
pub const PENDING: usize = 64;

impl PartIds {
    /// Announces the part that the camera's next frame will show.
    pub fn announce(&self, camera: &str, part_id: &str, at: SystemTime) {
        let mut p = self.pending.lock().expect("part ids lock");
        let q = p.entry(camera.to_string()).or_default();
        if q.len() == PENDING {
            if let Some((_, lost)) = q.pop_front() {
                tracing::warn!(camera, part_id = %lost, "part id never met a frame; forgotten");
            }
        }
        q.push_back((at, Arc::from(part_id)));
    }

    /// Gives `frame` the oldest id announced for its camera before it was captured (frames of
    /// a camera come in capture order), unless it already has one (folder cameras).
    pub fn label(&self, frame: &mut Frame) {
        if frame.part_id.is_some() {
            return;
        }
        let mut p = self.pending.lock().expect("part ids lock");
        let Some(q) = p.get_mut(&*frame.camera) else { return };
        if q.front().is_some_and(|(at, _)| *at <= frame.capture_time) {
            frame.part_id = q.pop_front().map(|(_, id)| id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn frame(camera: &str, at: SystemTime) -> Frame {
        Frame {
            camera: camera.into(),
            seq: 0,
            capture_time: at,
            captured_at: Instant::now(),
            width: 1,
            height: 1,
            data: vec![0; 3],
            part_id: None,
        }
    }

    #[test]
    fn an_announced_id_goes_to_the_next_frame_of_its_camera_only() {
        let parts = PartIds::default();
        let t0 = SystemTime::now();
        let mut before = frame("a", t0);
        parts.announce("a", "P-1", t0 + Duration::from_millis(10));
        parts.label(&mut before);
        assert_eq!(before.part_id, None, "captured before the announcement");
        let mut other = frame("b", t0 + Duration::from_millis(20));
        parts.label(&mut other);
        assert_eq!(other.part_id, None, "another camera");
        let mut next = frame("a", t0 + Duration::from_millis(20));
        parts.label(&mut next);
        assert_eq!(next.part_id.as_deref(), Some("P-1"));
        let mut after = frame("a", t0 + Duration::from_millis(30));
        parts.label(&mut after);
        assert_eq!(after.part_id, None, "used once");
    }
}
