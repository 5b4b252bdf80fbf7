//! The pictures of a held frame, made on request (never in the pipeline) and each encoded at
//! most once per frame: the frame, the heat overlay with its regions outlined, the map alone,
//! and small versions of the frame and overlay for tiles and the gallery. They are drawn by
//! one [`Renderer`] thread at the idle scheduling class, so a viewer only ever spends CPU the
//! inspection does not want.

use crate::board::Shot;
use image::imageops::FilterType;
use image::{ImageBuffer, Luma, RgbImage};
use kensa_core::AnomalyMap;
use std::sync::Arc;

/// Longest side of tiles and gallery pictures.
pub const SMALL_SIDE: u32 = 320;

/// Which picture of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Picture {
    /// The frame, small.
    Thumb,
    /// The heat overlay, small (live tiles and the gallery).
    Tile,
    /// The frame at full size.
    Image,
    /// The heat overlay at full size, regions outlined.
    Overlay,
    /// The map alone in heat colours.
    Map,
}

impl std::str::FromStr for Picture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "thumb" => Self::Thumb,
            "tile" => Self::Tile,
            "image" => Self::Image,
            "overlay" => Self::Overlay,
            "map" => Self::Map,
            _ => return Err(format!("`{s}` is not a picture (thumb, tile, image, overlay, map)")),
        })
    }
}

/// One thread that draws pictures at the idle scheduling class (Linux `SCHED_IDLE`: it runs
/// when no inspection thread wants the CPU), with a short queue.
#[derive(Clone)]
pub struct Renderer {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

type Job = (Arc<Shot>, Picture, tokio::sync::oneshot::Sender<Arc<Vec<u8>>>);

/// Why a picture is not drawn now.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: ask again.
    Busy,
    /// The renderer has stopped.
    Stopped,
    /// This picture could not be drawn (logged).
    Failed,
}

impl Renderer {
    /// Starts the thread (its queue holds `queue` pictures).
    pub fn start(queue: usize) -> Self {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue.max(1));
        let spawned = std::thread::Builder::new().name("kensa-console-render".into()).spawn(move || {
            use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
            let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
            if let Err(e) = thread_priority::set_thread_priority_and_policy(
                thread_priority::thread_native_id(),
                ThreadPriority::Min,
                idle,
            ) {
                tracing::warn!("the console's pictures are drawn at normal priority ({e:?})");
            }
            for (shot, which, reply) in rx {
                // A picture that cannot be drawn (a panic in an encoder) fails alone.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| picture(&shot, which))) {
                    Ok(p) => {
                        let _ = reply.send(p);
                    }
                    Err(_) => tracing::error!(event = %shot.event_id, ?which, "cannot draw this picture"),
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the console's picture thread: {e}");
        }
        Self { jobs }
    }

    /// The picture: at once when already drawn, else drawn on the renderer's thread.
    pub async fn draw(&self, shot: Arc<Shot>, which: Picture) -> Result<Arc<Vec<u8>>, Refused> {
        if let Some(p) = shot.pictures.lock().ok().and_then(|p| p.get(&which).cloned()) {
            return Ok(p);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs.try_send((shot, which, tx)).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => Refused::Busy,
            std::sync::mpsc::TrySendError::Disconnected(_) => Refused::Stopped,
        })?;
        rx.await.map_err(|_| Refused::Failed)
    }
}

/// JPEG bytes of one picture of `shot`, encoded once and then kept with the frame.
pub fn picture(shot: &Shot, which: Picture) -> Arc<Vec<u8>> {
    let cached = |s: &Shot| s.pictures.lock().ok().and_then(|p| p.get(&which).cloned());
    if let Some(p) = cached(shot) {
        return p;
    }
    let img = match which {
        Picture::Image => shot.image.clone(),
        Picture::Thumb => small(&shot.image),
        Picture::Overlay => overlay(&shot.image, &shot.map, shot.level),
        Picture::Tile => {
            let img = small(&shot.image);
            overlay(&img, &resize_map(&shot.map, img.width(), img.height()), shot.level)
        }
        Picture::Map => kensa_verdict::overlay::heat_map(&shot.map, shot.level),
    };
    let bytes = Arc::new(kensa_verdict::overlay::jpeg(&img, 85));
    if let Ok(mut p) = shot.pictures.lock() {
        p.insert(which, bytes.clone());
    }
    bytes
}

/// The overlay, or the frame itself when the map has another size (it is scored at the
/// frame's size, so only a broken frame gets here).
fn overlay(img: &RgbImage, map: &AnomalyMap, level: f32) -> RgbImage {
    if (map.width, map.height) == (img.width(), img.height()) {
        kensa_verdict::overlay::heat_overlay(img, map, level)
    } else {
        img.clone()
    }
}

/// The size of `(w, h)` with its longer side at most [`SMALL_SIDE`].
pub fn small_size(w: u32, h: u32) -> (u32, u32) {
    let (w, h) = (w.max(1), h.max(1));
    if w.max(h) <= SMALL_SIDE {
        return (w, h);
    }
    if w >= h {
        (SMALL_SIDE, (SMALL_SIDE * h / w).max(1))
    } else {
        ((SMALL_SIDE * w / h).max(1), SMALL_SIDE)
    }
}

fn small(img: &RgbImage) -> RgbImage {
    let (w, h) = small_size(img.width(), img.height());
    if (w, h) == img.dimensions() {
        img.clone()
    } else {
        image::imageops::thumbnail(img, w, h)
    }
}

/// The map resampled to `w × h` (bilinear), so a tile's outline follows the small frame.
fn resize_map(map: &AnomalyMap, w: u32, h: u32) -> AnomalyMap {
    if (map.width, map.height) == (w, h) {
        return AnomalyMap::new(w, h, map.data.clone());
    }
    let Some(buf) = ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(map.width, map.height, map.data.clone()) else {
        return AnomalyMap::new(w, h, vec![0.0; (w * h) as usize]);
    };
    let r = image::imageops::resize(&buf, w, h, FilterType::Triangle);
    AnomalyMap::new(w, h, r.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_jpeg_small_when_asked_and_made_once() {
        let mut s = crate::board::tests::shot("a", 1, true);
        s.image = RgbImage::new(640, 480);
        s.map = AnomalyMap::new(640, 480, vec![0.2; 640 * 480]);
        let tile = picture(&s, Picture::Tile);
        let img = image::load_from_memory(&tile).unwrap();
        assert_eq!((img.width(), img.height()), (320, 240));
        assert_eq!(&tile[..2], &[0xFF, 0xD8], "JPEG");
        let again = picture(&s, Picture::Tile);
        assert!(Arc::ptr_eq(&tile, &again), "encoded once, then kept");
        let full = image::load_from_memory(&picture(&s, Picture::Overlay)).unwrap();
        assert_eq!(full.width(), 640);
        assert!("tile".parse::<Picture>().is_ok() && "x".parse::<Picture>().is_err());
        assert_eq!(small_size(100, 400), (80, 320));
    }

    #[test]
    fn the_renderer_draws_on_its_thread_and_reuses_what_it_drew() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let r = Renderer::start(2);
        let s = Arc::new(crate::board::tests::shot("a", 1, true));
        let a = rt.block_on(r.draw(s.clone(), Picture::Map)).unwrap();
        let b = rt.block_on(r.draw(s, Picture::Map)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
