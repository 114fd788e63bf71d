//! The crate's own model and data as a [`Trainable`] and a [`BatchSource`]
//! (the `learner` feature): [`ResNet`] with fastai's three groups, and the
//! data crate's [`Loader`].

use candle_core::{Tensor, Var};
use multilabel_data::{Augment, Loader, LoaderConfig, TransformConfig};
use multilabel_resnet::ResNet;

use crate::error::{Error, Result};
use crate::learner::{TtaConfig, TtaPreds, tta_over};
use crate::source::{Batch, BatchSource};
use crate::trainable::{Param, ParamGroup, ParamKind, Trainable};

/// fastai's `_resnet_split`: stem to layer2, layer3 and layer4, the head.
/// Convolutions and linear layers are weights; every BatchNorm weight and
/// bias is a norm parameter. The running statistics are the buffers. The
/// eval path is [`ResNet::forward_infer`], and frozen groups' convolutions
/// skip their kernel gradients.
impl Trainable for ResNet {
    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ResNet::forward_t(self, images, train)
    }

    fn forward_infer(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        ResNet::forward_infer(self, images)
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        ResNet::param_groups(self)
            .into_iter()
            .map(|group| ParamGroup {
                name: group.name,
                params: group
                    .params
                    .into_iter()
                    .map(|p| Param {
                        kind: match (p.is_norm, p.no_decay) {
                            (true, _) => ParamKind::Norm,
                            (false, true) => ParamKind::Bias,
                            (false, false) => ParamKind::Weight,
                        },
                        name: p.name,
                        var: p.var,
                    })
                    .collect(),
            })
            .collect()
    }

    fn buffers(&self) -> Vec<Var> {
        ResNet::buffers(self).into_iter().map(|b| b.var).collect()
    }

    fn freeze_to(&mut self, n: usize) {
        ResNet::freeze_to(self, n);
    }

    fn set_dropout_seed(&self, seed: u64) {
        ResNet::set_dropout_seed(self, seed);
    }
}

impl BatchSource for Loader {
    fn n_items(&self) -> usize {
        Loader::n_items(self)
    }

    fn n_batches(&self) -> usize {
        Loader::n_batches(self)
    }

    fn n_classes(&self) -> usize {
        Loader::n_classes(self)
    }

    fn epoch(&self, epoch: usize) -> Box<dyn Iterator<Item = Result<Batch>>> {
        Box::new(Loader::epoch(self, epoch).map(|batch| {
            let batch = batch.map_err(|e| Error::Data(Box::new(e)))?;
            Ok(Batch {
                images: batch.images,
                targets: batch.targets,
                indices: batch.indices,
            })
        }))
    }
}

/// The loader that [`tta`] draws its augmented passes from: `valid`'s
/// items, in order, under the training augmentation of `train_transform`
/// (random crop, and flip if it flips), crops seeded by `seed`.
pub fn tta_loader(valid: &Loader, train_transform: &TransformConfig, seed: u64) -> Loader {
    Loader::new(
        valid.items().to_vec(),
        Loader::n_classes(valid),
        train_transform.clone(),
        LoaderConfig {
            augment: Augment::Train,
            shuffle: false,
            drop_last: false,
            seed,
            ..valid.config().clone()
        },
        valid.device().clone(),
    )
}

/// fastai's `Learner.tta()` on a validation [`Loader`]: [`tta_over`] with
/// the augmented passes from [`tta_loader`]`(valid, train_transform,
/// config.seed)`. Deterministic given `config.seed`.
pub fn tta<M: Trainable + ?Sized>(
    model: &M,
    valid: &Loader,
    train_transform: &TransformConfig,
    config: &TtaConfig,
    on_pass: &mut dyn FnMut(usize, usize),
) -> Result<TtaPreds> {
    let augmented = tta_loader(valid, train_transform, config.seed);
    tta_over(model, valid, &augmented, config, on_pass)
}
