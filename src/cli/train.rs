//! `train` and `lr-find`: fastai's `fine_tune` recipe from the command line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use multilabel_data::{
    DatasetConfig, IMAGENET_MEAN, IMAGENET_STD, Loader, LoaderConfig, SplitConfig, TransformConfig,
    default_cache_dir, download_pascal_2007,
};
use multilabel_resnet::{
    Arch, DEFAULT_HUB_REPO, Kernels, Precision, ResNet, ResNetConfig, WeightsSource,
    load_pretrained,
};
use multilabel_train::metrics::{best_threshold, default_thresholds, threshold_sweep};
use multilabel_train::{
    AdamConfig, EpochTable, EventsJsonl, FineTune, HistoryCsv, Learner, LearnerConfig,
    LrFindConfig, ModelMeta, RunDir,
};
use serde::{Deserialize, Serialize};

use super::common::{RUNS_DIR, device_name, load_dataset, parse_device};
use super::plot;
use super::progress::ProgressSink;

/// Flags of `multilabel train`. The defaults are the seed's recipe:
/// `fine_tune(3, base_lr=3e-3, freeze_epochs=3)` of an ImageNet ResNet-50
/// (torchvision V1 weights) on PASCAL 2007 at 128 px.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Dataset folder holding train.csv and train/ [default: PASCAL 2007 in data/, downloaded when absent]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Architecture: resnet18, resnet34, resnet50, resnet101 or resnet152
    #[arg(long, default_value = "resnet50")]
    pub arch: String,
    /// Channels of the stem (64 = the ImageNet networks; smaller = narrow, for tests and the demo)
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Initial body weights: a hub repo id, a .safetensors file, or `none` for random init [default: timm/<arch>.tv_in1k]
    #[arg(long, value_name = "HUB_ID|FILE|none")]
    pub weights: Option<String>,
    /// Use only the local hub cache for --weights (also HF_HUB_OFFLINE=1)
    #[arg(long)]
    pub offline: bool,
    /// Side of the square training images, in pixels
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Smallest fraction of the image area a training crop keeps (RandomResizedCrop)
    #[arg(long, default_value_t = 0.35)]
    pub min_scale: f64,
    /// Also flip training images horizontally at random (off in the recipe)
    #[arg(long)]
    pub flip: bool,
    /// Batch size, training and validation
    #[arg(long, default_value_t = 64)]
    pub bs: usize,
    /// Epochs with everything trainable (fine_tune's `epochs`)
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Epochs with the body frozen first (fine_tune's `freeze_epochs`)
    #[arg(long, default_value_t = 3)]
    pub freeze_epochs: usize,
    /// Peak learning rate of the head (fine_tune's `base_lr`)
    #[arg(long, default_value_t = 3e-3)]
    pub base_lr: f64,
    /// Ratio of the head's learning rate to the stem's in the unfrozen phase
    /// (fine_tune's `lr_mult`; 1 trains every group at the same rate, as a
    /// network trained from scratch needs)
    #[arg(long, default_value_t = 100.0)]
    pub lr_mult: f64,
    /// Threshold of the accuracy_multi printed each epoch
    #[arg(long, default_value_t = 0.2)]
    pub thresh: f32,
    /// Compute device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N, metal
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed of the shuffles, crops, initialisation and dropout
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Hold out this fraction of rows at random instead of using the is_valid column
    #[arg(long, value_name = "FRACTION")]
    pub valid_pct: Option<f64>,
    /// Run folder to create [default: runs/<date>-<arch>]
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub run: Option<PathBuf>,
    /// Continue an interrupted run from its folder, with its saved settings
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Act as if Ctrl-C came after this many optimizer steps (for tests of --resume)
    #[arg(long, hide = true, value_name = "N")]
    pub stop_after_steps: Option<u64>,
    /// Which implementation runs the model's ops: `auto` (the CPU kernels
    /// for f32 on the CPU; on CUDA the fused BatchNorm and max-pool kernels,
    /// cuDNN's convolutions in a `cudnn` build, and candle's ops for the
    /// rest; candle's ops on Metal) or `generic` (candle's ops everywhere;
    /// for checking one against the other)
    #[arg(long, default_value = "auto", value_parser = parse_kernels)]
    pub kernels: Kernels,
    /// On CUDA with cuDNN, let f32 convolutions run in TF32 on the tensor
    /// cores (compute capability 8.0 and up; PyTorch's default for
    /// convolutions): several times faster, products rounded to a 10-bit
    /// mantissa. Without it f32 convolutions compute in exact f32, as on the
    /// CPU. No effect elsewhere
    #[arg(long)]
    pub tf32: bool,
    /// The dtype the network's body computes in: `auto` (bf16 on a CUDA GPU
    /// of compute capability 8.0 or more, f32 elsewhere), `f32`, or `bf16`
    /// (CUDA only): convolutions and activations in bf16, BatchNorm
    /// statistics, the head, the loss, the metrics and the optimizer's
    /// master weights in f32
    #[arg(long, default_value = "auto", value_parser = parse_precision)]
    pub precision: PrecisionArg,
}

