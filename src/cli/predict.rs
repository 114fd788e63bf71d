//! `predict`: a saved run's labels for image files, folders or a CSV of
//! file names, in batches on the device, printed or written to a file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Tensor;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use multilabel_data::{Item, load_image_for_eval};
use rayon::prelude::*;
use serde_json::json;

use super::common::{
    TtaArgs, load_run_model, parse_device, resolve_run, run_transform, run_tta, training_transform,
    valid_loader,
};
use super::train::{TrainConfig, check_thresh};

/// File extensions read from folders (case does not matter).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Flags of `multilabel predict`.
#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    /// Image files (JPEG or PNG) and folders (searched recursively for
    /// .jpg, .jpeg and .png files)
    #[arg(value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// A CSV whose `--column` lists image files, relative to `--image-dir`
    /// (for a dataset's train.csv: its train/ folder)
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// The CSV column holding the file names
    #[arg(long, default_value = "fname", value_name = "NAME")]
    pub column: String,
    /// Folder the CSV's file names are relative to [default: the CSV's
    /// folder's train/ if there is one, else the CSV's folder]
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// Run folder [default: runs/latest]
    #[arg(long, value_name = "DIR")]
    pub run: Option<PathBuf>,
    /// Report labels whose probability is above this [default: the run's
    /// per-class thresholds if `eval --per-class --save` stored them, else its
    /// single threshold]
    #[arg(long)]
    pub thresh: Option<f32>,
    /// Write every image's probabilities and labels to FILE instead of
    /// printing the labels: .csv (file, one column per class, labels) or
    /// .jsonl (one JSON object per image)
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Images per batch on the device
    #[arg(long, default_value_t = 64)]
    pub bs: usize,
    /// Stop at the first image that cannot be read (exit 1, nothing
    /// written) instead of skipping it and listing it at the end
    #[arg(long)]
    pub strict: bool,
    /// Compute device: auto, cpu, cuda, cuda:N, metal
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub tta: TtaArgs,
}

/// The output format `--out`'s extension asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    JsonLines,
}

fn format_of(path: &Path) -> anyhow::Result<Format> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("csv") => Ok(Format::Csv),
        Some("jsonl") | Some("ndjson") => Ok(Format::JsonLines),
        _ => bail!(
            "--out {}: the name must end in .csv or .jsonl to say the format",
            path.display()
        ),
    }
}

