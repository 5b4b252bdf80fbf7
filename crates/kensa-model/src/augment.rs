//! Bank augmentation: with only 1-4 references, the bank also holds the features of transformed
//! copies of each reference, so a part that is turned or shifted a little (or a texture seen the
//! other way round) finds its nearest neighbour. Which copies is a per-product choice made at
//! enrollment (`kensa enroll --augment`) and recorded in the bank: an orientation-sensitive part
//! must not be enrolled with rotations, or a part mounted upside down looks normal.
//!
//! Spelling (comma separated): `none`, `hflip`, `vflip`, `rot90`, `rot180`, `rot270`,
//! `rotate:D` (two copies, turned by ±D degrees, 0 < D ≤ 45), `shift:F` (four copies, moved by
//! ±F of the side along x and y, 0 < F ≤ 0.25). Turned and shifted copies fill the border by
//! reflection.

use crate::{ModelError, Result};
use std::fmt;
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    HFlip,
    VFlip,
    Rot90,
    Rot180,
    Rot270,
    /// ± this many degrees.
    Rotate(f64),
    /// ± this fraction of the side, along x and along y.
    Shift(f64),
}

impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Augment::HFlip => write!(f, "hflip"),
            Augment::VFlip => write!(f, "vflip"),
            Augment::Rot90 => write!(f, "rot90"),
            Augment::Rot180 => write!(f, "rot180"),
            Augment::Rot270 => write!(f, "rot270"),
            Augment::Rotate(d) => write!(f, "rotate:{d}"),
            Augment::Shift(s) => write!(f, "shift:{s}"),
        }
    }
}

/// The default: no copies. Orientation can be what is wrong with a part, and every copy makes
/// the bank search slower; measured with `kensa eval` on ../shared/data (README, "Evaluation"),
/// the quarter turns gain 1-4 points of image AUROC on parts in random pose and on textures at
/// 2/3 of the throughput, so products like those enroll with `--augment rot90,rot180,rot270`.
pub const DEFAULT: &str = "none";

/// Parses a comma-separated list (see the module docs); `none` or an empty string is no copy.
pub fn parse_list(s: &str) -> Result<Vec<Augment>> {
    let mut out = Vec::new();
    for tok in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad = |why: &str| ModelError::Recipe(format!("augmentation `{tok}`: {why}"));
        let a = match tok {
            "none" => continue,
            "hflip" => Augment::HFlip,
            "vflip" => Augment::VFlip,
            "rot90" => Augment::Rot90,
            "rot180" => Augment::Rot180,
            "rot270" => Augment::Rot270,
            t => {
                let (name, v) = t.split_once(':').ok_or_else(|| {
                    bad("unknown (none, hflip, vflip, rot90, rot180, rot270, rotate:DEGREES, shift:FRACTION)")
                })?;
                let v: f64 = v.parse().map_err(|_| bad("the value is not a number"))?;
                match name {
                    "rotate" if v > 0.0 && v <= 45.0 => Augment::Rotate(v),
                    "rotate" => return Err(bad("degrees must be in (0, 45]")),
                    "shift" if v > 0.0 && v <= 0.25 => Augment::Shift(v),
                    "shift" => return Err(bad("the fraction must be in (0, 0.25]")),
                    _ => return Err(bad("unknown (rotate:DEGREES or shift:FRACTION take a value)")),
                }
            }
        };
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Names as recorded in a bank.
pub fn names(augs: &[Augment]) -> Vec<String> {
    augs.iter().map(ToString::to_string).collect()
}

impl Augment {
    /// The transformed copies of a square `[B, C, S, S]` batch.
    pub fn apply(&self, x: &Tensor) -> Vec<Tensor> {
        let _g = tch::no_grad_guard();
        match *self {
            Augment::HFlip => vec![x.flip([3])],
            Augment::VFlip => vec![x.flip([2])],
            Augment::Rot90 => vec![x.rot90(1, [2, 3])],
            Augment::Rot180 => vec![x.rot90(2, [2, 3])],
            Augment::Rot270 => vec![x.rot90(3, [2, 3])],
            Augment::Rotate(d) => [d, -d]
                .iter()
                .map(|deg| {
                    let (s, c) = deg.to_radians().sin_cos();
                    affine(x, [c, -s, 0.0, s, c, 0.0])
                })
                .collect(),
            Augment::Shift(f) => [(f, 0.0), (-f, 0.0), (0.0, f), (0.0, -f)]
                .iter()
                // Normalised coordinates span 2 per side.
                .map(|&(dx, dy)| affine(x, [1.0, 0.0, 2.0 * dx, 0.0, 1.0, 2.0 * dy]))
                .collect(),
        }
    }
}

/// Resamples `x` through the 2×3 affine map `t` (output → input, normalised coordinates),
/// bilinear, borders reflected.
fn affine(x: &Tensor, t: [f64; 6]) -> Tensor {
    let size = x.size();
    let theta = Tensor::from_slice(&t.map(|v| v as f32))
        .view([1, 2, 3])
        .to_device(x.device())
        .to_kind(x.kind())
        .expand([size[0], 2, 3], false)
        .contiguous();
    let grid = Tensor::affine_grid_generator(&theta, size.as_slice(), false);
    // interpolation 0 = bilinear, padding 2 = reflection.
    x.grid_sampler(&grid, 0, 2, false).to_kind(x.kind())
}

/// Number of copies a list adds per reference.
pub fn copies(augs: &[Augment]) -> usize {
    augs.iter()
        .map(|a| match a {
            Augment::Rotate(_) => 2,
            Augment::Shift(_) => 4,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_list("none").unwrap(), vec![]);
        assert_eq!(parse_list("").unwrap(), vec![]);
        assert_eq!(
            parse_list("rot90, hflip,rotate:10,shift:0.05,rot90").unwrap(),
            vec![Augment::Rot90, Augment::HFlip, Augment::Rotate(10.0), Augment::Shift(0.05)]
        );
        assert!(parse_list(DEFAULT).unwrap().is_empty());
        assert_eq!(names(&parse_list("rot90,rot180,rot270").unwrap()), vec!["rot90", "rot180", "rot270"]);
        for bad in ["spin", "rotate:90", "rotate:x", "shift:0.5", "rotate"] {
            let e = parse_list(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
        assert_eq!(copies(&parse_list("hflip,rotate:5,shift:0.1").unwrap()), 7);
    }

    #[test]
    fn copies_are_the_expected_transforms() {
        let x = Tensor::arange(16, (Kind::Float, tch::Device::Cpu)).view([1, 1, 4, 4]);
        let r = &Augment::Rot180.apply(&x)[0];
        assert_eq!(r.double_value(&[0, 0, 0, 0]), 15.0);
        let h = &Augment::HFlip.apply(&x)[0];
        assert_eq!(h.double_value(&[0, 0, 0, 0]), 3.0);
        // A tiny rotation changes little; a shift by a quarter moves the ramp by one pixel.
        let t = &Augment::Rotate(1.0).apply(&x)[0];
        assert!((t - &x).abs().max().double_value(&[]) < 0.3);
        let ramp = Tensor::arange(8, (Kind::Float, tch::Device::Cpu))
            .view([1, 1, 1, 8])
            .expand([1, 1, 8, 8], false)
            .contiguous();
        let s = &Augment::Shift(0.125).apply(&ramp)[0];
        // Output x samples input x + 1 (interior columns).
        assert!((s.double_value(&[0, 0, 4, 3]) - 4.0).abs() < 1e-4, "{}", s.double_value(&[0, 0, 4, 3]));
        assert_eq!(Augment::Shift(0.1).apply(&x).len(), 4);
    }
}
