//! A whole residual block in train mode as one graph node.
//!
//! As one node per conv + BatchNorm (`conv_bn.rs`), candle's backward still
//! hands every activation gradient between the nodes through its gradient
//! store: a zeroed tensor of the activation's size, then an add into it (a
//! new tensor again). A ResNet-50 block has four or five such hand-overs
//! (the two inside the main path, the block input's from the first conv and
//! from the residual); measured on two cores at 64 px they were 9% of a
//! training step. As one node the block keeps its inner gradients to itself
//! and hands candle one input gradient and one parameter gradient.
//!
//! The arithmetic is the per-layer ops', in the same order, so the results
//! are the same bits as [`conv2d_batch_norm_train`] for each inner layer
//! and [`conv2d_batch_norm_add_relu_train`] for the last.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::conv::{Geometry, data, forward, input_grad, kernel_grad, supported, with_data};
use super::conv_bn::{conv2d_batch_norm_add_relu_train, conv2d_batch_norm_train};
use super::norm::{BatchNormGrad, Stats, bn_train_forward};
use super::simd::simd_kernel;

/// Values per parallel task of the input gradient's sum.
const ADD_CHUNK: usize = 1 << 15;

simd_kernel! {
    /// `a += b`, value by value.
    pub(super) fn add_into => add_into_body(a: &mut [f32], b: &[f32])
}

