//! fastai's classifier head (`create_head`) and a dropout driven by our own RNG.

use std::sync::Mutex;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::batch_norm::{BatchNorm, get_var, join};
use crate::config::HeadConfig;
use crate::error::{ResNetError, WithName};
use crate::init;
use crate::ops::Ops;

/// fastai initialises every head BatchNorm with weight 1 and bias 1e-3.
const HEAD_BN_BIAS: f64 = 1e-3;

/// One `BatchNorm1d → Dropout → Linear(no bias)` block of the head.
#[derive(Debug, Clone)]
pub(crate) struct HeadLayer {
    pub(crate) bn: BatchNorm,
    pub(crate) dropout: f32,
    pub(crate) linear: Var,
    pub(crate) linear_name: String,
}

/// Pool → flatten → `HeadLayer`s with ReLU between them.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) layers: Vec<HeadLayer>,
    concat_pool: bool,
}

impl Head {
    /// The head for `num_features` body channels, under `vb` (e.g. prefix `head`).
    pub(crate) fn new(
        cfg: &HeadConfig,
        num_features: usize,
        vb: VarBuilder,
        seed: u64,
    ) -> std::result::Result<Self, ResNetError> {
        let pooled = if cfg.concat_pool {
            2 * num_features
        } else {
            num_features
        };
        let sizes: Vec<usize> = std::iter::once(pooled)
            .chain(cfg.hidden.iter().copied())
            .chain(std::iter::once(cfg.n_classes))
            .collect();
        let mut layers = Vec::with_capacity(sizes.len() - 1);
        for (i, (pair, dropout)) in sizes.windows(2).zip(cfg.dropouts()).enumerate() {
            let (n_in, n_out) = (pair[0], pair[1]);
            let layer_vb = vb.pp(i.to_string());
            let bn = BatchNorm::new(layer_vb.pp("bn"), n_in, 1.0, HEAD_BN_BIAS)?;
            let linear_vb = layer_vb.pp("linear");
            let (linear, fresh) = get_var(&linear_vb, &[n_out, n_in], "weight", vb.dtype())?;
            let linear_name = join(&linear_vb.prefix(), "weight");
            if fresh {
                // kaiming_normal_ with PyTorch's defaults: fan_in, gain √2.
                let values = init::kaiming_normal(seed, &linear_name, linear.shape(), n_in);
                init::set_var(&linear, values, linear.device()).with_name(&linear_name)?;
            }
            layers.push(HeadLayer {
                bn,
                dropout,
                linear,
                linear_name,
            });
        }
        Ok(Self {
            layers,
            concat_pool: cfg.concat_pool,
        })
    }

    /// Logits `[N, n_classes]` from body features `[N, C, H, W]`.
    pub(crate) fn forward_t(
        &self,
        ops: &Ops,
        features: &Tensor,
        train: bool,
        rng: &Mutex<ChaCha8Rng>,
    ) -> Result<Tensor> {
        // fastai's AdaptiveConcatPool2d puts the max first.
        let mut x = if self.concat_pool {
            ops.concat_pool(features)?
        } else {
            features.flatten_from(2)?.mean(2)?
        };
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.bn.forward_t(ops, &x, train)?;
            if train {
                x = ops.dropout(&x, layer.dropout, rng)?;
            }
            x = x.matmul(&layer.linear.as_tensor().t()?)?;
            if i < last {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

/// A fresh dropout generator.
pub(crate) fn dropout_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// About `p` of the values are zeroed, the rest scaled by `1/(1-p)`;
    /// the same seed replays the same mask.
    #[test]
    fn dropout_masks() {
        let x = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        for p in [0.25f32, 0.5] {
            let rng = Mutex::new(dropout_rng(5));
            let y: Vec<f32> = Ops::default()
                .dropout(&x, p, &rng)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let zeros = y.iter().filter(|&&v| v == 0.0).count() as f32 / y.len() as f32;
            assert!((zeros - p).abs() < 0.02, "p {p}: zero fraction {zeros}");
            assert!(
                y.iter()
                    .all(|&v| v == 0.0 || (v - 1.0 / (1.0 - p)).abs() < 1e-6)
            );
            let again = Mutex::new(dropout_rng(5));
            let z: Vec<f32> = Ops::default()
                .dropout(&x, p, &again)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(y, z);
        }
        let rng = Mutex::new(dropout_rng(5));
        let same: Vec<f32> = Ops::default()
            .dropout(&x, 0.0, &rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(same.iter().all(|&v| v == 1.0));
    }
}
