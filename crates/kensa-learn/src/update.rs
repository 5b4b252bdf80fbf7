//! Bank changes from the line. Each returns a new [`Bank`] stamped with its lineage (parent,
//! change, new version); the caller decides where it goes (`versions::commit`, or memory).

use crate::Result;
use image::RgbImage;
use kensa_model::bank::{Bank, BankMeta};
use kensa_model::engine::{crop_frame, Engine};
use kensa_model::lineage::{Change, Label, LearnedRef, Lineage, Observation, Source};
use kensa_model::versions::{initial_lineage, stamp};
use tch::Tensor;

/// Observations kept in a bank's lineage (the newest).
pub const MAX_OBSERVATIONS: usize = 256;

/// How much a learned reference may add.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Learned references kept; past it the oldest learned one is taken out (enrolled
    /// references are never taken out). Bounds the bank, so scoring cost stops growing.
    pub max_learned: usize,
    /// A learned frame adds, per layer, only its patches whose distance to the bank is at
    /// least this quantile of its own patches' distances (0: all of them): what the bank
    /// already explains is not stored twice.
    pub novelty_quantile: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Self { max_learned: 32, novelty_quantile: 0.5 }
    }
}

/// `image` (a frame of the product, any size; cropped like every frame) becomes a reference.
pub fn add_reference(
    engine: &Engine,
    bank: &Bank,
    frame: &str,
    image: &RgbImage,
    source: Source,
    budget: &Budget,
) -> Result<Bank> {
    let _g = tch::no_grad_guard();
    let size = i64::from(bank.meta.input_size);
    let cropped = crop_frame(image.as_raw(), image.width(), image.height(), bank.meta.crop);
    let view = match &cropped {
        Some((r, data)) => (data.as_slice(), r[2], r[3]),
        None => (image.as_raw().as_slice(), image.width(), image.height()),
    };
    let feats = engine.features_at(&[view], size, &bank.meta.aggregation())?;
    let dists = engine.nearest(&feats, &bank.layers);
    let mut lineage = initial_lineage(&bank.meta, &bank.layers);
    let mut rows = Vec::new();
    let mut layers = Vec::new();
    for ((f, d), b) in feats.iter().zip(&dists).zip(&bank.layers) {
        let (_, c, h, w) = f.size4()?;
        let patches = f.permute([0, 2, 3, 1]).reshape([h * w, c]).to_kind(b.kind());
        let d = d.reshape([h * w]);
        let kept = if budget.novelty_quantile > 0.0 {
            let q = d.quantile_scalar(budget.novelty_quantile.clamp(0.0, 1.0), None, false, "linear");
            patches.index_select(0, &d.ge_tensor(&q).nonzero().squeeze_dim(1))
        } else {
            patches
        };
        rows.push(kept.size()[0]);
        layers.push(Tensor::cat(&[b.shallow_clone(), kept.to_device(b.device())], 0));
    }
    lineage.learned.push(LearnedRef { frame: frame.to_string(), source, rows, follow_ratio: 1.0 });
    let mut meta = bank.meta.clone();
    meta.references += 1;
    meta.reference_files.push(frame.to_string());
    meta.thumbnails.insert(frame.to_string(), kensa_model::bank::thumbnail(image));
    // Past the budget the oldest learned reference goes (its rows are the first learned ones).
    while lineage.learned.len() > budget.max_learned.max(1) {
        let gone = lineage.learned.remove(0);
        layers = drop_rows(&layers, &lineage.enrolled_rows, &gone.rows);
        forget(&mut meta, &gone.frame);
    }
    let mut out = Bank::new(meta, layers);
    stamp(&mut out, &bank.meta, Change::Added { frame: frame.to_string(), source }, lineage);
    Ok(out)
}

/// `layers` without `len[l]` rows starting at `start[l]` on each layer.
fn drop_rows(layers: &[Tensor], start: &[i64], len: &[i64]) -> Vec<Tensor> {
    layers
        .iter()
        .zip(start.iter().zip(len))
        .map(|(t, (&s, &l))| {
            let n = t.size()[0];
            let tail = t.narrow(0, s + l, n - s - l);
            Tensor::cat(&[t.narrow(0, 0, s), tail], 0)
        })
        .collect()
}

