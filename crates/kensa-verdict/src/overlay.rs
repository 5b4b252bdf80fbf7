//! Pictures a quality engineer looks at: the anomaly map as a heat overlay on the image, with
//! the outline of the regions above the decision level, and side-by-side panels
//! (image | ground truth | overlay) for `kensa score --overlay` and `kensa eval --report`. The
//! colour map is turbo.

use image::{ImageEncoder, Rgb, RgbImage};
use kensa_core::AnomalyMap;

/// Turbo (Google's perceptually smoother rainbow; their polynomial approximation) for t in
/// [0, 1]: near black → blue → cyan → green → yellow → red → dark red. Unlike jet it has no bright
/// bands that read as edges, and its lightness rises and falls smoothly.
fn heat(t: f32) -> [u8; 3] {
    // Google's coefficients of 1, t, .., t⁵ per channel, as published.
    const R: [f64; 6] = [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943];
    const G: [f64; 6] = [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604];
    const B: [f64; 6] = [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973];
    let t = f64::from(t.clamp(0.0, 1.0));
    let poly = |c: &[f64; 6]| c.iter().rev().fold(0.0, |acc, &k| acc * t + k);
    [R, G, B].map(|c| (poly(&c).clamp(0.0, 1.0) * 255.0).round() as u8)
}

/// [`heat`] at 1024 levels, computed once: what the overlays use (a few times faster than the
/// polynomial per pixel, and the same colours to within one level).
fn heat_lut(t: f32) -> [u8; 3] {
    const LEVELS: usize = 1024;
    static LUT: std::sync::OnceLock<Vec<[u8; 3]>> = std::sync::OnceLock::new();
    let lut = LUT.get_or_init(|| (0..LEVELS).map(|i| heat(i as f32 / (LEVELS - 1) as f32)).collect());
    lut[(t.clamp(0.0, 1.0) * (LEVELS - 1) as f32).round() as usize]
}

/// The image with the map blended in (colour scale 0 .. max(2 × level, map max)), and the
/// outline of `map ≥ level` in white. `map` must have the image's size.
pub fn heat_overlay(img: &RgbImage, map: &AnomalyMap, level: f32) -> RgbImage {
    let (w, h) = (map.width as usize, map.height as usize);
    assert_eq!((img.width() as usize, img.height() as usize), (w, h), "map and image sizes differ");
    let top = map.data.iter().copied().fold(2.0 * level, f32::max).max(1e-6);
    let above: Vec<bool> = map.data.iter().map(|&v| v >= level).collect();
    // Inside the region and all four neighbours too (outside the image counts as not above).
    let inner = |i: usize, x: usize, y: usize| {
        x > 0 && x + 1 < w && y > 0 && y + 1 < h && above[i - 1] && above[i + 1] && above[i - w] && above[i + w]
    };
    let src = img.as_raw();
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let px = if above[i] && !inner(i, x, y) {
                [255, 255, 255]
            } else {
                let c = heat_lut(map.data[i] / top);
                let p = &src[3 * i..3 * i + 3];
                [0, 1, 2].map(|k| ((u16::from(p[k]) + u16::from(c[k])) / 2) as u8)
            };
            out[3 * i..3 * i + 3].copy_from_slice(&px);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("sized to the map")
}

/// Side by side: image | ground truth (white on black; omitted when `None`) | overlay.
pub fn panel(img: &RgbImage, gt: Option<&[bool]>, map: &AnomalyMap, level: f32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let parts = if gt.is_some() { 3 } else { 2 };
    let gap = 4;
    let mut out = RgbImage::from_pixel(parts * w + (parts - 1) * gap, h, Rgb([40, 40, 40]));
    image::imageops::overlay(&mut out, img, 0, 0);
    let mut x0 = w + gap;
    if let Some(gt) = gt {
        let m = RgbImage::from_fn(
            w,
            h,
            |x, y| if gt[(y * w + x) as usize] { Rgb([255, 255, 255]) } else { Rgb([0, 0, 0]) },
        );
        image::imageops::overlay(&mut out, &m, x0 as i64, 0);
        x0 += w + gap;
    }
    image::imageops::overlay(&mut out, &heat_overlay(img, map, level), x0 as i64, 0);
    out
}

/// The map alone in heat colours (same scale as [`heat_overlay`]), regions at `level` outlined.
pub fn heat_map(map: &AnomalyMap, level: f32) -> RgbImage {
    let black = RgbImage::from_pixel(map.width, map.height, Rgb([0, 0, 0]));
    let top = map.data.iter().copied().fold(2.0 * level, f32::max).max(1e-6);
    let mut out = heat_overlay(&black, map, level);
    for (px, v) in out.pixels_mut().zip(&map.data) {
        if px.0 != [255, 255, 255] {
            px.0 = heat_lut(v / top);
        }
    }
    out
}