/// `--precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionArg {
    Auto,
    Fixed(Precision),
}

fn parse_precision(value: &str) -> Result<PrecisionArg, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(PrecisionArg::Auto),
        "f32" | "fp32" => Ok(PrecisionArg::Fixed(Precision::F32)),
        "bf16" | "bfloat16" => Ok(PrecisionArg::Fixed(Precision::Bf16)),
        other => Err(format!("`{other}`: expected auto, f32 or bf16")),
    }
}

impl PrecisionArg {
    /// The precision to train in on `device`.
    pub fn resolve(self, device: &Device) -> anyhow::Result<Precision> {
        match self {
            PrecisionArg::Auto => Ok(Precision::auto_for(device)),
            PrecisionArg::Fixed(Precision::F32) => Ok(Precision::F32),
            PrecisionArg::Fixed(p) if device.is_cuda() => Ok(p),
            PrecisionArg::Fixed(p) => bail!(
                "--precision {p} needs a CUDA device; this run is on {} (use --precision f32 or auto)",
                device_name(device)
            ),
        }
    }
}

fn parse_kernels(value: &str) -> Result<Kernels, String> {
    match value {
        "auto" => Ok(Kernels::Auto),
        "generic" => Ok(Kernels::Generic),
        other => Err(format!("`{other}`: expected auto or generic")),
    }
}

/// The resolved settings of a training run, saved as `config.json` so that
/// `--resume` and `eval` rebuild exactly the same thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub data: DatasetConfig,
    pub model: ResNetConfig,
    pub weights: String,
    pub offline: bool,
    pub transform: TransformConfig,
    pub batch_size: usize,
    pub epochs: usize,
    pub freeze_epochs: usize,
    pub base_lr: f64,
    pub lr_mult: f64,
    pub metric_thresh: f32,
    pub seed: u64,
}

