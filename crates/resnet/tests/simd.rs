//! The CPU kernels give the same bits at every SIMD level this machine
//! supports: baseline SSE2, AVX2 and AVX-512 builds of each kernel do the
//! same operations in the same order. One test (the level is process-wide):
//! a narrow ResNet-18's training step (outputs and every gradient), its
//! eval-mode and inference forwards, at each level against the baseline.
//! The direct convolution (`cpu/direct.rs`) needs FMA and has no baseline
//! build; this model's 8-channel layers and small planes never take it,
//! and its last planes, 3×3, are not small enough for the valid-taps
//! variant (`tests/direct_conv.rs` checks that its AVX2 and AVX-512
//! builds agree).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::cpu::{self, SimdLevel};
use multilabel_resnet::{Arch, ResNet, ResNetConfig};

fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Everything the model computes on one batch, as bit patterns.
fn run(model: &ResNet, x: &Tensor) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    let logits = model.forward_t(x, true).unwrap();
    out.push(("train logits".into(), bits(&logits)));
    let weights = values(logits.dims(), 9);
    let loss = (logits * weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for group in model.param_groups() {
        for param in group.params {
            let grad = grads.get(param.var.as_tensor()).expect("a gradient");
            out.push((format!("grad {}", param.name), bits(grad)));
        }
    }
    for buffer in model.buffers() {
        out.push((buffer.name.clone(), bits(buffer.var.as_tensor())));
    }
    out.push((
        "eval logits".into(),
        bits(&model.forward_t(x, false).unwrap()),
    ));
    out.push((
        "infer logits".into(),
        bits(&model.forward_infer(x).unwrap()),
    ));
    out
}

#[test]
fn every_simd_level_gives_the_same_bits() {
    let detected = cpu::detected_simd_level();
    let levels: Vec<SimdLevel> = [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|&l| l <= detected)
        .collect();
    eprintln!("levels on this machine: {levels:?}");
    let mut results = Vec::new();
    for &level in &levels {
        cpu::set_simd_level(level).unwrap();
        assert_eq!(cpu::simd_level(), level);
        // A fresh model per level: the same seed, so the same weights and
        // running statistics before the step.
        let varmap = VarMap::new();
        let mut config = ResNetConfig::new(Arch::ResNet18, 5);
        config.base_width = 8;
        let model = ResNet::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            3,
        )
        .unwrap();
        // 67×75: odd sizes, so every kernel meets padding and remainders;
        // planes of 17×19 after the stem and 3×3 in the last stage.
        let x = values(&[3, 3, 67, 75], 1);
        results.push(run(&model, &x));
    }
    let (baseline, others) = results.split_first().unwrap();
    for (level, result) in levels[1..].iter().zip(others) {
        for ((name, want), (_, got)) in baseline.iter().zip(result) {
            assert!(want == got, "{name}: {level:?} differs from the baseline");
        }
    }
    if detected < SimdLevel::Avx512 {
        assert!(cpu::set_simd_level(SimdLevel::Avx512).is_err());
    }
    cpu::set_simd_level(detected).unwrap();
}

/// `gemm`'s level follows the CPU, capped by the build: with the default
/// `gemm-avx512` feature it is the detected level on any AVX2 machine.
/// (Not checked here: that lowering our kernels' level leaves it alone,
/// since the other test changes that level concurrently.)
#[test]
fn gemm_level_follows_the_cpu_and_the_build() {
    let detected = cpu::detected_simd_level();
    let cap = if cfg!(feature = "gemm-avx512") {
        SimdLevel::Avx512
    } else {
        SimdLevel::Avx2
    };
    assert_eq!(cpu::gemm_simd_level(), detected.min(cap));
}
