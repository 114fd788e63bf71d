//! fastai's item transforms for this recipe: RandomResizedCrop for
//! training, squash-and-centre-crop for validation, optional flip, then
//! ImageNet normalization into CHW `f32`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::decode::decode_rgb;
use crate::resize::{CropBox, crop_resize_bilinear};

/// ImageNet channel means, the statistics the pretrained ResNets expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The aspect ratio range of fastai's RandomResizedCrop.
const RATIO_RANGE: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// Item transform settings (fastai's `RandomResizedCrop(128, min_scale=0.35)`
/// plus normalization by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformConfig {
    /// Output side in pixels: every image becomes `size` × `size`.
    pub size: usize,
    /// Smallest fraction of the image area a training crop covers.
    pub min_scale: f64,
    /// Flip training images horizontally with probability one half.
    pub flip: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            size: 128,
            min_scale: 0.35,
            flip: false,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl TransformConfig {
    /// Checks the values a transform relies on.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.size == 0 || self.size > 4096 {
            return Err(DataError::Config(format!(
                "image size must be in 1..=4096, got {}",
                self.size
            )));
        }
        if !(self.min_scale > 0.0 && self.min_scale <= 1.0) {
            return Err(DataError::Config(format!(
                "min_scale must be in (0, 1], got {}",
                self.min_scale
            )));
        }
        if self
            .std
            .iter()
            .any(|&s| s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater))
        {
            return Err(DataError::Config(format!(
                "normalization std must be positive, got {:?}",
                self.std
            )));
        }
        Ok(())
    }
}

/// Which item transform to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// RandomResizedCrop (and the optional flip).
    Train,
    /// Squash the whole image to `size + xtra`, then centre-crop `size`.
    Valid,
}

/// fastai's extra validation margin: `ceil(size * 0.14 / 8) * 8` (24 at 128).
pub fn valid_xtra(size: usize) -> usize {
    (size as f64 * 0.14 / 8.0).ceil() as usize * 8
}

/// The crop fastai's RandomResizedCrop picks for a `width` × `height` image.
///
/// Up to ten tries of an area fraction uniform in `[min_scale, 1]` and a
/// log-uniform aspect ratio in `[3/4, 4/3]`, sides rounded half to even like
/// Python's `round`; the first crop that fits is placed uniformly. If none
/// fits, a centred crop with the aspect ratio clamped to the range.
pub fn random_resized_crop_box<R: Rng + ?Sized>(
    width: u32,
    height: u32,
    min_scale: f64,
    rng: &mut R,
) -> CropBox {
    let (w, h) = (width as f64, height as f64);
    let (log_lo, log_hi) = (RATIO_RANGE.0.ln(), RATIO_RANGE.1.ln());
    for _ in 0..10 {
        let area = uniform(rng, min_scale, 1.0) * w * h;
        let ratio = uniform(rng, log_lo, log_hi).exp();
        let crop_w = (area * ratio).sqrt().round_ties_even() as u32;
        let crop_h = (area / ratio).sqrt().round_ties_even() as u32;
        if crop_w <= width && crop_h <= height && crop_w > 0 && crop_h > 0 {
            let left = rng.random_range(0..=width - crop_w);
            let top = rng.random_range(0..=height - crop_h);
            return CropBox {
                left,
                top,
                width: crop_w,
                height: crop_h,
            };
        }
    }
    let (crop_w, crop_h) = if w / h < RATIO_RANGE.0 {
        (width, (w / RATIO_RANGE.0) as u32)
    } else if w / h > RATIO_RANGE.1 {
        ((h * RATIO_RANGE.1) as u32, height)
    } else {
        (width, height)
    };
    // `w / (3/4)` exceeds `w` but stays within `h` here; clamp anyway so a
    // rounding quirk can never produce a box outside the image.
    let (crop_w, crop_h) = (crop_w.clamp(1, width), crop_h.clamp(1, height));
    CropBox {
        left: (width - crop_w) / 2,
        top: (height - crop_h) / 2,
        width: crop_w,
        height: crop_h,
    }
}

