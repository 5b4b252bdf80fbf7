//! Pictures a quality engineer looks at: the anomaly map as a heat overlay on the image, with
//! the outline of the regions above the decision level, and side-by-side panels
//! (image | ground truth | overlay) for `kensa score --overlay` and `kensa eval --report`.

use image::{ImageEncoder, Rgb, RgbImage};
use kensa_core::AnomalyMap;

/// Jet-like colour for t in [0, 1]: blue → cyan → yellow → red.
fn heat(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * t - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * t - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * t - 1.0).abs()).clamp(0.0, 1.0);
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// The image with the map blended in (colour scale 0 .. max(2 × level, map max)), and the
/// outline of `map ≥ level` in white. `map` must have the image's size.
pub fn heat_overlay(img: &RgbImage, map: &AnomalyMap, level: f32) -> RgbImage {
    let (w, h) = (map.width, map.height);
    assert_eq!((img.width(), img.height()), (w, h), "map and image sizes differ");
    let top = map.data.iter().copied().fold(2.0 * level, f32::max).max(1e-6);
    let mut out = RgbImage::new(w, h);
    let above = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && map.data[(y as u32 * w + x as u32) as usize] >= level
    };
    for y in 0..h {
        for x in 0..w {
            let v = map.data[(y * w + x) as usize];
            let c = heat(v / top);
            let p = img.get_pixel(x, y).0;
            let a = 0.5;
            let mut px = [0u8; 3];
            for i in 0..3 {
                px[i] = (p[i] as f32 * (1.0 - a) + c[i] as f32 * a) as u8;
            }
            let (xi, yi) = (x as i64, y as i64);
            if above(xi, yi) && !(above(xi - 1, yi) && above(xi + 1, yi) && above(xi, yi - 1) && above(xi, yi + 1)) {
                px = [255, 255, 255];
            }
            out.put_pixel(x, y, Rgb(px));
        }
    }
    out
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
            px.0 = heat(v / top);
        }
    }
    out
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
        // Inside the region: red dominates; outline pixel: white; far away: blue tint.
        let inside = o.get_pixel(7, 7).0;
        assert!(inside[0] > inside[2], "{inside:?}");
        assert_eq!(o.get_pixel(5, 7).0, [255, 255, 255]);
        let far = o.get_pixel(15, 15).0;
        assert!(far[2] > far[0], "{far:?}");
        let p = panel(&img, Some(&vec![false; 400]), &map, 0.5);
        assert_eq!((p.width(), p.height()), (3 * 20 + 8, 20));
        assert!(png(&p).starts_with(&[0x89, b'P', b'N', b'G']));
    }
}
