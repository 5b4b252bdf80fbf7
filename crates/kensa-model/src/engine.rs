//! Scoring: patch features at the bank's input size and aggregation; per layer
//! `s = 1 − max_j cos(f, B[j])` (with the self-match below on the coarser layers when the bank
//! asks for it), mean over layers, upsampled to the model input, smoothed with a Gaussian
//! (σ = 4 px), then resized to each frame's own resolution.

use crate::backbone::{images_to_batch, Backbone};
use crate::bank::Bank;
use crate::Result;
use kensa_core::AnomalyMap;
use tch::{Device, Kind, Tensor};

/// Largest block of the query × bank similarity matrix computed at once (elements):
/// 4 Mi floats = 16 MiB, whatever the batch and bank sizes.
const SIM_BLOCK: i64 = 1 << 22;
/// Bank rows per block: a few MiB of bank features, re-read from cache for each query block.
const BANK_BLOCK: i64 = 2048;
const SMOOTH_SIGMA: f64 = 4.0;
/// Self-match: patches of the frame itself within this many model-input pixels (Chebyshev) of a
/// patch are never its match, so a defect cannot explain itself with its own neighbours.
const SELF_MATCH_EXCLUDE_PX: i64 = 32;

/// Default neighbourhood averaged into each patch feature, per layer: the finest layer alone
/// (1), coarser layers 3×3. Chosen by `kensa eval` on ../shared/data with EfficientNet-Lite0
/// (strides 8 and 16): tiny defects (VisA) need the unblurred stride-8 patch, while the
/// stride-16 layer gains from the 3×3 context; 3×3 everywhere (PatchCore's choice) loses 5-12
/// points of pixel AUROC on VisA (README, "Evaluation").
pub fn default_aggregation(layers: usize) -> Vec<u32> {
    (0..layers).map(|i| if i == 0 { 1 } else { 3 }).collect()
}

/// Checks an aggregation list: one odd size (1-15) per backbone layer.
pub fn check_aggregation(aggregation: &[u32], layers: usize) -> Result<()> {
    if aggregation.len() != layers || aggregation.iter().any(|&k| k == 0 || k % 2 == 0 || k > 15) {
        return Err(crate::ModelError::Recipe(format!(
            "aggregation {aggregation:?}: give one odd size (1-15) per backbone layer ({layers} layers)"
        )));
    }
    Ok(())
}

pub struct Engine {
    pub backbone: Backbone,
    /// Input side and per-layer aggregation used by [`Engine::features`] (enrollment); scoring
    /// against a bank uses the bank's own.
    pub input_size: i64,
    pub aggregation: Vec<u32>,
    /// Whether banks enrolled by this engine score with the self-match ([`match_self`]).
    pub self_match: bool,
    kernel: Tensor,
}

impl Engine {
    pub fn new(backbone: Backbone, input_size: u32) -> Self {
        let kernel = gaussian_kernel(SMOOTH_SIGMA, backbone.device);
        let aggregation = default_aggregation(backbone.meta.strides.len());
        Self { backbone, input_size: input_size as i64, aggregation, self_match: true, kernel }
    }

    /// Sets whether banks enrolled by this engine use the self-match (default on).
    pub fn with_self_match(mut self, on: bool) -> Self {
        self.self_match = on;
        self
    }

    /// Sets the per-layer aggregation used for enrollment (one odd size per layer).
    pub fn with_aggregation(mut self, aggregation: Vec<u32>) -> Result<Self> {
        check_aggregation(&aggregation, self.backbone.meta.strides.len())?;
        self.aggregation = aggregation;
        Ok(self)
    }

    pub fn device(&self) -> Device {
        self.backbone.device
    }

    /// Patch features of RGB8 images (any sizes) at the engine's input size and aggregation.
    pub fn features(&self, images: &[(&[u8], u32, u32)]) -> Result<Vec<Tensor>> {
        self.features_at(images, self.input_size, &self.aggregation)
    }

    /// Patch features of RGB8 images resized to `size`, aggregated as given.
    pub fn features_at(&self, images: &[(&[u8], u32, u32)], size: i64, aggregation: &[u32]) -> Result<Vec<Tensor>> {
        let batch = images_to_batch(images, size, self.backbone.device);
        self.backbone.patch_features(&batch, aggregation)
    }

