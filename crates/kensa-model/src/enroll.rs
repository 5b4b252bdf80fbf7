//! Enrollment: a memory bank from a handful of normal references, with the verdict calibrated
//! from the references alone (no defect samples, no threshold to set).

use crate::augment::{self, Augment};
use crate::backbone::images_to_batch;
use crate::bank::{Bank, BankMeta, BANK_FORMAT};
use crate::engine::Engine;
use crate::{pseudo, ModelError, Result};
use image::RgbImage;
use kensa_verdict::Calibration;
use rand::SeedableRng;
use tch::Tensor;

pub struct EnrollOptions {
    pub product: String,
    pub seed: u64,
    /// Fraction of each reference's patches kept, by greedy k-center selection (PatchCore's
    /// coreset); 1.0 keeps all. Calibration uses the reduced bank, so the decision matches it.
    pub coreset: f64,
    /// Transformed copies of each reference added to the bank (see [`crate::augment`]).
    pub augment: Vec<Augment>,
    /// Region of interest `[x, y, w, h]` (frame pixels): references are cropped to it, and so
    /// is every frame scored against the bank.
    pub crop: Option<[u32; 4]>,
}

impl EnrollOptions {
    /// Defaults: all patches, the default augmentation.
    pub fn new(product: &str, seed: u64) -> Self {
        let augment = augment::parse_list(augment::DEFAULT).expect("valid default");
        Self { product: product.to_string(), seed, coreset: 1.0, augment, crop: None }
    }
}

/// Greedy k-center (farthest point) selection of `m` rows of `x: [N, C]`, in a random
/// projection to at most 64 dimensions (Johnson-Lindenstrauss, as PatchCore does), seeded.
/// Returns the selected rows, in selection order.
pub fn coreset(x: &Tensor, m: i64, seed: u64) -> Tensor {
    let _g = tch::no_grad_guard();
    let (n, c) = x.size2().expect("[N, C]");
    if m >= n {
        return x.shallow_clone();
    }
    let xf = x.to_kind(tch::Kind::Float);
    let dim = c.min(64);
    let proj = if c > dim {
        // A fixed seeded Gaussian projection, generated on the CPU so it does not depend on
        // libtorch's global RNG.
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xc0de);
        let v: Vec<f32> = (0..c * dim)
            .map(|_| {
                use rand::Rng;
                // Box-Muller.
                let (u1, u2): (f32, f32) = (r.random_range(1e-7..1.0), r.random_range(0.0..1.0));
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos() / (dim as f32).sqrt()
            })
            .collect();
        xf.matmul(&Tensor::from_slice(&v).view([c, dim]).to_device(x.device()))
    } else {
        xf.shallow_clone()
    };
    let mut picked = Vec::with_capacity(m as usize);
    let mut last = (seed % n as u64) as i64;
    let mut min_d = Tensor::full([n], f64::INFINITY, (tch::Kind::Float, x.device()));
    for _ in 0..m {
        picked.push(last);
        let d = (&proj - proj.get(last).unsqueeze(0)).square().sum_dim_intlist(1, false, tch::Kind::Float);
        min_d = min_d.minimum(&d);
        last = min_d.argmax(0, false).int64_value(&[]);
    }
    let idx = Tensor::from_slice(&picked).to_device(x.device());
    x.index_select(0, &idx)
}

/// The most calibration maps of each population kept for fitting regions (a 320 px map is
/// 400 KiB).
const REGION_FIT_MAPS: usize = 32;

