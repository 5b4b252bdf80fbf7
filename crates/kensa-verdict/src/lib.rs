//! Thresholdless verdicts.
//!
//! Nobody sets a threshold: at enrollment, Kensa scores pseudo-normal images (augmented
//! references) and pseudo-anomalies (synthetic defects pasted onto the references) against the
//! bank, and [`Calibration::fit`] places the decision where the two populations separate best
//! (balanced accuracy, the middle of the best gap; with one reference, [`Calibration::fit_medians`]:
//! midway between their medians). The fitted calibration is stored in the bank.
//! [`judge`] then turns an anomaly map into AnomalyGPT's answer: anomalous or not, the 3×3 cells
//! of each region (connected components of the map at the calibrated level), a confidence and a
//! pixel mask.

use kensa_core::grid::{answer, Cell};
use kensa_core::AnomalyMap;
use serde::{Deserialize, Serialize};

/// The decision fitted from the references; stored in the bank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Image-level decision: anomalous iff the map's maximum reaches it.
    pub image_threshold: f32,
    /// Pixel level for regions (the same as the image level, so an anomalous image always has a
    /// region, and a region always makes the image anomalous).
    pub pixel_threshold: f32,
    /// Scale of the logistic that maps (score − threshold) to a probability.
    pub logistic_scale: f32,
    /// Regions smaller than this fraction of the image are dropped (unless the only one).
    pub min_area_frac: f32,
    /// Balanced accuracy of the decision on the calibration populations.
    pub fit_balanced_accuracy: f32,
    pub normal_count: usize,
    pub anomaly_count: usize,
    /// How it was fitted, for the record.
    pub method: String,
    /// The image scores it was fitted on (pseudo-normal, pseudo-anomalous), sorted.
    #[serde(default)]
    pub normal_scores: Vec<f32>,
    #[serde(default)]
    pub anomaly_scores: Vec<f32>,
}

impl Calibration {
    /// Fits the decision from image scores of pseudo-normal and pseudo-anomalous samples.
    /// Panics if either population is empty (enrollment always makes both).
    pub fn fit(normal: &[f32], anomalous: &[f32]) -> Calibration {
        Self::fit_with(normal, anomalous, Placement::BestGap)
    }

    /// Like [`Calibration::fit`], but the decision sits midway between the two populations'
    /// medians. For a single reference, whose pseudo-normals are augmented copies of itself
    /// and so score lower than real new parts do, this keeps the decision away from the
    /// optimistic normal population (measured with `kensa eval`, 1 shot, two seeds: mean
    /// verdict accuracy 0.730-0.746 → 0.756-0.763, bottle 0.83-0.91 → 0.966); with leave-one-out
    /// pseudo-normals (2+ references), which score higher than real parts, the best gap does
    /// better.
    pub fn fit_medians(normal: &[f32], anomalous: &[f32]) -> Calibration {
        Self::fit_with(normal, anomalous, Placement::Medians)
    }

    fn fit_with(normal: &[f32], anomalous: &[f32], placement: Placement) -> Calibration {
        assert!(!normal.is_empty() && !anomalous.is_empty(), "calibration needs both populations");
        let mut n: Vec<f32> = normal.iter().copied().filter(|v| v.is_finite()).collect();
        let mut a: Vec<f32> = anomalous.iter().copied().filter(|v| v.is_finite()).collect();
        n.sort_by(f32::total_cmp);
        a.sort_by(f32::total_cmp);
        // Candidate thresholds: midpoints between consecutive distinct values of both sets.
        let mut all: Vec<f32> = n.iter().chain(a.iter()).copied().collect();
        all.sort_by(f32::total_cmp);
        all.dedup();
        let mut best = (f32::NEG_INFINITY, 0usize, 0usize); // (balanced acc, first, last) over candidate indices
        let cands: Vec<f32> = all.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let bacc = |t: f32| {
            let tnr = n.iter().filter(|&&v| v < t).count() as f32 / n.len() as f32;
            let tpr = a.iter().filter(|&&v| v >= t).count() as f32 / a.len() as f32;
            (tnr + tpr) / 2.0
        };
        for (i, &t) in cands.iter().enumerate() {
            let b = bacc(t);
            if b > best.0 + 1e-6 {
                best = (b, i, i);
            } else if (b - best.0).abs() <= 1e-6 && best.2 + 1 == i {
                best.2 = i;
            }
        }
        let med = |v: &[f32]| v[v.len() / 2];
        let threshold = if placement == Placement::Medians {
            (med(&n) + med(&a)) / 2.0
        } else if cands.is_empty() {
            all[0]
        } else if best.1 == best.2 {
            cands[best.1]
        } else {
            (cands[best.1] + cands[best.2]) / 2.0
        };
        let spread = (med(&a) - med(&n)).abs().max(1e-4);
        Calibration {
            image_threshold: threshold,
            pixel_threshold: threshold,
            logistic_scale: spread / 8.0,
            min_area_frac: 0.0005,
            fit_balanced_accuracy: bacc(threshold),
            normal_count: n.len(),
            anomaly_count: a.len(),
            method: match placement {
                Placement::BestGap => "balanced-accuracy midpoint over pseudo-normal references and synthetic defects",
                Placement::Medians => "midpoint of the medians of augmented references and synthetic defects",
            }
            .into(),
            normal_scores: n.clone(),
            anomaly_scores: a.clone(),
        }
    }