/// [`panel`] at thumbnail size: the image (area-averaged), its ground truth and map (nearest
/// sample, so map values and the outline level keep their meaning) scaled so that each part's
/// longest side is at most `side` pixels.
pub fn small_panel(img: &RgbImage, gt: Option<&[bool]>, map: &AnomalyMap, level: f32, side: u32) -> RgbImage {
    use image::imageops::{resize, FilterType};
    let (w, h) = (img.width(), img.height());
    let scale = (side as f32 / w.max(h) as f32).min(1.0);
    let (tw, th) = (((w as f32 * scale).round() as u32).max(1), ((h as f32 * scale).round() as u32).max(1));
    let small = resize(img, tw, th, FilterType::Triangle);
    let values =
        image::ImageBuffer::<image::Luma<f32>, _>::from_raw(w, h, map.data.clone()).expect("map and image sizes agree");
    let small_map = AnomalyMap::new(tw, th, resize(&values, tw, th, FilterType::Nearest).into_raw());
    let small_gt = gt.map(|g| {
        let m = image::GrayImage::from_fn(w, h, |x, y| image::Luma([u8::from(g[(y * w + x) as usize])]));
        resize(&m, tw, th, FilterType::Nearest).into_raw().into_iter().map(|v| v > 0).collect::<Vec<bool>>()
    });
    panel(&small, small_gt.as_deref(), &small_map, level)
}

/// JPEG bytes of an image (`quality` 1-100).
pub fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut v = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut v, quality)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .expect("JPEG encoding to memory");
    v
}

/// PNG bytes of an image.
pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut v = Vec::new();
    image::codecs::png::PngEncoder::new(&mut v)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .expect("PNG encoding to memory");
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_pixels_are_red_and_the_region_is_outlined() {
        let img = RgbImage::from_pixel(20, 20, Rgb([100, 100, 100]));
        let mut data = vec![0.0f32; 400];
        for y in 5..10 {
            for x in 5..10 {
                data[y * 20 + x] = 1.0;
            }
        }
        let map = AnomalyMap::new(20, 20, data);
        let o = heat_overlay(&img, &map, 0.5);
        // Inside the region: red dominates; outline pixel: white; far away (0): darkened.
        let inside = o.get_pixel(7, 7).0;
        assert!(inside[0] > inside[2], "{inside:?}");
        assert_eq!(o.get_pixel(5, 7).0, [255, 255, 255]);
        let far = o.get_pixel(15, 15).0;
        assert!(far.iter().all(|&c| c < 75), "{far:?}");
        let p = panel(&img, Some(&vec![false; 400]), &map, 0.5);
        assert_eq!((p.width(), p.height()), (3 * 20 + 8, 20));
        assert!(png(&p).starts_with(&[0x89, b'P', b'N', b'G']));
        // Thumbnails: each part at most 8 px, the hot region still outlined and hot.
        let s = small_panel(&img, Some(&vec![false; 400]), &map, 0.5, 8);
        assert_eq!((s.width(), s.height()), (3 * 8 + 8, 8));
        let outline = (2 * 8 + 8..3 * 8 + 8).flat_map(|x| (0..8).map(move |y| (x, y)));
        assert!(outline.into_iter().any(|(x, y)| s.get_pixel(x, y).0 == [255, 255, 255]), "outline kept");
        assert_eq!(small_panel(&img, None, &map, 0.5, 100).dimensions(), (2 * 20 + 4, 20), "never enlarged");
        assert!(jpeg(&s, 80).starts_with(&[0xff, 0xd8]));
    }

    #[test]
    fn turbo_runs_from_dark_through_green_to_dark_red() {
        let (lo, mid, hi) = (heat(0.0), heat(0.5), heat(1.0));
        assert!(lo.iter().all(|&c| c < 60), "{lo:?}");
        assert!(mid[1] > mid[0] && mid[1] > mid[2] && mid[1] > 200, "{mid:?}");
        assert!(hi[0] > 120 && hi[1] < 30 && hi[2] < 30, "{hi:?}");
        // Clamped outside [0, 1], and continuous: no step between neighbours larger than 16.
        assert_eq!((heat(-1.0), heat(2.0)), (lo, hi));
        let steps: Vec<[u8; 3]> = (0..=255).map(|i| heat(i as f32 / 255.0)).collect();
        for w in steps.windows(2) {
            assert!(w[0].iter().zip(w[1]).all(|(a, b)| a.abs_diff(b) <= 16), "{w:?}");
        }
        // Lightness (Rec. 709 luma) rises to a single peak and falls: no bright bands.
        let luma: Vec<f32> =
            steps.iter().map(|c| 0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32).collect();
        let peak = luma.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert!(luma[..=peak].windows(2).all(|w| w[1] >= w[0] - 1.0), "rises to {peak}");
        assert!(luma[peak..].windows(2).all(|w| w[1] <= w[0] + 1.0), "falls after {peak}");
    }
}
