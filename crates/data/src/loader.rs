//! Batches of augmented images as candle tensors, decoded in parallel behind
//! a bounded prefetch queue.
//!
//! The producer thread also moves each batch to the device (as `u8`
//! pixels, normalized there): on a GPU the upload of batch k+1 (which for
//! pageable host memory can wait for the device to finish what is queued)
//! then overlaps step k instead of stalling the training thread.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::DataError;
use crate::dataset::Item;
use crate::decode::decode_rgb;
use crate::transform::{Augment, TransformConfig, chw_into, normalize_on_device, transform_image};

/// How a [`Loader`] groups, orders and augments items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle the order each epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    pub augment: Augment,
    /// Seeds the shuffle and every item's crop. Batches depend only on
    /// `seed`, the epoch and the items, never on the thread count.
    pub seed: u64,
    /// Worker threads for decoding; `None` uses rayon's global pool (one per
    /// core).
    pub threads: Option<usize>,
    /// Finished batches waiting in the queue. Memory stays at about
    /// `prefetch + 2` batches (plus the cache, see `cache`).
    pub prefetch: usize,
    /// Keep each batch's decoded pixels for later epochs, where the batches
    /// are the same every epoch (the validation transform in dataset
    /// order) and all of them fit in [`CACHE_MAX_BYTES`]; ignored
    /// otherwise. For a loader that runs several epochs, such as
    /// validation during training; a single pass gains nothing from it.
    #[serde(default)]
    pub cache: bool,
}

impl LoaderConfig {
    /// fastai's training loader: shuffled, last partial batch dropped,
    /// RandomResizedCrop.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: true,
            augment: Augment::Train,
            seed,
            threads: None,
            prefetch: 2,
            cache: false,
        }
    }

    /// fastai's validation loader: dataset order, last partial batch kept,
    /// squash and centre crop; decoded batches kept between epochs (see
    /// `cache`).
    pub fn valid(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            augment: Augment::Valid,
            seed: 0,
            threads: None,
            prefetch: 2,
            cache: true,
        }
    }
}

/// One batch: normalized images `[N, 3, S, S]`, multi-hot targets `[N, C]`
/// (both `f32` on the loader's device) and each row's position in the
/// loader's item list.
///
/// The images travel to the device as `u8` pixels (a quarter of the bytes
/// of `f32`) and are normalized there, with the same `f32` arithmetic as
/// [`normalize_into`](crate::normalize_into): the values are the same to
/// the bit on every device.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Tensor,
    pub targets: Tensor,
    pub indices: Vec<usize>,
}

/// Turns a list of items into batches, epoch by epoch.
///
/// With [`LoaderConfig::cache`] (as [`LoaderConfig::valid`] sets it), a
/// loader whose batches are the same every epoch (the validation transform,
/// dataset order) keeps each batch's decoded `u8` pixels after the first
/// epoch that makes it, so later epochs skip reading, decoding and resizing
/// (for PASCAL's 2,510 validation images at 224 px, 378 MB, and about 3 s
/// of a 2-core machine per epoch); the batches are the same values either
/// way. Not when the pixels would pass [`CACHE_MAX_BYTES`].
pub struct Loader {
    items: Arc<Vec<Item>>,
    n_classes: usize,
    transform: TransformConfig,
    cfg: LoaderConfig,
    device: Device,
    pool: Option<Arc<rayon::ThreadPool>>,
    invalid: Option<String>,
    cache: Option<Cache>,
}

/// Most bytes of decoded pixels a [`Loader`] keeps between epochs.
pub const CACHE_MAX_BYTES: usize = 1 << 30;

/// Each batch's decoded pixels and targets, by batch number, once made.
type Cache = Arc<Mutex<Vec<Option<Arc<RawBatch>>>>>;

