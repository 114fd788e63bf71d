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
/// A CUDA device keeps freed memory in its pool for the next steps.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let device = open_device(spec)?;
    #[cfg(feature = "cuda")]
    multilabel_resnet::cuda::keep_pool_memory(&device);
    Ok(device)
}

fn open_device(spec: &str) -> anyhow::Result<Device> {
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
                return Device::new_metal(0).map_err(|err| {
                    anyhow::anyhow!(
                        "starting the Metal device: {}",
                        first_line(&err.to_string())
                    )
                });
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
            Device::new_metal(0).map_err(|err| {
                anyhow::anyhow!(
                    "starting the Metal device: {}",
                    first_line(&err.to_string())
                )
            })
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
            // candle's error carries a backtrace when RUST_BACKTRACE is set:
            // keep its first line.
            Device::new_cuda(ordinal).map_err(|err| {
                anyhow::anyhow!(
                    "--device {spec}: CUDA device {ordinal} cannot start ({}); check the GPU and driver with nvidia-smi, or use --device cpu",
                    first_line(&err.to_string())
                )
            })
        }
    }
}

/// A name for the device, for messages.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => match rayon::current_num_threads() {
            1 => "cpu (1 thread)".into(),
            n => format!("cpu ({n} threads)"),
        },
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
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