/// Builds a bank from references (name, image) and calibrates its verdict.
/// `progress(done, total)` is called as calibration proceeds.
pub fn enroll(
    engine: &Engine,
    refs: &[(String, RgbImage)],
    opts: &EnrollOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Bank> {
    if refs.is_empty() {
        return Err(ModelError::Recipe("enrollment needs at least one reference image".into()));
    }
    if !(opts.coreset > 0.0 && opts.coreset <= 1.0) {
        return Err(ModelError::Recipe(format!("coreset fraction {} is outside (0, 1]", opts.coreset)));
    }
    let _g = tch::no_grad_guard();
    // References cropped to the region of interest, as frames will be.
    let cropped: Vec<(String, RgbImage)>;
    let refs = match opts.crop {
        None => refs,
        Some(c) => {
            if c[2] == 0 || c[3] == 0 {
                return Err(ModelError::Recipe(format!("crop {c:?} is empty")));
            }
            cropped = refs
                .iter()
                .map(|(n, img)| match crate::engine::crop_frame(img.as_raw(), img.width(), img.height(), Some(c)) {
                    Some((r, data)) => (n.clone(), RgbImage::from_raw(r[2], r[3], data).expect("crop size")),
                    None => (n.clone(), img.clone()),
                })
                .collect();
            &cropped[..]
        }
    };
    let k = refs.len();
    // Patch features of each reference and its augmented copies, flattened to [n*h*w, C] per
    // layer.
    let per_ref: Vec<Vec<Tensor>> = refs
        .iter()
        .map(|(_, img)| {
            let x = images_to_batch(&[(img.as_raw(), img.width(), img.height())], engine.input_size, engine.device());
            let mut copies = vec![x.shallow_clone()];
            for a in &opts.augment {
                copies.extend(a.apply(&x));
            }
            let f = engine.backbone.patch_features(&Tensor::cat(&copies, 0), &engine.aggregation)?;
            Ok(f.into_iter()
                .map(|t| {
                    let p = flatten_patches(&t);
                    if opts.coreset < 1.0 {
                        let keep = ((p.size()[0] as f64 * opts.coreset).ceil() as i64).max(1);
                        coreset(&p, keep, opts.seed)
                    } else {
                        p
                    }
                })
                .collect())
        })
        .collect::<Result<_>>()?;
    let layers_of = |skip: Option<usize>| -> Vec<Tensor> {
        let n_layers = per_ref[0].len();
        (0..n_layers)
            .map(|l| {
                let parts: Vec<&Tensor> =
                    per_ref.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, v)| &v[l]).collect();
                Tensor::cat(&parts, 0)
            })
            .collect()
    };
    let full = layers_of(None);

    // Calibration populations. With K ≥ 2, each reference (augmented) is scored against a bank
    // of the others (leave-one-out), which is what a new normal part looks like; with K = 1,
    // augmentation alone stands for the product's variation.
    let (n_norm, n_anom) = if k == 1 { (12, 12) } else { (4, 5) };
    let total = k * (n_norm + n_anom);
    let mut done = 0;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut normal = Vec::new();
    let mut anomalous = Vec::new();
    // Maps kept for fitting the pixel level and minimum area: at most REGION_FIT_MAPS of each
    // population, evenly spread over the references, so memory stays bounded for large banks.
    let mut normal_maps: Vec<Vec<f32>> = Vec::new();
    let mut anomaly_maps: Vec<(Vec<f32>, Vec<bool>)> = Vec::new();
    let keep_normal = (k * n_norm).div_ceil(REGION_FIT_MAPS);
    let keep_anomaly = (k * n_anom).div_ceil(REGION_FIT_MAPS);
    let side = engine.input_size as u32;
    for (i, (_, img)) in refs.iter().enumerate() {
        let bank_i = if k >= 2 { layers_of(Some(i)) } else { full.iter().map(tch::Tensor::shallow_clone).collect() };
        let donor = &refs[(i + 1) % k].1;
        let mut batch_imgs = Vec::new();
        for j in 0..n_norm {
            // With K ≥ 2 the first normal sample is the reference itself, unchanged.
            let a = if k >= 2 && j == 0 { img.clone() } else { pseudo::augment(img, &mut rng) };
            batch_imgs.push((a, None));
        }
        for _ in 0..n_anom {
            let a = pseudo::augment(img, &mut rng);
            let (d, mask) = pseudo::defect(&a, donor, &mut rng);
            batch_imgs.push((d, Some(mask)));
        }
        for chunk in batch_imgs.chunks(4) {
            let views: Vec<(&[u8], u32, u32)> =
                chunk.iter().map(|(im, _)| (im.as_raw().as_slice(), im.width(), im.height())).collect();
            let feats = engine.features(&views)?;
            let maps = engine
                .maps_from_features(&feats, &bank_i, engine.input_size, engine.self_match)
                .to_device(tch::Device::Cpu);
            let maxes: Vec<f32> = Vec::try_from(maps.flatten(1, -1).amax([1], false)).map_err(ModelError::Torch)?;
            for (idx, ((_, mask), s)) in chunk.iter().zip(maxes).enumerate() {
                let map = || -> Result<Vec<f32>> {
                    Vec::try_from(maps.get(idx as i64).flatten(0, -1)).map_err(ModelError::Torch)
                };
                match mask {
                    Some(mask) => {
                        if anomalous.len() % keep_anomaly == 0 {
                            let small = image::imageops::resize(mask, side, side, image::imageops::FilterType::Nearest);
                            anomaly_maps.push((map()?, small.as_raw().iter().map(|&v| v > 127).collect::<Vec<bool>>()));
                        }
                        anomalous.push(s);
                    }
                    None => {
                        if normal.len() % keep_normal == 0 {
                            normal_maps.push(map()?);
                        }
                        normal.push(s);
                    }
                }
            }
            done += chunk.len();
            progress(done, total);
        }
    }
    tracing::debug!(?normal, ?anomalous, "calibration populations");
    // One reference: its augmented copies are optimistic pseudo-normals, so the decision goes
    // midway between the highest of them and the median synthetic defect; leave-one-out ones (K ≥ 2)
    // are pessimistic, so midway between their median and the lowest synthetic defect.
    let mut calibration = if k == 1 {
        Calibration::fit_single(&normal, &anomalous)
    } else {
        Calibration::fit_leave_one_out(&normal, &anomalous)
    };
    calibration.fit_logistic();
    let nm: Vec<&[f32]> = normal_maps.iter().map(std::vec::Vec::as_slice).collect();
    let am: Vec<(&[f32], &[bool])> = anomaly_maps.iter().map(|(m, k)| (m.as_slice(), k.as_slice())).collect();
    calibration.fit_regions(&nm, &am, side, side);
    let bb = &engine.backbone.meta;
    let meta = BankMeta {
        format: BANK_FORMAT.into(),
        product: opts.product.clone(),
        backbone: bb.name.clone(),
        backbone_weights: bb.weights.clone(),
        backbone_sha256: bb.sha256.clone(),
        input_size: engine.input_size as u32,
        strides: bb.strides.clone(),
        channels: bb.channels.clone(),
        references: k,
        reference_files: refs.iter().map(|(n, _)| n.clone()).collect(),
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        calibration,
        content_sha256: String::new(),
        coreset: opts.coreset,
        aggregation: engine.aggregation.clone(),
        augment: augment::names(&opts.augment),
        crop: opts.crop,
        self_match: engine.self_match,
        lineage: None,
        thumbnails: refs.iter().map(|(n, img)| (n.clone(), crate::bank::thumbnail(img))).collect(),
    };
    Ok(Bank::new(meta, full))
}