impl Loader {
    /// A loader over `items`, whose labels index a vocab of `n_classes`.
    /// An invalid configuration is reported by the first batch of
    /// [`Loader::epoch`].
    pub fn new(
        items: Vec<Item>,
        n_classes: usize,
        transform: TransformConfig,
        cfg: LoaderConfig,
        device: Device,
    ) -> Loader {
        let invalid = validate(&items, n_classes, &transform, &cfg).err();
        // A pool that cannot be built (no threads left) falls back to the
        // global one: slower, but the batches are the same.
        let pool = cfg.threads.and_then(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .thread_name(|i| format!("multilabel-data-{i}"))
                .build()
                .ok()
                .map(Arc::new)
        });
        // Batches that are the same every epoch: no randomness in the
        // transform, none in the order.
        let fixed = cfg.augment == Augment::Valid && !cfg.shuffle;
        let bytes = items
            .len()
            .saturating_mul(3 * transform.size * transform.size);
        let batches = items.len().div_ceil(cfg.batch_size.max(1));
        let cache = (cfg.cache && invalid.is_none() && fixed && bytes <= CACHE_MAX_BYTES)
            .then(|| Arc::new(Mutex::new(vec![None; batches])));
        Loader {
            items: Arc::new(items),
            n_classes,
            transform,
            cfg,
            device,
            pool,
            invalid,
            cache,
        }
    }

    /// Whether this loader keeps decoded batches between epochs (see
    /// [`Loader`]).
    pub fn caches(&self) -> bool {
        self.cache.is_some()
    }

    /// Batches per epoch.
    pub fn n_batches(&self) -> usize {
        let bs = self.cfg.batch_size.max(1);
        let n = self.items.len();
        if self.cfg.drop_last {
            n / bs
        } else {
            n.div_ceil(bs)
        }
    }

    /// Items in the loader (some may be dropped each epoch by `drop_last`).
    pub fn n_items(&self) -> usize {
        self.items.len()
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Width of the target rows.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// The device batches are delivered to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn transform(&self) -> &TransformConfig {
        &self.transform
    }

    /// The item positions of each batch of `epoch`, in order.
    pub fn batch_plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut shuffle_rng(self.cfg.seed, epoch));
        }
        let bs = self.cfg.batch_size.max(1);
        order
            .chunks(bs)
            .filter(|chunk| !self.cfg.drop_last || chunk.len() == bs)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The batches of one epoch. Decoding starts at once on a background
    /// thread and runs at most `prefetch` batches ahead; dropping the
    /// iterator stops it.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let plan = self.batch_plan(epoch);
        let remaining = plan.len();
        let (tx, rx) = bounded(self.cfg.prefetch.max(1));
        let job = Job {
            items: Arc::clone(&self.items),
            n_classes: self.n_classes,
            transform: self.transform.clone(),
            augment: self.cfg.augment,
            seed: self.cfg.seed,
            epoch,
            device: self.device.clone(),
        };
        let pool = self.pool.clone();
        let cache = self.cache.clone();
        let handle = match &self.invalid {
            Some(message) => {
                // Report the configuration error as the epoch's only item.
                let _ = tx.send(Err(DataError::Config(message.clone())));
                None
            }
            None => std::thread::Builder::new()
                .name("multilabel-data-loader".into())
                .spawn(move || produce(job, plan, pool, cache, tx))
                .ok(),
        };
        EpochIter {
            rx: Some(rx),
            handle,
            remaining: if self.invalid.is_some() { 1 } else { remaining },
        }
    }
}