/// Builds the model described by the run's `model.json` and loads
/// `model.safetensors`, after checking that the two files agree with each
/// other: an error names the file at fault.
pub fn load_run_model(run: &RunDir, device: &Device) -> anyhow::Result<LoadedModel> {
    let meta_path = run.model_meta_path();
    let weights_path = run.model_weights_path();
    let meta = run
        .load_model_meta()
        .with_context(|| format!("reading the model bundle of run {}", run.path().display()))?;
    let mut config = check_model_meta(&meta, &meta_path)?;
    if !device.is_cuda() {
        // The weights are f32 whatever the body trained in; off CUDA (no
        // bf16 convolutions) the model evaluates in f32.
        config.precision = multilabel_resnet::Precision::F32;
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::new(&config, vb, 0)
        .with_context(|| format!("{}: building the model it describes", meta_path.display()))?;
    let weights = run
        .load_model_weights(device)
        .with_context(|| format!("reading the model bundle of run {}", run.path().display()))?;
    // Named for messages: the network model.json describes.
    let described = format!(
        "{} of width {} with {} outputs",
        config.arch.name(),
        config.base_width,
        config.head.n_classes
    );
    let head_name = format!("head.{}.linear.weight", config.head.hidden.len());
    if let Some(n_outputs) = weights.get(&head_name).and_then(|t| t.dims().first())
        && *n_outputs != meta.vocab.len()
    {
        bail!(
            "{}: the head has {n_outputs} outputs but {} lists {} labels; the two files are \
                 from different runs: copy the pair from one run",
            weights_path.display(),
            meta_path.display(),
            meta.vocab.len()
        );
    }
    {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("the model's variables are poisoned"))?;
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            match weights.get(name) {
                Some(tensor) if tensor.dims() == var.dims() => {
                    var.set(&tensor.to_dtype(var.dtype())?)
                        .with_context(|| format!("loading {name}"))?;
                }
                Some(tensor) => bail!(
                    "{}: tensor {name} has shape {:?} but the {described} that {} describes \
                     needs {:?}; the two files do not belong together",
                    weights_path.display(),
                    tensor.dims(),
                    meta_path.display(),
                    var.dims()
                ),
                None => missing.push(name.clone()),
            }
        }
        let mut unexpected: Vec<String> = weights
            .keys()
            .filter(|name| !data.contains_key(*name))
            .cloned()
            .collect();
        for (what, names) in [("missing", &mut missing), ("unexpected", &mut unexpected)] {
            if !names.is_empty() {
                names.sort();
                bail!(
                    "{}: {} tensors {what} for the {described} that {} describes, e.g. {}; \
                     the two files do not belong together",
                    weights_path.display(),
                    names.len(),
                    meta_path.display(),
                    names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(LoadedModel {
        model,
        meta,
        _varmap: varmap,
    })
}

/// The model configuration in `model.json`, once its fields agree with each
/// other: the `arch` and `base_width` entries with the `model` entry, the
/// vocab with the head's outputs, and the image settings with what the
/// transforms accept.
fn check_model_meta(meta: &ModelMeta, meta_path: &Path) -> anyhow::Result<ResNetConfig> {
    let path = meta_path.display();
    let config: ResNetConfig = serde_json::from_value(meta.model.clone())
        .with_context(|| format!("{path}: the `model` entry is not a model configuration"))?;
    if meta.arch != config.arch.name() || meta.base_width != config.base_width {
        bail!(
            "{path}: `arch` and `base_width` say {} of width {} but the `model` entry says {} of \
             width {}; the file was edited: make them agree",
            meta.arch,
            meta.base_width,
            config.arch.name(),
            config.base_width
        );
    }
    if meta.vocab.len() != config.head.n_classes {
        bail!(
            "{path}: the vocab lists {} labels but the `model` entry's head has {} outputs; \
             the file was edited: make them agree",
            meta.vocab.len(),
            config.head.n_classes
        );
    }
    if !(meta.threshold > 0.0 && meta.threshold < 1.0) {
        bail!(
            "{path}: `threshold` must be between 0 and 1, got {}",
            meta.threshold
        );
    }
    if let Some(thresholds) = &meta.class_thresholds {
        if thresholds.len() != meta.vocab.len() {
            bail!(
                "{path}: `class_thresholds` has {} values for {} labels; the file was edited: \
                 remove the entry or run `eval --per-class --save` again",
                thresholds.len(),
                meta.vocab.len()
            );
        }
        if let Some((name, t)) = meta
            .vocab
            .iter()
            .zip(thresholds)
            .find(|(_, t)| !(**t > 0.0 && **t < 1.0))
        {
            bail!("{path}: the threshold of `{name}` must be between 0 and 1, got {t}");
        }
    }
    run_transform(meta)
        .validate()
        .with_context(|| format!("{path}: the image settings are not usable"))?;
    Ok(config)
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

/// The validation loader of a dataset for an evaluation: one pass, so
/// nothing is kept for a next epoch.
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
        LoaderConfig {
            cache: false,
            ..LoaderConfig::valid(batch_size)
        },
        device.clone(),
    )
}

/// Loads a dataset, saying which folder when it fails.
pub fn load_dataset(config: &DatasetConfig) -> anyhow::Result<Dataset> {
    Dataset::load(config)
        .with_context(|| format!("loading the dataset in {}", config.root.display()))
}

/// The test-time augmentation flags of `eval` and `predict`.
#[derive(Debug, Clone, clap::Args)]
pub struct TtaArgs {
    /// Test-time augmentation (fastai's `tta`): the mean of --tta-n
    /// predictions under the training crops (and flips, if the run trained
    /// with them), blended with the plain prediction by --tta-beta
    #[arg(long)]
    pub tta: bool,
    /// Augmented passes of --tta
    #[arg(long, default_value_t = 4, value_name = "N", requires = "tta")]
    pub tta_n: usize,
    /// Weight of the plain prediction in --tta: aug + beta·(plain − aug)
    #[arg(long, default_value_t = 0.25, value_name = "BETA", requires = "tta")]
    pub tta_beta: f32,
    /// Seed of --tta's crops
    #[arg(long, default_value_t = 0, requires = "tta")]
    pub tta_seed: u64,
}

impl Default for TtaArgs {
    fn default() -> Self {
        let defaults = multilabel_train::TtaConfig::default();
        Self {
            tta: false,
            tta_n: defaults.n,
            tta_beta: defaults.beta,
            tta_seed: defaults.seed,
        }
    }
}

impl TtaArgs {
    /// The checked configuration, or `None` without `--tta`.
    pub fn config(&self) -> anyhow::Result<Option<multilabel_train::TtaConfig>> {
        if !self.tta {
            return Ok(None);
        }
        if self.tta_n == 0 || !(0.0..=1.0).contains(&self.tta_beta) {
            bail!("--tta-n must be at least 1 and --tta-beta between 0 and 1");
        }
        Ok(Some(multilabel_train::TtaConfig {
            n: self.tta_n,
            beta: self.tta_beta,
            seed: self.tta_seed,
        }))
    }
}

/// The training augmentation a run used (its crop settings live in
/// `config.json`), for test-time augmentation; the default crop, with a
/// note, when the run has no readable `config.json`.
pub fn training_transform(
    run: &RunDir,
    train_config: Option<&super::train::TrainConfig>,
    meta: &ModelMeta,
) -> TransformConfig {
    match train_config {
        Some(config) => TransformConfig {
            size: meta.image_size,
            mean: meta.mean,
            std: meta.std,
            ..config.transform.clone()
        },
        None => {
            eprintln!(
                "note: {} has no readable config.json; --tta uses the default crop (min_scale 0.35, no flip)",
                run.path().display()
            );
            run_transform(meta)
        }
    }
}

/// [`multilabel_train::tta`] with a line of progress per pass.
pub fn run_tta(
    model: &ResNet,
    loader: &Loader,
    train_transform: &TransformConfig,
    config: &multilabel_train::TtaConfig,
) -> multilabel_train::Result<multilabel_train::TtaPreds> {
    eprintln!("test-time augmentation: {} passes", config.n + 1);
    multilabel_train::tta(model, loader, train_transform, config, &mut |k, n| {
        eprintln!("  pass {}/{n}", k + 1)
    })
}
