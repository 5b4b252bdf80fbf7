//! Evidence on disk: for each stored frame its snapshot (PNG), full-resolution anomaly map
//! (.npy) and overlay (the map as heat over the frame, regions outlined), under
//! `publish.store_dir/<camera>/<run id>/<seq>`: the run id makes names unique across restarts,
//! so an event never points at a picture of another run. Optionally a URL per file
//! (`publish.evidence_url_prefix`, served by Kensa's listener under `/evidence/`). Retention by
//! bytes and age: [`prune`] removes the oldest files first.

use kensa_core::config::PublishConfig;
use kensa_core::{AnomalyMap, Frame};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Where a frame's evidence went (empty strings when nothing was stored).
pub use kensa_publish::event::EvidenceRefs as Stored;

/// Writes evidence under one folder for one run.
pub struct Evidence {
    dir: PathBuf,
    run_id: String,
    url_prefix: Option<String>,
}

impl Evidence {
    pub fn new(dir: PathBuf, run_id: &str, url_prefix: Option<String>) -> Self {
        let url_prefix = url_prefix.map(|p| p.trim_end_matches('/').to_string());
        Self { dir, run_id: run_id.to_string(), url_prefix }
    }

    /// Stores a frame's snapshot, map and overlay (regions outlined at `level`). A failure is
    /// logged and leaves the paths empty: evidence never stops inspection.
    pub fn store(&self, f: &Frame, map: &AnomalyMap, level: f32) -> Stored {
        let rel = PathBuf::from(&*f.camera).join(&self.run_id);
        let d = self.dir.join(&rel);
        let stem = format!("{:012}", f.seq);
        let res = (|| -> std::io::Result<[PathBuf; 3]> {
            std::fs::create_dir_all(&d)?;
            let mp = rel.join(format!("{stem}_map.npy"));
            kensa_core::npy::write_f32_2d(
                std::io::BufWriter::new(std::fs::File::create(self.dir.join(&mp))?),
                map.height as usize,
                map.width as usize,
                &map.data,
            )?;
            let img = image::RgbImage::from_raw(f.width, f.height, f.data.clone())
                .ok_or_else(|| std::io::Error::other("frame buffer does not match its size"))?;
            let sp = rel.join(format!("{stem}.png"));
            std::fs::write(self.dir.join(&sp), kensa_verdict::overlay::png(&img))?;
            let op = rel.join(format!("{stem}_overlay.png"));
            if (map.width, map.height) == (f.width, f.height) {
                let pic = kensa_verdict::overlay::heat_overlay(&img, map, level);
                std::fs::write(self.dir.join(&op), kensa_verdict::overlay::png(&pic))?;
            }
            Ok([sp, mp, op])
        })();
        match res {
            Ok([sp, mp, op]) => {
                let overlay = self.dir.join(&op).is_file();
                let url = |p: &Path| match &self.url_prefix {
                    Some(prefix) => format!("{prefix}/{}", p.display()),
                    None => String::new(),
                };
                Stored {
                    snapshot_path: self.dir.join(&sp).display().to_string(),
                    map_path: self.dir.join(&mp).display().to_string(),
                    overlay_path: if overlay { self.dir.join(&op).display().to_string() } else { String::new() },
                    snapshot_url: url(&sp),
                    map_url: url(&mp),
                    overlay_url: if overlay { url(&op) } else { String::new() },
                }
            }
            Err(e) => {
                tracing::error!(camera = %f.camera, frame = f.seq, dir = %d.display(), "cannot store evidence: {e}");
                Stored::default()
            }
        }
    }
}

/// What one retention pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub files: u64,
    pub bytes: u64,
}

/// Retention: removes files under `dir` older than `max_age` (zero: no age limit), then the
/// oldest until the rest fit in `max_bytes` (zero: no size limit); empty folders go too.
pub fn prune(dir: &Path, max_bytes: u64, max_age: Duration) -> Pruned {
    let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
                dirs.push(e.path());
            } else if meta.is_file() {
                files.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), e.path()));
            }
        }
    }
    files.sort();
    let now = SystemTime::now();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut out = Pruned::default();
    for (modified, len, path) in &files {
        let too_old = !max_age.is_zero() && now.duration_since(*modified).is_ok_and(|age| age > max_age);
        let too_big = max_bytes > 0 && total > max_bytes;
        if !too_old && !too_big {
            break;
        }
        if std::fs::remove_file(path).is_ok() {
            total -= len;
            out.files += 1;
            out.bytes += len;
        }
    }
    // Deepest first, so a run folder goes before its camera folder.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(d); // only succeeds when empty
    }
    out
}

/// Runs retention on `publish.store_dir` every `every` until cancelled.
pub async fn retention(publish: PublishConfig, every: Duration) {
    let Some(dir) = publish.store_dir.clone() else { return };
    let max_age = Duration::from_secs(publish.store_max_age_s);
    loop {
        let d = dir.clone();
        let pruned = tokio::task::spawn_blocking(move || prune(&d, publish.store_max_bytes, max_age)).await;
        if let Ok(p) = pruned {
            if p.files > 0 {
                tracing::info!(files = p.files, bytes = p.bytes, dir = %dir.display(), "evidence retention removed the oldest files");
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &Path, bytes: usize, age_s: u64) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, vec![0u8; bytes]).unwrap();
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn retention_removes_the_oldest_first_by_age_then_by_bytes() {
        let d = std::env::temp_dir().join(format!("kensa-evidence-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        file(&d.join("cam/run1/a.png"), 100, 10_000);
        file(&d.join("cam/run2/b.png"), 100, 300);
        file(&d.join("cam/run2/c.png"), 100, 200);
        file(&d.join("cam/run3/d.png"), 100, 100);
        // Age first: only a (older than an hour).
        assert_eq!(prune(&d, 0, Duration::from_secs(3600)), Pruned { files: 1, bytes: 100 });
        assert!(!d.join("cam/run1").exists(), "an emptied run folder is removed");
        // Then bytes: 300 left, 150 allowed: b and c go, d (newest) stays.
        assert_eq!(prune(&d, 150, Duration::ZERO), Pruned { files: 2, bytes: 200 });
        assert!(d.join("cam/run3/d.png").is_file());
        assert_eq!(prune(&d, 150, Duration::ZERO), Pruned::default(), "nothing more to do");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_carry_the_run_and_urls_the_prefix() {
        let d = std::env::temp_dir().join(format!("kensa-evidence-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let f = Frame {
            camera: "cam1".into(),
            seq: 7,
            capture_time: SystemTime::now(),
            captured_at: std::time::Instant::now(),
            width: 4,
            height: 2,
            data: vec![128; 24],
            part_id: None,
        };
        let map = AnomalyMap { width: 4, height: 2, data: vec![0.0, 0.1, 0.9, 0.2, 0.0, 0.0, 0.8, 0.0] };
        let a = Evidence::new(d.clone(), "r1", Some("http://kensa:9898/evidence/".into())).store(&f, &map, 0.5);
        let b = Evidence::new(d.clone(), "r2", None).store(&f, &map, 0.5);
        assert_eq!(a.snapshot_path, d.join("cam1/r1/000000000007.png").display().to_string());
        assert_ne!(a.snapshot_path, b.snapshot_path, "a second run never overwrites the first");
        assert_eq!(a.overlay_url, "http://kensa:9898/evidence/cam1/r1/000000000007_overlay.png");
        assert!(Path::new(&a.overlay_path).is_file() && Path::new(&a.map_path).is_file());
        assert!(b.snapshot_url.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
