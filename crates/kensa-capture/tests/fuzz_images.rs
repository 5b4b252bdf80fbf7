//! Property-based fuzzing of image decoding (folder cameras, enrollment, `kensa score`).

use proptest::prelude::*;

fn valid_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn try_load(name: &str, bytes: &[u8]) {
    let p = std::env::temp_dir().join(format!("kensa-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    let _ = kensa_capture::images::load_rgb(&p);
    let _ = std::fs::remove_file(&p);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_are_an_error_not_a_crash(bytes in proptest::collection::vec(any::<u8>(), 0..600), ext in prop::sample::select(vec!["png", "jpg", "bmp", "tiff"])) {
        try_load(&format!("r.{ext}"), &bytes);
    }

    #[test]
    fn mutated_png_never_panics(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut b = valid_png();
        let n = b.len();
        for (i, v) in flips {
            b[i % n] ^= v;
        }
        try_load("m.png", &b);
    }
}

#[test]
fn oversized_dimensions_are_refused() {
    // A PNG header claiming 100000 x 100000 pixels: refused by the size limit, not allocated.
    let mut b = valid_png();
    b[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    b[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let p = std::env::temp_dir().join(format!("kensa-bomb-{}.png", std::process::id()));
    std::fs::write(&p, &b).unwrap();
    let e = kensa_capture::images::load_rgb(&p).unwrap_err().to_string();
    let _ = std::fs::remove_file(&p);
    assert!(e.contains("kensa-bomb"), "{e}");
}
