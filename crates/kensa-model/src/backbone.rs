//! TorchScript backbones.
//!
//! Contract: the module takes a normalised float NCHW RGB batch and returns a list (or tuple)
//! of feature maps, finest first. The sidecar `<file>.json` (written by
//! `tools/export_backbone.py`) gives its name, weights, strides, channels and normalisation.

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{CModule, Device, IValue, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackboneMeta {
    pub name: String,
    pub weights: String,
    pub strides: Vec<u32>,
    pub channels: Vec<u32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default)]
    pub sha256: String,
    /// Weights and arithmetic of the file: fp32 (also when absent), fp16 or bf16.
    #[serde(default)]
    pub dtype: String,
    /// Frozen modules hold their weights as graph constants, which cannot be cast after export.
    #[serde(default)]
    pub frozen: bool,
}

impl BackboneMeta {
    pub fn kind(&self) -> std::result::Result<Kind, String> {
        match self.dtype.as_str() {
            "" | "fp32" => Ok(Kind::Float),
            "fp16" => Ok(Kind::Half),
            "bf16" => Ok(Kind::BFloat16),
            other => Err(format!("sidecar dtype `{other}` is not fp32, fp16 or bf16")),
        }
    }
}

/// Whether `kind` lacks native support on a CPU with these `/proc/cpuinfo` flags.
fn slow_on_this_cpu(kind: Kind, cpuinfo: &str) -> bool {
    let native: &[&str] = match kind {
        Kind::BFloat16 => &["avx512_bf16", "amx_bf16"],
        Kind::Half => &["avx512_fp16", "amx_fp16"],
        _ => return false,
    };
    let flags = cpu_flags(cpuinfo);
    !native.iter().any(|n| flags.contains(n))
}

/// The instruction-set flags of `/proc/cpuinfo` text (its `flags` lines).
pub(crate) fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
        .collect()
}

/// The name of a backbone dtype as the config and the sidecar write it.
pub fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Half => "fp16",
        Kind::BFloat16 => "bf16",
        _ => "fp32",
    }
}

pub struct Backbone {
    module: CModule,
    pub meta: BackboneMeta,
    pub device: Device,
    /// Arithmetic of the module and of the patch features (see [`Backbone::with_precision`]).
    pub kind: Kind,
    pub path: PathBuf,
    mean: Tensor,
    std: Tensor,
}

