//! `just bench-cpu`: our CPU training speed next to PyTorch's and fastai's on
//! the same machine, with the same thread count.
//!
//! By default, ResNet-50 with fastai's head (random init: speed does not
//! depend on the weights), 128 px, batch 64, after warm-up:
//!
//! - `train_frozen`, `train_unfrozen`: images/s of forward, stable BCE,
//!   backward and an Adam step, with the body frozen (BatchNorm still
//!   trains, as fastai's `freeze()`) and unfrozen;
//! - `eval`: images/s of the forward pass in eval mode without a gradient
//!   graph (`ResNet::forward_infer`; PyTorch's side runs under `no_grad`);
//! - `data` (`data_1_worker`, `data_all_workers`): images/s of the training
//!   loader (decode, RandomResizedCrop, to tensor, normalise) with one worker
//!   and with `--threads` workers (fastai's main process, which runs its
//!   batch transforms, gets as many torch threads as there are workers),
//!   next to fastai's own `DataLoaders` built
//!   as the book builds them (`bench/fastai_data.py`), over the same
//!   generated PASCAL-sized dataset: `--images` JPEGs of 500×375 (PASCAL's
//!   typical photo), written once under `target/bench/`. Each side runs one
//!   warm-up epoch (worker start-up, page cache) and then
//!   [`DATA_EPOCHS`] timed epochs with its workers kept, counting the
//!   images that reach a batch;
//! - `peak_rss_mb`: the process's peak resident memory (VmHWM);
//! - `peak_gpu_mb` (on CUDA): ours, the device memory pool's high-water mark;
//!   PyTorch's, its allocator's `max_memory_allocated`.
//!
//! The reference side is `bench/pytorch_cpu.py` (training, eval, memory) and
//! `bench/fastai_data.py` (data), run with `--python PATH`, or
//! `MULTILABEL_BENCH_PYTHON`, or a virtualenv `.venv-bench` created on demand
//! with torch, torchvision, fastai, pillow and numpy from PyPI; if none of
//! that works it is skipped with a message. The table goes to stdout and
//! everything to `target/bench/cpu.json` (`ours`, `reference`, `ratio`).
//!
//! Two more modes, alone or together, instead of the above:
//!
//! - `--matrix`: training (frozen, unfrozen) and eval images/s next to
//!   PyTorch for ResNet-18 and ResNet-50 at 64, 128 and 224 px (batch 64;
//!   32 at 224 unless `--batch-size` is given); `target/bench/cpu-matrix.json`;
//! - `--e2e`: the whole recipe, `fine_tune(1, 3e-3, freeze_epochs=1)` from
//!   random weights, on `--e2e-images` generated 500×375 JPEGs (default
//!   1,000, a fifth of them validation; 10 classes): ours through the
//!   `multilabel` binary as a user runs it, fastai through its own
//!   `DataLoaders` and `fine_tune` (`bench/fastai_e2e.py`), each as wall time
//!   from start to the saved model, with mAP and accuracy_multi (0.2) of the
//!   result, for each of `--seeds N` seeds and their mean and spread;
//!   `target/bench/cpu-e2e.json`.
//!
//! Every mode prints the CPU model and the SIMD level each side runs at.
//!
//! Flags (after `--`): `--arch NAME` (default resnet50), `--batch-size N`,
//! `--iters N`, `--warmup N`, `--rounds N` (both sides measured N times,
//! alternating, each keeping its best), `--size N`, `--threads N`, `--images N`
//! (generated images for the data measurement, default 512), `--python
//! PATH`, `--no-pytorch`, `--only PHASES` (comma list of
//! `train_frozen,train_unfrozen,eval,data`), `--matrix`, `--e2e`, `--seeds
//! N`, `--e2e-images N`, `--device D`, `--precision f32|tf32|bf16`. Each also reads `MULTILABEL_BENCH_<FLAG>` (e.g.
//! `MULTILABEL_BENCH_BATCH_SIZE=16`, `MULTILABEL_BENCH_MATRIX=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multilabel_data::{
    Dataset, DatasetConfig, Loader, LoaderConfig, SynthConfig, TransformConfig, synth,
};
use multilabel_resnet::{Arch, ResNet, ResNetConfig};
use multilabel_train::{Adam, AdamConfig, StepHypers, bce_with_logits, opt_groups};
use serde_json::{Value, json};

const PHASES: [&str; 4] = ["train_frozen", "train_unfrozen", "eval", "data"];
/// The table's rows: what the phases measure.
const METRICS: [&str; 7] = [
    "train_frozen",
    "train_unfrozen",
    "eval",
    "data_1_worker",
    "data_all_workers",
    "peak_rss_mb",
    "peak_gpu_mb",
];
/// Timed epochs of the data measurement, after one warm-up epoch.
const DATA_EPOCHS: usize = 2;
/// The generated images' size: PASCAL VOC's typical photo.
const PASCAL_SIZE: (u32, u32) = (500, 375);
const N_CLASSES: usize = 20;
/// The flags that take a value, each also read from `MULTILABEL_BENCH_<FLAG>`.
const VALUE_FLAGS: [&str; 14] = [
    "device",
    "precision",
    "batch-size",
    "iters",
    "warmup",
    "size",
    "threads",
    "images",
    "python",
    "only",
    "arch",
    "seeds",
    "e2e-images",
    "rounds",
];
/// The cells of `--matrix`: every architecture at every size.
const MATRIX_ARCHS: [Arch; 2] = [Arch::ResNet18, Arch::ResNet50];
const MATRIX_SIZES: [usize; 3] = [64, 128, 224];
/// The training and eval phases, which the matrix measures per cell.
const MODEL_PHASES: [&str; 3] = ["train_frozen", "train_unfrozen", "eval"];