/// The metadata of a reference that leaves the bank: its count, file name and thumbnail.
fn forget(meta: &mut BankMeta, frame: &str) {
    meta.references -= 1;
    if let Some(i) = meta.reference_files.iter().position(|f| f == frame) {
        meta.reference_files.remove(i);
    }
    meta.thumbnails.remove(frame);
}

/// Takes the learned reference `frame` out of the bank; None when it is not one.
pub fn remove_reference(bank: &Bank, frame: &str, reason: &str) -> Option<Bank> {
    let mut lineage = bank.meta.lineage.clone()?;
    let idx = lineage.learned.iter().position(|r| r.frame == frame)?;
    let starts: Vec<i64> = (0..bank.layers.len())
        .map(|l| lineage.enrolled_rows[l] + lineage.learned[..idx].iter().map(|r| r.rows[l]).sum::<i64>())
        .collect();
    let gone = lineage.learned.remove(idx);
    let layers = drop_rows(&bank.layers, &starts, &gone.rows);
    let mut meta = bank.meta.clone();
    forget(&mut meta, frame);
    let mut out = Bank::new(meta, layers);
    stamp(&mut out, &bank.meta, Change::Removed { frame: frame.into(), reason: reason.into() }, lineage);
    Some(out)
}

/// Records a labelled observation and re-fits the calibration with it: confirmed defects join
/// the synthetic defects as real positives ([`refit`]).
pub fn observe(bank: &Bank, obs: Observation) -> Bank {
    let change = Change::Observed { frame: obs.frame.clone(), label: obs.label };
    with_observation(bank, &bank.meta, obs, change)
}

/// `changed` (made from `parent` by `change`) with `obs` recorded too, as one version.
pub fn with_observation(changed: &Bank, parent: &BankMeta, obs: Observation, change: Change) -> Bank {
    let mut lineage = initial_lineage(&changed.meta, &changed.layers);
    lineage.observations.retain(|o| o.frame != obs.frame);
    lineage.observations.push(obs);
    if lineage.observations.len() > MAX_OBSERVATIONS {
        let extra = lineage.observations.len() - MAX_OBSERVATIONS;
        lineage.observations.drain(..extra);
    }
    let mut meta = changed.meta.clone();
    meta.calibration = refit(&meta.calibration, &lineage);
    let layers: Vec<Tensor> = changed.layers.iter().map(Tensor::shallow_clone).collect();
    let mut out = Bank::new(meta, layers);
    stamp(&mut out, parent, change, lineage);
    out
}

/// The calibration re-fitted with the line's labelled observations.
///
/// The image decision starts from the enrolled one. Confirmed defects (real positives) that
/// score below it pull it down to midway between the highest confirmed-normal observation
/// below them and the lowest such defect. A false alarm answered `normal` does not raise it:
/// that frame becomes a reference, so it and parts like it score low from then on, and raising
/// the decision as well would correct twice (and a single odd part would blind the judge).
pub fn refit(cal: &kensa_verdict::Calibration, lineage: &Lineage) -> kensa_verdict::Calibration {
    let mut out = cal.clone();
    let t0 = lineage.enrolled_threshold;
    let defects: Vec<f32> = lineage.observations.iter().filter(|o| o.label == Label::Defect).map(|o| o.score).collect();
    let lowest_defect = defects.iter().copied().fold(f32::INFINITY, f32::min);
    let mut t = t0;
    if lowest_defect < t0 {
        let below = lineage
            .observations
            .iter()
            .filter(|o| o.label == Label::Normal && o.score < lowest_defect)
            .map(|o| o.score)
            .fold(f32::NEG_INFINITY, f32::max);
        let floor = below.max(cal.normal_scores.last().copied().unwrap_or(f32::NEG_INFINITY));
        t = if floor.is_finite() { (floor + lowest_defect) / 2.0 } else { lowest_defect };
    }
    let shift = t - out.image_threshold;
    out.image_threshold = t;
    if shift != 0.0 {
        out.pixel_threshold = (out.pixel_threshold + shift).max(f32::MIN_POSITIVE);
    }
    if !defects.is_empty() {
        out.method = format!("{} (+{} confirmed defect(s) from the line)", base_method(&cal.method), defects.len());
    }
    out
}