    /// Probability that a frame with this image score is anomalous.
    pub fn probability(&self, score: f32) -> f32 {
        1.0 / (1.0 + (-(score - self.image_threshold) / self.logistic_scale).exp())
    }
}

/// Where [`Calibration`] puts the decision between the two populations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// The middle of the range that maximises balanced accuracy.
    BestGap,
    /// Midway between the medians.
    Medians,
}

/// One anomalous region.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Region {
    pub cell: Cell,
    /// Bounding box in pixels: x0, y0, x1, y1 (exclusive ends).
    pub bbox: [u32; 4],
    pub area: u32,
    pub peak: f32,
}

/// A frame's verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub anomalous: bool,
    /// The answer sentence in AnomalyGPT's exact grammar.
    pub answer: String,
    /// Distinct cells of the regions, strongest region first.
    pub locations: Vec<Cell>,
    pub regions: Vec<Region>,
    /// Confidence in the verdict, in [0, 1].
    pub confidence: f32,
    /// Which judge decided.
    pub judge: &'static str,
    pub score: f32,
}

pub const JUDGE_CALIBRATED: &str = "calibrated";

/// What a judge sees of a frame: its anomaly map (at the frame's resolution) and the frame.
pub struct Evidence<'a> {
    pub map: &'a AnomalyMap,
    pub image: &'a image::RgbImage,
}

/// A verdict maker. Both of Kensa's judges implement it: [`CalibratedJudge`] (thresholdless,
/// calibrated from the references) and the language-model judge (`kensa` binary, on
/// `kensa_lm::judge::LmJudge`).
pub trait Judge {
    /// The name events carry in `verdicts[].judge`.
    fn name(&self) -> &'static str;
    /// A verdict in AnomalyGPT's grammar, or why there is none.
    fn judge(&self, e: &Evidence<'_>) -> Result<Verdict, String>;
}

/// The self-calibrating judge of a bank.
pub struct CalibratedJudge<'a>(pub &'a Calibration);

impl Judge for CalibratedJudge<'_> {
    fn name(&self) -> &'static str {
        JUDGE_CALIBRATED
    }

    fn judge(&self, e: &Evidence<'_>) -> Result<Verdict, String> {
        Ok(judge(e.map, self.0).0)
    }
}

/// Judges a map with a calibration. Also returns the binary mask (0/255, map size) of the kept
/// regions.
pub fn judge(map: &AnomalyMap, cal: &Calibration) -> (Verdict, Vec<u8>) {
    let score = map.max();
    let anomalous = score >= cal.image_threshold;
    let (w, h) = (map.width as usize, map.height as usize);
    let mut mask = vec![0u8; w * h];
    let mut regions = Vec::new();
    if anomalous {
        let mut comps = components(map, cal.pixel_threshold);
        comps.sort_by(|a, b| b.0.peak.total_cmp(&a.0.peak));
        let min_area = (cal.min_area_frac * (w * h) as f32).ceil() as u32;
        for (i, (region, pixels)) in comps.into_iter().enumerate() {
            if i > 0 && region.area < min_area {
                continue;
            }
            for p in pixels {
                mask[p] = 255;
            }
            regions.push(region);
        }
    }
    let mut locations = Vec::new();
    for r in &regions {
        if !locations.contains(&r.cell) {
            locations.push(r.cell);
        }
    }
    let p = cal.probability(score);
    let verdict = Verdict {
        anomalous,
        answer: answer(&locations),
        locations,
        regions,
        confidence: if anomalous { p } else { 1.0 - p },
        judge: JUDGE_CALIBRATED,
        score,
    };
    (verdict, mask)
}