impl TrainArgs {
    /// Checks every flag before any work starts.
    fn plan(&self) -> anyhow::Result<TrainConfig> {
        let arch: Arch = self
            .arch
            .parse()
            .map_err(|e| anyhow::anyhow!("--arch {}: {e}", self.arch))?;
        // Far wider networks than ImageNet's 64 only abort on allocation.
        if !(1..=256).contains(&self.width) {
            bail!(
                "--width must be between 1 and 256 (64 is the ImageNet networks' width), got {}",
                self.width
            );
        }
        check_thresh(self.thresh)?;
        if self.bs == 0 {
            bail!("--bs must be at least 1");
        }
        if self.size < 32 {
            bail!(
                "--size {} is too small: the network downsamples by 32",
                self.size
            );
        }
        if !(self.min_scale > 0.0 && self.min_scale <= 1.0) {
            bail!("--min-scale must be in (0, 1], got {}", self.min_scale);
        }
        if !(self.base_lr > 0.0 && self.base_lr.is_finite()) {
            bail!("--base-lr must be a positive number, got {}", self.base_lr);
        }
        if !(self.lr_mult >= 1.0 && self.lr_mult.is_finite()) {
            bail!("--lr-mult must be at least 1, got {}", self.lr_mult);
        }
        if self.epochs == 0 && self.freeze_epochs == 0 {
            bail!("nothing to train: --epochs and --freeze-epochs are both 0");
        }
        let root = match &self.data {
            Some(dir) => dir.clone(),
            None => default_cache_dir().join("pascal_2007"),
        };
        let mut data = DatasetConfig::new(root);
        if let Some(pct) = self.valid_pct {
            if !(pct > 0.0 && pct < 1.0) {
                bail!("--valid-pct must be between 0 and 1, got {pct}");
            }
            data.split = SplitConfig::Random {
                valid_pct: pct,
                seed: self.seed,
            };
        }
        let weights = match &self.weights {
            Some(w) => w.clone(),
            None if self.width == 64 => {
                if arch == Arch::ResNet50 {
                    DEFAULT_HUB_REPO.to_string()
                } else {
                    format!("timm/{}.tv_in1k", arch.name())
                }
            }
            None => "none".into(),
        };
        let mut model = ResNetConfig::new(arch, 1);
        model.base_width = self.width;
        model.kernels = self.kernels;
        model.tf32 = self.tf32;
        let transform = TransformConfig {
            size: self.size,
            min_scale: self.min_scale,
            flip: self.flip,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        };
        transform.validate()?;
        Ok(TrainConfig {
            data,
            model,
            weights,
            offline: self.offline,
            transform,
            batch_size: self.bs,
            epochs: self.epochs,
            freeze_epochs: self.freeze_epochs,
            base_lr: self.base_lr,
            lr_mult: self.lr_mult,
            metric_thresh: self.thresh,
            seed: self.seed,
        })
    }
}

/// The checks [`TrainArgs::plan`] makes on flags, made again on a
/// `config.json` read back for `--resume`, which may have been edited.
fn check_saved_config(config: &TrainConfig, path: &Path) -> anyhow::Result<()> {
    let problem = if config.batch_size == 0 {
        Some("batch_size must be at least 1".to_string())
    } else if !(1..=256).contains(&config.model.base_width) {
        Some("model.base_width must be between 1 and 256".into())
    } else if config.transform.size < 32 {
        Some("transform.size must be at least 32".into())
    } else if !(config.base_lr > 0.0 && config.base_lr.is_finite()) {
        Some("base_lr must be a positive number".into())
    } else if !(config.lr_mult >= 1.0 && config.lr_mult.is_finite()) {
        Some("lr_mult must be at least 1".into())
    } else if config.epochs == 0 && config.freeze_epochs == 0 {
        Some("epochs and freeze_epochs are both 0".into())
    } else if !(config.metric_thresh > 0.0 && config.metric_thresh < 1.0) {
        Some("metric_thresh must be between 0 and 1".into())
    } else {
        config.transform.validate().err().map(|err| err.to_string())
    };
    match problem {
        Some(problem) => bail!(
            "{}: {problem}; the file was edited: restore it or start a new run",
            path.display()
        ),
        None => Ok(()),
    }
}

/// `--thresh` must be a probability strictly between 0 and 1.
pub fn check_thresh(thresh: f32) -> anyhow::Result<()> {
    if !(thresh > 0.0 && thresh < 1.0) {
        bail!("--thresh must be between 0 and 1 (a sigmoid probability), got {thresh}");
    }
    Ok(())
}

/// The weights flag as a source.
fn weights_source(spec: &str, offline: bool) -> WeightsSource {
    let offline =
        offline || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    if spec.eq_ignore_ascii_case("none") {
        WeightsSource::None
    } else if Path::new(spec).exists() || spec.ends_with(".safetensors") {
        WeightsSource::File(PathBuf::from(spec))
    } else {
        WeightsSource::Hub {
            repo: spec.to_string(),
            offline,
        }
    }
}

/// Everything a training session holds, built from a [`TrainConfig`].
pub struct Session {
    pub learner: Learner<ResNet>,
    pub vocab: Vec<String>,
    pub config: TrainConfig,
}