/// `bank` (made from `parent`) with its decision scaled by `ratio`: the image and pixel levels,
/// the logistic's scale, the populations they were fitted on, the base later re-fits start
/// from ([`Lineage::enrolled_threshold`]) and the observations they compare with it; stamped
/// again (the calibration is part of the version). `joined`: the learned reference whose
/// arrival this follows (it keeps the ratio, to divide it out when it leaves).
pub fn rescale(bank: &Bank, parent: &BankMeta, ratio: f32, joined: Option<&str>) -> Bank {
    let mut meta = bank.meta.clone();
    let c = &mut meta.calibration;
    c.image_threshold *= ratio;
    c.pixel_threshold *= ratio;
    c.logistic_scale *= ratio;
    c.normal_scores.iter_mut().for_each(|v| *v *= ratio);
    c.anomaly_scores.iter_mut().for_each(|v| *v *= ratio);
    let mut lineage = meta.lineage.take().unwrap_or_else(|| initial_lineage(&bank.meta, &bank.layers));
    lineage.enrolled_threshold *= ratio;
    lineage.observations.iter_mut().for_each(|o| o.score *= ratio);
    if let Some(r) = joined.and_then(|f| lineage.learned.iter_mut().find(|r| r.frame == f)) {
        r.follow_ratio = ratio;
    }
    let change = lineage.change.clone();
    let layers: Vec<Tensor> = bank.layers.iter().map(Tensor::shallow_clone).collect();
    let mut out = Bank::new(meta, layers);
    stamp(&mut out, parent, change, lineage);
    out
}

fn base_method(m: &str) -> &str {
    m.split(" (+").next().unwrap_or(m)
}

/// Rows each layer of `bank` holds (the search cost grows with them).
pub fn rows(bank: &Bank) -> i64 {
    bank.layers.iter().map(|t| t.size()[0]).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kensa_verdict::Calibration;

    fn lineage(obs: &[(f32, Label)]) -> Lineage {
        Lineage {
            version: String::new(),
            parent: String::new(),
            change: Change::Enrolled,
            changed_unix: 0,
            enrolled_rows: vec![],
            learned: vec![],
            observations: obs
                .iter()
                .enumerate()
                .map(|(i, &(score, label))| Observation {
                    frame: i.to_string(),
                    score,
                    label,
                    source: Source::Operator,
                })
                .collect(),
            enrolled_threshold: 0.5,
        }
    }

    #[test]
    fn refit_lowers_the_decision_only_for_missed_defects_and_never_for_false_alarms() {
        let mut cal = Calibration::fit_single(&[0.1, 0.2, 0.3], &[0.6, 0.7, 0.9]);
        cal.image_threshold = 0.5;
        cal.pixel_threshold = 0.55;
        // False alarms answered normal (above the decision): the decision stays.
        let r = refit(&cal, &lineage(&[(0.6, Label::Normal), (0.7, Label::Normal)]));
        assert_eq!(r.image_threshold, 0.5);
        // Defects above the decision: it stays too.
        assert_eq!(refit(&cal, &lineage(&[(0.8, Label::Defect)])).image_threshold, 0.5);
        // A confirmed defect the decision missed (0.4): midway between the highest normal
        // below it (the synthetic 0.3, or a real 0.35) and it; the pixel level follows.
        let r = refit(&cal, &lineage(&[(0.4, Label::Defect)]));
        assert!((r.image_threshold - 0.35).abs() < 1e-6, "{}", r.image_threshold);
        assert!((r.pixel_threshold - 0.40).abs() < 1e-6);
        assert!(r.method.contains("1 confirmed defect"));
        let r = refit(&cal, &lineage(&[(0.4, Label::Defect), (0.36, Label::Normal)]));
        assert!((r.image_threshold - 0.38).abs() < 1e-6, "{}", r.image_threshold);
    }
}
