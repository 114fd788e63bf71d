//! The network: [`ResNet`] (torchvision body + fastai head), its parameter
//! groups and freezing.

use std::sync::Mutex;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use crate::batch_norm::{self, BatchNorm, get_var, join};
use crate::config::{BlockKind, ResNetConfig};
use crate::cpu::BlockLayer;
use crate::error::{ResNetError, WithName};
use crate::head::{Head, dropout_rng};
use crate::init;
use crate::ops::Ops;

/// Number of parameter groups ([`ResNet::param_groups`]).
pub const N_GROUPS: usize = 3;

/// One trainable tensor and what the optimizer needs to know about it.
#[derive(Debug, Clone)]
pub struct Param {
    /// Its name in the `VarMap`, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    pub var: Var,
    /// A BatchNorm parameter or a bias: fastai applies no weight decay to it.
    pub no_decay: bool,
    /// A BatchNorm weight or bias: trained even in a frozen group (fastai's `train_bn`).
    pub is_norm: bool,
    /// Whether it trains under the current freezing ([`ResNet::freeze_to`]).
    pub trainable: bool,
}

/// Parameters trained with one learning rate, as fastai's `_resnet_split`.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// `stem-layer2`, `layer3-layer4` or `head`.
    pub name: String,
    pub params: Vec<Param>,
}

/// A buffer of the model: a BatchNorm running statistic, saved but not trained.
#[derive(Debug, Clone)]
pub struct Buffer {
    pub name: String,
    pub var: Var,
}

#[derive(Debug, Clone)]
struct Conv {
    name: String,
    weight: Var,
    stride: usize,
    padding: usize,
    group: usize,
}

impl Conv {
    fn new(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        group: usize,
        seed: u64,
    ) -> std::result::Result<Self, ResNetError> {
        let (weight, fresh) = get_var(vb, &[c_out, c_in, kernel, kernel], "weight", vb.dtype())?;
        let name = join(&vb.prefix(), "weight");
        if fresh {
            // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
            let fan_out = c_out * kernel * kernel;
            let values = init::kaiming_normal(seed, &name, weight.shape(), fan_out);
            init::set_var(&weight, values, weight.device()).with_name(&name)?;
        }
        Ok(Self {
            name,
            weight,
            stride,
            padding: kernel / 2,
            group,
        })
    }

    /// The kernel as it enters the graph: a frozen one detached, so backward
    /// computes no gradient for it (see `conv.rs`).
    fn kernel(&self, frozen_groups: usize) -> Tensor {
        if self.group < frozen_groups {
            self.weight.as_detached_tensor()
        } else {
            self.weight.as_tensor().clone()
        }
    }

    /// `relu?(bn(conv(x)))`; in train mode one op of `ops` (on the CPU one
    /// fused graph node).
    fn forward_bn_t(
        &self,
        ops: &Ops,
        bn: &BatchNorm,
        x: &Tensor,
        train: bool,
        frozen_groups: usize,
        relu: bool,
    ) -> Result<Tensor> {
        let kernel = self.kernel(frozen_groups);
        if train {
            return bn.conv_forward_train(ops, x, &kernel, self.geometry(), relu, None);
        }
        let y = ops.conv2d(x, &kernel, self.padding, self.stride)?;
        bn.forward_relu_t(ops, &y, train, relu)
    }

    /// `(padding, stride)`.
    fn geometry(&self) -> (usize, usize) {
        (self.padding, self.stride)
    }