/// Builds data, model and Learner; downloads the dataset if the default one
/// is absent. Loads pretrained weights unless `load_weights` is false (a
/// resumed run loads its own).
pub fn build_session(
    config: &TrainConfig,
    device: &Device,
    load_weights: bool,
) -> anyhow::Result<Session> {
    let mut config = config.clone();
    ensure_dataset(&config.data.root)?;
    let data = load_dataset(&config.data)?;
    for skipped in data.skipped() {
        eprintln!("warning: skipped {skipped:?}");
    }
    let vocab = data.vocab().to_vec();
    if data.train().is_empty() {
        bail!("{}: no training rows", config.data.csv_path().display());
    }
    if data.valid().is_empty() {
        bail!(
            "{}: no validation rows; mark some with the is_valid column or pass --valid-pct",
            config.data.csv_path().display()
        );
    }
    if data.train().len() < config.batch_size {
        bail!(
            "{} training images are fewer than one batch of {}; lower --bs",
            data.train().len(),
            config.batch_size
        );
    }
    config.model.head.n_classes = vocab.len();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::new(&config.model, vb, config.seed).context("building the model")?;
    if load_weights {
        let source = weights_source(&config.weights, config.offline);
        if !matches!(source, WeightsSource::None) {
            eprintln!("loading weights {}", config.weights);
            load_pretrained(&varmap, &source).with_context(|| {
                format!(
                    "loading weights `{}`; without network, pass --weights FILE.safetensors, \
                     set HF_HOME to a folder holding the hub cache (with --offline), or use --weights none",
                    config.weights
                )
            })?;
        }
    }
    let train = Loader::new(
        data.train().to_vec(),
        vocab.len(),
        config.transform.clone(),
        LoaderConfig::train(config.batch_size, config.seed),
        device.clone(),
    );
    let valid = Loader::new(
        data.valid().to_vec(),
        vocab.len(),
        config.transform.clone(),
        LoaderConfig::valid(config.batch_size),
        device.clone(),
    );
    let learner_config = LearnerConfig {
        seed: config.seed,
        metric_thresh: config.metric_thresh,
        adam: AdamConfig::default(),
        pos_weight: None,
        read_every: 0,
    };
    let learner = Learner::new(model, varmap, train, valid, learner_config, device.clone())?;
    Ok(Session {
        learner,
        vocab,
        config,
    })
}

/// When the dataset folder has no CSV and it is the default PASCAL folder,
/// download it; otherwise say what is missing.
fn ensure_dataset(root: &Path) -> anyhow::Result<()> {
    if root.join("train.csv").exists() {
        return Ok(());
    }
    let default = default_cache_dir().join("pascal_2007");
    if root != default {
        bail!(
            "{}: no train.csv there; pass --data with a folder holding train.csv and train/ \
             (`multilabel synth --out DIR` makes one)",
            root.display()
        );
    }
    eprintln!("PASCAL 2007 is not in {}: downloading it", root.display());
    let cache = root.parent().unwrap_or(Path::new("."));
    download_pascal_2007(cache, &mut super::data::render_download_event()).with_context(|| {
        format!(
            "downloading PASCAL 2007 into {}; without network, unpack a copy of pascal_2007.tgz \
             there (or anywhere, and pass --data DIR)",
            root.display()
        )
    })?;
    Ok(())
}

/// A Ctrl-C flag: the first Ctrl-C asks training to save and stop.
pub fn cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    // A second handler cannot be installed (tests call this twice in one
    // process): then Ctrl-C keeps its default meaning.
    let _ = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving state after this batch (Ctrl-C again to quit now)");
    });
    flag
}

fn new_run_path(arch: &str) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}-{arch}", format_utc(now));
    let mut path = PathBuf::from(RUNS_DIR).join(&base);
    let mut n = 2;
    while path.exists() {
        path = PathBuf::from(RUNS_DIR).join(format!("{base}-{n}"));
        n += 1;
    }
    path
}

