//! Pieces the training and evaluation commands share: device choice, run
//! folders, building the model and loaders from a saved run.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use multilabel_data::{Dataset, DatasetConfig, Item, Loader, LoaderConfig, TransformConfig};
use multilabel_resnet::{ResNet, ResNetConfig};
use multilabel_train::{ModelMeta, RunDir};

/// Where runs go when `--run` is not given.
pub const RUNS_DIR: &str = "runs";

/// `--device`: `auto` (CUDA, then Metal, then CPU), `cpu`, `cuda`, `cuda:N`, `metal`.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                // A CUDA build on a machine whose driver has no usable GPU
                // (or is the toolkit's stub) runs on the CPU instead.
                match Device::new_cuda(0) {
                    Ok(device) => return Ok(device),
                    Err(err) => eprintln!(
                        "note: this is a CUDA build but CUDA device 0 cannot start ({}); running on the CPU",
                        first_line(&err.to_string())
                    ),
                }
            }
            if candle_core::utils::metal_is_available() {
                return Device::new_metal(0).context("starting the Metal device");
            }
            Ok(Device::Cpu)
        }
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!(
                    "--device metal: this build has no Metal support; rebuild with `--features metal` (MULTILABEL_FEATURES=metal just ...)"
                )
            }
            Device::new_metal(0).context("starting the Metal device")
        }
        _ => {
            let Some(rest) = spec.strip_prefix("cuda") else {
                bail!("--device {spec}: expected auto, cpu, cuda, cuda:N or metal")
            };
            let ordinal = match rest.strip_prefix(':') {
                None if rest.is_empty() => 0,
                Some(n) => n
                    .parse::<usize>()
                    .with_context(|| format!("--device {spec}: `{n}` is not a GPU number"))?,
                None => bail!("--device {spec}: expected cuda or cuda:N"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {spec}: this build has no CUDA support; rebuild with `--features cuda` (MULTILABEL_FEATURES=cuda just ...)"
                )
            }
            Device::new_cuda(ordinal).with_context(|| format!("starting CUDA device {ordinal}"))
        }
    }
}

/// A name for the device, for messages.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon_threads()),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The first line of a message, shortened to 160 characters.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    if line.chars().count() > 160 {
        format!("{}…", line.chars().take(160).collect::<String>())
    } else {
        line.to_string()
    }
}

/// The run folder named by `--run`, or `runs/latest` when none is given.
pub fn resolve_run(run: Option<&Path>) -> anyhow::Result<RunDir> {
    let path = match run {
        Some(path) => path.to_path_buf(),
        None => {
            let latest = PathBuf::from(RUNS_DIR).join("latest");
            if !latest.exists() {
                bail!(
                    "no run given and {} does not exist; train first (`just train`) or pass --run DIR",
                    latest.display()
                );
            }
            latest
        }
    };
    RunDir::open(&path).with_context(|| format!("opening run {}", path.display()))
}

/// A saved run's model, ready for evaluation, with its metadata.
pub struct LoadedModel {
    pub model: ResNet,
    pub meta: ModelMeta,
    /// Holds the model's variables; dropped with the model.
    pub _varmap: VarMap,
}

/// Builds the model described by the run's `model.json` and loads `model.safetensors`.
pub fn load_run_model(run: &RunDir, device: &Device) -> anyhow::Result<LoadedModel> {
    let meta = run.load_model_meta().context("reading model.json")?;
    let config: ResNetConfig = serde_json::from_value(meta.model.clone()).with_context(|| {
        format!(
            "{}: the `model` entry is not a model configuration",
            run.model_meta_path().display()
        )
    })?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::new(&config, vb, 0).context("building the model of the run")?;
    let weights = run
        .load_model_weights(device)
        .context("reading model.safetensors")?;
    {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            match weights.get(name) {
                Some(tensor) if tensor.dims() == var.dims() => {
                    var.set(&tensor.to_dtype(var.dtype())?)
                        .with_context(|| format!("loading {name}"))?;
                }
                Some(tensor) => bail!(
                    "{}: tensor {name} has shape {:?}, the model needs {:?}",
                    run.model_weights_path().display(),
                    tensor.dims(),
                    var.dims()
                ),
                None => missing.push(name.clone()),
            }
        }
        if !missing.is_empty() {
            missing.sort();
            bail!(
                "{}: {} tensors missing, e.g. {}",
                run.model_weights_path().display(),
                missing.len(),
                missing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(LoadedModel {
        model,
        meta,
        _varmap: varmap,
    })
}

/// The transform a run was trained with.
pub fn run_transform(meta: &ModelMeta) -> TransformConfig {
    TransformConfig {
        size: meta.image_size,
        mean: meta.mean,
        std: meta.std,
        ..TransformConfig::default()
    }
}

/// Validation items of `data`, with labels re-indexed to the run's vocab. A
/// label the run does not know is an error naming it.
pub fn valid_items_for_vocab(data: &Dataset, vocab: &[String]) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::with_capacity(data.valid().len());
    for item in data.valid() {
        let mut labels = Vec::with_capacity(item.labels.len());
        for &label in &item.labels {
            let name = &data.vocab()[label];
            let index = vocab.iter().position(|v| v == name).with_context(|| {
                format!(
                    "{}: label `{name}` is not in the run's vocab ({} classes)",
                    item.path.display(),
                    vocab.len()
                )
            })?;
            labels.push(index);
        }
        items.push(Item {
            path: item.path.clone(),
            labels,
        });
    }
    Ok(items)
}

/// The validation loader of a dataset for an evaluation.
pub fn valid_loader(
    items: Vec<Item>,
    n_classes: usize,
    transform: TransformConfig,
    batch_size: usize,
    device: &Device,
) -> Loader {
    Loader::new(
        items,
        n_classes,
        transform,
        LoaderConfig::valid(batch_size),
        device.clone(),
    )
}

/// Loads a dataset, saying which folder when it fails.
pub fn load_dataset(config: &DatasetConfig) -> anyhow::Result<Dataset> {
    Dataset::load(config)
        .with_context(|| format!("loading the dataset in {}", config.root.display()))
}