    /// Inference: this conv with its eval-mode BatchNorm, the residual and
    /// the ReLU applied in the same pass; carries no gradient graph.
    fn forward_infer(
        &self,
        ops: &Ops,
        bn: &BatchNorm,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let (scale, shift) = bn.eval_affine()?;
        ops.conv2d_affine(
            x,
            self.weight.as_tensor(),
            self.geometry(),
            &scale,
            &shift,
            residual,
            relu,
        )
    }
}

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv, BatchNorm)>,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        kind: BlockKind,
        c_in: usize,
        planes: usize,
        stride: usize,
        group: usize,
        seed: u64,
    ) -> std::result::Result<Self, ResNetError> {
        let c_out = planes * kind.expansion();
        // (in, out, kernel, stride) of conv1, conv2[, conv3]; torchvision v1.5
        // puts the stride on the 3×3 conv.
        let shapes: Vec<(usize, usize, usize, usize)> = match kind {
            BlockKind::Basic => vec![(c_in, planes, 3, stride), (planes, planes, 3, 1)],
            BlockKind::Bottleneck => vec![
                (c_in, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, c_out, 1, 1),
            ],
        };
        let mut convs = Vec::with_capacity(shapes.len());
        for (j, (i, o, k, s)) in shapes.into_iter().enumerate() {
            let conv = Conv::new(&vb.pp(format!("conv{}", j + 1)), i, o, k, s, group, seed)?;
            let bn = BatchNorm::new(vb.pp(format!("bn{}", j + 1)), o, 1.0, 0.0)?;
            convs.push((conv, bn));
        }
        let downsample = if stride != 1 || c_in != c_out {
            let ds = vb.pp("downsample");
            let conv = Conv::new(&ds.pp("0"), c_in, c_out, 1, stride, group, seed)?;
            let bn = BatchNorm::new(ds.pp("1"), c_out, 1.0, 0.0)?;
            Some((conv, bn))
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(
        &self,
        ops: &Ops,
        x: &Tensor,
        train: bool,
        frozen_groups: usize,
    ) -> Result<Tensor> {
        if train {
            return self.forward_train(ops, x, frozen_groups);
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => conv.forward_bn_t(ops, bn, x, false, frozen_groups, false)?,
            None => x.clone(),
        };
        let last = self.convs.len() - 1;
        let mut out = x.clone();
        for (j, (conv, bn)) in self.convs.iter().enumerate() {
            out = conv.forward_bn_t(ops, bn, &out, false, frozen_groups, j < last)?;
        }
        ops.add_relu(&out, &identity)
    }

    /// Train mode: the whole block as one op of `ops` (on the CPU one graph
    /// node); updates every BatchNorm's running statistics.
    fn forward_train(&self, ops: &Ops, x: &Tensor, frozen_groups: usize) -> Result<Tensor> {
        let kernels: Vec<Tensor> = self
            .layers()
            .map(|(conv, _)| conv.kernel(frozen_groups))
            .collect();
        let spec: Vec<BlockLayer> = self
            .layers()
            .zip(&kernels)
            .map(|((conv, bn), kernel)| BlockLayer {
                kernel,
                padding: conv.padding,
                stride: conv.stride,
                weight: bn.weight.as_tensor(),
                bias: bn.bias.as_tensor(),
            })
            .collect();
        let (main, downsample) = spec.split_at(self.convs.len());
        let (y, stats) = ops
            .residual_block_train(x, main, downsample.first(), batch_norm::EPS)
            .map_err(|e| e.context(format!("block of {}", self.convs[0].1.name)))?;
        for ((_, bn), (mean, var, count)) in self.layers().zip(&stats) {
            bn.update_running(ops, mean, var, *count)?;
        }
        Ok(y)
    }

    /// Eval mode without a gradient graph, each conv fused with what follows it.
    fn forward_infer(&self, ops: &Ops, x: &Tensor) -> Result<Tensor> {
        let identity = match &self.downsample {
            Some((conv, bn)) => conv.forward_infer(ops, bn, x, None, false)?,
            None => x.clone(),
        };
        let last = self.convs.len() - 1;
        let mut out = x.clone();
        for (j, (conv, bn)) in self.convs.iter().enumerate() {
            out = if j < last {
                conv.forward_infer(ops, bn, &out, None, true)?
            } else {
                conv.forward_infer(ops, bn, &out, Some(&identity), true)?
            };
        }
        Ok(out)
    }

    fn layers(&self) -> impl Iterator<Item = &(Conv, BatchNorm)> {
        self.convs.iter().chain(self.downsample.iter())
    }
}

/// A trainable torchvision ResNet body with fastai's head.
///
/// Variables are named as in torchvision and timm (`conv1.weight`,
/// `layer3.0.downsample.1.running_var`, ...); the head's are
/// `head.{i}.bn.*` and `head.{i}.linear.weight`.
#[derive(Debug)]
pub struct ResNet {
    config: ResNetConfig,
    stem: (Conv, BatchNorm),
    stages: Vec<Vec<Block>>,
    head: Head,
    frozen_groups: usize,
    ops: Ops,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl ResNet {
    /// Builds the network under `vb` and gives every variable its initial value.
    ///
    /// With a `VarBuilder` over a `VarMap`, all variables (parameters and
    /// BatchNorm running statistics) live in that map and are initialised
    /// from `init_seed` like torchvision (conv kaiming-normal fan-out, BatchNorm
    /// 1/0) and fastai (head Linears kaiming-normal fan-in, head BatchNorm
    /// 1/1e-3). Load pretrained weights afterwards ([`crate::load_pretrained`]).
    /// With any other backend (e.g. safetensors) the stored values are used.
    pub fn new(
        cfg: &ResNetConfig,
        vb: VarBuilder,
        init_seed: u64,
    ) -> std::result::Result<Self, ResNetError> {
        Self::with_stage_blocks(cfg, cfg.arch.blocks_per_stage(), vb, init_seed)
    }

    /// Like [`ResNet::new`] with another number of blocks per stage (of the
    /// block kind of `cfg.arch`), e.g. `[2, 2, 2, 2]` bottlenecks for timm's
    /// ResNet-26. Tests use shallow networks to compare with PyTorch where
    /// float32 rounding does not dominate.
    pub fn with_stage_blocks(
        cfg: &ResNetConfig,
        blocks_per_stage: [usize; 4],
        vb: VarBuilder,
        init_seed: u64,
    ) -> std::result::Result<Self, ResNetError> {
        cfg.validate()?;
        if blocks_per_stage.contains(&0) {
            return Err(ResNetError::InvalidConfig {
                reason: format!("every stage needs a block, got {blocks_per_stage:?}"),
            });
        }
        let width = cfg.base_width;
        let conv1 = Conv::new(&vb.pp("conv1"), 3, width, 7, 2, 0, init_seed)?;
        let bn1 = BatchNorm::new(vb.pp("bn1"), width, 1.0, 0.0)?;
        let kind = cfg.arch.block();
        let mut c_in = width;
        let mut stages = Vec::with_capacity(4);
        for (k, &n_blocks) in blocks_per_stage.iter().enumerate() {
            let planes = width << k;
            let stride = if k == 0 { 1 } else { 2 };
            // fastai's `_resnet_split`: stem + layer1 + layer2 | layer3 + layer4 | head.
            let group = if k < 2 { 0 } else { 1 };
            let stage_vb = vb.pp(format!("layer{}", k + 1));
            let mut blocks = Vec::with_capacity(n_blocks);
            for i in 0..n_blocks {
                let s = if i == 0 { stride } else { 1 };
                blocks.push(Block::new(
                    stage_vb.pp(i.to_string()),
                    kind,
                    c_in,
                    planes,
                    s,
                    group,
                    init_seed,
                )?);
                c_in = planes * kind.expansion();
            }
            stages.push(blocks);
        }
        let head = Head::new(&cfg.head, c_in, vb.pp("head"), init_seed)?;
        Ok(Self {
            config: cfg.clone(),
            stem: (conv1, bn1),
            stages,
            head,
            frozen_groups: 0,
            ops: Ops::new(cfg.kernels)
                .with_tf32(cfg.tf32)
                .with_half(cfg.precision.half()),
            dropout_rng: Mutex::new(dropout_rng(init_seed)),
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Body features `[N, C, H/32, W/32]` (C = 2048 for a full ResNet-50),
    /// in the parameters' dtype whatever the [`Precision`](crate::Precision).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let frozen = self.frozen_groups;
        let ops = &self.ops;
        let (conv, bn) = &self.stem;
        let x = conv.forward_bn_t(ops, bn, &ops.to_compute(x)?, train, frozen, true)?;
        let mut x = ops.max_pool_3x3_s2(&x)?;
        for block in self.stages.iter().flatten() {
            x = block.forward_t(ops, &x, train, frozen)?;
        }
        ops.to_master(&x)
    }

    /// [`ResNet::features_t`] in eval mode for inference: each convolution
    /// runs with its BatchNorm, residual add and ReLU in one pass, and the
    /// result carries no gradient graph. Equal to `features_t(x, false)`.
    pub fn features_infer(&self, x: &Tensor) -> Result<Tensor> {
        let ops = &self.ops;
        let (conv, bn) = &self.stem;
        let x = conv.forward_infer(ops, bn, &ops.to_compute(&x.detach())?, None, true)?;
        let mut x = ops.max_pool_3x3_s2(&x)?;
        for block in self.stages.iter().flatten() {
            x = block.forward_infer(ops, &x)?;
        }
        ops.to_master(&x)
    }

    /// Logits `[N, n_classes]` in eval mode for inference (validation,
    /// prediction): the same values as `forward_t(x, false)`, faster, and
    /// with no gradient graph (use `forward_t` to backpropagate through
    /// eval mode, e.g. to train with frozen BatchNorm statistics).
    pub fn forward_infer(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.features_infer(x)?;
        Ok(self
            .head
            .forward_t(&self.ops, &features, false, &self.dropout_rng)?
            .detach())
    }

    /// Logits `[N, n_classes]`. `train` selects batch statistics (and updates
    /// the running ones) and active dropout; eval mode uses the running
    /// statistics and no dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let features = self.features_t(x, train)?;
        self.head
            .forward_t(&self.ops, &features, train, &self.dropout_rng)
    }

    /// Restarts the dropout masks from `seed`.
    pub fn set_dropout_seed(&self, seed: u64) {
        let mut rng = self
            .dropout_rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *rng = dropout_rng(seed);
    }

    /// fastai's `freeze()`: only the head and every BatchNorm's affine parameters train.
    pub fn freeze(&mut self) {
        self.freeze_to(N_GROUPS - 1);
    }

    /// fastai's `unfreeze()`: everything trains.
    pub fn unfreeze(&mut self) {
        self.freeze_to(0);
    }

    /// fastai's `freeze_to(n)`: the first `n` groups train only their
    /// BatchNorm parameters (`n` of 3 or more freezes the head's linear
    /// layers too, as in fastai).
    pub fn freeze_to(&mut self, n: usize) {
        self.frozen_groups = n.min(N_GROUPS);
    }

    /// Whether any body group is frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen_groups > 0
    }

    /// How many leading groups are frozen.
    pub fn frozen_groups(&self) -> usize {
        self.frozen_groups
    }

    /// All parameters in three groups (stem+layer1+layer2, layer3+layer4,
    /// head), each in PyTorch's `module.parameters()` order. Running
    /// statistics are in no group ([`ResNet::buffers`]).
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        let names = ["stem-layer2", "layer3-layer4", "head"];
        let mut groups: Vec<ParamGroup> = names
            .iter()
            .map(|name| ParamGroup {
                name: name.to_string(),
                params: Vec::new(),
            })
            .collect();
        let frozen = self.frozen_groups;
        let push_conv = |conv: &Conv, groups: &mut Vec<ParamGroup>| {
            groups[conv.group].params.push(Param {
                name: conv.name.clone(),
                var: conv.weight.clone(),
                no_decay: false,
                is_norm: false,
                trainable: conv.group >= frozen,
            });
        };
        let push_bn = |bn: &BatchNorm, group: usize, groups: &mut Vec<ParamGroup>| {
            for (tensor, var) in [("weight", &bn.weight), ("bias", &bn.bias)] {
                groups[group].params.push(Param {
                    name: join(&bn.name, tensor),
                    var: var.clone(),
                    no_decay: true,
                    is_norm: true,
                    trainable: true,
                });
            }
        };
        push_conv(&self.stem.0, &mut groups);
        push_bn(&self.stem.1, 0, &mut groups);
        for block in self.stages.iter().flatten() {
            for (conv, bn) in block.layers() {
                push_conv(conv, &mut groups);
                push_bn(bn, conv.group, &mut groups);
            }
        }
        for layer in &self.head.layers {
            push_bn(&layer.bn, 2, &mut groups);
            groups[2].params.push(Param {
                name: layer.linear_name.clone(),
                var: layer.linear.clone(),
                no_decay: false,
                is_norm: false,
                trainable: frozen < N_GROUPS,
            });
        }
        groups
    }

    /// The parameters that train under the current freezing, in group order.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.param_groups()
            .into_iter()
            .flat_map(|group| group.params)
            .filter(|param| param.trainable)
            .collect()
    }

    /// BatchNorm running means and variances, in module order.
    pub fn buffers(&self) -> Vec<Buffer> {
        let mut norms: Vec<&BatchNorm> = vec![&self.stem.1];
        for block in self.stages.iter().flatten() {
            norms.extend(block.layers().map(|(_, bn)| bn));
        }
        norms.extend(self.head.layers.iter().map(|layer| &layer.bn));
        norms
            .into_iter()
            .flat_map(|bn| {
                [
                    ("running_mean", &bn.running_mean),
                    ("running_var", &bn.running_var),
                ]
                .map(|(tensor, var)| Buffer {
                    name: join(&bn.name, tensor),
                    var: var.clone(),
                })
            })
            .collect()
    }
}

/// So a `ResNet` goes wherever candle takes a module: `x.apply_t(&model,
/// train)`, `candle_nn::ModuleT` trait objects. The same as
/// [`ResNet::forward_t`].
impl candle_nn::ModuleT for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        ResNet::forward_t(self, xs, train)
    }
}
