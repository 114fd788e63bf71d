//! Parity with PyTorch: narrow torchvision bodies with fastai's head, values
//! written by `tests/fixtures/make_fixtures.py` (torch 2.15.0, torchvision 0.29.2).
//!
//! For a basic-block and a bottleneck network this compares eval-mode logits
//! and features, train-mode logits, every running statistic after one
//! train-mode forward, and gradients of `Σ logits · upstream` with respect to
//! the input and chosen weights — all within a relative error of 1e-4 of a
//! float64 PyTorch reference.
//!
//! A third network has ResNet-50's full depth. There, train mode loses
//! digits to BatchNorm over small batches in any float32 implementation
//! (PyTorch's own float32 gradients are up to ~2e-3 off its float64 ones), so
//! each value must be within 1e-4 or within twice PyTorch's float32 error,
//! whichever is larger.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::{Arch, HeadConfig, ResNet, ResNetConfig};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// max |a - b| / max |b|: relative to the scale of the reference tensor.
fn relative_error(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let diff = (ours - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    let scale = reference.abs().unwrap().flatten_all().unwrap();
    let max = |t: Tensor| t.max(0).unwrap().to_scalar::<f32>().unwrap();
    max(diff) / max(scale).max(1e-12)
}

struct Case {
    file: &'static str,
    arch: Arch,
    blocks: [usize; 4],
    base_width: usize,
    /// Allow twice PyTorch's own float32 error where that exceeds 1e-4.
    allow_torch_f32_error: bool,
}

struct Loaded {
    model: ResNet,
    varmap: VarMap,
    tensors: HashMap<String, Tensor>,
}

fn load(case: &Case) -> Loaded {
    let device = Device::Cpu;
    let tensors = candle_core::safetensors::load(fixture(case.file), &device).unwrap();
    let config = ResNetConfig {
        arch: case.arch,
        base_width: case.base_width,
        head: HeadConfig {
            n_classes: 5,
            ps: 0.0,
            hidden: vec![32],
            concat_pool: true,
        },
        kernels: Default::default(),
        tf32: false,
        precision: Default::default(),
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = ResNet::with_stage_blocks(&config, case.blocks, vb, 0).unwrap();
    // Every variable of the model (parameters and running statistics) is in
    // the fixture under the same name; extra fixture tensors are ignored.
    {
        let vars = varmap.data().lock().unwrap();
        let expected = tensors
            .keys()
            .filter(|k| !k.starts_with("fixture."))
            .count();
        assert_eq!(
            vars.len(),
            expected,
            "model and fixture differ in tensor count"
        );
        for (name, var) in vars.iter() {
            let value = tensors
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing in fixture"));
            var.set(value).unwrap();
        }
    }
    Loaded {
        model,
        varmap,
        tensors,
    }
}

fn run(case: &Case) {
    let Loaded {
        model,
        varmap,
        tensors,
    } = load(case);
    let get = |name: &str| tensors[name].clone();
    let input = get("fixture.input");
    let mut worst = 0f32;
    // `key` is the fixture name without its `fixture.` prefix.
    let check = |key: &str, ours: &Tensor, reference: &Tensor, worst: &mut f32| {
        let err = relative_error(ours, reference);
        let torch_err = tensors[&format!("fixture.torch_f32_error.{key}")]
            .to_vec1::<f32>()
            .unwrap()[0];
        // At full ResNet-50 depth in train mode (width 2), f32 rounding is
        // amplified through 16 blocks of batch statistics: PyTorch's own f32
        // gradients are up to 2.4e-3 off its f64 ones. Where our excess over
        // that came from, measured by swapping ops for the generic ones
        // (`Kernels::Generic`) one layer at a time: the stem conv's forward
        // alone, its rounding amplified ~1e4 times. With f32 accumulation the
        // worst value here was 6.5 times PyTorch's error (1.54e-2,
        // `grad.layer1.0.downsample.0.weight`); swapping any other stage
        // changed nothing. The CPU kernels now compute the conv that reads
        // the image in f64 and round once (`cpu/conv.rs`, `forward_exact`),
        // and the worst ratio is 1.83 (4.36e-3 against PyTorch's 2.38e-3, the
        // same key; 1.56 for the input gradient), the same with gemm's AVX2
        // and AVX-512 kernels. What is left is noise against noise, and at
        // this depth the noise pattern alone moves it: with the blocks of
        // one stage on the generic ops (candle's convs, which are as exact
        // as ours one op at a time), the worst ratio is 0.91 (layer1), 2.08
        // (layer2), 1.91 (layer3), 1.84 (layer4); with all blocks generic,
        // 0.53. So 2x holds today with a small margin; a kernel change that
        // moves this case past it without moving the shallow cases is
        // changing the rounding pattern, not losing accuracy.
        let tolerance = if case.allow_torch_f32_error {
            TOLERANCE.max(2.0 * torch_err)
        } else {
            TOLERANCE
        };
        println!("{key}: relative error {err:.2e} (pytorch float32 {torch_err:.2e})");
        *worst = worst.max(err);
        assert!(
            err <= tolerance,
            "{key}: relative error {err} > {tolerance}"
        );
    };

    let eval_features = model.features_t(&input, false).unwrap();
    check(
        "eval_features",
        &eval_features,
        &get("fixture.eval_features"),
        &mut worst,
    );
    let eval_logits = model.forward_t(&input, false).unwrap();
    check(
        "eval_logits",
        &eval_logits,
        &get("fixture.eval_logits"),
        &mut worst,
    );

    // Eval mode touched no running statistic.
    for buffer in model.buffers() {
        let before = &tensors[&buffer.name];
        assert_eq!(
            relative_error(buffer.var.as_tensor(), before),
            0.0,
            "{}",
            buffer.name
        );
    }

    let input_var = candle_core::Var::from_tensor(&input).unwrap();
    let train_logits = model.forward_t(input_var.as_tensor(), true).unwrap();
    check(
        "train_logits",
        &train_logits,
        &get("fixture.train_logits"),
        &mut worst,
    );

    for buffer in model.buffers() {
        let key = format!("after.{}", buffer.name);
        let reference = get(&format!("fixture.{key}"));
        check(&key, buffer.var.as_tensor(), &reference, &mut worst);
    }

    let loss = (train_logits * get("fixture.upstream"))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    check(
        "grad.input",
        grads.get(input_var.as_tensor()).unwrap(),
        &get("fixture.grad.input"),
        &mut worst,
    );
    let vars = varmap.data().lock().unwrap();
    let mut n_grads = 0;
    for (key, reference) in &tensors {
        let Some(name) = key.strip_prefix("fixture.grad.") else {
            continue;
        };
        if name == "input" {
            continue;
        }
        let grad = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        check(&format!("grad.{name}"), grad, reference, &mut worst);
        n_grads += 1;
    }
    assert!(n_grads >= 11);
    println!("{}: worst relative error {worst:.2e}", case.file);
}

#[test]
fn basic_block_network_matches_pytorch() {
    run(&Case {
        file: "parity_basic.safetensors",
        arch: Arch::ResNet18,
        blocks: [2, 2, 2, 2],
        base_width: 4,
        allow_torch_f32_error: false,
    });
}

#[test]
fn bottleneck_network_matches_pytorch() {
    run(&Case {
        file: "parity_bottleneck.safetensors",
        arch: Arch::ResNet50,
        blocks: [1, 2, 2, 1],
        base_width: 2,
        allow_torch_f32_error: false,
    });
}

#[test]
fn resnet50_depth_network_matches_pytorch_within_float32_noise() {
    run(&Case {
        file: "parity_resnet50_depth.safetensors",
        arch: Arch::ResNet50,
        blocks: [3, 4, 6, 3],
        base_width: 2,
        allow_torch_f32_error: true,
    });
}

/// The stem's max-pool on inputs full of ties: forward values and the
/// gradient going to the first maximum of each window, as in PyTorch.
#[test]
fn max_pool_matches_pytorch_with_ties() {
    let tensors =
        candle_core::safetensors::load(fixture("max_pool.safetensors"), &Device::Cpu).unwrap();
    for (label, pool) in [
        (
            "cpu kernel",
            multilabel_resnet::max_pool_3x3_s2 as fn(&Tensor) -> candle_core::Result<Tensor>,
        ),
        ("composed", multilabel_resnet::max_pool_composed),
    ] {
        let x = candle_core::Var::from_tensor(&tensors["input"]).unwrap();
        let y = pool(x.as_tensor()).unwrap();
        assert_eq!(
            relative_error(&y, &tensors["output"]),
            0.0,
            "{label} forward"
        );
        let grads = (y * &tensors["upstream"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x.as_tensor()).unwrap();
        let err = relative_error(grad, &tensors["grad"]);
        assert!(err < 1e-6, "{label} gradient: relative error {err}");
    }
}
