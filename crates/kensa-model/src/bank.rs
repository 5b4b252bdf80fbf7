//! Memory bank files.
//!
//! A bank is a safetensors file: one `[N_i, C_i]` float32 tensor of L2-normalised patch features
//! per backbone layer (`layer0`, `layer1`, ...) and, in the header's metadata under `kensa`, a
//! JSON [`BankMeta`]: format version, product, backbone identity, input size, number of
//! references, the verdict calibration, and a SHA-256 of the tensor bytes. Loading checks all of
//! it, so a truncated, tampered or mismatched bank is a clear error naming the file.

use crate::backbone::BackboneMeta;
use crate::{ModelError, Result};
use kensa_verdict::Calibration;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const BANK_FORMAT: &str = "kensa-bank/1";
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
}

fn full_coreset() -> f64 {
    1.0
}

impl BankMeta {
    /// Short version string for logs, events and metrics.
    pub fn version(&self) -> String {
        self.content_sha256.chars().take(12).collect()
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
        meta.content_sha256 = content_hash(&layers);
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
        let meta_json = serde_json::to_string(&self.meta).map_err(|e| err(e.to_string()))?;
        let info = HashMap::from([("kensa".to_string(), meta_json)]);
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
        let len =
            std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e} (make one with `kensa enroll`)")))?.len();
        if len > MAX_BANK_BYTES {
            return Err(err(format!("{len} bytes is over the {MAX_BANK_BYTES}-byte bank limit")));
        }
        let data = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&data)
            .map_err(|e| err(format!("not a Kensa bank (bad or truncated safetensors: {e})")))?;
        let (_, header) = SafeTensors::read_metadata(&data).map_err(|e| err(e.to_string()))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("kensa"))
            .ok_or_else(|| err("not a Kensa bank (no `kensa` metadata)".into()))?;
        let meta: BankMeta = serde_json::from_str(meta_json).map_err(|e| err(format!("bad bank metadata: {e}")))?;
        if meta.format != BANK_FORMAT {
            return Err(err(format!("format `{}` is not supported (expected {BANK_FORMAT})", meta.format)));
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
        let hash = content_hash(&layers);
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

fn content_hash(layers: &[Tensor]) -> String {
    let mut h = Sha256::new();
    for t in layers {
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).expect("float tensor");
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}
