//! The frames held for the console. The verdict stage [`Board::push`]es every judged frame:
//! it joins its camera's ring (`console.frames_per_camera`, the newest shown live) and, when
//! anomalous, the gallery ring (`console.defects`); the oldest leave first, so memory stays
//! bounded. A push takes one short lock and encodes nothing (pictures are made on request,
//! see [`crate::render`]), so the pipeline never waits for a viewer.

use kensa_core::config::ConsoleConfig;
use kensa_core::AnomalyMap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One judge's say on a frame.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Said {
    pub judge: String,
    pub anomalous: bool,
    /// The answer sentence in AnomalyGPT's words.
    pub answer: String,
    pub confidence: f32,
    pub score: f32,
}

impl From<&kensa_verdict::Verdict> for Said {
    fn from(v: &kensa_verdict::Verdict) -> Self {
        Self {
            judge: v.judge.to_string(),
            anomalous: v.anomalous,
            answer: v.answer.clone(),
            confidence: v.confidence,
            score: v.score,
        }
    }
}

/// A judged frame as the console shows it.
pub struct Shot {
    /// The event's id (`camera/run/seq`), as on the Kafka topics.
    pub event_id: String,
    pub camera: String,
    pub product: String,
    pub seq: u64,
    pub part_id: String,
    pub captured_unix_ms: i64,
    /// The frame's pixels.
    pub image: image::RgbImage,
    /// Its anomaly map (the frame's size) and the level whose regions are outlined.
    pub map: AnomalyMap,
    pub level: f32,
    /// The deciding verdict; `judges` has every judge that ran, the calibrated one first.
    pub decided: Said,
    pub judges: Vec<Said>,
    /// Cells of the regions, strongest first.
    pub cells: Vec<String>,
    pub bank_version: String,
    /// The deciding verdict's regions, and the image decision (for questions about the frame).
    pub regions: Vec<kensa_verdict::Region>,
    pub decision: f32,
    /// Pictures already encoded (each at most once per frame).
    pub(crate) pictures: Mutex<HashMap<crate::render::Picture, Arc<Vec<u8>>>>,
}

impl Shot {
    /// A shot with no pictures encoded yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        event_id: String,
        (camera, product): (String, String),
        (seq, part_id, captured_unix_ms): (u64, String, i64),
        image: image::RgbImage,
        (map, level): (AnomalyMap, f32),
        (decided, judges): (Said, Vec<Said>),
        cells: Vec<String>,
        bank_version: String,
    ) -> Self {
        Self {
            event_id,
            camera,
            product,
            seq,
            part_id,
            captured_unix_ms,
            image,
            map,
            level,
            decided,
            judges,
            cells,
            bank_version,
            regions: Vec::new(),
            decision: 0.0,
            pictures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether every judge that ran said the same.
    pub fn judges_agree(&self) -> bool {
        self.judges.iter().all(|j| j.anomalous == self.decided.anomalous)
    }

    /// Bytes held: pixels, map and the encoded pictures.
    pub fn bytes(&self) -> usize {
        let pics: usize = self.pictures.lock().map_or(0, |p| p.values().map(|v| v.len()).sum());
        self.image.as_raw().len() + self.map.data.len() * 4 + pics
    }
}

/// The newest frame of a camera, and its rate, as the live view shows them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latest {
    pub event_id: String,
    pub seq: u64,
    pub captured_unix_ms: i64,
    pub product: String,
    pub decided: Said,
    pub cells: Vec<String>,
    pub bank_version: String,
}

/// A camera's tile: its latest frame and how many frames a second it scores.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Tile {
    pub camera: String,
    /// `up`, `reconnecting`, `failed`, `waiting_for_bank`, … (from `/healthz`).
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Frames judged per second over the last few seconds (0 when none for 5 s).
    pub fps: f64,
    /// Frames judged since the start.
    pub frames: u64,
    pub latest: Option<Latest>,
}

#[derive(Default)]
struct Live {
    recent: VecDeque<Arc<Shot>>,
    /// When the last frames were pushed (for the rate).
    times: VecDeque<Instant>,
    frames: u64,
}

