//! Trainable ResNet-18…152 for candle, with ImageNet weights from a file or
//! the Hugging Face hub and fastai's classifier head.
//!
//! candle-transformers' ResNet only runs inference; this one trains. The main
//! types:
//!
//! - [`ResNetConfig`] (with [`Arch`] and [`HeadConfig`]) says what to build:
//!   a torchvision "v1.5" body of any width and fastai's head
//!   (`[max, avg]` pool → BatchNorm → Dropout → Linear → ReLU → … → Linear).
//! - [`ResNet`] is the network: [`ResNet::forward_t`] (logits) and
//!   [`ResNet::features_t`] (body features) in train or eval mode;
//!   [`ResNet::freeze`]/[`ResNet::unfreeze`] like fastai; three
//!   [`ParamGroup`]s like fastai's `_resnet_split`, each [`Param`] telling
//!   BatchNorm parameters from the rest.
//! - [`load_pretrained`] copies body weights into the model's `VarMap` from a
//!   [`WeightsSource`]: a safetensors file or a hub repo such as
//!   [`DEFAULT_HUB_REPO`], with torchvision/timm names or those of
//!   `microsoft/resnet-50`.
//!
//! BatchNorm running statistics are variables of the same `VarMap`, so
//! `VarMap::save` writes what training produced, but they are in no param
//! group. Initial values and dropout masks come from seeded generators, so a
//! run can be repeated bit for bit. The stem's max-pool ([`max_pool_3x3_s2`])
//! and the convolutions ([`conv2d`]) have backward passes that compute only
//! what is needed: with the body frozen no conv kernel gradient is computed,
//! and the input image never gets one.
//!
//! # Example
//!
//! Another candle project fine-tuning an ImageNet ResNet-50 with a 20-label head:
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use multilabel_resnet::{load_pretrained, Arch, ResNet, ResNetConfig, WeightsSource};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
//! let mut config = ResNetConfig::new(Arch::ResNet50, 20);
//! config.head.hidden = vec![256]; // a custom head: one hidden layer of 256
//! let mut model = ResNet::new(&config, vb, 42)?;
//! let source = WeightsSource::Hub { repo: "timm/resnet50.tv_in1k".into(), offline: false };
//! let report = load_pretrained(&varmap, &source)?;
//! assert!(report.skipped.iter().any(|name| name == "fc.weight"));
//!
//! model.freeze(); // train the head and every BatchNorm first, as fastai does
//! let images = Tensor::zeros((8, 3, 128, 128), DType::F32, &device)?;
//! let logits = model.forward_t(&images, true)?; // train mode: batch statistics, dropout
//! let loss = candle_nn::loss::binary_cross_entropy_with_logit(
//!     &logits,
//!     &Tensor::zeros((8, 20), DType::F32, &device)?,
//! )?;
//! let grads = loss.backward()?;
//! for param in model.trainable_params() {
//!     let _gradient = grads.get(&param.var); // hand these to an optimizer
//! }
//! let eval_logits = model.forward_t(&images, false)?; // eval mode: running statistics
//! let predictions = model.forward_infer(&images)?; // the same, fused and without a graph
//! assert_eq!(predictions.dims(), &[8, 20]);
//! varmap.save("model.safetensors")?; // weights and running statistics
//! # Ok(())
//! # }
//! ```

mod batch_norm;
mod concat_pool;
mod config;
mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod generic;
mod head;
mod init;
mod max_pool;
mod model;
mod ops;
mod weights;

pub use concat_pool::{concat_pool, concat_pool_composed};
pub use config::{Arch, BlockKind, HeadConfig, Precision, ResNetConfig};
pub use conv::conv2d;
pub use error::ResNetError;
pub use max_pool::{max_pool_3x3_s2, max_pool_composed, pooled_len};
pub use model::{Buffer, N_GROUPS, Param, ParamGroup, ResNet};
pub use ops::{Kernels, Ops};
pub use weights::{
    DEFAULT_HUB_REPO, HUB_WEIGHTS_FILE, LoadReport, WeightsSource, hub_file, load_pretrained,
    load_pretrained_at, transformers_to_torchvision,
};

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// The largest `|a − b|` over all values.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The gradients of the loss `Σ y·r`: a random `r` makes the output
    /// gradient non-uniform, so a wrong backward shows.
    pub(crate) fn linear_loss_grads(y: &Tensor, r: &Tensor) -> candle_core::backprop::GradStore {
        (y * r).unwrap().sum_all().unwrap().backward().unwrap()
    }
}