    /// Anomaly maps at `size × size`, `[B, S, S]`, of features against a bank's layers, with the
    /// self-match on the coarser layers when `self_match` (the bank's recipe) says so.
    pub fn maps_from_features(&self, feats: &[Tensor], bank_layers: &[Tensor], size: i64, self_match: bool) -> Tensor {
        let layers = self.nearest(feats, bank_layers);
        let layers = if self_match { match_self(feats, layers, size) } else { layers };
        self.fuse(&layers, size)
    }

    /// Per layer, `1 − max_j cos(f, B[j])` for every patch: `[B, 1, h_i, w_i]`. The bank is
    /// compared in chunks of rows so the similarity matrix stays bounded for large banks.
    pub fn nearest(&self, feats: &[Tensor], bank_layers: &[Tensor]) -> Vec<Tensor> {
        let _g = tch::no_grad_guard();
        feats
            .iter()
            .zip(bank_layers)
            .map(|(f, b)| {
                let (bs, c, h, w) = f.size4().expect("4-D features");
                let q = f.permute([0, 2, 3, 1]).reshape([bs * h * w, c]);
                let q = if q.kind() == b.kind() { q } else { q.to_kind(b.kind()) };
                let n = b.size()[0];
                let nq = q.size()[0];
                // Blocks of at most SIM_BLOCK similarities: bounded memory for any batch and
                // bank, and blocks small enough to stay in cache while `amax` reads them.
                let bank_chunk = n.min(BANK_BLOCK);
                let query_chunk = (SIM_BLOCK / bank_chunk).max(1);
                let mut rows = Vec::new();
                let mut qs = 0;
                while qs < nq {
                    let ql = query_chunk.min(nq - qs);
                    let qc = q.narrow(0, qs, ql);
                    let mut best: Option<Tensor> = None;
                    let mut start = 0;
                    while start < n {
                        let len = bank_chunk.min(n - start);
                        let sim = qc.matmul(&b.narrow(0, start, len).transpose(0, 1)).amax([1], false);
                        best = Some(match best {
                            None => sim,
                            Some(prev) => prev.maximum(&sim),
                        });
                        start += len;
                    }
                    rows.push(best.expect("non-empty bank"));
                    qs += ql;
                }
                let best = if rows.len() == 1 { rows.pop().unwrap() } else { Tensor::cat(&rows, 0) };
                best.to_kind(Kind::Float).neg().g_add_scalar(1.0).view([bs, 1, h, w])
            })
            .collect()
    }

    /// Post-processing: every layer upsampled to `s × s` (the input size), averaged, smoothed:
    /// `[B, S, S]`.
    pub fn fuse(&self, layers: &[Tensor], s: i64) -> Tensor {
        let _g = tch::no_grad_guard();
        let mut acc: Option<Tensor> = None;
        for l in layers {
            let layer = l.upsample_bilinear2d([s, s], false, None::<f64>, None::<f64>);
            acc = Some(match acc {
                None => layer,
                Some(a) => a + layer,
            });
        }
        let mean = acc.expect("at least one layer") / layers.len() as f64;
        self.smooth(&mean).squeeze_dim(1)
    }

