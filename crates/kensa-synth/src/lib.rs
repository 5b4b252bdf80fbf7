//! A seeded synthetic production line.
//!
//! Each frame is a machined part (a textured disc with a hub and six bolt holes) on a plain
//! background, with small natural variation in pose and lighting. Some frames carry one
//! injected defect (scratch, hole, missing piece or contamination) with its exact pixel mask.
//! Frame `i` of a line with a given seed is always the same image, so a test can regenerate
//! the ground truth of any frame a camera delivered.
//!
//! # Layout
//! One module: [`Line`] (frame `i` of a seeded line, with its defect mask), [`DefectKind`], and
//! writing a line as an MVTec-layout data set.

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// The kinds of injected defect; `name()` is the MVTec folder name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefectKind {
    Scratch,
    Hole,
    MissingPiece,
    Contamination,
}

impl DefectKind {
    pub const ALL: [DefectKind; 4] =
        [DefectKind::Scratch, DefectKind::Hole, DefectKind::MissingPiece, DefectKind::Contamination];

    pub fn name(self) -> &'static str {
        match self {
            DefectKind::Scratch => "scratch",
            DefectKind::Hole => "hole",
            DefectKind::MissingPiece => "missing_piece",
            DefectKind::Contamination => "contamination",
        }
    }
}

/// One generated frame.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: RgbImage,
    /// 255 where the defect changed the part, 0 elsewhere (all 0 for a normal part).
    pub mask: GrayImage,
    pub defect: Option<DefectKind>,
}

/// A synthetic line: frame `index` is a pure function of (seed, index).
#[derive(Clone, Debug)]
pub struct Line {
    pub seed: u64,
    pub defect_rate: f64,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: image::ImageError },
    #[error("cannot create folder {path}: {source}")]
    Mkdir { path: String, source: std::io::Error },
}

const SALT_DEFECT: u64 = 0x005e_edde_fec7;
const SALT_POSE: u64 = 0x000b_1ec7;

impl Line {
    pub fn new(seed: u64, defect_rate: f64, width: u32, height: u32) -> Self {
        Self { seed, defect_rate, width, height }
    }

    fn rng(&self, index: u64, salt: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(mix(self.seed ^ salt, index))
    }

    /// Whether frame `index` carries a defect (and which).
    pub fn defect_of(&self, index: u64) -> Option<DefectKind> {
        let mut r = self.rng(index, SALT_DEFECT);
        let roll: f64 = r.random();
        (roll < self.defect_rate).then(|| DefectKind::ALL[r.random_range(0..4)])
    }

    /// Frame `index`, defective or not as [`Line::defect_of`] says.
    pub fn sample(&self, index: u64) -> Sample {
        self.render(index, self.defect_of(index))
    }

    /// Frame `index` forced to be normal (references for enrollment).
    pub fn normal(&self, index: u64) -> Sample {
        self.render(index, None)
    }