#[inline(always)]
fn add_into_body(a: &mut [f32], b: &[f32]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// One conv + BatchNorm of a residual block, for [`residual_block_train`].
#[derive(Clone, Copy)]
pub struct BlockLayer<'a> {
    /// `[O, C, kh, kw]`; passed detached when frozen (no kernel gradient).
    pub kernel: &'a Tensor,
    pub padding: usize,
    pub stride: usize,
    /// The BatchNorm's `[O]` weight and bias.
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// A layer's batch mean, biased variance (`[O]` each) and values per channel.
pub type LayerStats = (Tensor, Tensor, usize);

/// Train mode residual block: `relu(bn(conv(…relu(bn(conv(x)))…)) + r)`
/// with `r` the block input `x`, or `bn(conv(x))` of `downsample`; every
/// inner layer has a ReLU. Returns the output and each BatchNorm's
/// statistics, the main path's layers in order, then the downsample's.
///
/// On the CPU in `f32` one graph node; elsewhere the per-layer ops.
pub fn residual_block_train(
    x: &Tensor,
    layers: &[BlockLayer],
    downsample: Option<&BlockLayer>,
    eps: f64,
) -> Result<(Tensor, Vec<LayerStats>)> {
    if layers.is_empty() {
        candle_core::bail!("cpu residual block: no layers")
    }
    let all = layers.iter().chain(downsample);
    let operands = all.flat_map(|l| [l.kernel, l.weight, l.bias]);
    if !std::iter::once(x).chain(operands).all(supported) {
        return block_per_layer(x, layers, downsample, eps, &cpu_layer);
    }
    let stages: Vec<Stage> = layers
        .iter()
        .chain(downsample)
        .map(Stage::new)
        .collect::<Result<_>>()?;
    // The BatchNorms' weights and biases, in stage order, as one operand.
    let bn: Vec<Tensor> = layers
        .iter()
        .chain(downsample)
        .flat_map(|l| [l.weight.clone(), l.bias.clone()])
        .collect();
    let packed = Tensor::cat(&bn, 0)?;
    let saved = Arc::new(Mutex::new(None));
    let stash = Arc::new(Mutex::new(Vec::new()));
    let trainable: Vec<&Tensor> = layers
        .iter()
        .chain(downsample)
        .map(|l| l.kernel)
        .filter(|k| k.track_op())
        .collect();
    let op = BlockTrain {
        stages,
        main: layers.len(),
        eps,
        saved: saved.clone(),
        stash: stash.clone(),
    };
    let x = x.contiguous()?;
    let y = match kernel_token(&trainable, &stash)? {
        Some(token) => x.apply_op3(&packed, &token, op)?,
        None => x.apply_op2(&packed, op)?,
    };
    let guard = saved.lock().unwrap_or_else(|e| e.into_inner());
    let Some(saved) = guard.as_ref() else {
        candle_core::bail!("cpu residual block: the forward pass left no statistics")
    };
    let device = x.device();
    let stats = saved
        .stats
        .iter()
        .zip(&saved.counts)
        .map(|(s, &count)| {
            let c = s.mean.len();
            Ok((
                Tensor::from_slice(&s.mean, c, device)?,
                Tensor::from_slice(&s.var, c, device)?,
                count,
            ))
        })
        .collect::<Result<_>>()?;
    Ok((y, stats))
}

/// What follows a layer's BatchNorm in a block.
pub(crate) enum After<'a> {
    /// A ReLU, or nothing (the downsample).
    Relu(bool),
    /// The residual add, then the ReLU (the last layer).
    AddRelu(&'a Tensor),
}

/// `(y, mean, biased var)` of a conv + BatchNorm from the input, the
/// layer, `eps` and what follows.
type LayerOp<'f> =
    dyn Fn(&Tensor, &BlockLayer, f64, After) -> Result<(Tensor, Tensor, Tensor)> + 'f;

/// [`residual_block_train`] as one `layer` op per conv + BatchNorm, the
/// last with the residual (the generic and GPU paths pass theirs).
pub(crate) fn block_per_layer(
    x: &Tensor,
    layers: &[BlockLayer],
    downsample: Option<&BlockLayer>,
    eps: f64,
    layer: &LayerOp,
) -> Result<(Tensor, Vec<LayerStats>)> {
    let Some((last, inner)) = layers.split_last() else {
        candle_core::bail!("residual block: no layers")
    };
    let count = |y: &Tensor| -> Result<usize> { Ok(y.elem_count() / y.dim(1)?) };
    let mut stats = Vec::new();
    let mut ds_stats = None;
    let residual = match downsample {
        Some(l) => {
            let (r, mean, var) = layer(x, l, eps, After::Relu(false))?;
            ds_stats = Some((mean, var, count(&r)?));
            r
        }
        None => x.clone(),
    };
    let mut h = x.clone();
    for l in inner {
        let (y, mean, var) = layer(&h, l, eps, After::Relu(true))?;
        stats.push((mean, var, count(&y)?));
        h = y;
    }
    let (y, mean, var) = layer(&h, last, eps, After::AddRelu(&residual))?;
    stats.push((mean, var, count(&y)?));
    stats.extend(ds_stats);
    Ok((y, stats))
}

/// The per-layer CPU ops, for [`block_per_layer`].
fn cpu_layer(
    x: &Tensor,
    l: &BlockLayer,
    eps: f64,
    after: After,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (k, p, s, w, b) = (l.kernel, l.padding, l.stride, l.weight, l.bias);
    match after {
        After::AddRelu(residual) => {
            conv2d_batch_norm_add_relu_train(x, k, p, s, w, b, eps, residual)
        }
        After::Relu(relu) => conv2d_batch_norm_train(x, k, p, s, w, b, eps, relu),
    }
}

/// One layer of a [`BlockTrain`].
struct Stage {
    kernel_dims: (usize, usize, usize, usize),
    padding: usize,
    stride: usize,
    /// The kernel (contiguous), whether or not it is trainable.
    kernel: Tensor,
    /// Whether candle tracks the kernel: its gradient then goes out
    /// through the kernel token (see [`kernel_token`]).
    trainable: bool,
}

impl Stage {
    fn new(l: &BlockLayer) -> Result<Self> {
        Ok(Self {
            kernel_dims: l.kernel.dims4()?,
            padding: l.padding,
            stride: l.stride,
            kernel: l.kernel.detach().contiguous()?,
            trainable: l.kernel.track_op(),
        })
    }
}

/// What the forward pass keeps for the backward pass and the caller.
struct BlockSaved {
    /// The input of each main-path layer after the first.
    inputs: Vec<Vec<f32>>,
    /// Each layer's conv output (its BatchNorm's input), stage order.
    convs: Vec<Vec<f32>>,
    stats: Vec<Stats>,
    /// Values per channel of each layer's output.
    counts: Vec<usize>,
}

/// `x.apply_op2(packed, BlockTrain { .. })`, or with trainable kernels
/// `x.apply_op3(packed, token, ..)` (see [`kernel_token`]); `packed` holds
/// each layer's BatchNorm weight and bias, in stage order.
struct BlockTrain {
    /// The main path's layers, then the downsample's if any.
    stages: Vec<Stage>,
    /// Layers on the main path.
    main: usize,
    eps: f64,
    saved: Arc<Mutex<Option<BlockSaved>>>,
    /// The trainable kernels' gradients, from the backward pass to the
    /// kernel token's (see [`kernel_token`]).
    stash: Stash,
}

/// Kernel gradients handed from a [`BlockTrain`]'s backward to its tokens'.
type Stash = Arc<Mutex<Vec<Option<Tensor>>>>;

/// A stage's kernel and BatchNorm weight and bias.
struct Params<'a> {
    kernel: &'a [f32],
    weight: &'a [f32],
    bias: &'a [f32],
}

