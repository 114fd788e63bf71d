//! Where the Learner's batches come from: the [`BatchSource`] trait, and
//! [`TensorDataset`], a source over tensors already in memory.

use candle_core::Tensor;

use crate::error::{CandleContext, Error, Result};

/// A batch of images and their 0/1 targets.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[batch, …]` model inputs (images `[batch, 3, H, W]` for a CNN).
    pub images: Tensor,
    /// `[batch, n_classes]` 0/1 targets, in the dtype the model's logits have.
    pub targets: Tensor,
    /// Position of each row in the source, so predictions can be put back
    /// in source order.
    pub indices: Vec<usize>,
}

/// A source of batches, epoch by epoch.
///
/// An epoch's batches must depend only on the source's own settings (its
/// seed) and the epoch number: the Learner numbers epochs across fits, and
/// a resumed run replays an epoch by asking for it again.
pub trait BatchSource {
    /// Items in the source.
    fn n_items(&self) -> usize;
    /// Batches per epoch.
    fn n_batches(&self) -> usize;
    /// Width of the targets.
    fn n_classes(&self) -> usize;
    /// The batches of epoch `epoch`, produced lazily.
    fn epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>>>;
}

/// A [`BatchSource`] over tensors in memory: `images` `[n, …]` and
/// `targets` `[n, n_classes]`, cut into batches along the first dimension.
///
/// Built with [`TensorDataset::new`] it is a validation source (items in
/// order, the last batch may be short); [`TensorDataset::shuffled`] makes
/// it a training source as fastai's (a new order each epoch from the seed
/// and the epoch, the last short batch dropped).
#[derive(Clone, Debug)]
pub struct TensorDataset {
    images: Tensor,
    targets: Tensor,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    drop_last: bool,
}

impl TensorDataset {
    /// Batches of `batch_size` in order, keeping the last short one.
    pub fn new(images: Tensor, targets: Tensor, batch_size: usize) -> Result<Self> {
        let n = images.dims().first().copied().unwrap_or(0);
        match targets.dims() {
            [rows, _] if *rows == n => {}
            [rows, _] => {
                return Err(Error::Invalid(format!(
                    "TensorDataset: images have {n} rows but targets have {rows}"
                )));
            }
            dims => {
                return Err(Error::Invalid(format!(
                    "TensorDataset: targets must be [n, n_classes], got shape {dims:?}"
                )));
            }
        }
        if images.rank() < 2 {
            return Err(Error::Invalid(format!(
                "TensorDataset: images must be [n, …] with at least two dimensions, got shape {:?}",
                images.dims()
            )));
        }
        if batch_size == 0 {
            return Err(Error::Invalid(
                "TensorDataset: batch_size must be at least 1".into(),
            ));
        }
        if !targets.dtype().is_float() {
            return Err(Error::Invalid(format!(
                "TensorDataset: targets must be floats (0.0 or 1.0), got {:?}",
                targets.dtype()
            )));
        }
        if !targets.device().same_device(images.device()) {
            return Err(Error::Invalid(
                "TensorDataset: images and targets are on different devices".into(),
            ));
        }
        Ok(Self {
            images,
            targets,
            batch_size,
            shuffle_seed: None,
            drop_last: false,
        })
    }

    /// A training source: a new order every epoch, drawn from `seed` and
    /// the epoch number, and the last short batch dropped (fastai's
    /// training `DataLoader`).
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self.drop_last = true;
        self
    }

    /// Whether a last batch shorter than `batch_size` is dropped.
    pub fn drop_last(mut self, drop: bool) -> Self {
        self.drop_last = drop;
        self
    }

    /// The item order of `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let n = self.n_items();
        let mut order: Vec<usize> = (0..n).collect();
        if let Some(seed) = self.shuffle_seed {
            let mut state = mix(seed ^ mix(epoch as u64));
            // Fisher–Yates from the back.
            for i in (1..n).rev() {
                state = mix(state);
                let j = (state % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
    }
}

impl BatchSource for TensorDataset {
    fn n_items(&self) -> usize {
        self.images.dims()[0]
    }

    fn n_batches(&self) -> usize {
        let n = self.n_items();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn n_classes(&self) -> usize {
        self.targets.dims()[1]
    }

    fn epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>>> {
        let order = self.order(epoch);
        let n_batches = self.n_batches();
        let (images, targets, batch_size) =
            (self.images.clone(), self.targets.clone(), self.batch_size);
        let shuffled = self.shuffle_seed.is_some();
        Box::new((0..n_batches).map(move |b| {
            let start = b * batch_size;
            let indices = order[start..(start + batch_size).min(order.len())].to_vec();
            let (images, targets) = if shuffled {
                let index = Tensor::from_iter(indices.iter().map(|&i| i as u32), images.device())
                    .ctx(|| "TensorDataset: batch indices".into())?;
                (
                    images.index_select(&index, 0),
                    targets.index_select(
                        &index
                            .to_device(targets.device())
                            .ctx(|| "TensorDataset: batch indices".into())?,
                        0,
                    ),
                )
            } else {
                (
                    images.narrow(0, start, indices.len()),
                    targets.narrow(0, start, indices.len()),
                )
            };
            let images = images.ctx(|| format!("TensorDataset: images of batch {b}"))?;
            let targets = targets.ctx(|| format!("TensorDataset: targets of batch {b}"))?;
            Ok(Batch {
                images,
                targets,
                indices,
            })
        }))
    }
}

/// SplitMix64's output function.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