/// What `--help` prints.
const HELP: &str = "\
just bench-cpu [FLAGS]: our CPU training and eval speed next to PyTorch's (same threads),
and the data pipeline next to fastai's DataLoaders; writes target/bench/cpu.json.

Modes (instead of the default ResNet-50 @ 128 px measurement):
  --matrix            ResNet-18/50 at 64, 128 and 224 px; target/bench/cpu-matrix.json
  --e2e               the whole fine_tune(1, 3e-3, freeze_epochs=1) through the CLI next to
                      fastai's, wall time, mAP, accuracy_multi; target/bench/cpu-e2e.json

Flags (each also read from MULTILABEL_BENCH_<FLAG>, e.g. MULTILABEL_BENCH_BATCH_SIZE=16):
  --arch NAME         resnet18, resnet34, resnet50, ... (default resnet50)
  --size N            image side in pixels (default 128)
  --batch-size N      images per step (default 64; 32 at 224 px in the matrix)
  --iters N           timed steps per phase (default 3), after --warmup N (default 1);
                      each rate is the batch over the median timed step
  --rounds N          measure both sides N times, alternating, and keep each side's best
                      (default 1; on a shared machine 2 or 3 steady the ratios)
  --threads N         threads for both sides (default: every core)
  --only PHASES       comma list of train_frozen,train_unfrozen,eval,data
  --images N          generated JPEGs for the data measurement (default 512)
  --seeds N           --e2e seeds per side (default 1); --e2e-images N (default 1000)
  --python PATH       the Python with torch/fastai (default: .venv-bench, made on demand)
  --precision P       f32 (default), tf32 or bf16 on CUDA: ours with ResNetConfig::tf32 or
                      Precision::Bf16, PyTorch with TF32 or bf16 autocast + channels_last
  --device D          cpu (default), cuda, cuda:N or metal: the model phases on that device,
                      both sides (the data pipeline is CPU work and is measured only on cpu;
                      --e2e only on cpu); on a GPU use more steps, e.g. --warmup 3 --iters 20
  --no-pytorch        measure our side only

`just bench-cpu-avx2 [FLAGS]` runs the same with an AVX2-only machine's paths on an AVX-512
one: gemm built without its AVX-512 kernels, ours at MULTILABEL_SIMD=avx2, PyTorch at AVX2.
";

#[derive(Debug, Clone)]
struct Options {
    arch: Arch,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    device: String,
    /// `f32`, `tf32` or `bf16` (the last two on CUDA only).
    precision: String,
    /// `--batch-size` was given (the matrix then uses it at every size).
    batch_given: bool,
    /// Measure every cell of [`MATRIX_ARCHS`] × [`MATRIX_SIZES`].
    matrix: bool,
    /// Time the whole recipe through the CLI next to fastai's.
    e2e: bool,
    seeds: usize,
    e2e_images: usize,
    /// Measurements of both sides, alternating; each keeps its best.
    rounds: usize,
    batch_size: usize,
    iters: usize,
    warmup: usize,
    size: usize,
    threads: usize,
    images: usize,
    python: Option<PathBuf>,
    pytorch: bool,
    only: Vec<String>,
}

fn env_flag(name: &str) -> Option<String> {
    let key = format!("MULTILABEL_BENCH_{}", name.to_uppercase().replace('-', "_"));
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn parse_options() -> Result<Options> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut flags: BTreeMap<String, String> = BTreeMap::new();
    for name in VALUE_FLAGS {
        if let Some(v) = env_flag(name) {
            flags.insert(name.into(), v);
        }
    }
    let mut pytorch = env_flag("no-pytorch").is_none();
    let mut matrix = env_flag("matrix").is_some();
    let mut e2e = env_flag("e2e").is_some();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes `--bench` to every harness-less bench.
            "--bench" => {}
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--no-pytorch" => pytorch = false,
            "--matrix" => matrix = true,
            "--e2e" => e2e = true,
            flag if flag.starts_with("--") => {
                let (name, value) = match flag[2..].split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => {
                        let v = args
                            .next()
                            .with_context(|| format!("{flag} needs a value"))?;
                        (flag[2..].to_string(), v)
                    }
                };
                flags.insert(name, value);
            }
            other => bail!("unexpected argument {other}; see --help"),
        }
    }
    let number = |name: &str, default: usize| -> Result<usize> {
        match flags.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .with_context(|| format!("--{name} must be a whole number, got {v}")),
        }
    };
    let only = match flags.get("only") {
        None => PHASES.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let only: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
            if let Some(bad) = only.iter().find(|p| !PHASES.contains(&p.as_str())) {
                bail!("--only: unknown phase {bad}; use {}", PHASES.join(","));
            }
            only
        }
    };
    for name in flags.keys() {
        if !VALUE_FLAGS.contains(&name.as_str()) {
            bail!("unknown flag --{name}; see --help");
        }
    }
    let arch = match flags.get("arch") {
        None => Arch::ResNet50,
        Some(name) => name.parse().map_err(|e| anyhow::anyhow!("--arch: {e}"))?,
    };
    let device = flags.get("device").cloned().unwrap_or_else(|| "cpu".into());
    let on_cpu = device == "cpu";
    let known = on_cpu
        || device == "cuda"
        || device == "metal"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if !known {
        bail!("--device: expected cpu, cuda, cuda:N or metal, got {device}");
    }
    let precision = flags
        .get("precision")
        .cloned()
        .unwrap_or_else(|| "f32".into());
    if !["f32", "tf32", "bf16"].contains(&precision.as_str()) {
        bail!("--precision: expected f32, tf32 or bf16, got {precision}");
    }
    if precision != "f32" && !device.starts_with("cuda") {
        bail!("--precision {precision} is for CUDA devices; use --device cuda");
    }
    if !on_cpu && e2e {
        bail!(
            "--e2e runs on the CPU only (the fastai side needs fastai, which the GPU machine lacks)"
        );
    }
    let only = if on_cpu {
        only
    } else {
        if flags
            .get("only")
            .is_some_and(|l| l.split(',').any(|p| p.trim() == "data"))
        {
            bail!("--only data: the data pipeline is CPU work, measured only with --device cpu");
        }
        only.into_iter().filter(|p| p != "data").collect()
    };
    let options = Options {
        arch,
        device,
        precision,
        batch_given: flags.contains_key("batch-size"),
        matrix,
        e2e,
        seeds: number("seeds", 1)?,
        e2e_images: number("e2e-images", 1000)?,
        rounds: number("rounds", 1)?,
        batch_size: number("batch-size", 64)?,
        iters: number("iters", 3)?,
        warmup: number("warmup", 1)?,
        size: number("size", 128)?,
        threads: number("threads", threads)?,
        images: number("images", 512)?,
        python: flags.get("python").map(PathBuf::from),
        pytorch,
        only,
    };
    if options.batch_size < 2
        || options.iters == 0
        || options.threads == 0
        || options.seeds == 0
        || options.rounds == 0
    {
        bail!(
            "--batch-size must be at least 2, --iters, --threads, --seeds and --rounds at least 1"
        );
    }
    if options.e2e_images < 10 {
        bail!("--e2e-images must be at least 10");
    }
    Ok(options)
}