    fn smooth(&self, x: &Tensor) -> Tensor {
        let k = self.kernel.size()[0];
        let pad = k / 2;
        let kh = self.kernel.view([1, 1, 1, k]);
        let kv = self.kernel.view([1, 1, k, 1]);
        let x = x.reflection_pad2d([pad, pad, 0, 0]).conv2d(&kh, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        x.reflection_pad2d([0, 0, pad, pad]).conv2d(&kv, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
    }

    /// Scores RGB8 images against a bank, at the bank's input size and aggregation, inside the
    /// bank's crop if it has one; each map is at its image's own resolution (0 outside the crop).
    pub fn score(&self, images: &[(&[u8], u32, u32)], bank: &Bank) -> Result<Vec<AnomalyMap>> {
        Ok(self.score_with(images, bank, None)?.into_iter().map(|(m, _)| m).collect())
    }

    /// [`Engine::score`], and with `judge_side = Some(n)` also what the language-model judge
    /// reads of each frame ([`JudgeFeatures`], map pooled to `n`²), from the same forward pass.
    pub fn score_with(
        &self,
        images: &[(&[u8], u32, u32)],
        bank: &Bank,
        judge_side: Option<i64>,
    ) -> Result<Vec<(AnomalyMap, Option<JudgeFeatures>)>> {
        Ok(self.score_all(images, bank, judge_side, false)?.into_iter().map(|s| (s.map, s.judge)).collect())
    }

    /// Everything one forward pass gives of each image: its map at the image's resolution,
    /// with `judge_side = Some(n)` the judge's features, and with `grid` the map on the
    /// model's grid (the bank's input size squared, inside the crop if the bank has one),
    /// which is what the engine computes before it resizes the map to the image.
    pub fn score_all(
        &self,
        images: &[(&[u8], u32, u32)],
        bank: &Bank,
        judge_side: Option<i64>,
        grid: bool,
    ) -> Result<Vec<Scored>> {
        let _g = tch::no_grad_guard();
        let size = i64::from(bank.meta.input_size);
        let cropped: Vec<Option<([u32; 4], Vec<u8>)>> =
            images.iter().map(|&(d, w, h)| crop_frame(d, w, h, bank.meta.crop)).collect();
        let rects: Vec<Option<[u32; 4]>> = cropped.iter().map(|c| c.as_ref().map(|(r, _)| *r)).collect();
        let views: Vec<(&[u8], u32, u32)> = images
            .iter()
            .zip(&cropped)
            .map(|(&v, c)| match c {
                Some((r, data)) => (data.as_slice(), r[2], r[3]),
                None => v,
            })
            .collect();
        let feats = self.features_at(&views, size, &bank.meta.aggregation())?;
        let maps = self.maps_from_features(&feats, &bank.layers, size, bank.meta.self_match);
        let judge = match judge_side {
            Some(side) => Some(judge_features(&feats, &maps, side)?),
            None => None,
        };
        let mut judge = judge.map(Vec::into_iter);
        Ok(images
            .iter()
            .zip(&rects)
            .enumerate()
            .map(|(i, (&(_, w, h), r))| {
                let m = maps.get(i as i64);
                let map = match r {
                    None => to_map(&m, w, h),
                    Some(r) => paste(&to_map(&m, r[2], r[3]), *r, w, h),
                };
                let grid = grid.then(|| to_map(&m, size as u32, size as u32));
                Scored { map, judge: judge.as_mut().and_then(Iterator::next), grid }
            })
            .collect())
    }
}

/// One image as [`Engine::score_all`] gives it.
pub struct Scored {
    /// The anomaly map at the image's own resolution (0 outside the bank's crop).
    pub map: AnomalyMap,
    /// What the language-model judge reads, when asked for.
    pub judge: Option<JudgeFeatures>,
    /// The map on the model's grid, when asked for.
    pub grid: Option<AnomalyMap>,
}

/// What the language-model judge reads of one frame, computed in the engine's forward pass
/// (so the judge never runs the backbone again): the anomaly map on the model's grid,
/// max-pooled to `side`², and the mean of each layer's patch features, concatenated. Plain
/// data, so it crosses from the model thread to the judge's.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeFeatures {
    pub side: i64,
    /// `side * side` scores, row-major.
    pub map: Vec<f32>,
    /// Sum of the backbone's channels.
    pub pooled: Vec<f32>,
}

fn judge_features(feats: &[Tensor], maps: &Tensor, side: i64) -> Result<Vec<JudgeFeatures>> {
    let pooled: Vec<Tensor> =
        feats.iter().map(|f| f.to_kind(Kind::Float).mean_dim([2i64, 3].as_slice(), false, Kind::Float)).collect();
    let pooled = Tensor::cat(&pooled, 1).to_device(Device::Cpu); // [B, D]
    let small = maps.to_kind(Kind::Float).unsqueeze(1).adaptive_max_pool2d([side, side]).0.to_device(Device::Cpu);
    let n = pooled.size()[0];
    (0..n)
        .map(|i| {
            Ok(JudgeFeatures {
                side,
                map: Vec::<f32>::try_from(small.get(i).flatten(0, -1))?,
                pooled: Vec::<f32>::try_from(pooled.get(i))?,
            })
        })
        .collect()
}

/// The self-match, on every layer but the finest: a patch's distance becomes the smaller of
/// its bank distance and its distance to the frame's *own* patches that (a) lie more than
/// [`SELF_MATCH_EXCLUDE_PX`] away and (b) are among the half of the frame's patches the bank
/// explains best. A part repeated in the frame (many capsules, a pattern) then vouches for
/// its unseen poses, while a defect, unlike anything the bank explains, keeps its distance.
/// The finest layer stays bank-only (tiny defects). Chosen with `kensa eval` (README,
/// "Evaluation"). One frame and a bounded block of its patches at a time (`SIM_BLOCK`).
pub fn match_self(feats: &[Tensor], layers: Vec<Tensor>, size: i64) -> Vec<Tensor> {
    match_self_in_blocks(feats, layers, size, SIM_BLOCK)
}

/// [`match_self`] computing at most `block_elems` similarities at once.
fn match_self_in_blocks(feats: &[Tensor], layers: Vec<Tensor>, size: i64, block_elems: i64) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    layers
        .into_iter()
        .zip(feats)
        .enumerate()
        .map(|(li, (d, f))| {
            if li == 0 {
                return d;
            }
            let (bs, c, h, w) = f.size4().expect("4-D features");
            let stride = (size / h.max(1)).max(1);
            let r = SELF_MATCH_EXCLUDE_PX / stride;
            let dev = f.device();
            let hw = h * w;
            let ys = Tensor::arange(h, (Kind::Int64, dev)).repeat_interleave_self_int(w, None::<i64>, None::<i64>);
            let xs = Tensor::arange(w, (Kind::Int64, dev)).repeat([h]);
            let (ys_all, xs_all) = (ys.unsqueeze(0), xs.unsqueeze(0));
            let q = f.to_kind(Kind::Float).permute([0, 2, 3, 1]).reshape([bs, hw, c]);
            let dv = d.view([bs, hw]);
            let (median, _) = dv.median_dim(1, true);
            let unexplained = dv.gt_tensor(&median); // [bs, hw]: never a match
                                                     // Blocks of query rows: a bounded similarity block whatever the input size.
            let block = (block_elems / hw).clamp(1, hw);
            let rows: Vec<Tensor> = (0..bs)
                .map(|b| {
                    let qb = q.get(b);
                    let qt = qb.transpose(0, 1);
                    let barred = unexplained.get(b).unsqueeze(0);
                    let mut best = Vec::new();
                    let mut start = 0;
                    while start < hw {
                        let len = block.min(hw - start);
                        let (yb, xb) = (ys.narrow(0, start, len).unsqueeze(1), xs.narrow(0, start, len).unsqueeze(1));
                        let near = (yb - &ys_all).abs().le(r).logical_and(&(xb - &xs_all).abs().le(r));
                        let sim = qb.narrow(0, start, len).matmul(&qt);
                        best.push(sim.masked_fill(&near.logical_or(&barred), -2.0).amax([1], false));
                        start += len;
                    }
                    let best = if best.len() == 1 { best.pop().unwrap() } else { Tensor::cat(&best, 0) };
                    dv.get(b).minimum(&best.neg().g_add_scalar(1.0))
                })
                .collect();
            Tensor::stack(&rows, 0).view([bs, 1, h, w])
        })
        .collect()
}