/// Applies the item transform to a decoded image, giving `size` × `size`
/// RGB. `rng` drives the crop and flip; validation does not use it.
pub fn transform_image<R: Rng + ?Sized>(
    image: &RgbImage,
    transform: &TransformConfig,
    augment: Augment,
    rng: &mut R,
) -> RgbImage {
    let size = transform.size as u32;
    match augment {
        Augment::Train => {
            let crop =
                random_resized_crop_box(image.width(), image.height(), transform.min_scale, rng);
            let mut out = crop_resize_bilinear(image, crop, size, size);
            if transform.flip && rng.random_bool(0.5) {
                image::imageops::flip_horizontal_in_place(&mut out);
            }
            out
        }
        Augment::Valid => valid_image(image, transform.size),
    }
}

/// fastai's validation transform: squash to `size + xtra`, centre-crop `size`.
pub fn valid_image(image: &RgbImage, size: usize) -> RgbImage {
    let big = (size + valid_xtra(size)) as u32;
    let offset = (big - size as u32) / 2;
    let squashed = crop_resize_bilinear(
        image,
        CropBox::full(image.width(), image.height()),
        big,
        big,
    );
    image::imageops::crop_imm(&squashed, offset, offset, size as u32, size as u32).to_image()
}

/// Writes `image` as normalized CHW floats, `(x / 255 - mean) / std`, into
/// `out` (length `3 * width * height`).
pub fn normalize_into(image: &RgbImage, mean: &[f32; 3], std: &[f32; 3], out: &mut [f32]) {
    let plane = (image.width() * image.height()) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer has the wrong length");
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| mean[c] / std[c]);
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    for (i, pixel) in image.as_raw().chunks_exact(3).enumerate() {
        red[i] = pixel[0] as f32 * scale[0] - shift[0];
        green[i] = pixel[1] as f32 * scale[1] - shift[1];
        blue[i] = pixel[2] as f32 * scale[2] - shift[2];
    }
}

/// Writes `image` as CHW `u8` pixels into `out` (length `3 * width * height`).
pub(crate) fn chw_into(image: &RgbImage, out: &mut [u8]) {
    let plane = (image.width() * image.height()) as usize;
    debug_assert_eq!(out.len(), 3 * plane, "output buffer has the wrong length");
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    for (i, pixel) in image.as_raw().chunks_exact(3).enumerate() {
        red[i] = pixel[0];
        green[i] = pixel[1];
        blue[i] = pixel[2];
    }
}

/// Normalizes `[N, 3, H, W]` `u8` pixels on their device into `f32`,
/// `x · 1/(255·std) − mean/std` per channel: the same two `f32` operations,
/// in the same order, as [`normalize_into`], so the results are equal to the bit.
pub fn normalize_on_device(
    pixels: &Tensor,
    mean: &[f32; 3],
    std: &[f32; 3],
) -> candle_core::Result<Tensor> {
    let device = pixels.device();
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| mean[c] / std[c]);
    let scale = Tensor::from_slice(&scale, (1, 3, 1, 1), device)?;
    let shift = Tensor::from_slice(&shift, (1, 3, 1, 1), device)?;
    pixels
        .to_dtype(candle_core::DType::F32)?
        .broadcast_mul(&scale)?
        .broadcast_sub(&shift)
}

/// Loads one image with the validation transform, as `[3, size, size]` on
/// the CPU: what `predict` feeds the model.
pub fn load_image_for_eval(path: &Path, transform: &TransformConfig) -> Result<Tensor, DataError> {
    transform.validate()?;
    let image = decode_rgb(path)?;
    let out = valid_image(&image, transform.size);
    let mut data = vec![0f32; 3 * transform.size * transform.size];
    normalize_into(&out, &transform.mean, &transform.std, &mut data);
    Tensor::from_vec(data, (3, transform.size, transform.size), &Device::Cpu)
        .map_err(|e| DataError::tensor(format!("building the tensor for {}", path.display()), e))
}

/// Python's `random.uniform(a, b)`: `a + (b - a) * random()`.
fn uniform<R: Rng + ?Sized>(rng: &mut R, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.random::<f64>()
}