impl BlockTrain {
    /// Read guards on the kernels' storage, one per stage.
    fn guards(&self) -> Vec<(impl Deref<Target = Storage> + '_, &Layout)> {
        self.stages
            .iter()
            .map(|s| s.kernel.storage_and_layout())
            .collect()
    }

    /// Each stage's parameters: kernels from `guards`, weights and biases
    /// from `packed`.
    fn params<'a, G: Deref<Target = Storage>>(
        &self,
        packed: &'a [f32],
        guards: &'a [(G, &Layout)],
    ) -> Result<Vec<Params<'a>>> {
        let mut at = 0;
        let mut out = Vec::with_capacity(self.stages.len());
        for (s, guard) in self.stages.iter().zip(guards) {
            let o = s.kernel_dims.0;
            if packed.len() < at + 2 * o {
                candle_core::bail!(
                    "cpu residual block: {} BatchNorm parameter values, too few for its layers",
                    packed.len()
                )
            }
            let (storage, layout) = guard;
            let kernel = match &**storage {
                Storage::Cpu(cpu) => data(cpu, layout, "kernel")?,
                _ => candle_core::bail!("cpu residual block: a kernel is not on the CPU"),
            };
            out.push(Params {
                kernel,
                weight: &packed[at..at + o],
                bias: &packed[at + o..at + 2 * o],
            });
            at += 2 * o;
        }
        if at != packed.len() {
            candle_core::bail!(
                "cpu residual block: {} BatchNorm parameter values, expected {at}",
                packed.len()
            )
        }
        Ok(out)
    }

    /// Each stage's geometry, from the block input's dims.
    fn geometries(&self, x: (usize, usize, usize, usize)) -> Result<Vec<Geometry>> {
        let mut dims = x;
        let mut out = Vec::with_capacity(self.stages.len());
        for (i, s) in self.stages.iter().enumerate() {
            if i == self.main {
                dims = x;
            }
            let g = Geometry::new(dims, s.kernel_dims, s.padding, s.stride)?;
            let (n, _, oh, ow) = g.out_dims();
            if n * oh * ow < 2 {
                candle_core::bail!(
                    "cpu residual block: train mode needs more than one value per channel, got {:?}; use a larger batch",
                    g.out_dims()
                )
            }
            dims = g.out_dims();
            out.push(g);
        }
        Ok(out)
    }
}

/// The input gradient, the packed BatchNorm parameters' gradient, and
/// each stage's kernel gradient where it was computed.
type KernelGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Vec<Option<Vec<f32>>>);

