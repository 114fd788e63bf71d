//! Decoding image files into 8-bit RGB, with limits against decompression
//! bombs.

use std::io::Cursor;
use std::path::Path;

use image::{ImageError, ImageReader, Limits, RgbImage};

use crate::DataError;

/// Largest accepted width or height. PASCAL images are about 500 px; a
/// side beyond this is far more likely a hostile or broken file than a
/// photograph anyone wants to train on at 128 px.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Most bytes a decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Reads and decodes a JPEG or PNG file into RGB. Grayscale, palette, CMYK
/// and alpha images are converted (alpha is dropped, like Pillow's
/// `convert('RGB')`).
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::io(path, source))?;
    decode_rgb_bytes(&bytes, path)
}

/// Like [`decode_rgb`] on bytes already in memory; `path` only names them
/// in errors.
pub fn decode_rgb_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage, DataError> {
    if bytes.is_empty() {
        return Err(DataError::EmptyImage {
            path: path.to_path_buf(),
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| DataError::io(path, source))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader.decode().map_err(|err| match err {
        ImageError::Limits(limit) => DataError::ImageTooLarge {
            path: path.to_path_buf(),
            message: limit.to_string(),
        },
        other => DataError::Decode {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })?;
    Ok(image.into_rgb8())
}