    /// Frame `index` with the given defect (or none).
    pub fn render(&self, index: u64, defect: Option<DefectKind>) -> Sample {
        let (w, h) = (self.width, self.height);
        let mut pose = self.rng(index, SALT_POSE);
        let side = w.min(h) as f32;
        let cx = w as f32 / 2.0 + pose.random_range(-0.02..0.02) * side;
        let cy = h as f32 / 2.0 + pose.random_range(-0.02..0.02) * side;
        let radius = side * 0.34 * (1.0 + pose.random_range(-0.015..0.015));
        let angle0: f32 = pose.random_range(-0.06..0.06);
        let light: f32 = 1.0 + pose.random_range(-0.05..0.05);
        let noise_seed = mix(self.seed, index);
        let part = Part { cx, cy, radius, angle0 };

        let mut image = RgbImage::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let n = (hash2(x, y, noise_seed) as f32 / u32::MAX as f32 - 0.5) * 6.0;
                let bg = [38.0 + n, 40.0 + n, 44.0 + n];
                let px = x as f32 + 0.5;
                let py = y as f32 + 0.5;
                let cover = part.coverage(px, py);
                let c = if cover > 0.0 {
                    let fg = part.colour(px, py, light, n);
                    [0, 1, 2].map(|i| fg[i] * cover + bg[i] * (1.0 - cover))
                } else {
                    bg
                };
                image.put_pixel(x, y, Rgb(c.map(|v| v.clamp(0.0, 255.0) as u8)));
            }
        }
        let mut mask = GrayImage::new(w, h);
        if let Some(kind) = defect {
            let mut r = self.rng(index, SALT_DEFECT ^ 0xd3f3c7);
            inject(&mut image, &mut mask, &part, kind, &mut r, noise_seed);
        }
        Sample { image, mask, defect }
    }

    /// Writes an MVTec-layout data set: `train/good` (`train` normal references),
    /// `test/good`, `test/<defect>` and `ground_truth/<defect>/<stem>_mask.png` for `count`
    /// test frames. Returns the number of defective test images.
    pub fn write_mvtec(&self, out: &Path, train: u64, count: u64) -> Result<u64, SynthError> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| SynthError::Mkdir { path: p.display().to_string(), source })
        };
        let save = |img: &dyn Fn(&Path) -> image::ImageResult<()>, p: &Path| {
            img(p).map_err(|source| SynthError::Write { path: p.display().to_string(), source })
        };
        mkdir(&out.join("train/good"))?;
        mkdir(&out.join("test/good"))?;
        // Train references use indices far from the test ones, so no test frame is a reference.
        for i in 0..train {
            let s = self.normal(1_000_000 + i);
            let p = out.join(format!("train/good/{i:03}.png"));
            save(&|p| s.image.save(p), &p)?;
        }
        let mut defective = 0;
        for i in 0..count {
            let s = self.sample(i);
            match s.defect {
                None => save(&|p| s.image.save(p), &out.join(format!("test/good/{i:03}.png")))?,
                Some(kind) => {
                    defective += 1;
                    mkdir(&out.join("test").join(kind.name()))?;
                    mkdir(&out.join("ground_truth").join(kind.name()))?;
                    save(&|p| s.image.save(p), &out.join(format!("test/{}/{i:03}.png", kind.name())))?;
                    save(&|p| s.mask.save(p), &out.join(format!("ground_truth/{}/{i:03}_mask.png", kind.name())))?;
                }
            }
        }
        Ok(defective)
    }
}

struct Part {
    cx: f32,
    cy: f32,
    radius: f32,
    angle0: f32,
}

impl Part {
    fn polar(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = (x - self.cx, y - self.cy);
        ((dx * dx + dy * dy).sqrt(), dy.atan2(dx))
    }

    /// Anti-aliased coverage of the disc at a pixel centre.
    fn coverage(&self, x: f32, y: f32) -> f32 {
        let (r, _) = self.polar(x, y);
        (self.radius - r + 0.5).clamp(0.0, 1.0)
    }

    fn inside(&self, x: f32, y: f32) -> bool {
        self.polar(x, y).0 < self.radius - 1.0
    }

    fn colour(&self, x: f32, y: f32, light: f32, n: f32) -> [f32; 3] {
        let (r, a) = self.polar(x, y);
        let rn = r / self.radius;
        // Machined rings and a slight directional sheen.
        let rings = (r * 0.9).sin() * 6.0;
        let sheen = 12.0 * (a - self.angle0).cos();
        let mut base = [176.0, 146.0, 94.0];
        if rn < 0.22 {
            base = [205.0, 188.0, 150.0]; // hub
        }
        // Six bolt holes on a circle at 0.68 R.
        for k in 0..6 {
            let ang = self.angle0 + k as f32 * std::f32::consts::PI / 3.0;
            let bx = self.cx + ang.cos() * self.radius * 0.68;
            let by = self.cy + ang.sin() * self.radius * 0.68;
            let d = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
            if d < self.radius * 0.075 {
                return [60.0 * light + n, 58.0 * light + n, 55.0 * light + n];
            }
        }
        base.map(|b| (b + rings + sheen) * light + n)
    }
}

