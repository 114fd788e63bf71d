//! ResNet-50 (fastai head, 20 classes) on the CPU: forward (eval mode and
//! fused inference) and forward+backward time per image, body frozen and unfrozen.
//!
//! `cargo bench -p multilabel-resnet --bench resnet50`; environment variables
//! `RESNET_BENCH_BATCH` (default 64), `RESNET_BENCH_SIZE` (128) and
//! `RESNET_BENCH_ITERS` (1, after one warm-up) change the workload.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_resnet::{Arch, ResNet, ResNetConfig};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Mean seconds per call of `f` over `iters` calls after one warm-up.
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_secs_f64() / iters as f64
}

fn main() -> candle_core::Result<()> {
    // As the CLI and `bench-cpu` do: keep freed activations mapped.
    multilabel_resnet::cpu::keep_freed_memory();
    let batch = env_usize("RESNET_BENCH_BATCH", 64);
    let size = env_usize("RESNET_BENCH_SIZE", 128);
    let iters = env_usize("RESNET_BENCH_ITERS", 1).max(1);
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut model = ResNet::new(&ResNetConfig::new(Arch::ResNet50, 20), vb, 0)
        .map_err(candle_core::Error::wrap)?;
    let images = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &device)?;
    println!(
        "resnet50 + fastai head, {batch}x3x{size}x{size} f32, {} rayon threads, {iters} iterations after a warm-up",
        rayon::current_num_threads()
    );
    let per_image = |seconds: f64| seconds * 1000.0 / batch as f64;

    let eval = time(iters, || {
        model.forward_t(&images, false).unwrap();
    });
    println!(
        "forward eval               {:8.2} ms/image",
        per_image(eval)
    );
    let infer = time(iters, || {
        model.forward_infer(&images).unwrap();
    });
    println!(
        "forward inference (fused)  {:8.2} ms/image",
        per_image(infer)
    );
    for frozen in [true, false] {
        if frozen {
            model.freeze();
        } else {
            model.unfreeze();
        }
        let label = if frozen { "frozen  " } else { "unfrozen" };
        let forward = time(iters, || {
            model.forward_t(&images, true).unwrap();
        });
        let step = time(iters, || {
            let loss = model.forward_t(&images, true).unwrap().sum_all().unwrap();
            loss.backward().unwrap();
        });
        println!(
            "forward train {label}     {:8.2} ms/image",
            per_image(forward)
        );
        println!("forward+backward {label}  {:8.2} ms/image", per_image(step));
    }
    Ok(())
}