/// Peak resident memory of this process in MiB (VmHWM).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn optimizer(model: &ResNet) -> Result<Adam> {
    Ok(Adam::new(opt_groups(model), AdamConfig::default())?)
}

/// Images/s of `iters` training steps after `warmup` more.
fn time_train(
    model: &mut ResNet,
    frozen: bool,
    x: &Tensor,
    y: &Tensor,
    o: &Options,
) -> Result<f64> {
    if frozen {
        model.freeze();
    } else {
        model.unfreeze();
    }
    let mut opt = optimizer(model)?;
    let hypers = StepHypers {
        lrs: vec![1e-4; opt.groups().len()],
        mom: 0.9,
    };
    // Seconds spent in forward (with the loss), backward and the Adam step.
    let mut split = [0f64; 3];
    let mut step = |model: &ResNet, split: &mut [f64; 3]| -> Result<f32> {
        let t0 = Instant::now();
        let logits = model.forward_t(x, true)?;
        let loss = bce_with_logits(&logits, y, None)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, &hypers)?;
        drop(grads);
        let t3 = Instant::now();
        split[0] += (t1 - t0).as_secs_f64();
        split[1] += (t2 - t1).as_secs_f64();
        split[2] += (t3 - t2).as_secs_f64();
        Ok(loss.to_scalar::<f32>()?)
    };
    for _ in 0..o.warmup {
        step(model, &mut [0.0; 3])?;
    }
    let mut steps = Vec::with_capacity(o.iters);
    for _ in 0..o.iters {
        let start = Instant::now();
        let loss = step(model, &mut split)?;
        steps.push(start.elapsed().as_secs_f64());
        if !loss.is_finite() {
            bail!("training loss became {loss}");
        }
    }
    let ms = |s: f64| s * 1000.0 / o.iters as f64;
    let median = median(&mut steps);
    eprintln!(
        "ours: {:.0} ms/step (median; mean {:.0} = forward+loss {:.0}, backward {:.0}, optimizer {:.0})",
        median * 1000.0,
        ms(steps.iter().sum()),
        ms(split[0]),
        ms(split[1]),
        ms(split[2])
    );
    Ok(o.batch_size as f64 / median)
}

/// The median of `values` (the mean of the middle two for an even count):
/// each side's rate comes from its median timed step, so that one step
/// slowed by another process on a shared machine does not move it.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n.is_multiple_of(2) {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    } else {
        values[n / 2]
    }
}

fn time_eval(model: &ResNet, x: &Tensor, o: &Options) -> Result<f64> {
    for _ in 0..o.warmup {
        model.forward_infer(x)?;
    }
    let mut steps = Vec::with_capacity(o.iters);
    for _ in 0..o.iters {
        let start = Instant::now();
        // Reading a value back makes sure the work is done.
        model.forward_infer(x)?.sum_all()?.to_scalar::<f32>()?;
        steps.push(start.elapsed().as_secs_f64());
    }
    Ok(o.batch_size as f64 / median(&mut steps))
}

/// Writes (once) a generated dataset of `n` PASCAL-sized JPEGs, every row
/// a training row, under `target/bench/`.
fn pascal_sized_dataset(target: &Path, n: usize) -> Result<PathBuf> {
    let (w, h) = PASCAL_SIZE;
    let root = target.join(format!("bench/synth-{n}-{w}x{h}"));
    if !root.join("train.csv").exists() {
        eprintln!("writing {n} generated {w}x{h} JPEGs to {}", root.display());
        synth(&SynthConfig {
            out: root.clone(),
            n_train: n,
            n_valid: 0,
            classes: 6,
            seed: 0,
            image_size: Some(PASCAL_SIZE),
        })
        .with_context(|| format!("writing a synthetic dataset to {}", root.display()))?;
    }
    Ok(root)
}

