//! Helpers shared by the integration tests: tiny datasets written to
//! temporary folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

/// The committed fixtures folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A `width` × `height` PNG whose pixels encode their coordinates and `tag`,
/// so tests can tell images apart after decoding.
pub fn write_png(path: &Path, width: u32, height: u32, tag: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let image = RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, tag])
    });
    image.save(path).unwrap();
}

/// Writes `root/train.csv` with `csv` and a PNG for every name in `images`.
pub fn make_dataset(root: &Path, csv: &str, images: &[&str]) {
    std::fs::create_dir_all(root.join("train")).unwrap();
    std::fs::write(root.join("train.csv"), csv).unwrap();
    for (i, name) in images.iter().enumerate() {
        write_png(&root.join("train").join(name), 40 + i as u32, 30, i as u8);
    }
}
