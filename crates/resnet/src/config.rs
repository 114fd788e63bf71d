//! What network to build: [`Arch`], [`ResNetConfig`] and the head's [`HeadConfig`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Kernels, ResNetError};

/// One of the five torchvision ResNets ("v1.5": the stride sits on the 3×3 conv).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
}

/// The dtype the body's activations and convolutions compute in.
///
/// The parameters always stay `f32` (the master weights the optimizer
/// updates); in a half precision the body casts its input and each
/// convolution kernel to it, BatchNorm takes its statistics in `f32` (the
/// activations are widened for them), and the features are widened back
/// to `f32` before the head, so the head, the loss and the metrics stay
/// `f32`. Gradients reach the `f32` parameters through the casts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in `f32`.
    #[default]
    F32,
    /// bfloat16 activations and convolutions (tensor cores; compute
    /// capability ≥ 8.0 on CUDA).
    Bf16,
    /// IEEE half activations and convolutions.
    F16,
}

impl Precision {
    /// The half dtype the body computes in, if any.
    pub fn half(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(candle_core::DType::BF16),
            Precision::F16 => Some(candle_core::DType::F16),
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The default for `device`: `bf16` on a CUDA GPU of compute capability
    /// 8.0 or more (with the `cuda` feature), `f32` elsewhere.
    pub fn auto_for(device: &candle_core::Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Some((major, _)) = crate::cuda::compute_capability(device)
            && major >= 8
        {
            return Precision::Bf16;
        }
        let _ = device;
        Precision::F32
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" => Ok(Precision::F16),
            other => Err(format!("`{other}`: expected f32, bf16 or f16")),
        }
    }
}

/// The two kinds of residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convs (ResNet-18/34), expansion 1.
    Basic,
    /// 1×1 → 3×3 → 1×1 convs (ResNet-50/101/152), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block divided by its `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

impl Arch {
    /// Every architecture, smallest first.
    pub const ALL: [Arch; 5] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
    ];

    /// Blocks in each of the four stages.
    pub fn blocks_per_stage(self) -> [usize; 4] {
        match self {
            Arch::ResNet18 => [2, 2, 2, 2],
            Arch::ResNet34 | Arch::ResNet50 => [3, 4, 6, 3],
            Arch::ResNet101 => [3, 4, 23, 3],
            Arch::ResNet152 => [3, 8, 36, 3],
        }
    }

    /// The residual block the architecture is made of.
    pub fn block(self) -> BlockKind {
        match self {
            Arch::ResNet18 | Arch::ResNet34 => BlockKind::Basic,
            _ => BlockKind::Bottleneck,
        }
    }

    /// Channels of the body's output for a given base width (2048 for ResNet-50 at width 64).
    pub fn num_features(self, base_width: usize) -> usize {
        base_width * 8 * self.block().expansion()
    }

    /// The lowercase name used by torchvision and timm, e.g. `resnet50`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNet101 => "resnet101",
            Arch::ResNet152 => "resnet152",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = ResNetError;

    /// Accepts `resnet50`, `ResNet50` and `resnet-50`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        Arch::ALL
            .into_iter()
            .find(|arch| arch.name() == key)
            .ok_or_else(|| ResNetError::UnknownArch {
                name: s.to_string(),
            })
    }
}

/// fastai's `create_head`: concat pool → [BatchNorm1d → Dropout → Linear(no bias) → ReLU]*
/// → BatchNorm1d → Dropout → Linear(no bias).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Outputs of the last Linear (the number of labels).
    pub n_classes: usize,
    /// Dropout of the last layer; the earlier layers use `ps / 2` (fastai's default 0.5).
    #[serde(default = "default_ps")]
    pub ps: f32,
    /// Sizes of the hidden Linear layers (fastai's default `[512]`).
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// Pool with `[max, avg]` concatenated (true, fastai) or average only.
    #[serde(default = "default_concat_pool")]
    pub concat_pool: bool,
}

fn default_ps() -> f32 {
    0.5
}

fn default_hidden() -> Vec<usize> {
    vec![512]
}

fn default_concat_pool() -> bool {
    true
}

fn default_base_width() -> usize {
    64
}

impl HeadConfig {
    /// fastai's defaults for `n_classes` outputs.
    pub fn new(n_classes: usize) -> Self {
        Self {
            n_classes,
            ps: default_ps(),
            hidden: default_hidden(),
            concat_pool: default_concat_pool(),
        }
    }

    /// Dropout probability before each Linear, first to last (fastai: `ps/2` then `ps`).
    pub fn dropouts(&self) -> Vec<f32> {
        let n = self.hidden.len() + 1;
        (0..n)
            .map(|i| if i + 1 == n { self.ps } else { self.ps / 2.0 })
            .collect()
    }
}

/// The whole network: body architecture, its width and the head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub arch: Arch,
    /// Channels of the stem and of the first stage's `planes` (64 in every
    /// torchvision ResNet; tests use a narrow network such as 8).
    #[serde(default = "default_base_width")]
    pub base_width: usize,
    pub head: HeadConfig,
    /// Which implementation runs the ops: the CPU kernels where they apply
    /// ([`Kernels::Auto`]) or the generic candle ops everywhere
    /// ([`Kernels::Generic`], what CUDA and Metal run; on the CPU it is how
    /// the tests check that path).
    #[serde(default, skip_serializing_if = "Kernels::is_auto")]
    pub kernels: Kernels,
    /// Let cuDNN run `f32` convolutions in TF32 on the tensor cores
    /// (compute capability ≥ 8.0; PyTorch's default for convolutions):
    /// several times faster, with a 10-bit mantissa in the products. Off,
    /// `f32` convolutions compute in exact `f32` as on the CPU. Nothing
    /// changes off CUDA or without the `cudnn` feature.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// The dtype of the body's activations and convolutions (see
    /// [`Precision`]); the parameters stay `f32` whatever it is.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl ResNetConfig {
    /// Full-width `arch` with fastai's head for `n_classes` labels.
    pub fn new(arch: Arch, n_classes: usize) -> Self {
        Self {
            arch,
            base_width: default_base_width(),
            head: HeadConfig::new(n_classes),
            kernels: Kernels::Auto,
            tf32: false,
            precision: Precision::F32,
        }
    }

    /// Channels entering the head (the body's output channels).
    pub fn num_features(&self) -> usize {
        self.arch.num_features(self.base_width)
    }

    pub(crate) fn validate(&self) -> Result<(), ResNetError> {
        let invalid = |reason: String| Err(ResNetError::InvalidConfig { reason });
        if self.base_width == 0 {
            return invalid("base_width must be at least 1".into());
        }
        if self.head.n_classes == 0 {
            return invalid("n_classes must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.head.ps) {
            return invalid(format!("ps {} must be in [0, 1)", self.head.ps));
        }
        if self.head.hidden.contains(&0) {
            return invalid("hidden layer sizes must be at least 1".into());
        }
        Ok(())
    }
}
