//! Evaluation metrics of anomaly detection: image AUROC, pixel AUROC and PRO (per-region
//! overlap integrated up to 30 % false-positive rate, normalised), plus verdict accuracy and F1.

/// Area under the ROC curve of `scores` for binary `labels` (true = anomalous), with ties
/// counted half (the Mann-Whitney statistic). `None` when a class is missing.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties, then sum the ranks of the positives.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += avg;
            }
        }
        i = j + 1;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos as f64 * neg as f64))
}

/// Pixel AUROC over many maps and masks, computed from fine histograms so memory stays
/// bounded (`bins` levels between the global min and max score; 10 000 is plenty).
pub fn pixel_auroc(maps: &[&[f32]], masks: &[&[bool]], bins: usize) -> Option<f64> {
    let (lo, hi) = range(maps)?;
    let (hp, hn) = histograms(maps, masks, lo, hi, bins);
    let (tp, tn): (f64, f64) = (hp.iter().sum::<u64>() as f64, hn.iter().sum::<u64>() as f64);
    if tp == 0.0 || tn == 0.0 {
        return None;
    }
    // Walk thresholds from high to low; trapezoids in (FPR, TPR).
    let (mut cp, mut cn, mut area) = (0.0f64, 0.0f64, 0.0f64);
    for b in (0..bins).rev() {
        let (np, nn) = (cp + hp[b] as f64, cn + hn[b] as f64);
        area += (nn - cn) / tn * (cp + np) / 2.0 / tp;
        cp = np;
        cn = nn;
    }
    Some(area)
}