fn inject(img: &mut RgbImage, mask: &mut GrayImage, part: &Part, kind: DefectKind, r: &mut ChaCha8Rng, noise: u64) {
    let (w, h) = img.dimensions();
    let side = w.min(h) as f32;
    // A point well inside the part, away from the rim.
    let pick = |r: &mut ChaCha8Rng, max_frac: f32| {
        let rad = part.radius * max_frac * r.random::<f32>().sqrt();
        let a = r.random_range(0.0..std::f32::consts::TAU);
        (part.cx + a.cos() * rad, part.cy + a.sin() * rad)
    };
    let mut paint = |x: u32, y: u32, c: [f32; 3], alpha: f32| {
        let p = img.get_pixel_mut(x, y);
        for (px, ci) in p.0.iter_mut().zip(c) {
            *px = (ci * alpha + f32::from(*px) * (1.0 - alpha)).clamp(0.0, 255.0) as u8;
        }
        mask.put_pixel(x, y, Luma([255]));
    };
    match kind {
        DefectKind::Scratch => {
            let (x0, y0) = pick(r, 0.6);
            let len = side * r.random_range(0.12..0.22);
            let a = r.random_range(0.0..std::f32::consts::TAU);
            let (x1, y1) = (x0 + a.cos() * len, y0 + a.sin() * len);
            let half = (side / 128.0).max(1.0) * r.random_range(0.9..1.4);
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    if part.inside(px, py) && seg_dist(px, py, x0, y0, x1, y1) <= half {
                        paint(x, y, [235.0, 232.0, 225.0], 0.85);
                    }
                }
            }
        }
        DefectKind::Hole => {
            let (hx, hy) = pick(r, 0.55);
            let (rx, ry) = (side * r.random_range(0.025..0.045), side * r.random_range(0.025..0.045));
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    if ((px - hx) / rx).powi(2) + ((py - hy) / ry).powi(2) <= 1.0 && part.inside(px, py) {
                        paint(x, y, [14.0, 12.0, 12.0], 1.0);
                    }
                }
            }
        }
        DefectKind::MissingPiece => {
            let a = r.random_range(0.0..std::f32::consts::TAU);
            let (bx, by) = (part.cx + a.cos() * part.radius, part.cy + a.sin() * part.radius);
            let br = part.radius * r.random_range(0.2..0.3);
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    if ((px - bx).powi(2) + (py - by).powi(2)).sqrt() < br && part.coverage(px, py) > 0.0 {
                        let n = (hash2(x, y, noise) as f32 / u32::MAX as f32 - 0.5) * 6.0;
                        paint(x, y, [38.0 + n, 40.0 + n, 44.0 + n], 1.0);
                    }
                }
            }
        }
        DefectKind::Contamination => {
            let (cx, cy) = pick(r, 0.6);
            let blobs: Vec<(f32, f32, f32)> = (0..r.random_range(3..6))
                .map(|_| {
                    (
                        cx + r.random_range(-0.04..0.04) * side,
                        cy + r.random_range(-0.04..0.04) * side,
                        side * r.random_range(0.015..0.03),
                    )
                })
                .collect();
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    if part.inside(px, py)
                        && blobs.iter().any(|(bx, by, br)| (px - bx).powi(2) + (py - by).powi(2) < br * br)
                    {
                        paint(x, y, [52.0, 118.0, 48.0], 0.9);
                    }
                }
            }
        }
    }
}

fn seg_dist(px: f32, py: f32, x0: f32, y0: f32, x1: f32, y1: f32) -> f32 {
    let (dx, dy) = (x1 - x0, y1 - y0);
    let t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
    ((px - x0 - t * dx).powi(2) + (py - y0 - t * dy).powi(2)).sqrt()
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash2(x: u32, y: u32, seed: u64) -> u32 {
    (mix(seed, ((x as u64) << 32) | y as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_masks_match_changes() {
        let line = Line::new(7, 1.0, 128, 128);
        for i in 0..8 {
            let a = line.sample(i);
            let b = line.sample(i);
            assert_eq!(a.image, b.image);
            let kind = a.defect.expect("rate 1.0 makes every frame defective");
            let clean = line.render(i, None);
            let marked = a.mask.pixels().filter(|p| p.0[0] == 255).count();
            assert!(marked > 10, "{kind:?} mask too small: {marked}");
            // Every changed pixel is inside the mask, and the mask marks changed pixels.
            let mut changed_outside = 0;
            for (x, y, p) in a.image.enumerate_pixels() {
                if *p != *clean.image.get_pixel(x, y) && a.mask.get_pixel(x, y).0[0] == 0 {
                    changed_outside += 1;
                }
            }
            assert_eq!(changed_outside, 0, "{kind:?}");
        }
    }

    #[test]
    fn defect_rate_is_respected_and_kinds_vary() {
        let line = Line::new(1, 0.25, 64, 64);
        let kinds: Vec<_> = (0..400).filter_map(|i| line.defect_of(i)).collect();
        assert!((70..130).contains(&kinds.len()), "{}", kinds.len());
        for k in DefectKind::ALL {
            assert!(kinds.contains(&k));
        }
        assert!(Line::new(1, 0.0, 64, 64).sample(3).defect.is_none());
    }

    #[test]
    fn frames_vary_in_pose_and_light() {
        let line = Line::new(2, 0.0, 96, 96);
        assert_ne!(line.normal(0).image, line.normal(1).image);
    }
}
