//! Anomaly maps.

/// A per-pixel anomaly map at a frame's own resolution (row-major, `width * height` values).
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyMap {
    pub width: u32,
    pub height: u32,
    pub data: Vec<f32>,
}

impl AnomalyMap {
    pub fn new(width: u32, height: u32, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), width as usize * height as usize, "map size mismatch");
        Self { width, height, data }
    }

    /// Image-level score: the maximum of the map (AnomalyGPT's definition).
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    pub fn get(&self, x: u32, y: u32) -> f32 {
        self.data[y as usize * self.width as usize + x as usize]
    }
}