/// `(N, C, H·W)` of a layer's output.
fn bn_dims(g: &Geometry) -> (usize, usize, usize) {
    let (n, o, oh, ow) = g.out_dims();
    (n, o, oh * ow)
}

impl BlockTrain {
    /// The forward pass, for both op kinds.
    fn forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = data(xs, xl, "block input")?;
        let guards = self.guards();
        let params = self.params(data(ps, pl, "block parameters")?, &guards)?;
        let geoms = self.geometries(xl.shape().dims4()?)?;
        let last = self.main - 1;
        let out_dims = geoms[last].out_dims();
        let (mut inputs, mut convs, mut stats) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..last {
            let input = inputs.last().map_or(x, |v: &Vec<f32>| v.as_slice());
            let conv = forward(&geoms[i], input, params[i].kernel, None);
            let (y, st) = bn_train_forward(
                &conv,
                bn_dims(&geoms[i]),
                params[i].weight,
                params[i].bias,
                self.eps,
                true,
                None,
            );
            convs.push(conv);
            stats.push(st);
            inputs.push(y);
        }
        let downsampled = if let Some(d) = geoms.get(self.main) {
            let p = &params[self.main];
            let conv = forward(d, x, p.kernel, None);
            let (r, st) =
                bn_train_forward(&conv, bn_dims(d), p.weight, p.bias, self.eps, false, None);
            Some((conv, st, r))
        } else {
            if xl.shape().dims4()? != out_dims {
                candle_core::bail!(
                    "cpu residual block: without a downsample the input {:?} must match the output {:?}",
                    xl.shape().dims(),
                    out_dims
                )
            }
            None
        };
        let residual = downsampled.as_ref().map_or(x, |(_, _, r)| r.as_slice());
        let input = inputs.last().map_or(x, |v| v.as_slice());
        let conv = forward(&geoms[last], input, params[last].kernel, None);
        let (y, st) = bn_train_forward(
            &conv,
            bn_dims(&geoms[last]),
            params[last].weight,
            params[last].bias,
            self.eps,
            true,
            Some(residual),
        );
        convs.push(conv);
        stats.push(st);
        if let Some((conv, st, _)) = downsampled {
            convs.push(conv);
            stats.push(st);
        }
        let counts = geoms.iter().map(|g| bn_dims(g).0 * bn_dims(g).2).collect();
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(BlockSaved {
            inputs,
            convs,
            stats,
            counts,
        });
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }

    /// The backward pass, for both op kinds: the input's and the packed
    /// BatchNorm parameters' gradients; with `need_k`, the trainable
    /// kernels' gradients go to the stash for the kernel token.
    fn grads(
        &self,
        x: &Tensor,
        packed: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        need_k: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_x, need_p) = (x.track_op(), packed.track_op());
        if !need_x && !need_p && !need_k {
            return Ok((None, None));
        }
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("cpu residual block: backward before forward")
        };
        let x = x.detach().contiguous()?;
        let packed = packed.detach().contiguous()?;
        let (y, grad) = (y.detach(), grad.detach().contiguous()?);
        let geoms = self.geometries(x.dims4()?)?;
        let guards = self.guards();
        let (dx, dpacked, dkernels) = with_data(&x, "block input", |xv| {
            with_data(&packed, "block parameters", |pv| {
                let params = self.params(pv, &guards)?;
                with_data(&y, "block output", |yv| {
                    with_data(&grad, "output gradient", |gv| {
                        let needs = (need_x, need_p, need_k);
                        Ok(self.backward(saved, &geoms, &params, (xv, yv, gv), needs))
                    })
                })
            })
        })?;
        let device = x.device();
        if need_k {
            let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
            stash.clear();
            for (dk, s) in dkernels.into_iter().zip(&self.stages) {
                if let Some(dk) = dk {
                    stash.push(Some(Tensor::from_vec(dk, s.kernel.shape(), device)?));
                }
            }
        }
        let dx = dx
            .map(|d| Tensor::from_vec(d, x.shape(), device))
            .transpose()?;
        let dpacked = dpacked
            .map(|d| {
                let len = d.len();
                Tensor::from_vec(d, len, device)
            })
            .transpose()?;
        Ok((dx, dpacked))
    }
}