/// The batches of one epoch; see [`Loader::epoch`].
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let received = self.rx.as_ref()?.recv();
        self.remaining -= 1;
        match received {
            Ok(Ok(batch)) => Some(Ok(batch)),
            Ok(Err(err)) => {
                // Nothing useful follows an error: end the epoch after it.
                self.remaining = 0;
                Some(Err(err))
            }
            Err(_) => {
                self.remaining = 0;
                Some(Err(DataError::LoaderStopped))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, so it
        // stops after the batch in hand.
        self.rx.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The random generator for one item's augmentation: a function of the
/// seed, the epoch and the item's position only.
pub fn item_rng(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    rng_from_words([seed, epoch as u64, position as u64, 0x6974_656d])
}

fn shuffle_rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    rng_from_words([seed, epoch as u64, u64::MAX, 0x7368_7566])
}

fn rng_from_words(words: [u64; 4]) -> ChaCha8Rng {
    let mut seed = [0u8; 32];
    for (chunk, word) in seed.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(seed)
}

fn validate(
    items: &[Item],
    n_classes: usize,
    transform: &TransformConfig,
    cfg: &LoaderConfig,
) -> Result<(), String> {
    if cfg.batch_size == 0 {
        return Err("batch_size must be at least 1".into());
    }
    transform.validate().map_err(|e| e.to_string())?;
    if let Some(item) = items
        .iter()
        .find(|item| item.labels.iter().any(|&l| l >= n_classes))
    {
        return Err(format!(
            "{}: a label index is not below n_classes = {n_classes}",
            item.path.display()
        ));
    }
    Ok(())
}

struct RawBatch {
    /// CHW `u8` pixels, image after image.
    images: Vec<u8>,
    targets: Vec<f32>,
    indices: Vec<usize>,
}

struct Job {
    items: Arc<Vec<Item>>,
    n_classes: usize,
    transform: TransformConfig,
    augment: Augment,
    seed: u64,
    epoch: usize,
    device: Device,
}

/// The cache's entries. A panic elsewhere while holding the lock leaves
/// whole entries only (each is set in one assignment).
fn lock(cache: &Cache) -> std::sync::MutexGuard<'_, Vec<Option<Arc<RawBatch>>>> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn produce(
    job: Job,
    plan: Vec<Vec<usize>>,
    pool: Option<Arc<rayon::ThreadPool>>,
    cache: Option<Cache>,
    tx: Sender<Result<Batch, DataError>>,
) {
    for (number, indices) in plan.into_iter().enumerate() {
        let kept = cache
            .as_ref()
            .and_then(|c| lock(c).get(number).cloned().flatten())
            .filter(|raw| raw.indices == indices);
        let raw = match kept {
            Some(raw) => Ok(raw),
            None => {
                let made = match &pool {
                    Some(pool) => pool.install(|| make_batch(&job, indices)),
                    None => make_batch(&job, indices),
                };
                made.map(|raw| {
                    let raw = Arc::new(raw);
                    if let Some(c) = &cache
                        && let Some(slot) = lock(c).get_mut(number)
                    {
                        *slot = Some(Arc::clone(&raw));
                    }
                    raw
                })
            }
        };
        let batch = raw.and_then(|raw| to_device(&job, &raw));
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

/// A decoded batch on the job's device: the pixels uploaded as `u8` and
/// normalized there, the targets as `f32`.
fn to_device(job: &Job, raw: &RawBatch) -> Result<Batch, DataError> {
    let n = raw.indices.len();
    let size = job.transform.size;
    let (mean, std) = (&job.transform.mean, &job.transform.std);
    let images = Tensor::from_slice(&raw.images, (n, 3, size, size), &job.device)
        .and_then(|pixels| normalize_on_device(&pixels, mean, std))
        .map_err(|e| DataError::tensor("moving a batch of images to the device", e))?;
    let targets = Tensor::from_slice(&raw.targets, (n, job.n_classes), &job.device)
        .map_err(|e| DataError::tensor("moving a batch of targets to the device", e))?;
    Ok(Batch {
        images,
        targets,
        indices: raw.indices.clone(),
    })
}

fn make_batch(job: &Job, indices: Vec<usize>) -> Result<RawBatch, DataError> {
    let size = job.transform.size;
    let per_image = 3 * size * size;
    let mut images = vec![0u8; indices.len() * per_image];
    let results: Vec<Result<(), DataError>> = images
        .par_chunks_mut(per_image)
        .zip(indices.par_iter())
        .map(|(out, &position)| {
            let item = &job.items[position];
            let decoded = decode_rgb(&item.path)?;
            let mut rng = item_rng(job.seed, job.epoch, position);
            let image = transform_image(&decoded, &job.transform, job.augment, &mut rng);
            chw_into(&image, out);
            Ok(())
        })
        .collect();
    // Report the first failing item in batch order, whatever thread hit it.
    results.into_iter().collect::<Result<Vec<()>, _>>()?;

    let mut targets = vec![0f32; indices.len() * job.n_classes];
    for (row, &position) in targets.chunks_exact_mut(job.n_classes.max(1)).zip(&indices) {
        for &label in &job.items[position].labels {
            row[label] = 1.0;
        }
    }
    Ok(RawBatch {
        images,
        targets,
        indices,
    })
}