/// The worker counts the data measurement uses: one, and all threads.
fn data_workers(o: &Options) -> Vec<usize> {
    let mut workers = vec![1, o.threads];
    workers.dedup();
    workers
}

/// The metric a worker count is reported under.
fn data_metric(workers: usize) -> &'static str {
    if workers == 1 {
        "data_1_worker"
    } else {
        "data_all_workers"
    }
}

/// Our training loader's images/s for each of [`data_workers`]: normalised
/// `f32` batches on the CPU, as training gets them.
fn time_data(root: &Path, o: &Options) -> Result<BTreeMap<String, f64>> {
    let dataset = Dataset::load(&DatasetConfig::new(root))?;
    let mut items = dataset.train().to_vec();
    items.extend_from_slice(dataset.valid());
    let n_items = items.len();
    let transform = TransformConfig {
        size: o.size,
        ..TransformConfig::default()
    };
    let mut out = BTreeMap::new();
    for workers in data_workers(o) {
        eprintln!("ours: data pipeline, {workers} worker(s)");
        let mut config = LoaderConfig::train(o.batch_size, 0);
        config.threads = Some(workers);
        let loader = Loader::new(
            items.clone(),
            dataset.vocab().len(),
            transform.clone(),
            config,
            Device::Cpu,
        );
        // One warm-up epoch starts the pool and fills the page cache.
        for batch in loader.epoch(0) {
            batch?;
        }
        let mut count = 0;
        let start = Instant::now();
        for epoch in 1..=DATA_EPOCHS {
            for batch in loader.epoch(epoch) {
                count += batch?.indices.len();
            }
        }
        if count == 0 {
            bail!(
                "the loader produced no batch from {n_items} images; use --images >= --batch-size"
            );
        }
        let rate = count as f64 / start.elapsed().as_secs_f64();
        out.insert(data_metric(workers).to_string(), rate);
    }
    Ok(out)
}

/// Our side: every phase in `o.only`.
fn ours(o: &Options, data_root: Option<&Path>) -> Result<BTreeMap<String, f64>> {
    let device = bench_device(&o.device)?;
    #[cfg(feature = "cuda")]
    multilabel_resnet::cuda::reset_peak_memory(&device);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut config = ResNetConfig::new(o.arch, N_CLASSES);
    config.tf32 = o.precision == "tf32";
    if o.precision == "bf16" {
        config.precision = multilabel_resnet::Precision::Bf16;
    }
    let mut model = ResNet::new(&config, vb, 0)?;
    let x = Tensor::randn(0f32, 1.0, (o.batch_size, 3, o.size, o.size), &device)?;
    let y = Tensor::rand(0f32, 1.0, (o.batch_size, N_CLASSES), &device)?
        .lt(0.1)?
        .to_dtype(DType::F32)?;
    let mut out = BTreeMap::new();
    let wants = |p: &str| o.only.iter().any(|q| q == p);
    for (phase, frozen) in [("train_frozen", true), ("train_unfrozen", false)] {
        if wants(phase) {
            eprintln!("ours: {phase}");
            out.insert(phase.into(), time_train(&mut model, frozen, &x, &y, o)?);
        }
    }
    if wants("eval") {
        eprintln!("ours: eval");
        out.insert("eval".into(), time_eval(&model, &x, o)?);
    }
    if let Some(root) = data_root {
        out.extend(time_data(root, o)?);
    }
    // The pool's high-water mark: every tensor and cuDNN workspace (PyTorch
    // reports its allocator's, which counts the same things).
    #[cfg(feature = "cuda")]
    if let Some(bytes) = multilabel_resnet::cuda::peak_memory(&device) {
        out.insert("peak_gpu_mb".into(), bytes as f64 / 1048576.0);
    }
    if let Some(mb) = peak_rss_mb() {
        out.insert("peak_rss_mb".into(), mb);
    }
    Ok(out)
}

/// The device `--device` names; an error that says what is missing when
/// this build or machine lacks it.
fn bench_device(spec: &str) -> Result<Device> {
    let device = match spec {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0)
            .context("--device metal: build with `--features multilabel/metal` on a Mac")?,
        cuda => {
            let ordinal = cuda.strip_prefix("cuda:").map_or(Ok(0), str::parse)?;
            Device::new_cuda(ordinal).with_context(|| {
                format!("--device {cuda}: build with `--features multilabel/cuda` (or cudnn), and run where the NVIDIA driver is")
            })?
        }
    };
    // Freed memory stays in the pool for the next step, as in the CLI.
    #[cfg(feature = "cuda")]
    multilabel_resnet::cuda::keep_pool_memory(&device);
    Ok(device)
}

