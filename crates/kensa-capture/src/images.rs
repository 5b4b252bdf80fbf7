//! Image files: listing a folder and decoding with limits and clear errors.

use crate::CaptureError;
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Image extensions read from folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Largest image side accepted from files (a guard against decompression bombs).
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Image errors are [`CaptureError::Image`] (the crate's one error enum).
pub use crate::CaptureError as ImageError;

/// Image files directly inside `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| CaptureError::Image { path: dir.to_path_buf(), msg: format!("cannot list folder: {e}") })?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Decodes an image file to RGB8, with a clear error naming the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let err = |msg: String| CaptureError::Image { path: path.to_path_buf(), msg };
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| err(format!("cannot open: {e}")))?
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| err(format!("cannot decode: {e}")))?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("kensa-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.png");
        std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("cannot decode"), "{e}");
        image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
        std::fs::write(dir.join("notes.txt"), "x").unwrap();
        let files = list_images(&dir).unwrap();
        assert_eq!(
            files.iter().map(|f| f.file_name().unwrap().to_str().unwrap()).collect::<Vec<_>>(),
            ["a.png", "bad.png"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
