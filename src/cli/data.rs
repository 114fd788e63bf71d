//! `synth`, `show-batch` and `download`: thin wrappers over
//! `multilabel-data`. Flags are checked into a plan before any work starts.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::{Args, ValueEnum};
use multilabel_data::{
    Dataset, DatasetConfig, DownloadEvent, Loader, LoaderConfig, ShowBatchConfig, SynthConfig,
    TransformConfig,
};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Dataset folder to write (train.csv + train/*.jpg)
    #[arg(long)]
    pub out: PathBuf,
    /// Training images
    #[arg(long, default_value_t = 400)]
    pub n_train: usize,
    /// Validation images
    #[arg(long, default_value_t = 100)]
    pub n_valid: usize,
    /// Classes (one coloured shape each), 1 to 10
    #[arg(long, default_value_t = 6)]
    pub classes: usize,
    /// Random seed; the same seed writes the same files
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Every image WIDTHxHEIGHT pixels (e.g. 500x375, PASCAL's typical
    /// photo, to measure decoding at PASCAL's cost); by default each side is
    /// drawn from 96 to 224
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = parse_image_size)]
    pub image_size: Option<(u32, u32)>,
}

/// `WIDTHxHEIGHT`, e.g. `500x375`.
fn parse_image_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("expected WIDTHxHEIGHT in pixels, e.g. 500x375; got {s:?}");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let side = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
    Ok((side(w)?, side(h)?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Valid,
}

#[derive(Debug, Args)]
pub struct ShowBatchArgs {
    /// Dataset folder (train.csv + train/)
    #[arg(long)]
    pub data: PathBuf,
    /// PNG file to write
    #[arg(long)]
    pub out: PathBuf,
    /// Image side in pixels
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Number of images in the grid
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// Which split to draw: train (augmented, shuffled) or valid
    #[arg(long, value_enum, default_value_t = SplitArg::Train)]
    pub split: SplitArg,
    /// Seed for the shuffle and the random crops
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Smallest crop area fraction of RandomResizedCrop
    #[arg(long, default_value_t = 0.35)]
    pub min_scale: f64,
    /// Also flip training images horizontally at random
    #[arg(long)]
    pub flip: bool,
    /// Decode every image first and leave out the ones that fail
    #[arg(long)]
    pub skip_bad_images: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Cache folder [default: $MULTILABEL_DATA, else data/]
    #[arg(long)]
    pub dest: Option<PathBuf>,
}

pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        out: args.out,
        n_train: args.n_train,
        n_valid: args.n_valid,
        classes: args.classes,
        seed: args.seed,
        image_size: args.image_size,
    };
    let start = Instant::now();
    let summary = multilabel_data::synth(&cfg)
        .with_context(|| format!("writing a synthetic dataset to {}", cfg.out.display()))?;
    println!(
        "wrote {} training and {} validation images to {} in {:.1}s",
        summary.n_train,
        summary.n_valid,
        summary.root.display(),
        start.elapsed().as_secs_f64()
    );
    let counts: Vec<String> = summary
        .vocab
        .iter()
        .zip(&summary.label_counts)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!(
        "images per class: {}; without objects: {}",
        counts.join(", "),
        summary.n_empty
    );
    Ok(())
}

pub fn show_batch(args: ShowBatchArgs) -> anyhow::Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let transform = TransformConfig {
        size: args.size,
        min_scale: args.min_scale,
        flip: args.flip,
        ..Default::default()
    };
    transform.validate()?;

    let dataset_cfg = DatasetConfig {
        skip_bad_images: args.skip_bad_images,
        ..DatasetConfig::new(&args.data)
    };
    let data = Dataset::load(&dataset_cfg)
        .with_context(|| format!("loading the dataset in {}", args.data.display()))?;
    if let Some(first) = data.skipped().first() {
        eprintln!(
            "warning: skipped {} unreadable image(s), first {}: {}",
            data.skipped().len(),
            first.path.display(),
            first.reason
        );
    }
    let (items, loader_cfg) = match args.split {
        SplitArg::Train => (data.train(), LoaderConfig::train(args.n, args.seed)),
        SplitArg::Valid => (data.valid(), LoaderConfig::valid(args.n)),
    };
    if items.is_empty() {
        bail!(
            "the {:?} split of {} is empty",
            args.split,
            args.data.display()
        );
    }
    // A grid of fewer images than asked beats no grid when the split is small.
    let loader_cfg = LoaderConfig {
        drop_last: false,
        ..loader_cfg
    };
    let loader = Loader::new(
        items.to_vec(),
        data.vocab().len(),
        transform.clone(),
        loader_cfg,
        Device::Cpu,
    );
    let batch = loader
        .epoch(0)
        .next()
        .context("the loader produced no batch")??;
    let cfg = ShowBatchConfig {
        max_images: args.n,
        ..Default::default()
    };
    multilabel_data::show_batch(
        &batch,
        data.vocab(),
        &transform.mean,
        &transform.std,
        &cfg,
        &args.out,
    )?;
    println!(
        "wrote {} ({} images from the {:?} split)",
        args.out.display(),
        batch.indices.len(),
        args.split
    );
    Ok(())
}

/// Renders download progress on stderr: a live line on a terminal, a line
/// every 10% otherwise. Shared by `download` and `train` (which downloads
/// PASCAL 2007 when it is absent).
pub fn render_download_event() -> impl FnMut(DownloadEvent) {
    let terminal = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last_percent = u64::MAX;
    move |event: DownloadEvent| match event {
        DownloadEvent::AlreadyPresent { path } => {
            eprintln!(
                "{} already holds a verified copy; nothing to do",
                path.display()
            );
        }
        DownloadEvent::Started { url, total } => {
            eprintln!("downloading {url} ({:.1} MB)", total as f64 / 1e6);
        }
        DownloadEvent::Downloaded { done, total } => {
            let percent = done * 100 / total.max(1);
            let rate = done as f64 / 1e6 / start.elapsed().as_secs_f64().max(1e-3);
            if terminal {
                eprint!(
                    "\r  {percent:3}%  {:.1}/{:.1} MB  {rate:.1} MB/s ",
                    done as f64 / 1e6,
                    total as f64 / 1e6
                );
                let _ = std::io::stderr().flush();
            } else if percent / 10 != last_percent / 10 {
                // Plain lines every 10% when output is not a terminal.
                eprintln!("  {percent}% ({rate:.1} MB/s)");
            }
            last_percent = percent;
        }
        DownloadEvent::Verified { md5 } => {
            if terminal {
                eprintln!();
            }
            eprintln!("size and md5 {md5} verified; extracting");
        }
        DownloadEvent::Extracting { entries } => {
            if terminal {
                eprint!("\r  {entries} entries ");
                let _ = std::io::stderr().flush();
            }
        }
        DownloadEvent::Finished { path } => {
            if terminal {
                eprintln!();
            }
            eprintln!("ready: {}", path.display());
        }
    }
}

pub fn download(args: DownloadArgs) -> anyhow::Result<()> {
    let cache = args.dest.unwrap_or_else(multilabel_data::default_cache_dir);
    let mut render = render_download_event();
    let path = multilabel_data::download_pascal_2007(&cache, &mut render)
        .with_context(|| format!("downloading PASCAL 2007 into {}", cache.display()))?;
    println!("{}", path.display());
    Ok(())
}