/// `multilabel predict`.
pub fn predict(args: PredictArgs) -> anyhow::Result<()> {
    if let Some(thresh) = args.thresh {
        check_thresh(thresh)?;
    }
    if args.bs == 0 {
        bail!("--bs must be at least 1");
    }
    let format = args.out.as_deref().map(format_of).transpose()?;
    if let Some(out) = &args.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|p| !p.is_dir()) {
            bail!(
                "--out {}: the folder {} does not exist",
                out.display(),
                parent.display()
            );
        }
    }
    let tta_config = args.tta.config()?;
    let files = collect_inputs(&args)?;
    let run = resolve_run(args.run.as_deref())?;
    let device = parse_device(&args.device)?;
    let loaded = load_run_model(&run, &device)?;
    let meta = &loaded.meta;
    let vocab = &meta.vocab;
    let thresholds: Vec<f32> = match (args.thresh, &meta.class_thresholds) {
        (Some(t), _) => vec![t; vocab.len()],
        (None, Some(each)) => {
            eprintln!(
                "using the per-class thresholds in {} (--thresh T for one threshold)",
                run.model_meta_path().display()
            );
            if tta_config.is_some() {
                eprintln!(
                    "note: they were chosen on plain predictions; with --tta the probabilities differ a little"
                );
            }
            each.clone()
        }
        (None, None) => vec![meta.threshold; vocab.len()],
    };
    let transform = run_transform(meta);

    let n_batches = files.len().div_ceil(args.bs);
    let bar = (n_batches > 1 && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("   predict [{bar:30}] {pos}/{len} ({elapsed}<{eta})")
                .expect("static progress template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut rows: Vec<(PathBuf, Vec<f32>)> = Vec::with_capacity(files.len());
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for (index, chunk) in files.chunks(args.bs).enumerate() {
        let loaded_images: Vec<_> = chunk
            .par_iter()
            .map(|path| load_image_for_eval(path, &transform))
            .collect();
        let mut images = Vec::with_capacity(chunk.len());
        let mut paths = Vec::with_capacity(chunk.len());
        for (path, image) in chunk.iter().zip(loaded_images) {
            match image {
                Ok(image) => {
                    images.push(image);
                    paths.push(path.clone());
                }
                Err(err) if args.strict => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("{}: cannot be read (--strict)", path.display())));
                }
                Err(err) => skipped.push((path.clone(), err.to_string())),
            }
        }
        if !images.is_empty() {
            let batch = Tensor::stack(&images, 0)?.to_device(&device)?;
            let probs = candle_nn::ops::sigmoid(&loaded.model.forward_infer(&batch)?)?
                .to_vec2::<f32>()
                .context("reading the predictions")?;
            rows.extend(paths.into_iter().zip(probs));
        }
        match &bar {
            Some(bar) => bar.inc(chunk.len() as u64),
            None if n_batches > 1 && (index + 1) % 10 == 0 => {
                eprintln!(
                    "predict: {}/{} images",
                    ((index + 1) * args.bs).min(files.len()),
                    files.len()
                );
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let (Some(config), false) = (tta_config, rows.is_empty()) {
        // The readable images again, through a loader, under the training crops.
        let items: Vec<Item> = rows
            .iter()
            .map(|(path, _)| Item {
                path: path.clone(),
                labels: Vec::new(),
            })
            .collect();
        let loader = valid_loader(items, vocab.len(), transform.clone(), args.bs, &device);
        let train_config: Option<TrainConfig> = run.load_config().ok();
        let train_transform = training_transform(&run, train_config.as_ref(), meta);
        let both = run_tta(&loaded.model, &loader, &train_transform, &config)
            .with_context(|| format!("predicting with TTA from run {}", run.path().display()))?;
        for (row, probs) in rows.iter_mut().zip(both.tta.probs.chunks(vocab.len())) {
            row.1 = probs.to_vec();
        }
    }

    if rows.is_empty() {
        list_skipped(&skipped, files.len());
        bail!("none of the {} images could be read", files.len());
    }
    let labels_of = |probs: &[f32]| -> Vec<(&String, f32)> {
        let mut found: Vec<(&String, f32)> = vocab
            .iter()
            .zip(probs.iter().copied())
            .zip(&thresholds)
            .filter(|&((_, p), &t)| p > t)
            .map(|(found, _)| found)
            .collect();
        found.sort_by(|a, b| b.1.total_cmp(&a.1));
        found
    };
    match (&args.out, format) {
        (Some(out), Some(format)) => {
            let text = render(format, vocab, &rows, &labels_of)?;
            multilabel_train::atomic_write(out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote predictions for {} images to {}",
                rows.len(),
                out.display()
            );
        }
        _ => {
            for (path, probs) in &rows {
                let found = labels_of(probs);
                let shown = if found.is_empty() {
                    "(no label above the threshold)".to_string()
                } else {
                    let labels: Vec<String> = found
                        .iter()
                        .map(|&(name, p)| format!("{name} {p:.3}"))
                        .collect();
                    labels.join(", ")
                };
                println!("{}: {shown}", path.display());
            }
        }
    }
    list_skipped(&skipped, files.len());
    Ok(())
}

/// Lists the images that could not be read, if any, on stderr.
fn list_skipped(skipped: &[(PathBuf, String)], total: usize) {
    if skipped.is_empty() {
        return;
    }
    eprintln!(
        "skipped {} of {total} images that could not be read:",
        skipped.len()
    );
    for (path, why) in skipped {
        eprintln!("  {}: {}", path.display(), first_line(why));
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// Every row as CSV (a header, then file, probabilities, labels) or as JSON
/// lines.
fn render<'a>(
    format: Format,
    vocab: &[String],
    rows: &'a [(PathBuf, Vec<f32>)],
    labels_of: &dyn Fn(&'a [f32]) -> Vec<(&'a String, f32)>,
) -> anyhow::Result<String> {
    let mut text = String::new();
    match format {
        Format::Csv => {
            let mut header = vec!["file".to_string()];
            header.extend(vocab.iter().map(|v| csv_field(v)));
            header.push("labels".into());
            text.push_str(&header.join(","));
            text.push('\n');
            for (path, probs) in rows {
                let mut fields = vec![csv_field(&path.display().to_string())];
                fields.extend(probs.iter().map(|p| format!("{p:.6}")));
                let labels: Vec<&str> = labels_of(probs).iter().map(|(n, _)| n.as_str()).collect();
                fields.push(csv_field(&labels.join(" ")));
                text.push_str(&fields.join(","));
                text.push('\n');
            }
        }
        Format::JsonLines => {
            for (path, probs) in rows {
                let by_class: serde_json::Map<String, serde_json::Value> = vocab
                    .iter()
                    .zip(probs)
                    .map(|(name, &p)| (name.clone(), json!(p)))
                    .collect();
                let labels: Vec<&str> = labels_of(probs).iter().map(|(n, _)| n.as_str()).collect();
                let line = json!({
                    "file": path.display().to_string(),
                    "probs": by_class,
                    "labels": labels,
                });
                text.push_str(&serde_json::to_string(&line)?);
                text.push('\n');
            }
        }
    }
    Ok(text)
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// The image files the flags name, in order: each file, each folder's
/// images (sorted, recursively), then the CSV's rows.
fn collect_inputs(args: &PredictArgs) -> anyhow::Result<Vec<PathBuf>> {
    if args.inputs.is_empty() && args.csv.is_none() {
        bail!("nothing to predict: name image files or folders, or pass --csv FILE");
    }
    let mut files = Vec::new();
    for input in &args.inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("{}: cannot be read", input.display()))?;
        if meta.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                eprintln!(
                    "note: {} holds no .jpg, .jpeg or .png file",
                    input.display()
                );
            }
        } else {
            files.push(input.clone());
        }
    }
    if let Some(csv) = &args.csv {
        let dir = match &args.image_dir {
            Some(dir) => dir.clone(),
            None => {
                let parent = csv.parent().unwrap_or(Path::new(".")).to_path_buf();
                let train = parent.join("train");
                if train.is_dir() { train } else { parent }
            }
        };
        for name in csv_column(csv, &args.column)? {
            files.push(dir.join(name));
        }
    }
    if files.is_empty() {
        bail!("no image files found in the inputs given");
    }
    Ok(files)
}

