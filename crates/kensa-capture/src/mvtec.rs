//! Data sets in MVTec AD layout (`train/good`, `test/<type>`, `ground_truth/<type>/<stem>_mask.png`),
//! as `kensa eval` and `kensa train-judge --eval` read them.

use crate::images::{list_images, ImageError};
use std::path::{Path, PathBuf};

/// One test image of a class.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub path: PathBuf,
    /// The test/ folder it came from (`good` for normal images).
    pub kind: String,
    pub anomalous: bool,
    /// Its ground-truth mask file (anomalous images only; the file may be missing).
    pub mask: Option<PathBuf>,
}

fn err(path: &Path, msg: impl Into<String>) -> ImageError {
    ImageError::Image { path: path.to_path_buf(), msg: msg.into() }
}

/// The classes under `root`: `root` itself when it is a class (has `train/good`), else its
/// sub-folders that are, by name.
pub fn classes(root: &Path) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    if root.join("train/good").is_dir() {
        return Ok(vec![(name(root), root.to_path_buf())]);
    }
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| err(root, format!("cannot list folder: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train/good").is_dir())
        .map(|p| (name(&p), p))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(err(root, "not an MVTec-layout class (no train/good) nor a folder of them"));
    }
    Ok(v)
}

/// Every test image of a class, by type folder then name.
pub fn test_images(class: &Path) -> Result<Vec<TestImage>, ImageError> {
    let mut out = Vec::new();
    let mut kinds: Vec<PathBuf> = std::fs::read_dir(class.join("test"))
        .map_err(|e| err(class, format!("has no test folder: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    kinds.sort();
    for k in kinds {
        let kind = k.file_name().unwrap_or_default().to_string_lossy().into_owned();
        for p in list_images(&k)? {
            let anomalous = kind != "good";
            let mask = anomalous.then(|| {
                let stem = p.file_stem().unwrap_or_default().to_string_lossy();
                class.join("ground_truth").join(&kind).join(format!("{stem}_mask.png"))
            });
            out.push(TestImage { path: p, kind: kind.clone(), anomalous, mask });
        }
    }
    Ok(out)
}

/// The ground-truth mask at `w × h`: all false for a normal image (`p` None), `None` when an
/// anomalous image's mask file is missing.
pub fn load_mask(p: Option<&PathBuf>, w: u32, h: u32) -> Result<Option<Vec<bool>>, ImageError> {
    let Some(p) = p else { return Ok(Some(vec![false; (w * h) as usize])) };
    if !p.is_file() {
        return Ok(None);
    }
    let m = image::open(p).map_err(|e| err(p, format!("cannot read mask: {e}")))?.to_luma8();
    let m = if m.dimensions() == (w, h) {
        m
    } else {
        image::imageops::resize(&m, w, h, image::imageops::FilterType::Nearest)
    };
    Ok(Some(m.pixels().map(|p| p.0[0] > 127).collect()))
}
