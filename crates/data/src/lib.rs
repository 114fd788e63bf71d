//! `multilabel-data`: from a PASCAL-style folder to augmented candle
//! batches, with fastai's DataBlock semantics (book chapter 6).
//!
//! - [`DatasetConfig`] → [`Dataset::load`]: reads `train.csv` (polars),
//!   checks every image file, builds the sorted vocab from the training rows
//!   and splits rows into training and validation [`Item`]s.
//! - [`TransformConfig`] + [`Augment`]: fastai's RandomResizedCrop for
//!   training, squash-and-centre-crop for validation, with a port of
//!   Pillow's bilinear resampling ([`resize`]) so pixels match fastai's.
//! - [`Loader`] with a [`LoaderConfig`]: decodes and augments in parallel
//!   (rayon) behind a bounded queue and yields [`Batch`]es of
//!   `[N, 3, S, S]` images and `[N, C]` multi-hot targets. The same seed
//!   gives the same batches whatever the thread count.
//! - [`synth`]: writes a small learnable dataset in the same layout;
//!   [`show_batch`] draws a batch as a captioned PNG grid;
//!   [`download_pascal_2007`] / [`download_archive`] fetch, verify and
//!   extract archives.
//!
//! All failures are a [`DataError`] naming the file, row, column or URL.
//!
//! ```
//! use candle_core::Device;
//! use multilabel_data::{
//!     Dataset, DatasetConfig, Loader, LoaderConfig, SynthConfig, TransformConfig, synth,
//! };
//!
//! # fn main() -> Result<(), multilabel_data::DataError> {
//! let dir = std::env::temp_dir().join(format!("multilabel-doc-{}", std::process::id()));
//! synth(&SynthConfig { out: dir.clone(), n_train: 16, n_valid: 8, classes: 3, seed: 1, image_size: None })?;
//!
//! let data = Dataset::load(&DatasetConfig::new(&dir))?;
//! let transform = TransformConfig { size: 32, ..Default::default() };
//! let loader = Loader::new(
//!     data.train().to_vec(),
//!     data.vocab().len(),
//!     transform,
//!     LoaderConfig::train(8, 42),
//!     Device::Cpu,
//! );
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     assert_eq!(batch.images.dims(), &[8, 3, 32, 32]);
//!     assert_eq!(batch.targets.dims(), &[8, 3]);
//! }
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

mod dataset;
mod decode;
mod download;
mod error;
pub mod font;
mod loader;
pub mod resize;
mod show;
mod synth;
mod transform;

pub use dataset::{Dataset, DatasetConfig, Item, SkippedImage, SplitConfig, random_split};
pub use decode::{MAX_DECODE_BYTES, MAX_IMAGE_SIDE, decode_rgb, decode_rgb_bytes};
pub use download::{
    DownloadEvent, PASCAL_2007_MD5, PASCAL_2007_SIZE, PASCAL_2007_URL, VERIFIED_MARKER,
    default_cache_dir, download_archive, download_pascal_2007,
};
pub use error::DataError;
pub use loader::{Batch, CACHE_MAX_BYTES, EpochIter, Loader, LoaderConfig, item_rng};
pub use show::{ShowBatchConfig, render_batch, show_batch};
pub use synth::{SynthConfig, SynthSummary, synth};
pub use transform::{
    Augment, IMAGENET_MEAN, IMAGENET_STD, TransformConfig, load_image_for_eval, normalize_into,
    normalize_on_device, random_resized_crop_box, transform_image, valid_image, valid_xtra,
};