/// Appends the images under `dir`, recursively, in sorted order; folders
/// that are symbolic links are skipped.
fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list the folder", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: cannot list the folder", dir.display()))?;
    entries.sort();
    for path in entries {
        // Linked folders are not followed: a link to a parent would loop.
        let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        if path.is_dir() {
            if !linked {
                walk(&path, files)?;
            }
        } else if path.extension().is_some_and(|e| {
            IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
        }) {
            files.push(path);
        }
    }
    Ok(())
}

/// The values of `column` in a CSV with a header row; blank lines are
/// skipped and quoted fields may hold commas and doubled quotes.
fn csv_column(path: &Path, column: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the CSV", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        bail!("{}: the CSV is empty", path.display());
    };
    let header = split_csv_line(header.trim_start_matches('\u{feff}'))
        .map_err(|why| anyhow::anyhow!("{}: line 1: {why}", path.display()))?;
    let Some(at) = header.iter().position(|h| h.trim() == column) else {
        bail!(
            "{}: no column named `{column}` (the header has {}); pass --column NAME",
            path.display(),
            header.join(", ")
        );
    };
    let mut out = Vec::new();
    for (index, line) in lines {
        let fields = split_csv_line(line)
            .map_err(|why| anyhow::anyhow!("{}: line {}: {why}", path.display(), index + 1))?;
        let Some(value) = fields.get(at).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
            bail!(
                "{}: line {}: the `{column}` value is missing",
                path.display(),
                index + 1
            );
        };
        out.push(value.to_string());
    }
    Ok(out)
}

/// The fields of one CSV line (RFC 4180 quoting, on a single line).
fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a double quote opens a value that is never closed".into());
    }
    fields.push(field);
    Ok(fields)
}
