//! `eval` and `demo`: score a saved run.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use multilabel_data::{DatasetConfig, SynthConfig, synth};
use multilabel_train::EvalReport;
use multilabel_train::metrics::default_thresholds;

use super::common::{
    TtaArgs, load_dataset, load_run_model, parse_device, resolve_run, run_transform, run_tta,
    training_transform, valid_items_for_vocab, valid_loader,
};
use super::plot;
use super::train::{TrainConfig, check_thresh, demo_train_args};

/// Flags of `multilabel eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Threshold on the sigmoid probability for accuracy_multi, F1 and exact match [default: the run's best]
    #[arg(long)]
    pub thresh: Option<f32>,
    /// Run folder [default: runs/latest]
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// Dataset folder to evaluate on (its validation rows) [default: the run's dataset]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Where to write the JSON report [default: <run>/eval.json]
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Where to write the threshold-sweep plot [default: <run>/eval_sweep.png]
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Batch size
    #[arg(long, default_value_t = 64)]
    pub bs: usize,
    /// Compute device: auto, cpu, cuda, cuda:N, metal
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Also choose one threshold per class (the sweep's value that maximises
    /// the class's F1, on the plain predictions) and report what it gives
    /// next to the single threshold, including an honest estimate: thresholds
    /// chosen on half the images and scored on the other half
    #[arg(long)]
    pub per_class: bool,
    /// With --per-class: store the per-class thresholds in the run's
    /// model.json, where `predict` uses them (its --thresh overrides)
    #[arg(long, requires = "per_class")]
    pub save: bool,
    #[command(flatten)]
    pub tta: TtaArgs,
}

/// `multilabel eval`.
pub fn eval(args: EvalArgs) -> anyhow::Result<()> {
    if let Some(thresh) = args.thresh {
        check_thresh(thresh)?;
    }
    if args.bs == 0 {
        bail!("--bs must be at least 1");
    }
    let tta_config = args.tta.config()?;
    let run = resolve_run(args.run.as_deref())?;
    let device = parse_device(&args.device)?;
    let loaded = load_run_model(&run, &device)?;
    let meta = &loaded.meta;
    let thresh = args.thresh.unwrap_or(meta.threshold);
    let train_config: Option<TrainConfig> = run.load_config().ok();
    let data_config = match (&args.data, &train_config) {
        (Some(dir), _) => DatasetConfig::new(dir),
        (None, Some(config)) => config.data.clone(),
        (None, None) => bail!(
            "{} has no readable config.json to find its dataset; pass --data DIR",
            run.path().display()
        ),
    };
    let data = load_dataset(&data_config)?;
    let items = valid_items_for_vocab(&data, &meta.vocab)?;
    if items.is_empty() {
        bail!(
            "{}: no validation rows to evaluate",
            data_config.csv_path().display()
        );
    }
    let loader = valid_loader(
        items,
        meta.vocab.len(),
        run_transform(meta),
        args.bs,
        &device,
    );
    let (preds, tta_preds) = if let Some(tta_config) = tta_config {
        let train_transform = training_transform(&run, train_config.as_ref(), meta);
        let both = run_tta(&loaded.model, &loader, &train_transform, &tta_config)
            .with_context(|| format!("evaluating run {} with TTA", run.path().display()))?;
        (both.plain, Some((both.tta, tta_config)))
    } else {
        let preds = multilabel_train::predict(&loaded.model, &loader, None, &mut |_, _| {})
            .with_context(|| format!("evaluating run {}", run.path().display()))?;
        (preds, None)
    };
    let mut report = EvalReport::compute(&preds, &meta.vocab, thresh, &default_thresholds())
        .with_context(|| format!("evaluating run {}", run.path().display()))?;
    if let Some((tta_preds, tta_config)) = &tta_preds {
        report = report
            .with_tta(tta_preds, *tta_config, &default_thresholds())
            .with_context(|| {
                format!(
                    "scoring the TTA predictions of run {}",
                    run.path().display()
                )
            })?;
    }
    if args.per_class {
        if preds.n_items() < 2 {
            bail!(
                "--per-class needs at least two validation images to choose and check thresholds"
            );
        }
        report = report
            .with_per_class(&preds, &default_thresholds())
            .with_context(|| {
                format!(
                    "choosing per-class thresholds for run {}",
                    run.path().display()
                )
            })?;
    }
    print!("{}", report.render());

    let json_path = args.json.unwrap_or_else(|| run.path().join("eval.json"));
    let mut text = serde_json::to_string_pretty(&report)?;
    text.push('\n');
    multilabel_train::atomic_write(&json_path, text.as_bytes())
        .with_context(|| format!("writing {}", json_path.display()))?;
    let plot_path = args
        .plot
        .unwrap_or_else(|| run.path().join("eval_sweep.png"));
    plot::sweep_plot(&report.sweep, report.best, &plot_path)?;
    println!();
    println!("report: {}", json_path.display());
    println!("sweep plot: {}", plot_path.display());
    if args.save
        && let Some(p) = &report.per_class_thresholds
    {
        let mut meta = loaded.meta.clone();
        meta.class_thresholds = Some(p.classes.iter().map(|c| c.thresh).collect());
        run.save_model_meta(&meta).with_context(|| {
            format!(
                "saving the thresholds to {}",
                run.model_meta_path().display()
            )
        })?;
        println!(
            "per-class thresholds saved to {}; predict uses them unless given --thresh",
            run.model_meta_path().display()
        );
    }
    Ok(())
}

/// Flags of `multilabel demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Folder for the generated dataset and the run
    #[arg(long, default_value = "runs/demo")]
    pub dir: PathBuf,
    /// Epochs after the first (frozen) one
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Image side in pixels
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Training images to generate
    #[arg(long, default_value_t = 800)]
    pub n_train: usize,
    /// Validation images to generate
    #[arg(long, default_value_t = 200)]
    pub n_valid: usize,
    /// Seed of the data and the training
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `multilabel demo`: offline, on the CPU, in a few minutes.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let data = args.dir.join("data");
    let run_dir = args.dir.join("run");
    if run_dir.exists() {
        bail!(
            "{} already holds a demo run; remove it (or pass --dir) to run the demo again",
            run_dir.display()
        );
    }
    if !data.join("train.csv").exists() {
        println!("writing a synthetic dataset to {}", data.display());
        let summary = synth(&SynthConfig {
            out: data.clone(),
            n_train: args.n_train,
            n_valid: args.n_valid,
            classes: 6,
            seed: args.seed,
            image_size: None,
        })?;
        println!(
            "{} train + {} valid images, classes: {}",
            summary.n_train,
            summary.n_valid,
            summary.vocab.join(", ")
        );
    }
    println!("training a narrow ResNet-18 from scratch on the CPU");
    super::train::train(demo_train_args(
        data.clone(),
        run_dir.clone(),
        args.epochs,
        args.size,
        args.seed,
    ))?;
    println!();
    eval(EvalArgs {
        thresh: None,
        run: Some(run_dir.clone()),
        data: None,
        json: None,
        plot: None,
        bs: 64,
        device: "cpu".into(),
        per_class: false,
        save: false,
        tta: TtaArgs::default(),
    })?;
    println!();
    println!("demo data: {}", data.display());
    println!(
        "demo run:  {} (model, history.csv, events.jsonl, plots)",
        run_dir.display()
    );
    println!(
        "try: multilabel predict --run {} {}/train/<image>.jpg",
        run_dir.display(),
        data.display()
    );
    Ok(())
}