/// What a bank's crop selects of a `w × h` RGB8 frame: the rectangle (clipped to the frame) and
/// its pixels; None when the whole frame is scored (no crop, or one that covers or misses it).
pub fn crop_frame(data: &[u8], w: u32, h: u32, crop: Option<[u32; 4]>) -> Option<([u32; 4], Vec<u8>)> {
    let r = clip_crop(crop?, w, h)?;
    Some((r, crop_rgb(data, w, r)))
}

/// The part of `crop` (`[x, y, w, h]`) inside a `w × h` frame; None when the crop covers the
/// whole frame or misses it entirely (then the whole frame is scored).
fn clip_crop(crop: [u32; 4], w: u32, h: u32) -> Option<[u32; 4]> {
    let (x0, y0) = (crop[0].min(w), crop[1].min(h));
    let (x1, y1) = (crop[0].saturating_add(crop[2]).min(w), crop[1].saturating_add(crop[3]).min(h));
    if x1 <= x0 || y1 <= y0 || (x0, y0, x1, y1) == (0, 0, w, h) {
        None
    } else {
        Some([x0, y0, x1 - x0, y1 - y0])
    }
}

/// Copies the `[x, y, w, h]` rectangle out of a tightly packed RGB8 image `width` pixels wide.
fn crop_rgb(data: &[u8], width: u32, r: [u32; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity((r[2] * r[3] * 3) as usize);
    for y in r[1]..r[1] + r[3] {
        let start = ((y * width + r[0]) * 3) as usize;
        out.extend_from_slice(&data[start..start + (r[2] * 3) as usize]);
    }
    out
}

/// A `w × h` map that is `m` inside the rectangle `r` and 0 elsewhere.
fn paste(m: &AnomalyMap, r: [u32; 4], w: u32, h: u32) -> AnomalyMap {
    let mut data = vec![0f32; (w * h) as usize];
    for y in 0..r[3] {
        let dst = ((r[1] + y) * w + r[0]) as usize;
        let src = (y * r[2]) as usize;
        data[dst..dst + r[2] as usize].copy_from_slice(&m.data[src..src + r[2] as usize]);
    }
    AnomalyMap::new(w, h, data)
}

/// Resizes one `[S, S]` map to `w × h` and copies it to the host.
pub fn to_map(m: &Tensor, w: u32, h: u32) -> AnomalyMap {
    let (mh, mw) = (m.size()[0], m.size()[1]);
    let m = if mh == h as i64 && mw == w as i64 {
        m.shallow_clone()
    } else {
        m.view([1, 1, mh, mw])
            .upsample_bilinear2d([h as i64, w as i64], false, None::<f64>, None::<f64>)
            .view([h as i64, w as i64])
    };
    let v: Vec<f32> =
        Vec::try_from(m.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1)).expect("float map");
    AnomalyMap::new(w, h, v)
}