impl Live {
    /// Frames a second over the last frames held (up to 32): 0 once the newest is older than
    /// three mean intervals (and 5 s), so a slow or triggered line still shows its rate.
    fn fps(&self, now: Instant) -> f64 {
        let (Some(first), Some(last)) = (self.times.front(), self.times.back()) else { return 0.0 };
        let n = self.times.len();
        let span = last.duration_since(*first).as_secs_f64();
        if n < 2 || span <= 0.0 {
            return 0.0;
        }
        let mean = span / (n - 1) as f64;
        if now.duration_since(*last).as_secs_f64() > (3.0 * mean).max(5.0) {
            return 0.0;
        }
        (n - 1) as f64 / span
    }
}

#[derive(Default)]
struct State {
    cameras: BTreeMap<String, Live>,
    defects: VecDeque<Arc<Shot>>,
}

/// The frames held for the console; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Board {
    state: Arc<Mutex<State>>,
    limits: Limits,
    /// Bumped at every push: the live streams wait on it.
    changed: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    per_camera: usize,
    defects: usize,
}

impl Board {
    /// An empty board for these cameras (in this order on the live view).
    pub fn new<'a>(cameras: impl IntoIterator<Item = &'a str>, cfg: &ConsoleConfig) -> Self {
        let cameras = cameras.into_iter().map(|c| (c.to_string(), Live::default())).collect();
        Self {
            state: Arc::new(Mutex::new(State { cameras, defects: VecDeque::new() })),
            limits: Limits { per_camera: cfg.frames_per_camera.max(1), defects: cfg.defects },
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave the rings inconsistent: go on with them.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds a judged frame: newest of its camera, and in the gallery when anomalous.
    pub fn push(&self, shot: Shot) {
        let shot = Arc::new(shot);
        let now = Instant::now();
        {
            let mut s = self.lock();
            let live = s.cameras.entry(shot.camera.clone()).or_default();
            live.frames += 1;
            live.times.push_back(now);
            while live.times.len() > 32 {
                live.times.pop_front();
            }
            live.recent.push_back(shot.clone());
            while live.recent.len() > self.limits.per_camera {
                live.recent.pop_front();
            }
            if shot.decided.anomalous && self.limits.defects > 0 {
                s.defects.push_back(shot);
                while s.defects.len() > self.limits.defects {
                    s.defects.pop_front();
                }
            }
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Each camera's tile; `states` gives each camera's state and detail (from `/healthz`).
    pub fn tiles(&self, states: &BTreeMap<String, (String, String)>) -> Vec<Tile> {
        let now = Instant::now();
        let s = self.lock();
        let mut ids: Vec<&String> = s.cameras.keys().collect();
        ids.extend(states.keys().filter(|k| !s.cameras.contains_key(*k)));
        ids.into_iter()
            .map(|id| {
                let live = s.cameras.get(id);
                let (state, detail) = states.get(id).cloned().unwrap_or_else(|| ("starting".into(), String::new()));
                Tile {
                    camera: id.clone(),
                    state,
                    detail,
                    fps: live.map_or(0.0, |l| l.fps(now)),
                    frames: live.map_or(0, |l| l.frames),
                    latest: live.and_then(|l| l.recent.back()).map(|x| Latest {
                        event_id: x.event_id.clone(),
                        seq: x.seq,
                        captured_unix_ms: x.captured_unix_ms,
                        product: x.product.clone(),
                        decided: x.decided.clone(),
                        cells: x.cells.clone(),
                        bank_version: x.bank_version.clone(),
                    }),
                }
            })
            .collect()
    }

    /// The held anomalous frames, newest first, of a camera and/or product when given.
    pub fn defects(&self, camera: Option<&str>, product: Option<&str>) -> Vec<Arc<Shot>> {
        let s = self.lock();
        s.defects
            .iter()
            .rev()
            .filter(|d| camera.is_none_or(|c| d.camera == c) && product.is_none_or(|p| d.product == p))
            .cloned()
            .collect()
    }

    /// A held frame by its event id (the gallery first, then the cameras' rings).
    pub fn find(&self, event_id: &str) -> Option<Arc<Shot>> {
        let s = self.lock();
        s.defects
            .iter()
            .chain(s.cameras.values().flat_map(|l| l.recent.iter()))
            .find(|x| x.event_id == event_id)
            .cloned()
    }

    /// Frames and bytes held now.
    pub fn held(&self) -> (usize, usize) {
        let s = self.lock();
        let mut seen = std::collections::HashSet::new();
        let all = s.defects.iter().chain(s.cameras.values().flat_map(|l| l.recent.iter()));
        let unique: Vec<&Arc<Shot>> = all.filter(|x| seen.insert(Arc::as_ptr(x))).collect();
        (unique.len(), unique.iter().map(|x| x.bytes()).sum())
    }

    /// Wakes when a frame is pushed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn shot(camera: &str, seq: u64, anomalous: bool) -> Shot {
        let said = Said {
            judge: "calibrated".into(),
            anomalous,
            answer: if anomalous { "Yes".into() } else { "No".into() },
            confidence: 0.9,
            score: if anomalous { 0.8 } else { 0.1 },
        };
        let (w, h) = (8, 6);
        let mut data = vec![0.0; (w * h) as usize];
        data[10] = 1.0;
        Shot::new(
            format!("{camera}/run/{seq}"),
            (camera.into(), "disc".into()),
            (seq, String::new(), 0),
            image::RgbImage::new(w, h),
            (AnomalyMap::new(w, h, data), 0.5),
            (said.clone(), vec![said]),
            vec!["top left".into()],
            "abc".into(),
        )
    }

    fn cfg(per_camera: usize, defects: usize) -> ConsoleConfig {
        ConsoleConfig { frames_per_camera: per_camera, defects, ..ConsoleConfig::default() }
    }

    #[test]
    fn rings_stay_bounded_and_keep_the_newest() {
        let b = Board::new(["a", "b"], &cfg(2, 3));
        for seq in 0..10 {
            b.push(shot("a", seq, seq % 2 == 0));
        }
        b.push(shot("b", 0, false));
        let d = b.defects(None, None);
        assert_eq!(d.iter().map(|x| x.seq).collect::<Vec<_>>(), vec![8, 6, 4], "newest first, three kept");
        assert!(b.find("a/run/9").is_some(), "latest of the camera ring");
        assert!(b.find("a/run/7").is_none(), "past the camera ring and not a defect");
        assert!(b.find("a/run/4").is_some(), "still in the gallery");
        assert_eq!(b.held().0, 5, "a/9, a/8 (also a defect), a/6, a/4, b/0");
        assert_eq!(b.defects(Some("b"), None).len(), 0);
        assert_eq!(b.defects(None, Some("disc")).len(), 3);
    }

    #[test]
    fn tiles_cover_configured_and_reported_cameras() {
        let b = Board::new(["a"], &cfg(1, 1));
        b.push(shot("a", 1, true));
        b.push(shot("a", 2, false));
        let states: BTreeMap<String, (String, String)> = [
            ("a".to_string(), ("up".to_string(), String::new())),
            ("c".to_string(), ("failed".to_string(), "no device".to_string())),
        ]
        .into();
        let t = b.tiles(&states);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].camera.as_str(), t[0].state.as_str(), t[0].frames), ("a", "up", 2));
        assert_eq!(t[0].latest.as_ref().map(|l| l.seq), Some(2));
        assert!(t[0].fps > 0.0, "two frames within the window");
        assert_eq!((t[1].state.as_str(), t[1].latest.is_none()), ("failed", true));
    }

    #[test]
    fn a_push_wakes_the_live_streams() {
        let b = Board::new(["a"], &cfg(1, 1));
        let rx = b.subscribe();
        assert!(!rx.has_changed().unwrap());
        b.push(shot("a", 1, false));
        assert!(rx.has_changed().unwrap());
    }
}
