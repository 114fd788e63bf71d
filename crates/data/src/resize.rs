//! Pillow's `Image.resize(..., BILINEAR)`, ported so pixels match.
//!
//! Pillow resamples with a convolution whose triangle filter widens with the
//! downscale factor (so shrinking averages every source pixel instead of
//! skipping some), one axis at a time: horizontal pass first, then vertical.
//! Coefficients are fixed point with 22 fractional bits and each pass rounds
//! and clips to `u8`. We follow the same steps in the same order, so results
//! equal Pillow's exactly: `tests/transforms.rs` requires every pixel of its
//! Pillow 12.3 goldens to match.

use image::RgbImage;

/// A rectangle of the source image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

impl CropBox {
    /// The whole of a `width` × `height` image.
    pub fn full(width: u32, height: u32) -> Self {
        CropBox {
            left: 0,
            top: 0,
            width,
            height,
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Crops `src` to `crop` and resizes the crop to `out_width` × `out_height`
/// like Pillow's `im.crop(box).resize(size, Image.BILINEAR)`: pixels outside
/// the crop never contribute, as they would not after a real crop.
///
/// Panics if the crop does not lie inside the image or a size is zero.
pub fn crop_resize_bilinear(
    src: &RgbImage,
    crop: CropBox,
    out_width: u32,
    out_height: u32,
) -> RgbImage {
    assert!(
        crop.width > 0 && crop.height > 0 && out_width > 0 && out_height > 0,
        "crop and output sizes must be positive"
    );
    assert!(
        crop.left + crop.width <= src.width() && crop.top + crop.height <= src.height(),
        "crop box {crop:?} outside a {}x{} image",
        src.width(),
        src.height()
    );
    let (out_w, out_h) = (out_width as usize, out_height as usize);
    let (crop_w, crop_h) = (crop.width as usize, crop.height as usize);
    let stride = src.width() as usize * 3;
    let base = crop.top as usize * stride + crop.left as usize * 3;
    let data = src.as_raw();

    let need_horizontal = out_w != crop_w;
    let need_vertical = out_h != crop_h;
    let horizontal = Coefficients::new(crop_w, out_w);
    let mut vertical = Coefficients::new(crop_h, out_h);

    // The horizontal pass only needs the source rows the vertical pass reads.
    let (row_first, row_last) = if need_horizontal {
        let first = vertical.bounds[0].0;
        let (last_min, last_len) = vertical.bounds[out_h - 1];
        (first, last_min + last_len)
    } else {
        (0, crop_h)
    };

    // Intermediate image: `out_w` (or `crop_w`) wide, rows row_first..row_last.
    let (temp, temp_w): (Vec<u8>, usize) = if need_horizontal {
        for bound in &mut vertical.bounds {
            bound.0 -= row_first;
        }
        let rows = row_last - row_first;
        let mut temp = vec![0u8; out_w * rows * 3];
        for (r, out_row) in temp.chunks_exact_mut(out_w * 3).enumerate() {
            let row_start = base + (row_first + r) * stride;
            let row = &data[row_start..row_start + crop_w * 3];
            horizontal_row(row, &horizontal, out_row);
        }
        (temp, out_w)
    } else {
        let mut temp = vec![0u8; crop_w * crop_h * 3];
        for (r, out_row) in temp.chunks_exact_mut(crop_w * 3).enumerate() {
            let row_start = base + r * stride;
            out_row.copy_from_slice(&data[row_start..row_start + crop_w * 3]);
        }
        (temp, crop_w)
    };

    let out = if need_vertical {
        let mut out = vec![0u8; out_w * out_h * 3];
        let row_len = temp_w * 3;
        for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
            let (min, len) = vertical.bounds[y];
            let weights = &vertical.weights[y * vertical.ksize..y * vertical.ksize + len];
            for (x, value) in out_row.iter_mut().enumerate() {
                let mut sum: i32 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in weights.iter().enumerate() {
                    sum += temp[(min + k) * row_len + x] as i32 * w;
                }
                *value = clip8(sum);
            }
        }
        out
    } else {
        temp
    };
    RgbImage::from_raw(out_width, out_height, out).expect("buffer has the output size")
}

/// Resizes the whole image (Pillow's `im.resize(size, Image.BILINEAR)`).
pub fn resize_bilinear(src: &RgbImage, out_width: u32, out_height: u32) -> RgbImage {
    crop_resize_bilinear(
        src,
        CropBox::full(src.width(), src.height()),
        out_width,
        out_height,
    )
}

/// Per output pixel: the first source pixel, how many pixels contribute,
/// and their fixed-point weights (`ksize` slots per output pixel).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        // The bilinear (triangle) filter has support 1, widened when shrinking.
        let support = filter_scale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut float_weights = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // Pillow rounds with `(int)(v + 0.5)`, truncating toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = xmax - xmin;
            let mut total = 0.0;
            for (x, w) in float_weights.iter_mut().enumerate().take(len) {
                *w = triangle((x as f64 + xmin as f64 - center + 0.5) / filter_scale);
                total += *w;
            }
            for x in 0..len {
                let w = if total != 0.0 {
                    float_weights[x] / total
                } else {
                    float_weights[x]
                };
                let fixed = w * (1u32 << PRECISION_BITS) as f64;
                weights[xx * ksize + x] = if fixed < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin, len));
        }
        Coefficients {
            ksize,
            bounds,
            weights,
        }
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn horizontal_row(row: &[u8], coefficients: &Coefficients, out: &mut [u8]) {
    for (xx, pixel) in out.chunks_exact_mut(3).enumerate() {
        let (min, len) = coefficients.bounds[xx];
        let weights = &coefficients.weights[xx * coefficients.ksize..xx * coefficients.ksize + len];
        let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
        for (k, &w) in weights.iter().enumerate() {
            let p = (min + k) * 3;
            sums[0] += row[p] as i32 * w;
            sums[1] += row[p + 1] as i32 * w;
            sums[2] += row[p + 2] as i32 * w;
        }
        pixel[0] = clip8(sums[0]);
        pixel[1] = clip8(sums[1]);
        pixel[2] = clip8(sums[2]);
    }
}

fn clip8(value: i32) -> u8 {
    if value >= (1 << PRECISION_BITS) << 8 {
        255
    } else if value <= 0 {
        0
    } else {
        (value >> PRECISION_BITS) as u8
    }
}
