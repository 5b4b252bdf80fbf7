//! Memory bank files.
//!
//! A bank is a safetensors file: one `[N_i, C_i]` float32 tensor of L2-normalised patch features
//! per backbone layer (`layer0`, `layer1`, ...) and, in the header's metadata under `kensa`, a
//! JSON [`BankMeta`]: format version, product, backbone identity, input size, number of
//! references, the verdict calibration, and a SHA-256 of the tensor bytes (the bank's version);
//! format 2 adds a seal (`kensa_sha256`): a SHA-256 over that hash and the metadata exactly as
//! stored. Loading checks all of it and range-checks every field, so a truncated, tampered,
//! impossible or mismatched bank is a clear error naming the file.

use crate::backbone::BackboneMeta;
use crate::{ModelError, Result};
use kensa_verdict::Calibration;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Banks written now: sealed, so the metadata is covered too.
pub const BANK_FORMAT: &str = "kensa-bank/2";
/// Banks from before format 2: no seal, the tensors alone are hashed (still read, with a warning).
pub const BANK_FORMAT_V1: &str = "kensa-bank/1";
/// Refuse banks larger than this (bytes) unless the caller raises it.
pub const MAX_BANK_BYTES: u64 = 2 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BankMeta {
    pub format: String,
    pub product: String,
    pub backbone: String,
    pub backbone_weights: String,
    pub backbone_sha256: String,
    pub input_size: u32,
    pub strides: Vec<u32>,
    pub channels: Vec<u32>,
    pub references: usize,
    pub reference_files: Vec<String>,
    pub created_unix: u64,
    pub calibration: Calibration,
    /// SHA-256 of the tensor bytes, in layer order: the bank's version.
    pub content_sha256: String,
    /// Fraction of each reference's patches kept (greedy coreset); 1 = all.
    #[serde(default = "full_coreset")]
    pub coreset: f64,
    /// Side of the neighbourhood averaged into each patch feature, per layer (1 = the patch
    /// alone). Scoring uses the bank's own value; banks from before it was recorded used 3.
    #[serde(default)]
    pub aggregation: Vec<u32>,
    /// Augmentations of the references whose features are in the bank (`none` when empty).
    #[serde(default)]
    pub augment: Vec<String>,
    /// Region of interest `[x, y, width, height]` in frame pixels: only it is scored (the map is
    /// 0 elsewhere); clipped to each frame. None: the whole frame.
    #[serde(default)]
    pub crop: Option<[u32; 4]>,
    /// Scoring lets the frame's own distant, well-explained patches vouch for its patches on the
    /// coarser layers (`engine::match_self`). Banks from before it existed: off.
    #[serde(default)]
    pub self_match: bool,
    /// Learning from the line: the version's parent, change and learned state (None: as
    /// enrolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<crate::lineage::Lineage>,
    /// Small JPEG thumbnails of the references (file or frame name → base64), for the operator
    /// console. Banks from before them have none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub thumbnails: std::collections::BTreeMap<String, String>,
}

/// Longest side of a reference's thumbnail.
pub const THUMBNAIL_SIDE: u32 = 96;

/// A reference's thumbnail as stored in [`BankMeta::thumbnails`]: base64 of a JPEG whose longer
/// side is [`THUMBNAIL_SIDE`].
pub fn thumbnail(img: &image::RgbImage) -> String {
    use base64::Engine as _;
    let (w, h) = (img.width().max(1), img.height().max(1));
    let side = THUMBNAIL_SIDE.min(w.max(h));
    let (tw, th) = if w >= h { (side, (side * h / w).max(1)) } else { ((side * w / h).max(1), side) };
    let small = image::imageops::thumbnail(img, tw, th);
    let mut jpeg = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80);
    if small.write_with_encoder(enc).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(jpeg)
}

fn full_coreset() -> f64 {
    1.0
}

impl BankMeta {
    /// The first field whose value no bank made by `kensa enroll` can have, if any.
    pub fn problem(&self) -> Option<String> {
        let c = &self.calibration;
        let finite = [c.image_threshold, c.pixel_threshold, c.logistic_scale, c.min_area_frac];
        if !(32..=4096).contains(&self.input_size) {
            return Some(format!("input_size {} is outside 32..=4096", self.input_size));
        }
        if self.strides.is_empty() || self.strides.len() != self.channels.len() {
            return Some(format!("{} strides for {} layers", self.strides.len(), self.channels.len()));
        }
        if self.strides.iter().any(|&s| s == 0 || s > self.input_size)
            || self.channels.iter().any(|&c| c == 0 || c > 65_536)
        {
            return Some(format!("strides {:?} / channels {:?}", self.strides, self.channels));
        }
        if self.references == 0 || self.references > 1_000_000 {
            return Some(format!("{} references", self.references));
        }
        if !(self.coreset > 0.0 && self.coreset <= 1.0) {
            return Some(format!("coreset {} is outside (0, 1]", self.coreset));
        }
        if finite.iter().any(|v| !v.is_finite()) || c.image_threshold <= 0.0 || c.pixel_threshold <= 0.0 {
            return Some(format!(
                "calibration thresholds {} / {} must be finite and positive",
                c.image_threshold, c.pixel_threshold
            ));
        }
        if c.logistic_scale <= 0.0 || !(0.0..=1.0).contains(&c.min_area_frac) {
            return Some(format!(
                "calibration logistic scale {} (> 0) or minimum area {} (0..=1)",
                c.logistic_scale, c.min_area_frac
            ));
        }
        None
    }