/// A Python with torch and fastai: the flag, the environment, or `.venv-bench`
/// (created on demand). `Err` says why there is none.
fn python(o: &Options, root: &Path) -> std::result::Result<PathBuf, String> {
    if let Some(p) = &o.python {
        return Ok(p.clone());
    }
    let venv = root.join(".venv-bench");
    let bin = venv.join("bin/python");
    let has_torch = |py: &Path| {
        Command::new(py)
            .args(["-c", "import torch, torchvision, fastai, PIL, numpy"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if bin.exists() && has_torch(&bin) {
        return Ok(bin);
    }
    eprintln!(
        "creating {} with torch, torchvision, fastai, pillow, numpy from PyPI (once; several minutes)",
        venv.display()
    );
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map_err(|e| format!("python3 -m venv failed to start: {e}"))?;
    if !created.success() {
        return Err(format!("python3 -m venv {} failed", venv.display()));
    }
    let installed = Command::new(&bin)
        .args(["-m", "pip", "install", "--quiet"])
        .args(["torch", "torchvision", "fastai", "pillow", "numpy"])
        .status()
        .map_err(|e| format!("pip failed to start: {e}"))?;
    if !installed.success() || !has_torch(&bin) {
        return Err("pip could not install torch, torchvision, fastai, pillow and numpy".into());
    }
    Ok(bin)
}

/// Runs a reference script with `py` and returns the last JSON object it
/// prints on stdout (its progress goes to our stderr).
fn run_script(
    py: &Path,
    script: &Path,
    args: &[String],
    threads: usize,
) -> std::result::Result<Value, String> {
    let name = script
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let output = Command::new(py)
        .arg(script)
        .args(args)
        // One thread count for every library PyTorch may use.
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{} failed to start: {e}", py.display()))?;
    if !output.status.success() {
        return Err(format!("bench/{name} exited with {}", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("bench/{name} printed no JSON: {stdout}"))
}

/// PyTorch's training, eval and memory figures (`bench/pytorch_cpu.py`).
fn pytorch(
    o: &Options,
    py: &Path,
    root: &Path,
) -> std::result::Result<BTreeMap<String, f64>, String> {
    let only: Vec<&str> = o
        .only
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "data")
        .collect();
    let mut out = BTreeMap::new();
    if only.is_empty() {
        return Ok(out);
    }
    let args = [
        "--device",
        &o.device,
        "--precision",
        &o.precision,
        "--arch",
        o.arch.name(),
        "--threads",
        &o.threads.to_string(),
        "--batch-size",
        &o.batch_size.to_string(),
        "--size",
        &o.size.to_string(),
        "--warmup",
        &o.warmup.to_string(),
        "--iters",
        &o.iters.to_string(),
        "--only",
        &only.join(","),
    ]
    .map(String::from);
    let value = run_script(py, &root.join("bench/pytorch_cpu.py"), &args, o.threads)?;
    for key in METRICS {
        if let Some(v) = value.get(key).and_then(Value::as_f64) {
            out.insert(key.to_string(), v);
        }
    }
    if let (Some(v), Some(simd)) = (value.get("torch"), value.get("simd")) {
        eprintln!("pytorch: torch {v}, CPU capability {simd}");
    }
    if let Some(gpu) = value.get("gpu") {
        eprintln!("pytorch: {gpu}");
    }
    Ok(out)
}

/// fastai's data-pipeline figures (`bench/fastai_data.py`) over `data_root`.
fn fastai(
    o: &Options,
    py: &Path,
    root: &Path,
    data_root: &Path,
) -> std::result::Result<BTreeMap<String, f64>, String> {
    let workers = data_workers(o);
    let list: Vec<String> = workers.iter().map(usize::to_string).collect();
    let args = [
        "--data".to_string(),
        data_root.display().to_string(),
        "--size".into(),
        o.size.to_string(),
        "--batch-size".into(),
        o.batch_size.to_string(),
        "--workers".into(),
        list.join(","),
        "--epochs".into(),
        DATA_EPOCHS.to_string(),
    ];
    let value = run_script(py, &root.join("bench/fastai_data.py"), &args, o.threads)?;
    if let Some(v) = value.get("versions") {
        eprintln!("fastai side: {v}");
    }
    let mut out = BTreeMap::new();
    for w in workers {
        let rate = value
            .pointer(&format!("/workers/{w}"))
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("bench/fastai_data.py gave no figure for {w} worker(s)"))?;
        out.insert(data_metric(w).to_string(), rate);
    }
    Ok(out)
}

/// The reference side: PyTorch, and fastai for the data pipeline.
fn reference(
    o: &Options,
    root: &Path,
    data_root: Option<&Path>,
) -> std::result::Result<BTreeMap<String, f64>, String> {
    let py = python(o, root)?;
    eprintln!("reference: {}", py.display());
    let mut out = pytorch(o, &py, root)?;
    if let Some(data) = data_root {
        out.extend(fastai(o, &py, root, data)?);
    }
    Ok(out)
}

fn main() -> Result<()> {
    let o = parse_options()?;
    // The allocation policy the `multilabel` binary uses; off with
    // `MULTILABEL_BENCH_DEFAULT_ALLOCATOR=1` to see what it is worth.
    if env_flag("default-allocator").is_none() {
        multilabel_resnet::cpu::keep_freed_memory();
    }
    // Both sides get the same number of threads: rayon (ours, candle, gemm)
    // reads this before its pool starts, and the CLI run by `--e2e`
    // inherits it.
    // SAFETY: nothing else runs yet.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", o.threads.to_string()) };
    // As the CLI does (see `use_main_thread_in_pool`); off with
    // `MULTILABEL_BENCH_OUTSIDE_POOL=1` to see what it is worth.
    if env_flag("outside-pool").is_none() {
        multilabel_resnet::cpu::use_main_thread_in_pool();
    }
    // The reference scripts live in the source tree; a binary carried to
    // another machine (the GPU check) finds them in the current directory.
    let mut root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !root.join("bench/pytorch_cpu.py").exists() {
        root = std::env::current_dir()?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    std::fs::create_dir_all(target.join("bench"))?;
    let machine = machine();
    eprintln!("{machine}");
    if o.matrix {
        run_matrix(&o, &root, &target, &machine)?;
    }
    if o.e2e {
        run_e2e(&o, &root, &target, &machine)?;
    }
    if !o.matrix && !o.e2e {
        run_single(&o, &root, &target, &machine)?;
    }
    Ok(())
}

/// The CPU's model name and the SIMD level our side runs at.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    json!({ "cpu": cpu, "simd": simd_level() })
}

/// The widest vectors `gemm` (the convolutions' products) uses on this
/// CPU in this build, and the level our own kernels run at (both chosen at
/// run time; ours can be lowered with `MULTILABEL_SIMD=baseline|avx2`,
/// `gemm`'s only by building without the `gemm-avx512` feature).
fn simd_level() -> String {
    use multilabel_resnet::cpu::{SimdLevel, gemm_simd_level, simd_level};
    let ours = simd_level().name();
    let gemm = if cfg!(target_arch = "aarch64") {
        "NEON"
    } else if !cfg!(target_arch = "x86_64") {
        "scalar"
    } else {
        match gemm_simd_level() {
            SimdLevel::Avx512 => "AVX-512 (x86-v4)",
            SimdLevel::Avx2 => "AVX2+FMA (x86-v3)",
            SimdLevel::Baseline => "SSE2 (baseline)",
        }
    };
    format!("gemm {gemm}, own kernels {ours}")
}

/// Ours and the reference's figures for one configuration, and their ratios.
fn measure(o: &Options, root: &Path, data_root: Option<&Path>) -> Result<Measured> {
    let mut ours_best = BTreeMap::new();
    let mut theirs_best: Option<BTreeMap<String, f64>> = None;
    for round in 0..o.rounds {
        if o.rounds > 1 {
            eprintln!("round {} of {}", round + 1, o.rounds);
        }
        keep_best(&mut ours_best, ours(o, data_root)?);
        // Our model and activations are dropped by now; give their pages
        // back, so that the other side does not run next to the gigabytes
        // `keep_freed_memory` keeps for reuse.
        multilabel_resnet::cpu::release_freed_memory();
        if !o.pytorch {
            eprintln!("reference side skipped: --no-pytorch");
            continue;
        }
        match reference(o, root, data_root) {
            Ok(t) => keep_best(theirs_best.get_or_insert_with(BTreeMap::new), t),
            Err(why) => {
                eprintln!("reference side skipped: {why}");
                break;
            }
        }
    }
    let (ours, theirs) = (ours_best, theirs_best);
    let mut ratio = BTreeMap::new();
    if let Some(t) = &theirs {
        for (key, v) in &ours {
            if let Some(p) = t.get(key).filter(|p| **p > 0.0) {
                ratio.insert(key.clone(), v / p);
            }
        }
    }
    Ok(Measured {
        ours,
        theirs,
        ratio,
    })
}

/// Merges one round's figures into `best`: the highest rate of each
/// metric, and the highest peak memory.
fn keep_best(best: &mut BTreeMap<String, f64>, round: BTreeMap<String, f64>) {
    for (key, v) in round {
        let slot = best.entry(key).or_insert(v);
        *slot = slot.max(v);
    }
}

struct Measured {
    ours: BTreeMap<String, f64>,
    theirs: Option<BTreeMap<String, f64>>,
    ratio: BTreeMap<String, f64>,
}

/// `--matrix`: training and eval at every architecture and size.
fn run_matrix(o: &Options, root: &Path, target: &Path, machine: &Value) -> Result<()> {
    let mut cells = Vec::new();
    println!();
    println!(
        "| {:<8} | {:>4} | {:>5} | {:<14} | {:>9} | {:>9} | {:>6} |",
        "arch", "px", "batch", "metric", "ours", "pytorch", "ratio"
    );
    println!(
        "|{:-<10}|{:->6}|{:->7}|{:-<16}|{:->11}|{:->11}|{:->8}|",
        "", "", "", "", "", "", ""
    );
    for arch in MATRIX_ARCHS {
        for size in MATRIX_SIZES {
            let batch_size = if o.batch_given || size < 224 {
                o.batch_size
            } else {
                o.batch_size.min(32)
            };
            let cell = Options {
                arch,
                size,
                batch_size,
                only: MODEL_PHASES.iter().map(|p| p.to_string()).collect(),
                ..o.clone()
            };
            eprintln!("matrix: {arch} at {size} px, batch {batch_size}");
            let mut m = measure(&cell, root, None)?;
            // Our peak memory is the whole process's, over every cell so
            // far, so it says nothing about this one; the matrix leaves it out.
            m.ours.remove("peak_rss_mb");
            m.ratio.remove("peak_rss_mb");
            if let Some(t) = &mut m.theirs {
                t.remove("peak_rss_mb");
            }
            for key in MODEL_PHASES {
                let fmt = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                println!(
                    "| {:<8} | {:>4} | {:>5} | {:<14} | {:>9} | {:>9} | {:>6} |",
                    arch.name(),
                    size,
                    batch_size,
                    key,
                    fmt(m.ours.get(key)),
                    fmt(m.theirs.as_ref().and_then(|t| t.get(key))),
                    m.ratio.get(key).map_or("-".into(), |r| format!("{r:.2}")),
                );
            }
            cells.push(json!({
                "arch": arch.name(), "size": size, "batch_size": batch_size,
                "ours": m.ours, "pytorch": m.theirs, "ratio": m.ratio,
            }));
        }
    }
    println!(
        "(images/s from the median step; ratio = ours / pytorch, higher is better; {} threads, {} warm-up + {} timed steps, best of {} rounds)",
        o.threads, o.warmup, o.iters, o.rounds
    );
    let json = json!({
        "machine": machine,
        "config": { "device": o.device, "precision": o.precision, "threads": o.threads, "warmup": o.warmup, "iters": o.iters, "rounds": o.rounds, "rate": "batch over the median step" },
        "cells": cells,
    });
    write_json(&target.join("bench/cpu-matrix.json"), &json)
}

fn write_json(path: &Path, json: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One whole run of the recipe: wall seconds and the validation figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct RunResult {
    wall_s: f64,
    map: f64,
    accuracy_multi: f64,
}

/// Classes of the end-to-end dataset (every shape `synth` has).
const E2E_CLASSES: usize = 10;

/// Writes (once) the end-to-end dataset: `n` PASCAL-sized JPEGs, a fifth of
/// them validation rows.
fn e2e_dataset(target: &Path, n: usize) -> Result<PathBuf> {
    let (w, h) = PASCAL_SIZE;
    let root = target.join(format!("bench/e2e-{n}-{w}x{h}"));
    if !root.join("train.csv").exists() {
        eprintln!("writing {n} generated {w}x{h} JPEGs to {}", root.display());
        synth(&SynthConfig {
            out: root.clone(),
            n_train: n - n / 5,
            n_valid: n / 5,
            classes: E2E_CLASSES,
            seed: 0,
            image_size: Some(PASCAL_SIZE),
        })
        .with_context(|| format!("writing a synthetic dataset to {}", root.display()))?;
    }
    Ok(root)
}

/// The recipe's settings for both sides: `fine_tune(1, 3e-3, freeze_epochs=1)`.
const E2E_EPOCHS: usize = 1;
const E2E_FREEZE_EPOCHS: usize = 1;
const E2E_BASE_LR: f64 = 3e-3;

/// Our side: `multilabel train` as a user runs it, timed from start to
/// exit (the saved model), then `multilabel eval` (not timed) for mAP and
/// accuracy_multi at 0.2.
fn ours_e2e(o: &Options, data: &Path, run: &Path, seed: usize) -> Result<RunResult> {
    let bin = env!("CARGO_BIN_EXE_multilabel");
    if run.exists() {
        std::fs::remove_dir_all(run).with_context(|| format!("removing {}", run.display()))?;
    }
    let start = Instant::now();
    let status = Command::new(bin)
        .arg("train")
        .arg("--data")
        .arg(data)
        .arg("--run")
        .arg(run)
        .args([
            "--arch",
            o.arch.name(),
            "--weights",
            "none",
            "--device",
            "cpu",
        ])
        .args([
            "--size",
            &o.size.to_string(),
            "--bs",
            &o.batch_size.to_string(),
        ])
        .args(["--epochs", &E2E_EPOCHS.to_string()])
        .args(["--freeze-epochs", &E2E_FREEZE_EPOCHS.to_string()])
        .args(["--base-lr", &E2E_BASE_LR.to_string()])
        .args(["--seed", &seed.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("starting multilabel train")?;
    let wall_s = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("multilabel train exited with {status}");
    }
    let report = run.join("e2e-eval.json");
    let status = Command::new(bin)
        .arg("eval")
        .arg("--run")
        .arg(run)
        .args(["--thresh", "0.2", "--device", "cpu"])
        .arg("--json")
        .arg(&report)
        .stdout(std::process::Stdio::null())
        .status()
        .context("starting multilabel eval")?;
    if !status.success() {
        bail!("multilabel eval exited with {status}");
    }
    let value: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let get = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("{} has no {k}", report.display()))
    };
    Ok(RunResult {
        wall_s,
        map: get("map")?,
        accuracy_multi: get("accuracy_multi")?,
    })
}

/// fastai's side: `bench/fastai_e2e.py`.
fn fastai_e2e(
    o: &Options,
    py: &Path,
    root: &Path,
    data: &Path,
    out: &Path,
    seed: usize,
) -> std::result::Result<RunResult, String> {
    let args = [
        "--data".to_string(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--arch".into(),
        o.arch.name().to_string(),
        "--size".into(),
        o.size.to_string(),
        "--batch-size".into(),
        o.batch_size.to_string(),
        "--epochs".into(),
        E2E_EPOCHS.to_string(),
        "--freeze-epochs".into(),
        E2E_FREEZE_EPOCHS.to_string(),
        "--base-lr".into(),
        E2E_BASE_LR.to_string(),
        "--workers".into(),
        o.threads.to_string(),
        "--threads".into(),
        o.threads.to_string(),
        "--seed".into(),
        seed.to_string(),
    ];
    let value = run_script(py, &root.join("bench/fastai_e2e.py"), &args, o.threads)?;
    let get = |k: &str| {
        value
            .get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("bench/fastai_e2e.py gave no {k}"))
    };
    if let (Some(v), Some(simd)) = (value.get("versions"), value.get("simd")) {
        eprintln!("fastai side: {v}, CPU capability {simd}");
    }
    Ok(RunResult {
        wall_s: get("wall_s")?,
        map: get("map")?,
        accuracy_multi: get("accuracy_multi")?,
    })
}

/// Mean and sample standard deviation.
fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `--e2e`: the whole recipe through our CLI next to fastai's, per seed.
fn run_e2e(o: &Options, root: &Path, target: &Path, machine: &Value) -> Result<()> {
    let data = e2e_dataset(target, o.e2e_images)?;
    let py = if o.pytorch {
        match python(o, root) {
            Ok(py) => Some(py),
            Err(why) => {
                eprintln!("fastai side skipped: {why}");
                None
            }
        }
    } else {
        None
    };
    let mut ours_runs = Vec::new();
    let mut fastai_runs = Vec::new();
    for seed in 0..o.seeds {
        eprintln!("e2e: ours, {} at {} px, seed {seed}", o.arch, o.size);
        let run = target.join(format!("bench/e2e-run-ours-{seed}"));
        let r = ours_e2e(o, &data, &run, seed)?;
        eprintln!("e2e: ours {r:?}");
        ours_runs.push(r);
        if let Some(py) = &py {
            eprintln!("e2e: fastai, seed {seed}");
            let out = target.join(format!("bench/e2e-run-fastai-{seed}"));
            match fastai_e2e(o, py, root, &data, &out, seed) {
                Ok(r) => {
                    eprintln!("e2e: fastai {r:?}");
                    fastai_runs.push(r);
                }
                Err(why) => eprintln!("fastai side failed: {why}"),
            }
        }
    }
    println!();
    println!(
        "whole recipe, fine_tune({E2E_EPOCHS}, {E2E_BASE_LR}, freeze_epochs={E2E_FREEZE_EPOCHS}), {} at {} px, batch {}, {} images ({} valid), random init, {} threads",
        o.arch,
        o.size,
        o.batch_size,
        o.e2e_images,
        o.e2e_images / 5,
        o.threads
    );
    println!(
        "| {:>4} | {:>10} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "seed", "ours s", "fastai s", "ours mAP", "fa mAP", "ours acc", "fa acc"
    );
    println!(
        "|{:->6}|{:->12}|{:->12}|{:->10}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", "", ""
    );
    let fmt = |r: Option<&RunResult>, f: fn(&RunResult) -> f64, digits: usize| {
        r.map_or("-".to_string(), |r| format!("{:.*}", digits, f(r)))
    };
    for seed in 0..o.seeds {
        let (a, b) = (ours_runs.get(seed), fastai_runs.get(seed));
        println!(
            "| {:>4} | {:>10} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} |",
            seed,
            fmt(a, |r| r.wall_s, 1),
            fmt(b, |r| r.wall_s, 1),
            fmt(a, |r| r.map, 4),
            fmt(b, |r| r.map, 4),
            fmt(a, |r| r.accuracy_multi, 4),
            fmt(b, |r| r.accuracy_multi, 4),
        );
    }
    let summary = |runs: &[RunResult]| {
        let pick = |f: fn(&RunResult) -> f64| mean_sd(&runs.iter().map(f).collect::<Vec<_>>());
        json!({
            "wall_s": pick(|r| r.wall_s), "map": pick(|r| r.map),
            "accuracy_multi": pick(|r| r.accuracy_multi),
        })
    };
    let ours_summary = summary(&ours_runs);
    let fastai_summary = (!fastai_runs.is_empty()).then(|| summary(&fastai_runs));
    println!("mean, sd over seeds: ours {ours_summary}");
    if let Some(f) = &fastai_summary {
        println!("mean, sd over seeds: fastai {f}");
        let (ours_wall, _) = mean_sd(&ours_runs.iter().map(|r| r.wall_s).collect::<Vec<_>>());
        let (fastai_wall, _) = mean_sd(&fastai_runs.iter().map(|r| r.wall_s).collect::<Vec<_>>());
        println!(
            "wall time ratio ours / fastai: {:.2} (lower is better)",
            ours_wall / fastai_wall
        );
    }
    let json = json!({
        "machine": machine,
        "config": {
            "arch": o.arch.name(), "size": o.size, "batch_size": o.batch_size,
            "device": o.device, "threads": o.threads, "images": o.e2e_images, "valid": o.e2e_images / 5,
            "classes": E2E_CLASSES, "epochs": E2E_EPOCHS, "freeze_epochs": E2E_FREEZE_EPOCHS,
            "base_lr": E2E_BASE_LR, "weights": "random",
        },
        "ours": { "runs": ours_runs, "mean_sd": ours_summary },
        "fastai": { "runs": fastai_runs, "mean_sd": fastai_summary },
    });
    write_json(&target.join("bench/cpu-e2e.json"), &json)
}

/// The default mode: one configuration, every phase of `--only`.
fn run_single(o: &Options, root: &Path, target: &Path, machine: &Value) -> Result<()> {
    eprintln!(
        "{} + fastai head, {} px, batch {}, on {}, {} threads, {} warm-up + {} timed steps",
        o.arch, o.size, o.batch_size, o.device, o.threads, o.warmup, o.iters
    );
    let data_root = if o.only.iter().any(|p| p == "data") {
        Some(pascal_sized_dataset(target, o.images)?)
    } else {
        None
    };
    let Measured {
        ours,
        theirs,
        ratio,
    } = measure(o, root, data_root.as_deref())?;
    println!();
    println!(
        "| {:<16} | {:>10} | {:>10} | {:>8} |",
        "metric", "ours", "reference", "ratio"
    );
    println!("|{:-<18}|{:->12}|{:->12}|{:->10}|", "", "", "", "");
    for key in METRICS {
        let fmt = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "| {:<16} | {:>10} | {:>10} | {:>8} |",
            key,
            fmt(ours.get(key)),
            fmt(theirs.as_ref().and_then(|t| t.get(key))),
            ratio.get(key).map_or("-".into(), |r| format!("{r:.2}")),
        );
    }
    println!(
        "(images/s except peak_*_mb in MiB; reference: PyTorch, and fastai's DataLoaders for data_*; \
         ratio = ours / reference, higher is better except for memory)"
    );
    let json = json!({
        "machine": machine,
        "config": {
            "arch": o.arch.name(), "size": o.size, "batch_size": o.batch_size,
            "threads": o.threads, "warmup": o.warmup, "iters": o.iters, "rounds": o.rounds,
            "data_images": o.images, "data_image_size": PASCAL_SIZE,
            "data_workers": data_workers(o), "data_epochs": DATA_EPOCHS,
        },
        "ours": ours,
        "reference": theirs,
        "ratio": ratio,
    });
    write_json(&target.join("bench/cpu.json"), &json)
}