/// 8-connected components of `map >= level`, each with its pixel indices.
fn components(map: &AnomalyMap, level: f32) -> Vec<(Region, Vec<usize>)> {
    let (w, h) = (map.width as usize, map.height as usize);
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if seen[start] || map.data[start] < level {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut pixels = Vec::new();
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let (mut peak, mut px, mut py) = (f32::NEG_INFINITY, 0.0f64, 0.0f64);
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
            if map.data[i] > peak {
                peak = map.data[i];
            }
            px += x as f64;
            py += y as f64;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && map.data[j] >= level {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let n = pixels.len() as f64;
        // A region's cell is the cell of its centre (the centroid of its pixels).
        let cell = Cell::of_point(px / n + 0.5, py / n + 0.5, w as f64, h as f64);
        let region = Region { cell, bbox: [x0 as u32, y0 as u32, x1 as u32, y1 as u32], area: pixels.len() as u32, peak };
        out.push((region, pixels));
    }
    out
}

/// Encodes a 0/255 mask as a grayscale PNG.
pub fn mask_png(mask: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut out);
    image::ImageEncoder::write_image(enc, mask, width, height, image::ExtendedColorType::L8)
        .expect("encoding a well-sized mask to memory cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob_map(w: u32, h: u32, blobs: &[(u32, u32, u32, f32)]) -> AnomalyMap {
        let mut d = vec![0.05f32; (w * h) as usize];
        for &(cx, cy, r, v) in blobs {
            for y in 0..h {
                for x in 0..w {
                    let dd = (x as i64 - cx as i64).pow(2) + (y as i64 - cy as i64).pow(2);
                    if dd <= (r * r) as i64 {
                        d[(y * w + x) as usize] = v;
                    }
                }
            }
        }
        AnomalyMap::new(w, h, d)
    }

    #[test]
    fn fit_separates_populations_in_the_gap() {
        let c = Calibration::fit(&[0.1, 0.12, 0.15], &[0.3, 0.4, 0.5]);
        assert!(c.image_threshold > 0.15 && c.image_threshold < 0.3, "{c:?}");
        assert_eq!(c.fit_balanced_accuracy, 1.0);
        assert!(c.probability(0.5) > 0.95 && c.probability(0.1) < 0.05);
    }

    #[test]
    fn fit_with_overlap_maximises_balanced_accuracy() {
        let c = Calibration::fit(&[0.1, 0.2, 0.3, 0.35], &[0.25, 0.4, 0.5, 0.6]);
        assert!(c.image_threshold > 0.35 && c.image_threshold < 0.4, "{c:?}");
        assert!((c.fit_balanced_accuracy - 0.875).abs() < 1e-6);
    }

    #[test]
    fn fit_medians_sits_between_the_medians() {
        let n = [0.1, 0.2, 0.3, 0.35];
        let a = [0.25, 0.4, 0.5, 0.6];
        let c = Calibration::fit_medians(&n, &a);
        // Medians (upper for even counts): 0.3 and 0.5.
        assert!((c.image_threshold - 0.4).abs() < 1e-6, "{c:?}");
        assert!(c.image_threshold > Calibration::fit(&[0.1, 0.12, 0.15], &[0.3, 0.4, 0.5]).image_threshold);
        assert!(c.method.contains("medians"));
        assert_eq!((c.normal_scores.len(), c.anomaly_scores.len()), (4, 4));
    }

    #[test]
    fn judge_normal_and_regions() {
        let cal = Calibration::fit(&[0.1], &[0.5]);
        let (v, mask) = judge(&blob_map(90, 90, &[]), &cal);
        assert!(!v.anomalous);
        assert_eq!(v.answer, "No, there is no anomaly in the image.");
        assert!(mask.iter().all(|&m| m == 0));
        assert!(v.confidence > 0.9);

        let (v, mask) = judge(&blob_map(90, 90, &[(10, 10, 4, 0.8)]), &cal);
        assert!(v.anomalous);
        assert_eq!(v.answer, "Yes, there is an anomaly in the image, at the top left of the image.");
        assert_eq!(mask[10 * 90 + 10], 255);
        assert_eq!(mask[80 * 90 + 80], 0);

        let (v, _) = judge(&blob_map(90, 90, &[(80, 80, 5, 0.9), (45, 45, 5, 0.7)]), &cal);
        assert_eq!(v.locations, vec![Cell::BottomRight, Cell::Center]);
        assert_eq!(v.answer, "Yes, there are 2 anomalies in the image, they are at the bottom right and center of the image.");
        assert_eq!(v.regions.len(), 2);
    }

    #[test]
    fn mask_png_decodes() {
        let png = mask_png(&[0, 255, 255, 0], 2, 2);
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(img.get_pixel(1, 0).0[0], 255);
    }
}

#[cfg(test)]
mod judge_trait_tests {
    use super::*;

    #[test]
    fn calibrated_judge_through_the_trait_matches_the_function() {
        let cal = Calibration::fit(&[0.1, 0.12, 0.11], &[0.5, 0.6, 0.55]);
        let mut data = vec![0.0f32; 30 * 30];
        for y in 2..6 {
            for x in 2..6 {
                data[y * 30 + x] = 0.8;
            }
        }
        let map = AnomalyMap::new(30, 30, data);
        let img = image::RgbImage::new(30, 30);
        let j: &dyn Judge = &CalibratedJudge(&cal);
        let v = j.judge(&Evidence { map: &map, image: &img }).unwrap();
        assert_eq!(j.name(), JUDGE_CALIBRATED);
        assert_eq!(v, judge(&map, &cal).0);
        assert!(v.anomalous && v.locations == vec![Cell::TopLeft], "{v:?}");
    }
}