/// `YYYYMMDD-HHMMSS` in UTC, from seconds since the epoch.
fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Raises the cancel flag after a number of optimizer steps, as a Ctrl-C would.
struct StopAfter {
    remaining: u64,
    flag: Arc<AtomicBool>,
}

impl multilabel_train::Sink for StopAfter {
    fn on_event(&mut self, event: &multilabel_train::Event) -> multilabel_train::Result<()> {
        if let multilabel_train::Event::BatchEnd { .. } = event {
            self.remaining = self.remaining.saturating_sub(1);
            if self.remaining == 0 {
                self.flag.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// Removes a run folder this command created if the command fails before
/// training writes anything into it, so a failed start leaves nothing behind.
struct NewRunGuard {
    path: Option<PathBuf>,
    /// The parent folder (`runs/`) when this command created it too.
    new_parent: Option<PathBuf>,
}

impl NewRunGuard {
    fn keep(&mut self) {
        self.path = None;
        self.new_parent = None;
    }
}

impl Drop for NewRunGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            // Only the files written before training started, then the
            // folder if that left it empty: nothing else is ever removed.
            for file in ["config.json", "history.csv", "events.jsonl"] {
                let _ = std::fs::remove_file(path.join(file));
            }
            let _ = std::fs::remove_dir(path);
        }
        if let Some(parent) = &self.new_parent {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The files a run holds before its first checkpoint, all written by `train`.
const EARLY_RUN_FILES: [&str; 3] = ["config.json", "history.csv", "events.jsonl"];

/// Checks that a new run may start in `path`: a folder that does not exist,
/// an empty one, or one where an earlier `train` stopped before its first
/// checkpoint (its files are then removed, to start again). Any other folder
/// may hold the user's own files, which training would overwrite, so it is
/// refused before anything in it changes.
fn check_new_run_folder(path: &Path) -> anyhow::Result<()> {
    if path.join("model.json").exists() || path.join("state.safetensors").exists() {
        bail!(
            "{} already holds a run; pick another --run, or continue it with --resume",
            path.display()
        );
    }
    if !path.exists() {
        return Ok(());
    }
    if !path.is_dir() {
        bail!(
            "--run {}: exists and is not a folder; pick another --run",
            path.display()
        );
    }
    let names = std::fs::read_dir(path)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .with_context(|| format!("--run {}: cannot list the folder", path.display()))?;
    if names.is_empty() {
        return Ok(());
    }
    // Atomic writes leave `.NAME.tmp-PID` behind only when killed mid-write.
    let ours = |name: &str| EARLY_RUN_FILES.contains(&name) || name.contains(".tmp-");
    let our_config = std::fs::read_to_string(path.join("config.json"))
        .ok()
        .is_some_and(|text| serde_json::from_str::<TrainConfig>(&text).is_ok());
    if !(our_config && names.iter().all(|name| ours(name))) {
        bail!(
            "--run {}: the folder exists and is not empty, and is not a run of ours; \
             pick a new or empty folder (nothing in it was changed)",
            path.display()
        );
    }
    eprintln!(
        "{} holds a run that stopped before its first checkpoint; starting it again",
        path.display()
    );
    for name in &names {
        let file = path.join(name);
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
    }
    Ok(())
}

/// `multilabel train`.
pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let resuming = args.resume.is_some();
    let mut new_parent = None;
    let (mut config, run, existed) = match &args.resume {
        Some(dir) => {
            let run = RunDir::open(dir).with_context(|| format!("--resume {}", dir.display()))?;
            let config: TrainConfig = run
                .load_config()
                .with_context(|| format!("reading the settings of {}", dir.display()))?;
            check_saved_config(&config, &run.config_path())?;
            (config, run, true)
        }
        None => {
            let config = args.plan()?;
            let path = args
                .run
                .clone()
                .unwrap_or_else(|| new_run_path(config.model.arch.name()));
            check_new_run_folder(&path)?;
            let existed = path.exists();
            new_parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty() && !p.exists())
                .map(Path::to_path_buf);
            let run = RunDir::create(&path)
                .with_context(|| format!("creating the run folder {}", path.display()))?;
            (config, run, existed)
        }
    };
    let mut guard = NewRunGuard {
        path: (!existed).then(|| run.path().to_path_buf()),
        new_parent,
    };
    let device = parse_device(&args.device)?;
    if !resuming {
        config.model.precision = args.precision.resolve(&device)?;
    } else if !config.model.precision.is_f32() && !device.is_cuda() {
        bail!(
            "{} trained in {} on CUDA; resume it on a CUDA device (it is on {})",
            run.path().display(),
            config.model.precision,
            device_name(&device)
        );
    }
    let mut session = build_session(&config, &device, !resuming)?;
    let config = session.config.clone();
    eprintln!(
        "{} on {} ({}): {} train / {} valid images, {} classes, run {}",
        config.model.arch.name(),
        device_name(&device),
        config.model.precision,
        session.learner.train_items(),
        session.learner.valid_items(),
        session.vocab.len(),
        run.path().display()
    );
    if !resuming {
        run.save_config(&config)?;
    }
    let learner = &mut session.learner;
    learner.add_sink(Box::new(EpochTable::new(std::io::stdout())));
    learner.add_sink(Box::new(ProgressSink::new()));
    let mut history = HistoryCsv::open(run.history_path())?;
    let mut events = EventsJsonl::open(run.events_path())?;
    if resuming {
        let state = learner.resume_from(&run)?;
        if state.finished {
            bail!(
                "{} already finished training; nothing to resume",
                run.path().display()
            );
        }
        // Rows written after the checkpoint are replayed by the resumed run.
        let fit_of = |phase: &str| usize::from(phase != "frozen" && config.freeze_epochs > 0);
        history.retain(|phase, epoch| {
            let fit = fit_of(phase);
            fit < state.fit || (fit == state.fit && epoch < state.epoch)
        });
        events = EventsJsonl::open(run.events_path())?;
        eprintln!(
            "resuming at fit {}, epoch {}, batch {}",
            state.fit, state.epoch, state.batch
        );
    }
    learner.add_sink(Box::new(history));
    learner.add_sink(Box::new(events));
    learner.set_run(run.clone());
    let cancel = cancel_flag();
    if let Some(steps) = args.stop_after_steps {
        learner.add_sink(Box::new(StopAfter {
            remaining: steps,
            flag: cancel.clone(),
        }));
    }
    learner.set_cancel_flag(cancel);

    let plan = FineTune {
        freeze_epochs: config.freeze_epochs,
        lr_mult: config.lr_mult,
        ..FineTune::new(config.epochs, config.base_lr)
    };
    guard.keep();
    learner.fine_tune(&plan)?;

    // The last epoch's validation made these predictions already.
    let preds = learner.take_valid_preds()?;
    let sweep = threshold_sweep(&preds.probs, &preds.targets, &default_thresholds())?;
    let best = best_threshold(&sweep).context("empty threshold sweep")?;
    let meta = ModelMeta {
        arch: config.model.arch.name().to_string(),
        base_width: config.model.base_width,
        vocab: session.vocab.clone(),
        image_size: config.transform.size,
        mean: config.transform.mean,
        std: config.transform.std,
        threshold: best.thresh,
        class_thresholds: None,
        model: serde_json::to_value(&config.model)?,
    };
    learner.save_model(&meta)?;
    learner.finish()?;
    run.mark_latest()?;
    let plot_path = run.path().join("sweep.png");
    plot::sweep_plot(&sweep, best, &plot_path)?;
    println!(
        "best threshold {:.4}: accuracy_multi {:.6} (at {}: see the table above)",
        best.thresh, best.accuracy_multi, config.metric_thresh
    );
    println!(
        "run saved in {} (sweep plot: {})",
        run.path().display(),
        plot_path.display()
    );
    println!(
        "evaluate it with: multilabel eval --run {} --thresh {:.2}",
        run.path().display(),
        best.thresh
    );
    Ok(())
}

/// Flags of `multilabel lr-find`: the model and data flags of `train`.
#[derive(Debug, Clone, Args)]
pub struct LrFindArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Lowest learning rate tried
    #[arg(long, default_value_t = 1e-7)]
    pub start_lr: f64,
    /// Highest learning rate tried
    #[arg(long, default_value_t = 10.0)]
    pub end_lr: f64,
    /// Number of steps
    #[arg(long, default_value_t = 100)]
    pub num_it: usize,
    /// Where to write the plot of loss against learning rate
    #[arg(long, default_value = "lr_find.png")]
    pub plot: PathBuf,
}

/// `multilabel lr-find`: fastai's learning-rate finder on the frozen model.
pub fn lr_find(args: LrFindArgs) -> anyhow::Result<()> {
    let mut config = args.train.plan()?;
    if !(args.start_lr > 0.0 && args.end_lr > args.start_lr) {
        bail!(
            "need 0 < --start-lr < --end-lr, got {} and {}",
            args.start_lr,
            args.end_lr
        );
    }
    if args.num_it < 2 {
        bail!("--num-it must be at least 2");
    }
    let device = parse_device(&args.train.device)?;
    config.model.precision = args.train.precision.resolve(&device)?;
    let mut session = build_session(&config, &device, true)?;
    let learner = &mut session.learner;
    learner.freeze();
    learner.set_cancel_flag(cancel_flag());
    let result = learner.lr_find(&LrFindConfig {
        start_lr: args.start_lr,
        end_lr: args.end_lr,
        num_it: args.num_it,
        ..LrFindConfig::default()
    })?;
    println!("{:>12}  {:>10}", "lr", "loss");
    for (lr, loss) in result.lrs.iter().zip(&result.losses) {
        println!("{lr:>12.3e}  {loss:>10.6}");
    }
    if result.diverged {
        println!("stopped early: the loss diverged");
    }
    plot::lr_find_plot(&result.lrs, &result.losses, result.suggestion, &args.plot)?;
    match result.suggestion {
        Some(lr) => println!("suggested learning rate (valley): {lr:.3e}"),
        None => println!("too few steps for a suggestion"),
    }
    println!("plot written to {}", args.plot.display());
    Ok(())
}

/// The flags `demo` passes to `train` (a narrow ResNet from scratch on synthetic data).
pub fn demo_train_args(
    data: PathBuf,
    run: PathBuf,
    epochs: usize,
    size: usize,
    seed: u64,
) -> TrainArgs {
    TrainArgs {
        data: Some(data),
        arch: "resnet18".into(),
        width: 16,
        weights: Some("none".into()),
        offline: true,
        size,
        min_scale: 0.75,
        flip: false,
        bs: 32,
        epochs,
        freeze_epochs: 1,
        base_lr: 1e-2,
        lr_mult: 1.0,
        thresh: 0.5,
        device: "cpu".into(),
        seed,
        valid_pct: None,
        run: Some(run),
        resume: None,
        stop_after_steps: None,
        kernels: Kernels::Auto,
        tf32: false,
        precision: PrecisionArg::Auto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "19700101-000000");
        // 2026-11-29 08:47:07 UTC
        assert_eq!(format_utc(1_795_942_027), "20261129-084707");
        // A leap day.
        assert_eq!(format_utc(951_782_400), "20000229-000000");
    }

    #[test]
    fn thresh_must_be_a_probability() {
        assert!(check_thresh(0.48).is_ok());
        for bad in [0.0, 1.0, 2.0, -0.1, f32::NAN] {
            assert!(check_thresh(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn precision_resolves() {
        let cpu = Device::Cpu;
        assert_eq!(PrecisionArg::Auto.resolve(&cpu).unwrap(), Precision::F32);
        let f32 = parse_precision("F32").unwrap();
        assert_eq!(f32.resolve(&cpu).unwrap(), Precision::F32);
        let bf16 = parse_precision("bf16").unwrap();
        let err = bf16.resolve(&cpu).unwrap_err().to_string();
        assert!(err.contains("CUDA") && err.contains("bf16"), "{err}");
        assert!(parse_precision("f16").is_err());
    }

    #[test]
    fn devices_parse() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }
}