impl BlockTrain {
    /// The input gradient (with `need_x`), the packed BatchNorm
    /// parameters' gradient (with `need_p`) and the trainable kernels'
    /// gradients (with `need_k`), from the block input `x`, output `y` and
    /// output gradient `g`.
    fn backward(
        &self,
        saved: &BlockSaved,
        geoms: &[Geometry],
        params: &[Params],
        (x, y, g): (&[f32], &[f32], &[f32]),
        (need_x, need_p, need_k): (bool, bool, bool),
    ) -> KernelGrads {
        let last = self.main - 1;
        // Per stage: (kernel gradient if trainable and wanted, BatchNorm's
        // dweight and dbias).
        let mut grads: Vec<(Option<Vec<f32>>, Vec<f32>)> = Vec::with_capacity(self.stages.len());
        grads.resize_with(self.stages.len(), || (None, Vec::new()));
        let input_of = |i: usize| {
            if i == 0 {
                x
            } else {
                saved.inputs[i - 1].as_slice()
            }
        };
        let bn = |i: usize, relu_from_input: bool, need_dconv: bool| BatchNormGrad {
            mean: saved.stats[i].mean.clone(),
            inv_std: saved.stats[i].inv_std.clone(),
            weight: params[i].weight.to_vec(),
            relu: relu_from_input || i == last,
            relu_from_input: relu_from_input
                .then(|| (saved.stats[i].scale.clone(), saved.stats[i].shift.clone())),
            need_x: need_dconv,
        };
        let trainable = |i: usize| need_k && self.stages[i].trainable;
        // The last layer: its ReLU's mask (from the output) is also the
        // residual's gradient.
        let (flat, masked) = bn(last, false, true).run_with_mask(
            &saved.convs[last],
            y,
            g,
            bn_dims(&geoms[last]),
            true,
        );
        let masked = masked.expect("the mask was asked for");
        let mut dh = self.layer_grads(
            last,
            geoms,
            params,
            &flat,
            input_of(last),
            &mut grads,
            trainable(last),
            true,
        );
        for i in (0..last).rev() {
            let need_dx = i > 0 || need_x;
            let need_dconv = need_dx || trainable(i);
            let dims = bn_dims(&geoms[i]);
            let conv = &saved.convs[i];
            let flat = bn(i, true, need_dconv).run(conv, conv, &dh.unwrap_or_default(), dims);
            dh = self.layer_grads(
                i,
                geoms,
                params,
                &flat,
                input_of(i),
                &mut grads,
                trainable(i),
                need_dx,
            );
        }
        let dres = if let Some(d) = geoms.get(self.main) {
            let i = self.main;
            let need_dconv = need_x || trainable(i);
            let conv = &saved.convs[i];
            let flat = bn(i, false, need_dconv).run(conv, conv, &masked, bn_dims(d));
            self.layer_grads(i, geoms, params, &flat, x, &mut grads, trainable(i), need_x)
        } else {
            need_x.then_some(masked)
        };
        let dx = match (dh, dres) {
            (Some(mut a), Some(b)) => {
                a.par_chunks_mut(ADD_CHUNK)
                    .zip(b.par_chunks(ADD_CHUNK))
                    .for_each(|(a, b)| add_into(a, b));
                Some(a)
            }
            _ => None,
        };
        let dpacked = need_p.then(|| grads.iter().flat_map(|(_, bn)| bn).copied().collect());
        let dkernels = grads.into_iter().map(|(k, _)| k).collect();
        (if need_x { dx } else { None }, dpacked, dkernels)
    }