impl Backbone {
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let err = |msg: String| ModelError::Backbone { path: path.to_path_buf(), msg };
        if !path.is_file() {
            return Err(err("file not found (run scripts/setup.sh, or tools/export_backbone.py)".into()));
        }
        let side = PathBuf::from(format!("{}.json", path.display()));
        let text = std::fs::read_to_string(&side)
            .map_err(|e| err(format!("cannot read its sidecar {}: {e}", side.display())))?;
        let meta: BackboneMeta =
            serde_json::from_str(&text).map_err(|e| err(format!("bad sidecar {}: {e}", side.display())))?;
        if meta.strides.is_empty() || meta.strides.len() != meta.channels.len() {
            return Err(err("sidecar strides/channels are empty or of different lengths".into()));
        }
        let kind = meta.kind().map_err(err)?;
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| err(format!("not loadable TorchScript: {e}")))?;
        module.set_eval();
        let mean = Tensor::from_slice(&meta.mean).view([1, 3, 1, 1]).to_device(device);
        let std = Tensor::from_slice(&meta.std).view([1, 3, 1, 1]).to_device(device);
        Ok(Self { module, meta, device, kind, path: path.to_path_buf(), mean, std })
    }

    /// Applies `model.precision`: `None` (auto) keeps the file's dtype; another dtype casts an
    /// unfrozen module, and is an error for a frozen one (export it with `--dtype` instead).
    /// Inputs follow the module; banks are cast by [`crate::bank::Bank::cast`].
    pub fn with_precision(mut self, kind: Option<Kind>) -> Result<Self> {
        let Some(kind) = kind.filter(|k| *k != self.kind) else { return Ok(self) };
        if self.meta.frozen {
            return Err(ModelError::Backbone {
                path: self.path.clone(),
                msg: format!(
                    "is a frozen {} export, so it cannot run in {}; export it with `tools/export_backbone.py --dtype {}` or set model.precision = \"auto\"",
                    dtype_name(self.kind),
                    dtype_name(kind),
                    dtype_name(kind)
                ),
            });
        }
        self.module.to(self.device, kind, false);
        self.kind = kind;
        Ok(self)
    }

    /// Why this backbone will run far slower than its fp32 export here, if it will: on a CPU
    /// without native bf16 (`avx512_bf16`/`amx_bf16`) or fp16 (`avx512_fp16`/`amx_fp16`)
    /// instructions, libtorch emulates the reduced precision (measured on an AMD EPYC Zen 3:
    /// the bf16 Lite0 export 1 img/s against 21 img/s in fp32, `scripts/bench.sh`).
    pub fn precision_warning(&self) -> Option<String> {
        if self.device != Device::Cpu {
            return None;
        }
        let flags = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        slow_on_this_cpu(self.kind, &flags).then(|| {
            format!(
                "backbone {} runs in {} on a CPU without native {} instructions: expect it to be many times slower than an fp32 export (tools/export_backbone.py --dtype fp32)",
                self.path.display(),
                dtype_name(self.kind),
                dtype_name(self.kind)
            )
        })
    }

    /// Raw feature maps for a batch of RGB images in [0, 1], `[B, 3, H, W]` on this device.
    pub fn forward(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let _g = tch::no_grad_guard();
        // Channels-last (NHWC strides, NCHW shape): the layout the exported module's weights are
        // in; with it the frozen Lite0 runs about 1.2x faster on CPU than with NCHW input.
        let x = channels_last(&((images - &self.mean) / &self.std).to_kind(self.kind));
        let out = self.module.forward_is(&[IValue::Tensor(x)])?;
        let maps = match out {
            IValue::TensorList(v) => v,
            IValue::Tuple(v) | IValue::GenericList(v) => v
                .into_iter()
                .map(|iv| match iv {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(ModelError::BackboneOutput(format!("backbone returned a non-tensor item: {other:?}"))),
                })
                .collect::<Result<_>>()?,
            IValue::Tensor(t) => vec![t],
            other => {
                return Err(ModelError::BackboneOutput(format!(
                    "backbone returned {other:?}, expected a list of tensors"
                )))
            }
        };
        if maps.len() != self.meta.strides.len() {
            return Err(ModelError::Backbone {
                path: self.path.clone(),
                msg: format!("returned {} maps, its sidecar declares {}", maps.len(), self.meta.strides.len()),
            });
        }
        Ok(maps)
    }

    /// Patch features: each map averaged over a `k×k` neighbourhood (`aggregation[i]` for layer
    /// `i`; 1 = the patch alone) and L2-normalised over channels. Returns `[B, C_i, h_i, w_i]`
    /// per layer.
    pub fn patch_features(&self, images: &Tensor, aggregation: &[u32]) -> Result<Vec<Tensor>> {
        let _g = tch::no_grad_guard();
        let maps = self.forward(images)?;
        if aggregation.len() != maps.len() {
            return Err(ModelError::BackboneOutput(format!(
                "{} aggregation sizes given for a backbone with {} layers",
                aggregation.len(),
                maps.len()
            )));
        }
        Ok(maps
            .into_iter()
            .zip(aggregation)
            .map(|(f, &k)| {
                let f = f.to_kind(self.kind);
                let f = if k > 1 {
                    let k = k as i64;
                    f.avg_pool2d([k, k], [1, 1], [k / 2, k / 2], false, false, None::<i64>)
                } else {
                    f
                };
                let n = f.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-6);
                f / n
            })
            .collect())
    }
}

/// The same tensor with channels-last strides (a no-op when it already has them).
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Converts RGB8 images (tightly packed) to a `[B, 3, S, S]` float batch in [0, 1] on `device`,
/// resized (bilinear) to the model's input side `size`.
pub fn images_to_batch(images: &[(&[u8], u32, u32)], size: i64, device: Device) -> Tensor {
    let _g = tch::no_grad_guard();
    let ts: Vec<Tensor> = images
        .iter()
        .map(|&(data, w, h)| {
            let t = Tensor::from_slice(data)
                .view([1, h as i64, w as i64, 3])
                .to_device(device)
                .permute([0, 3, 1, 2])
                .to_kind(Kind::Float)
                / 255.0;
            if w as i64 == size && h as i64 == size {
                t
            } else {
                t.upsample_bilinear2d([size, size], false, None::<f64>, None::<f64>)
            }
        })
        .collect();
    Tensor::cat(&ts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduced_precision_is_flagged_only_without_native_instructions() {
        let zen3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c vaes\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma f16c vaes\n";
        let zen4 = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512vl\n";
        let spr = "flags\t\t: avx512f avx512_fp16 amx_bf16 amx_tile\n";
        assert!(slow_on_this_cpu(Kind::BFloat16, zen3));
        assert!(slow_on_this_cpu(Kind::Half, zen3), "f16c converts, it does not compute");
        assert!(!slow_on_this_cpu(Kind::BFloat16, zen4));
        assert!(slow_on_this_cpu(Kind::Half, zen4));
        assert!(!slow_on_this_cpu(Kind::BFloat16, spr) && !slow_on_this_cpu(Kind::Half, spr));
        assert!(!slow_on_this_cpu(Kind::Float, zen3), "fp32 is never flagged");
        assert!(slow_on_this_cpu(Kind::BFloat16, ""), "no flags line: nothing native is known");
    }
}
