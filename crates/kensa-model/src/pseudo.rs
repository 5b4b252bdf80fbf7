//! Pseudo-normal and pseudo-anomalous images made from references alone, for calibration.
//! Nothing here knows any product: augmentations are small generic pose and light changes, and
//! defects are generic spots, scratches and cut-paste patches.

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::Rng;

/// A small random change of pose (zoom in by 2-8 %, rotation up to ±2°, and a shift within
/// what the zoom leaves) and light (±5 %). The view always stays inside the image, so no
/// artificial border appears (a replicated or black border would itself look anomalous).
pub fn augment<R: Rng>(img: &RgbImage, r: &mut R) -> RgbImage {
    let (w, h) = img.dimensions();
    let zoom: f32 = r.random_range(1.02..1.08);
    let ang = r.random_range(-2.0f32..2.0).to_radians();
    let gain = r.random_range(0.95..1.05);
    let (s, c) = ang.sin_cos();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    // Room left for a shift once the rotated, zoomed view fits inside the image.
    let reach = (c.abs() + s.abs()) / zoom;
    let room_x = (cx * (1.0 - reach)).max(0.0);
    let room_y = (cy * (1.0 - reach)).max(0.0);
    let dx = if room_x > 0.0 { r.random_range(-room_x..room_x) } else { 0.0 };
    let dy = if room_y > 0.0 { r.random_range(-room_y..room_y) } else { 0.0 };
    RgbImage::from_fn(w, h, |x, y| {
        // Inverse map: output pixel ← source pixel.
        let (ox, oy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = (c * ox + s * oy) / zoom + cx + dx;
        let sy = (-s * ox + c * oy) / zoom + cy + dy;
        let p = sample_bilinear(img, sx - 0.5, sy - 0.5);
        Rgb(p.map(|v| (v * gain).clamp(0.0, 255.0) as u8))
    })
}

fn sample_bilinear(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = img.dimensions();
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let g = |xx, yy| img.get_pixel(xx, yy).0.map(|v| v as f32);
    let (a, b, c, d) = (g(x0, y0), g(x1, y0), g(x0, y1), g(x1, y1));
    [0, 1, 2].map(|i| {
        a[i] * (1.0 - fx) * (1.0 - fy) + b[i] * fx * (1.0 - fy) + c[i] * (1.0 - fx) * fy + d[i] * fx * fy
    })
}

/// Adds one synthetic defect (spot, scratch or a cut-paste patch from `donor`); returns the
/// image and its exact mask.
pub fn defect<R: Rng>(img: &RgbImage, donor: &RgbImage, r: &mut R) -> (RgbImage, GrayImage) {
    let mut out = img.clone();
    let (w, h) = img.dimensions();
    let side = w.min(h) as f32;
    let mut mask = GrayImage::new(w, h);
    let centre = |r: &mut R| (r.random_range(0.2..0.8) * w as f32, r.random_range(0.2..0.8) * h as f32);
    let colour = |r: &mut R| -> [f32; 3] {
        match r.random_range(0..3) {
            0 => [r.random_range(0.0..40.0); 3],
            1 => [r.random_range(215.0..255.0); 3],
            _ => [r.random_range(0.0..255.0), r.random_range(0.0..255.0), r.random_range(0.0..255.0)],
        }
    };
    match r.random_range(0..3) {
        0 => {
            let (cx, cy) = centre(r);
            let (rx, ry) = (side * r.random_range(0.02..0.05), side * r.random_range(0.02..0.05));
            let col = colour(r);
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    if ((px - cx) / rx).powi(2) + ((py - cy) / ry).powi(2) <= 1.0 {
                        blend(&mut out, x, y, col, 0.9);
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
            }
        }
        1 => {
            let (x0, y0) = centre(r);
            let len = side * r.random_range(0.1..0.25);
            let a = r.random_range(0.0..std::f32::consts::TAU);
            let (x1, y1) = (x0 + a.cos() * len, y0 + a.sin() * len);
            let half = (side / 128.0).max(1.0) * r.random_range(0.8..1.5);
            let col = colour(r);
            for y in 0..h {
                for x in 0..w {
                    let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                    let (dx, dy) = (x1 - x0, y1 - y0);
                    let t = (((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
                    if ((px - x0 - t * dx).powi(2) + (py - y0 - t * dy).powi(2)).sqrt() <= half {
                        blend(&mut out, x, y, col, 0.85);
                        mask.put_pixel(x, y, Luma([255]));
                    }
                }
            }
        }
        _ => {
            let ps = (side * r.random_range(0.06..0.14)) as u32;
            let ps = ps.max(2);
            let (dw, dh) = donor.dimensions();
            let sx = r.random_range(0..dw.saturating_sub(ps).max(1));
            let sy = r.random_range(0..dh.saturating_sub(ps).max(1));
            let (tx, ty) = centre(r);
            let (tx, ty) = ((tx as u32).min(w.saturating_sub(ps)), (ty as u32).min(h.saturating_sub(ps)));
            for y in 0..ps.min(dh - sy).min(h - ty) {
                for x in 0..ps.min(dw - sx).min(w - tx) {
                    let p = *donor.get_pixel(sx + x, sy + y);
                    if p != *out.get_pixel(tx + x, ty + y) {
                        mask.put_pixel(tx + x, ty + y, Luma([255]));
                    }
                    out.put_pixel(tx + x, ty + y, p);
                }
            }
        }
    }
    (out, mask)
}

fn blend(img: &mut RgbImage, x: u32, y: u32, c: [f32; 3], alpha: f32) {
    let p = img.get_pixel_mut(x, y);
    for i in 0..3 {
        p.0[i] = (c[i] * alpha + p.0[i] as f32 * (1.0 - alpha)).clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn defects_change_pixels_only_inside_their_mask() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let img = RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 3) as u8, (y * 3) as u8, 100]));
        let donor = RgbImage::from_fn(64, 64, |x, y| Rgb([200, (x + y) as u8, 10]));
        for _ in 0..20 {
            let (out, mask) = defect(&img, &donor, &mut r);
            let marked = mask.pixels().filter(|p| p.0[0] == 255).count();
            assert!(marked > 0);
            for (x, y, p) in out.enumerate_pixels() {
                if mask.get_pixel(x, y).0[0] == 0 {
                    assert_eq!(p, img.get_pixel(x, y));
                }
            }
        }
    }

    #[test]
    fn augment_keeps_size_and_changes_little() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let img = RgbImage::from_fn(64, 64, |_, _| Rgb([120, 120, 120]));
        let a = augment(&img, &mut r);
        assert_eq!(a.dimensions(), (64, 64));
        let d: i32 = a.pixels().map(|p| (p.0[0] as i32 - 120).abs()).max().unwrap();
        assert!(d <= 7, "{d}");
    }
}