    /// Short version string for logs, events and metrics.
    pub fn version(&self) -> String {
        match &self.lineage {
            Some(l) if !l.version.is_empty() => l.version.clone(),
            _ => self.content_sha256.chars().take(12).collect(),
        }
    }

    /// The aggregation sizes features are scored with (3 per layer for banks that predate the
    /// field).
    pub fn aggregation(&self) -> Vec<u32> {
        if self.aggregation.is_empty() {
            vec![3; self.strides.len()]
        } else {
            self.aggregation.clone()
        }
    }
}

pub struct Bank {
    pub meta: BankMeta,
    /// One `[N_i, C_i]` tensor per layer, on the scoring device.
    pub layers: Vec<Tensor>,
}

impl Bank {
    pub fn new(mut meta: BankMeta, layers: Vec<Tensor>) -> Self {
        meta.format = BANK_FORMAT.into();
        meta.content_sha256 = tensor_hash(&layers);
        Self { meta, layers }
    }

    /// Casts the bank's features to `kind` (the backbone's precision) for scoring.
    pub fn cast(mut self, kind: Kind) -> Self {
        self.layers = self.layers.iter().map(|t| t.to_kind(kind)).collect();
        self
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |msg: String| ModelError::Bank { path: path.to_path_buf(), msg };
        let bytes: Vec<(String, Vec<f32>, Vec<usize>)> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).expect("float tensor");
                (format!("layer{i}"), v, shape)
            })
            .collect();
        let raw: Vec<(String, Vec<u8>, Vec<usize>)> =
            bytes.into_iter().map(|(n, v, s)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s)).collect();
        let views: Vec<(String, TensorView<'_>)> = raw
            .iter()
            .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("sizes match")))
            .collect();
        // Sealed as written: the hash covers the tensors and the metadata as they are now.
        let mut meta = self.meta.clone();
        meta.format = BANK_FORMAT.into();
        meta.content_sha256 = tensor_hash(&self.layers);
        let meta_json = serde_json::to_string(&meta).map_err(|e| err(e.to_string()))?;
        let seal = sealed_hash(&meta.content_sha256, &meta_json);
        let info = HashMap::from([("kensa".to_string(), meta_json), (SEAL_KEY.to_string(), seal)]);
        let data = safetensors::serialize(views, Some(info)).map_err(|e| err(format!("cannot serialise: {e}")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Write to a temporary file and rename, so a reader never sees half a bank.
        let tmp = path.with_extension("kbank.tmp");
        std::fs::write(&tmp, &data).map_err(|e| err(format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot rename into place: {e}")))?;
        Ok(())
    }

    /// Loads and validates a bank for use with `backbone`; `input_size` > 0 also requires the
    /// bank to have been enrolled at that size (0: any; the bank's own size is used to score).
    pub fn load(path: &Path, backbone: &BackboneMeta, input_size: u32, device: Device) -> Result<Self> {
        let bank = Self::load_unchecked(path, device)?;
        let m = &bank.meta;
        let err = |msg: String| ModelError::Bank { path: path.to_path_buf(), msg };
        if m.backbone != backbone.name || m.strides != backbone.strides || m.channels != backbone.channels {
            return Err(err(format!(
                "built with backbone {} (strides {:?}), but the loaded backbone is {} (strides {:?}); re-enroll the product",
                m.backbone, m.strides, backbone.name, backbone.strides
            )));
        }
        if !backbone.weights.is_empty() && m.backbone_weights != backbone.weights {
            return Err(err(format!(
                "built with backbone weights {}, but the loaded backbone has {}; re-enroll the product",
                m.backbone_weights, backbone.weights
            )));
        }
        if input_size > 0 && m.input_size != input_size {
            return Err(err(format!(
                "built at input size {}, but the config asks for {input_size}; re-enroll or change the config",
                m.input_size
            )));
        }
        Ok(bank)
    }

    /// Loads a bank and checks its own integrity (format, sizes, content hash) only.
    pub fn load_unchecked(path: &Path, device: Device) -> Result<Self> {
        let err = |msg: String| ModelError::Bank { path: path.to_path_buf(), msg };
        let data = read_bounded(path, MAX_BANK_BYTES).map_err(err)?;
        let st = SafeTensors::deserialize(&data)
            .map_err(|e| err(format!("not a Kensa bank (bad or truncated safetensors: {e})")))?;
        let (_, header) = SafeTensors::read_metadata(&data).map_err(|e| err(e.to_string()))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kensa"))
            .ok_or_else(|| err("not a Kensa bank (no `kensa` metadata)".into()))?;
        let meta: BankMeta = serde_json::from_str(meta_json).map_err(|e| err(format!("bad bank metadata: {e}")))?;
        if meta.format != BANK_FORMAT && meta.format != BANK_FORMAT_V1 {
            return Err(err(format!("format `{}` is not supported (expected {BANK_FORMAT})", meta.format)));
        }
        if let Some(problem) = meta.problem() {
            return Err(err(format!("impossible metadata: {problem}; re-enroll the product")));
        }
        if !meta.aggregation.is_empty() {
            crate::engine::check_aggregation(&meta.aggregation, meta.channels.len()).map_err(|e| err(e.to_string()))?;
        }
        if let Some(c) = meta.crop {
            if c[2] == 0 || c[3] == 0 {
                return Err(err(format!("crop {c:?} is empty")));
            }
        }
        let mut layers = Vec::new();
        for (i, &c) in meta.channels.iter().enumerate() {
            let view = st.tensor(&format!("layer{i}")).map_err(|e| err(format!("layer{i}: {e}")))?;
            let shape = view.shape();
            if view.dtype() != Dtype::F32 || shape.len() != 2 || shape[1] != c as usize || shape[0] == 0 {
                return Err(err(format!("layer{i} has shape {shape:?} {:?}, expected [N, {c}] F32", view.dtype())));
            }
            let t = Tensor::f_from_data_size(view.data(), &[shape[0] as i64, shape[1] as i64], Kind::Float)?;
            layers.push(t);
        }
        let hash = tensor_hash(&layers);
        if meta.format == BANK_FORMAT_V1 {
            tracing::warn!(path = %path.display(), "bank format 1: its metadata is not covered by its hash; re-enroll to protect it");
        } else {
            // The seal covers the metadata exactly as stored (the raw JSON), so fields added by
            // later versions never break it.
            let stored = header.metadata().as_ref().and_then(|m| m.get(SEAL_KEY));
            if stored.map(String::as_str) != Some(sealed_hash(&hash, meta_json).as_str()) {
                return Err(err(
                    "content hash mismatch: its metadata does not match its seal; the bank is corrupt or was modified"
                        .into(),
                ));
            }
        }
        if hash != meta.content_sha256 {
            return Err(err(format!(
                "content hash mismatch (file says {}, data is {}): the bank is corrupt or was modified",
                meta.content_sha256, hash
            )));
        }
        let layers = layers.into_iter().map(|t| t.to_device(device)).collect();
        Ok(Self { meta, layers })
    }
}

/// Reads a bank file: a regular file (not a FIFO or a device), at most `limit` bytes, the limit
/// applied to what is read (not only to what the file system says).
fn read_bounded(path: &Path, limit: u64) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without blocking: opening a FIFO for reading would otherwise wait for a writer
    // forever (and with it the file watch or the control command that named it).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read: {e} (make one with `kensa enroll`)"))?;
    let md = f.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    let mut data = Vec::with_capacity(usize::try_from(md.len().min(limit)).unwrap_or(0));
    f.take(limit + 1).read_to_end(&mut data).map_err(|e| format!("cannot read: {e}"))?;
    if data.len() as u64 > limit {
        return Err(format!("over the {limit}-byte bank limit"));
    }
    Ok(data)
}

/// Safetensors metadata key of the format-2 seal.
const SEAL_KEY: &str = "kensa_sha256";

/// Format 2's seal: SHA-256 of the tensor hash and the metadata JSON exactly as stored.
fn sealed_hash(tensor_hash: &str, meta_json: &str) -> String {
    let mut h = Sha256::new();
    h.update(tensor_hash.as_bytes());
    h.update(meta_json.as_bytes());
    hex::encode(h.finalize())
}

/// SHA-256 of the tensor bytes, in layer order: the bank's version (every format).
fn tensor_hash(layers: &[Tensor]) -> String {
    let mut h = Sha256::new();
    feed_tensors(&mut h, layers);
    hex::encode(h.finalize())
}

fn feed_tensors(h: &mut Sha256, layers: &[Tensor]) {
    for t in layers {
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).expect("float tensor");
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
}
