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
    if !jpeg_is_complete(bytes) {
        // zune-jpeg fills a cut-off scan with grey and reports success;
        // Pillow refuses such files ("image file is truncated"), and so do we.
        return Err(DataError::Decode {
            path: path.to_path_buf(),
            message: "the JPEG data stops before its end-of-image marker (truncated file)".into(),
        });
    }
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

/// For a JPEG, whether the entropy-coded data is followed by an end-of-image
/// marker; `true` for anything that is not a JPEG.
///
/// Marker segments are skipped by their lengths up to the first
/// start-of-scan, so an EXIF thumbnail's own markers cannot be mistaken for
/// the main image's. After it, `FF D9` can only be the end-of-image marker:
/// inside scan data a literal `FF` byte is always followed by `00` or a
/// restart marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return true;
    }
    let mut i = 2;
    loop {
        while i < bytes.len() && bytes[i] == 0xFF && bytes.get(i + 1) == Some(&0xFF) {
            i += 1; // fill bytes
        }
        if i + 1 >= bytes.len() || bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        i += 2;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        if i + 2 > bytes.len() {
            return false;
        }
        let length = u16::from_be_bytes([bytes[i], bytes[i + 1]]) as usize;
        if marker == 0xDA {
            let scan = bytes.get(i + length..).unwrap_or(&[]);
            return scan.windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += length;
    }
}
