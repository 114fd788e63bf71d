//! A batch drawn as a PNG grid, each image with its labels written under it.

use std::path::Path;

use candle_core::{DType, Device};
use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::font::{LINE_HEIGHT, draw_text, text_width};
use crate::loader::Batch;
use crate::synth::write_atomically;

/// Layout of a [`show_batch`] grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShowBatchConfig {
    /// Images drawn (the first of the batch).
    pub max_images: usize,
    /// Images per row; about a square grid when `None`.
    pub cols: Option<usize>,
    /// Font pixels per screen pixel; grows with the image size when `None`.
    pub text_scale: Option<u32>,
}

impl Default for ShowBatchConfig {
    fn default() -> Self {
        ShowBatchConfig {
            max_images: 16,
            cols: None,
            text_scale: None,
        }
    }
}

const PAD: u32 = 6;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];

/// Draws the first images of `batch` de-normalized with `mean`/`std`, each
/// captioned with the vocab names of its positive targets (`(none)` for
/// an all-zero target).
pub fn render_batch(
    batch: &Batch,
    vocab: &[String],
    mean: &[f32; 3],
    std: &[f32; 3],
    cfg: &ShowBatchConfig,
) -> Result<RgbImage, DataError> {
    let dims = batch.images.dims().to_vec();
    let [n, 3, size, size_w] = dims[..] else {
        return Err(DataError::Config(format!(
            "show_batch needs images shaped [N, 3, S, S], got {dims:?}"
        )));
    };
    if size != size_w {
        return Err(DataError::Config(format!(
            "show_batch needs square images, got {dims:?}"
        )));
    }
    let n_shown = n.min(cfg.max_images.max(1));
    let images: Vec<f32> = batch
        .images
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| DataError::tensor("reading the batch images", e))?;
    let targets: Vec<Vec<f32>> = batch
        .targets
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec2())
        .map_err(|e| DataError::tensor("reading the batch targets", e))?;
    if targets.len() != n {
        return Err(DataError::Config(format!(
            "batch has {n} images but {} target rows",
            targets.len()
        )));
    }

    let size = size as u32;
    let scale = cfg.text_scale.unwrap_or((size / 128).max(1)).max(1);
    let cols = cfg
        .cols
        .unwrap_or_else(|| (n_shown as f64).sqrt().ceil() as usize)
        .clamp(1, n_shown.max(1)) as u32;
    let rows = (n_shown as u32).div_ceil(cols);
    let captions: Vec<Vec<String>> = targets[..n_shown]
        .iter()
        .map(|row| {
            let names: Vec<&str> = row
                .iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.5)
                .map(|(i, _)| vocab.get(i).map_or("?", String::as_str))
                .collect();
            let text = if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(" ")
            };
            wrap(&text, size, scale)
        })
        .collect();
    let caption_lines = captions.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let cell_w = size + PAD;
    let cell_h = size + PAD + caption_lines * LINE_HEIGHT * scale;
    let mut grid = RgbImage::from_pixel(
        cols * cell_w + PAD,
        rows * cell_h + PAD,
        image::Rgb(BACKGROUND),
    );

    let plane = (size * size) as usize;
    for (i, caption) in captions.iter().enumerate() {
        let (col, row) = (i as u32 % cols, i as u32 / cols);
        let (x0, y0) = (PAD + col * cell_w, PAD + row * cell_h);
        let pixels = &images[i * 3 * plane..(i + 1) * 3 * plane];
        for y in 0..size {
            for x in 0..size {
                let p = (y * size + x) as usize;
                let rgb: [u8; 3] = std::array::from_fn(|c| {
                    let value = (pixels[c * plane + p] * std[c] + mean[c]) * 255.0;
                    value.round().clamp(0.0, 255.0) as u8
                });
                grid.put_pixel(x0 + x, y0 + y, image::Rgb(rgb));
            }
        }
        for (line_no, line) in caption.iter().enumerate() {
            let y = y0 + size + 3 + line_no as u32 * LINE_HEIGHT * scale;
            draw_text(&mut grid, x0, y, line, scale, INK);
        }
    }
    Ok(grid)
}

/// Renders `batch` (see [`render_batch`]) and writes it to `out` as PNG.
pub fn show_batch(
    batch: &Batch,
    vocab: &[String],
    mean: &[f32; 3],
    std: &[f32; 3],
    cfg: &ShowBatchConfig,
    out: &Path,
) -> Result<(), DataError> {
    let grid = render_batch(batch, vocab, mean, std, cfg)?;
    let mut bytes = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| DataError::Encode {
            path: out.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomically(out, &bytes)
}

/// Splits `text` into lines no wider than `width` pixels, breaking at
/// spaces, and a word longer than a line into pieces.
fn wrap(text: &str, width: u32, scale: u32) -> Vec<String> {
    let fits = |s: &str| text_width(s, scale) <= width;
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_string()
        } else {
            format!("{line} {word}")
        };
        if fits(&candidate) {
            line = candidate;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        let mut rest: Vec<char> = word.chars().collect();
        while !fits(&rest.iter().collect::<String>()) && rest.len() > 1 {
            let mut take = rest.len() - 1;
            while take > 1 && !fits(&rest[..take].iter().collect::<String>()) {
                take -= 1;
            }
            lines.push(rest[..take].iter().collect());
            rest.drain(..take);
        }
        line = rest.into_iter().collect();
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrap_breaks_at_spaces_and_splits_long_words() {
        // 32 px at scale 1 holds 5 characters (5 * 6 - 1 = 29 px).
        assert_eq!(wrap("ab cd efghijklm", 32, 1), ["ab cd", "efghi", "jklm"]);
        assert_eq!(wrap("", 32, 1), [""]);
        assert_eq!(wrap("abcde", 32, 1), ["abcde"]);
    }
}