    /// From a layer's BatchNorm gradient `flat` (`[dweight, dbias, dconv]`):
    /// records its parameter gradients (and its kernel's, if `trainable`)
    /// in `grads`, and returns its input gradient if `need_dx`.
    #[allow(clippy::too_many_arguments)]
    fn layer_grads(
        &self,
        i: usize,
        geoms: &[Geometry],
        params: &[Params],
        flat: &[f32],
        input: &[f32],
        grads: &mut [(Option<Vec<f32>>, Vec<f32>)],
        trainable: bool,
        need_dx: bool,
    ) -> Option<Vec<f32>> {
        let o = geoms[i].out_dims().1;
        let dconv = &flat[2 * o..];
        grads[i].1 = flat[..2 * o].to_vec();
        if trainable {
            grads[i].0 = Some(kernel_grad(&geoms[i], input, dconv));
        }
        need_dx.then(|| input_grad(&geoms[i], dconv, params[i].kernel))
    }
}

impl CustomOp2 for BlockTrain {
    fn name(&self) -> &'static str {
        "cpu-residual-block-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ps, pl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, packed, y, grad, false)
    }
}

/// With trainable kernels: `x.apply_op3(packed, token, ..)`, `token` from
/// [`kernel_token`].
impl CustomOp3 for BlockTrain {
    fn name(&self) -> &'static str {
        "cpu-residual-block-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        _ts: &CpuStorage,
        _tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl, ps, pl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        token: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_k = token.track_op();
        let (dx, dpacked) = self.grads(x, packed, y, grad, need_k)?;
        let dtoken = need_k.then(|| token.zeros_like()).transpose()?;
        Ok((dx, dpacked, dtoken))
    }
}

/// A one-value tensor that depends on the block's trainable `kernels`,
/// the block op's third operand: the kernels reach the block without being
/// copied into its packed operand (`Tensor::cat` would copy every kernel
/// each step, and route its gradient through two more zeroed tensors). The
/// block's backward leaves the kernel gradients in `stash`; candle runs the
/// token ops' backward after it (they are the block's inputs), and they
/// hand those gradients to the kernels. One op per kernel, chained:
/// `token(k₀)`, then `token(previous, kᵢ)`. `None` without kernels.
fn kernel_token(kernels: &[&Tensor], stash: &Stash) -> Result<Option<Tensor>> {
    let mut token: Option<Tensor> = None;
    for (index, kernel) in kernels.iter().enumerate() {
        let op = KernelToken {
            stash: stash.clone(),
            index,
        };
        token = Some(match token {
            None => kernel.apply_op1(op)?,
            Some(previous) => previous.apply_op2(kernel, op)?,
        });
    }
    Ok(token)
}

/// One link of [`kernel_token`]'s chain: kernel `index` of the stash.
struct KernelToken {
    stash: Stash,
    index: usize,
}

impl KernelToken {
    fn token() -> (CpuStorage, Shape) {
        (CpuStorage::F32(vec![0.0]), Shape::from(1))
    }

    /// The kernel's gradient from the stash (taken: each is handed once).
    fn kernel_grad(&self) -> Option<Tensor> {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        stash.get_mut(self.index).and_then(Option::take)
    }
}

impl candle_core::CustomOp1 for KernelToken {
    fn name(&self) -> &'static str {
        "cpu-residual-block-kernel-token"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok(Self::token())
    }

    fn bwd(&self, _kernel: &Tensor, _token: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.kernel_grad())
    }
}

impl CustomOp2 for KernelToken {
    fn name(&self) -> &'static str {
        "cpu-residual-block-kernel-token"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(Self::token())
    }

    fn bwd(
        &self,
        previous: &Tensor,
        _kernel: &Tensor,
        _token: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dprevious = previous
            .track_op()
            .then(|| previous.zeros_like())
            .transpose()?;
        Ok((dprevious, self.kernel_grad()))
    }
}