fn range(maps: &[&[f32]]) -> Option<(f32, f32)> {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for m in maps {
        for &v in *m {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    lo.is_finite().then_some((lo, hi.max(lo + 1e-12)))
}

fn bin_of(v: f32, lo: f32, hi: f32, bins: usize) -> usize {
    (((v - lo) / (hi - lo)) * bins as f32).clamp(0.0, (bins - 1) as f32) as usize
}

fn histograms(maps: &[&[f32]], masks: &[&[bool]], lo: f32, hi: f32, bins: usize) -> (Vec<u64>, Vec<u64>) {
    let mut hp = vec![0u64; bins];
    let mut hn = vec![0u64; bins];
    for (m, k) in maps.iter().zip(masks) {
        for (&v, &pos) in m.iter().zip(k.iter()) {
            let b = bin_of(v, lo, hi, bins);
            if pos {
                hp[b] += 1;
            } else {
                hn[b] += 1;
            }
        }
    }
    (hp, hn)
}

/// PRO: for each threshold, the mean over ground-truth regions of the fraction of the region
/// above it, against the false-positive rate over normal pixels; the area under that curve up
/// to `max_fpr` (0.3 by convention), divided by `max_fpr`. `widths[i]` is map i's width.
pub fn pro(maps: &[&[f32]], masks: &[&[bool]], widths: &[usize], max_fpr: f64, bins: usize) -> Option<f64> {
    let (lo, hi) = range(maps)?;
    let (_, hn) = histograms(maps, masks, lo, hi, bins);
    let tn: f64 = hn.iter().sum::<u64>() as f64;
    // One histogram per region.
    let mut region_hists: Vec<(Vec<u32>, f64)> = Vec::new();
    for ((m, k), &w) in maps.iter().zip(masks).zip(widths) {
        for r in kensa_core::regions::components(k, w) {
            let mut h = vec![0u32; bins];
            for &i in &r {
                h[bin_of(m[i], lo, hi, bins)] += 1;
            }
            region_hists.push((h, r.len() as f64));
        }
    }
    if region_hists.is_empty() || tn == 0.0 {
        return None;
    }
    // Curve points from high threshold to low.
    let mut above: Vec<f64> = vec![0.0; region_hists.len()];
    let (mut fp, mut prev_fpr, mut prev_pro, mut area) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for b in (0..bins).rev() {
        fp += hn[b] as f64;
        for (a, (h, _)) in above.iter_mut().zip(&region_hists) {
            *a += h[b] as f64;
        }
        let fpr = fp / tn;
        let pro = above.iter().zip(&region_hists).map(|(a, (_, n))| a / n).sum::<f64>() / region_hists.len() as f64;
        if fpr >= max_fpr {
            // Interpolate the last segment to exactly max_fpr.
            let t = if fpr > prev_fpr { (max_fpr - prev_fpr) / (fpr - prev_fpr) } else { 0.0 };
            let pro_at = prev_pro + t * (pro - prev_pro);
            area += (max_fpr - prev_fpr) * (prev_pro + pro_at) / 2.0;
            return Some(area / max_fpr);
        }
        area += (fpr - prev_fpr) * (prev_pro + pro) / 2.0;
        prev_fpr = fpr;
        prev_pro = pro;
    }
    Some(area / max_fpr)
}

/// Verdicts against the ground truth (anomalous = positive): the confusion matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
    pub tn: usize,
}

impl Confusion {
    /// Counts of `pred[i]` against `truth[i]`.
    pub fn new(pred: &[bool], truth: &[bool]) -> Self {
        let mut c = Self::default();
        for (&p, &t) in pred.iter().zip(truth) {
            *match (p, t) {
                (true, true) => &mut c.tp,
                (true, false) => &mut c.fp,
                (false, true) => &mut c.fn_,
                (false, false) => &mut c.tn,
            } += 1;
        }
        c
    }

    /// Fraction of verdicts that were right (0 when there were none).
    pub fn accuracy(&self) -> f64 {
        (self.tp + self.tn) as f64 / (self.tp + self.fp + self.fn_ + self.tn).max(1) as f64
    }

    /// F1 of the anomalous class (0 without true positives).
    pub fn f1(&self) -> f64 {
        if self.tp == 0 {
            return 0.0;
        }
        2.0 * self.tp as f64 / (2 * self.tp + self.fp + self.fn_) as f64
    }
}

/// Verdict accuracy and F1 (anomalous = positive).
pub fn accuracy_f1(pred: &[bool], truth: &[bool]) -> (f64, f64) {
    let c = Confusion::new(pred, truth);
    (c.accuracy(), c.f1())
}

/// The verdict accuracy of the best threshold on the image scores (`score > threshold` is
/// anomalous), chosen with the labels themselves: an upper bound for any judge that decides
/// from the image score alone, which no judge can reach without the test labels. `None`
/// without scores.
pub fn best_threshold_accuracy(scores: &[f32], labels: &[bool]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let mut s: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Threshold below every score: everything anomalous.
    let mut right = s.iter().filter(|x| x.1).count();
    let mut best = right;
    for (i, &(score, anomalous)) in s.iter().enumerate() {
        // Moving the threshold to this score makes it normal.
        right = if anomalous { right - 1 } else { right + 1 };
        // Only between distinct scores (equal scores cannot be split).
        if s.get(i + 1).is_none_or(|n| n.0 > score) {
            best = best.max(right);
        }
    }
    Some(best as f64 / s.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_threshold_accuracy_splits_only_between_distinct_scores() {
        assert_eq!(best_threshold_accuracy(&[], &[]), None);
        assert_eq!(best_threshold_accuracy(&[0.1, 0.2, 0.3, 0.4], &[false, false, true, true]), Some(1.0));
        // One good part above one defect: 3 of 4 at best.
        assert_eq!(best_threshold_accuracy(&[0.1, 0.3, 0.2, 0.4], &[false, false, true, true]), Some(0.75));
        // Tied scores with different labels cannot be split.
        assert_eq!(best_threshold_accuracy(&[0.2, 0.2], &[false, true]), Some(0.5));
        // All normal: a threshold above everything.
        assert_eq!(best_threshold_accuracy(&[0.5, 0.9], &[false, false]), Some(1.0));
    }

    #[test]
    fn auroc_matches_known_values() {
        // scikit-learn's roc_auc_score documentation example: 0.75.
        assert_eq!(auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
        // Ties count half: one positive tied with one negative.
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(auroc(&[0.1, 0.9, 0.2, 0.8], &[false, true, false, true]), Some(1.0));
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
    }

    #[test]
    fn pixel_auroc_agrees_with_exact_auroc() {
        let map: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 100.0).collect();
        let mask: Vec<bool> = (0..100).map(|i| (i * 37) % 100 > 60 || i % 7 == 0).collect();
        let exact = auroc(&map, &mask).unwrap();
        let binned = pixel_auroc(&[&map], &[&mask], 10_000).unwrap();
        assert!((exact - binned).abs() < 1e-3, "{exact} vs {binned}");
    }

    #[test]
    fn pro_worked_by_hand() {
        // 4x1 image: pixels 0,1 normal, 2,3 one defect region.
        // Perfect separation: PRO reaches 1 at FPR 0, so the normalised area is 1.
        let map = [0.1f32, 0.2, 0.8, 0.9];
        let mask = [false, false, true, true];
        assert!((pro(&[&map], &[&mask], &[4], 0.3, 1000).unwrap() - 1.0).abs() < 1e-9);
        // Worst case: the region scores lowest; until FPR 0.3 it covers nothing → PRO 0.
        let map = [0.9f32, 0.8, 0.1, 0.2];
        assert!(pro(&[&map], &[&mask], &[4], 0.3, 1000).unwrap().abs() < 1e-9);
        // Two regions, one found at FPR 0 and one never before FPR 0.3: mean overlap 0.5.
        let map = [0.9f32, 0.1, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05];
        let mask = [true, false, false, false, false, false, false, false, false, false, false, false, true];
        let v = pro(&[&map], &[&mask], &[13], 0.3, 1000).unwrap();
        assert!((v - 0.5).abs() < 1e-9, "{v}");
    }

    #[test]
    fn accuracy_and_f1() {
        let (a, f) = accuracy_f1(&[true, true, false, false], &[true, false, false, true]);
        assert_eq!(a, 0.5);
        assert!((f - 0.5).abs() < 1e-12);
        let c = Confusion::new(&[true, true, false, false, false], &[true, false, false, true, false]);
        assert_eq!(c, Confusion { tp: 1, fp: 1, fn_: 1, tn: 2 });
        assert!((c.accuracy() - 0.6).abs() < 1e-12);
        assert_eq!(Confusion::new(&[], &[]).accuracy(), 0.0);
    }
}