fn gaussian_kernel(sigma: f64, device: Device) -> Tensor {
    let radius = (4.0 * sigma).round() as i64;
    let v: Vec<f32> = (-radius..=radius).map(|i| (-(i as f64).powi(2) / (2.0 * sigma * sigma)).exp() as f32).collect();
    let sum: f32 = v.iter().sum();
    let v: Vec<f32> = v.into_iter().map(|x| x / sum).collect();
    Tensor::from_slice(&v).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features `[1, 3, 8, 8]` (one-hot unit vectors) and bank distances `[1, 1, 8, 8]`, from
    /// a background value and (y, x, feature, distance) patches.
    fn layer(background: (usize, f32), patches: &[(i64, i64, usize, f32)]) -> (Tensor, Tensor) {
        let mut f = vec![0f32; 3 * 64];
        let mut d = vec![background.1; 64];
        for i in 0..64 {
            f[background.0 * 64 + i] = 1.0;
        }
        for &(y, x, k, dist) in patches {
            let i = (y * 8 + x) as usize;
            for c in 0..3 {
                f[c * 64 + i] = if c == k { 1.0 } else { 0.0 };
            }
            d[i] = dist;
        }
        (Tensor::from_slice(&f).view([1, 3, 8, 8]), Tensor::from_slice(&d).view([1, 1, 8, 8]))
    }

    fn at(t: &Tensor, y: i64, x: i64) -> f64 {
        t.double_value(&[0, 0, y, x])
    }

    #[test]
    fn self_match_lets_distant_explained_twins_vouch_but_not_neighbours_or_defects() {
        // 128 px input, stride 16: an 8 × 8 grid; patches within 2 cells are neighbours.
        let patches = [
            (0, 0, 1, 0.9), // an unseen pose whose twin far away is well explained
            (7, 7, 1, 0.05),
            (0, 7, 2, 0.9), // a defect whose only look-alike is its neighbour
            (1, 7, 2, 0.9),
            (4, 0, 2, 0.8), // a defect whose distant look-alike is unexplained too
        ];
        let (f, d) = layer((0, 0.1), &patches);
        let fine = d.copy();
        let out = match_self(&[f.shallow_clone(), f], vec![fine.shallow_clone(), d], 128);
        // The finest layer is never changed.
        assert_eq!((&out[0] - &fine).abs().max().double_value(&[]), 0.0);
        let m = &out[1];
        assert!(at(m, 0, 0).abs() < 1e-6, "the far explained twin vouches: {}", at(m, 0, 0));
        assert!((at(m, 7, 7) - 0.05).abs() < 1e-6);
        assert!((at(m, 0, 7) - 0.9).abs() < 1e-6, "a neighbour never vouches: {}", at(m, 0, 7));
        assert!((at(m, 4, 0) - 0.8).abs() < 1e-6, "unexplained patches never vouch: {}", at(m, 4, 0));
        // Background patches find explained background far away: distance 0.
        assert!(at(m, 3, 3).abs() < 1e-6);
        // Computed 5 rows at a time (blocks that straddle grid rows), the same result.
        let (f, d) = layer((0, 0.1), &patches);
        let blocked = match_self_in_blocks(&[f.shallow_clone(), f], vec![d.copy(), d], 128, 5 * 64);
        assert_eq!((&blocked[1] - m).abs().max().double_value(&[]), 0.0);
    }
}