fn flatten_patches(t: &Tensor) -> Tensor {
    let (b, c, h, w) = t.size4().expect("4-D features");
    t.permute([0, 2, 3, 1]).reshape([b * h * w, c]).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coreset_spreads_over_clusters_and_is_seeded() {
        // 100 points near (0,0,...) and 5 near (10,10,...): 2 centres take one of each cluster.
        let mut v = Vec::new();
        for i in 0..105 {
            let base = if i < 100 { 0.0 } else { 10.0 };
            for d in 0..8 {
                v.push(base + ((i * 7 + d * 3) % 11) as f32 * 0.01);
            }
        }
        let x = Tensor::from_slice(&v).view([105, 8]);
        let c = coreset(&x, 2, 3);
        assert_eq!(c.size(), vec![2, 8]);
        let firsts: Vec<f64> = (0..2).map(|i| c.double_value(&[i, 0])).collect();
        assert!(firsts.iter().any(|&f| f < 1.0) && firsts.iter().any(|&f| f > 9.0), "{firsts:?}");
        assert!(coreset(&x, 10, 3).equal(&coreset(&x, 10, 3)), "same seed, same selection");
        // Asking for at least N rows keeps them all.
        assert_eq!(coreset(&x, 200, 0).size(), vec![105, 8]);
    }
}
