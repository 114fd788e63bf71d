//! A synthetic dataset in PASCAL layout that a small CNN learns in a few
//! epochs: each class is a shape with its own saturated colour, drawn 0–3
//! times on a muted noisy background.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// What [`synth`] writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// The dataset root: `out/train.csv` and `out/train/*.jpg`.
    pub out: PathBuf,
    pub n_train: usize,
    pub n_valid: usize,
    /// Number of classes, at most [`SynthConfig::MAX_CLASSES`].
    pub classes: usize,
    pub seed: u64,
    /// Every image `(width, height)` pixels, each side in
    /// [`SynthConfig::IMAGE_SIDES`]; `None` draws each side from 96 to 224.
    /// `(500, 375)`, a typical PASCAL photo, makes decoding cost what it
    /// does on PASCAL.
    #[serde(default)]
    pub image_size: Option<(u32, u32)>,
}

impl SynthConfig {
    /// There is one distinct shape and colour per class.
    pub const MAX_CLASSES: usize = SHAPES.len();
    /// The sides [`SynthConfig::image_size`] may have.
    pub const IMAGE_SIDES: std::ops::RangeInclusive<u32> = 32..=4096;
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            out: PathBuf::from("data/synth"),
            n_train: 400,
            n_valid: 100,
            classes: 6,
            seed: 0,
            image_size: None,
        }
    }
}

/// What [`synth`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    pub root: PathBuf,
    pub csv: PathBuf,
    pub n_train: usize,
    pub n_valid: usize,
    /// Class names in vocab (alphabetical) order.
    pub vocab: Vec<String>,
    /// Images containing each class, in vocab order, over both splits.
    pub label_counts: Vec<usize>,
    /// Images with no object (an all-zero target).
    pub n_empty: usize,
}

/// Writes a synthetic dataset; the same config always writes the same
/// files. `train.csv` is written last, so a dataset with a CSV is complete.
pub fn synth(cfg: &SynthConfig) -> Result<SynthSummary, DataError> {
    if cfg.classes == 0 || cfg.classes > SynthConfig::MAX_CLASSES {
        return Err(DataError::Config(format!(
            "classes must be in 1..={}, got {}",
            SynthConfig::MAX_CLASSES,
            cfg.classes
        )));
    }
    if cfg.n_train < cfg.classes {
        return Err(DataError::Config(format!(
            "n_train ({}) must be at least the number of classes ({}) so every class is in the training vocab",
            cfg.n_train, cfg.classes
        )));
    }
    if let Some((w, h)) = cfg.image_size {
        let sides = SynthConfig::IMAGE_SIDES;
        if !sides.contains(&w) || !sides.contains(&h) {
            return Err(DataError::Config(format!(
                "image size {w}x{h}: each side must be in {}..={}",
                sides.start(),
                sides.end()
            )));
        }
    }
    let image_dir = cfg.out.join("train");
    std::fs::create_dir_all(&image_dir).map_err(|e| DataError::io(&image_dir, e))?;

    let total = cfg.n_train + cfg.n_valid;
    let labels: Vec<Vec<usize>> = (0..total)
        .into_par_iter()
        .map(|index| {
            let (image, labels) = draw_image(cfg, index);
            write_jpeg(&image, &image_dir.join(file_name(index)))?;
            Ok(labels)
        })
        .collect::<Result<_, DataError>>()?;

    let mut csv = String::from("fname,labels,is_valid\n");
    let mut label_counts = vec![0; cfg.classes];
    let mut n_empty = 0;
    for (index, classes) in labels.iter().enumerate() {
        let mut names: Vec<&str> = classes.iter().map(|&c| SHAPES[c].name).collect();
        names.sort_unstable();
        for &c in classes {
            label_counts[c] += 1;
        }
        n_empty += usize::from(classes.is_empty());
        let valid = if index < cfg.n_train { "False" } else { "True" };
        csv.push_str(&format!(
            "{},{},{valid}\n",
            file_name(index),
            names.join(" ")
        ));
    }
    let csv_path = cfg.out.join("train.csv");
    write_atomically(&csv_path, csv.as_bytes())?;

    // Report counts in vocab order, which is alphabetical.
    let mut order: Vec<usize> = (0..cfg.classes).collect();
    order.sort_by_key(|&c| SHAPES[c].name);
    Ok(SynthSummary {
        root: cfg.out.clone(),
        csv: csv_path,
        n_train: cfg.n_train,
        n_valid: cfg.n_valid,
        vocab: order.iter().map(|&c| SHAPES[c].name.to_string()).collect(),
        label_counts: order.iter().map(|&c| label_counts[c]).collect(),
        n_empty,
    })
}

/// The file name of image `index`.
fn file_name(index: usize) -> String {
    format!("{:06}.jpg", index + 1)
}

struct Shape {
    name: &'static str,
    colour: [u8; 3],
    /// Whether the point `(u, v)`, in units of the object's radius from its
    /// centre, is inside the shape.
    inside: fn(f64, f64) -> bool,
}

const SHAPES: [Shape; 10] = [
    Shape {
        name: "circle",
        colour: [230, 40, 40],
        inside: |u, v| u * u + v * v <= 1.0,
    },
    Shape {
        name: "square",
        colour: [40, 200, 60],
        inside: |u, v| u.abs() <= 0.8 && v.abs() <= 0.8,
    },
    Shape {
        name: "triangle",
        colour: [50, 80, 235],
        inside: |u, v| (-0.9..=0.8).contains(&v) && u.abs() <= (v + 0.9) / 1.7 * 0.95,
    },
    Shape {
        name: "cross",
        colour: [240, 220, 40],
        inside: |u, v| (u.abs() <= 0.25 && v.abs() <= 0.95) || (v.abs() <= 0.25 && u.abs() <= 0.95),
    },
    Shape {
        name: "ring",
        colour: [225, 60, 225],
        inside: |u, v| (0.5..=1.0).contains(&(u * u + v * v)),
    },
    Shape {
        name: "diamond",
        colour: [40, 225, 225],
        inside: |u, v| u.abs() + v.abs() <= 0.95,
    },
    Shape {
        name: "hbar",
        colour: [250, 140, 20],
        inside: |u, v| u.abs() <= 0.95 && v.abs() <= 0.3,
    },
    Shape {
        name: "vbar",
        colour: [245, 245, 245],
        inside: |u, v| v.abs() <= 0.95 && u.abs() <= 0.3,
    },
    Shape {
        name: "frame",
        colour: [140, 70, 210],
        inside: |u, v| (0.55..=0.9).contains(&u.abs().max(v.abs())),
    },
    Shape {
        name: "xmark",
        colour: [20, 20, 20],
        inside: |u, v| {
            u.abs().max(v.abs()) <= 0.9 && ((u - v).abs() <= 0.3 || (u + v).abs() <= 0.3)
        },
    },
];

/// Draws image `index` and returns it with its sorted, distinct classes.
fn draw_image(cfg: &SynthConfig, index: usize) -> (RgbImage, Vec<usize>) {
    let mut rng = image_rng(cfg.seed, index);
    let width = rng.random_range(96..=224u32);
    let height = rng.random_range(96..=224u32);
    let (width, height) = cfg.image_size.unwrap_or((width, height));

    // Muted background: a grey-ish base colour with per-pixel noise, so the
    // saturated shape colours stand out and the model cannot key on flat
    // regions alone.
    let grey = rng.random_range(70..=150i32);
    let base: [i32; 3] = std::array::from_fn(|_| grey + rng.random_range(-20..=20));
    let mut image = RgbImage::from_fn(width, height, |_, _| {
        image::Rgb(std::array::from_fn(|c| {
            (base[c] + rng.random_range(-28..=28)).clamp(0, 255) as u8
        }))
    });

    let n_objects = match rng.random_range(0..20u32) {
        0..=1 => 0,
        2..=8 => 1,
        9..=15 => 2,
        _ => 3,
    };
    let mut classes: Vec<usize> = (0..n_objects)
        .map(|_| rng.random_range(0..cfg.classes))
        .collect();
    // The first training images carry one of each class, so the training
    // vocab always holds every class, however few images there are.
    if index < cfg.classes {
        if classes.is_empty() {
            classes.push(index);
        } else {
            classes[0] = index;
        }
    }
    let mut placed = Vec::new();
    for &class in &classes {
        draw_shape(&mut image, &SHAPES[class], &mut placed, &mut rng);
    }
    classes.sort_unstable();
    classes.dedup();
    (image, classes)
}

/// Draws `shape` where it overlaps none of the `placed` circles (centre x,
/// centre y, radius) if a few tries find such a spot, so an object is
/// rarely hidden under another one and every label stays visible.
fn draw_shape(
    image: &mut RgbImage,
    shape: &Shape,
    placed: &mut Vec<(f64, f64, f64)>,
    rng: &mut ChaCha8Rng,
) {
    let (w, h) = (image.width() as f64, image.height() as f64);
    let mut spot = (0.0, 0.0, 0.0);
    for _ in 0..30 {
        let radius = rng.random_range(0.14..0.28) * w.min(h);
        let cx = rng.random_range(radius..=w - radius);
        let cy = rng.random_range(radius..=h - radius);
        spot = (cx, cy, radius);
        let clear = placed
            .iter()
            .all(|&(x, y, r)| ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() >= r + radius);
        if clear {
            break;
        }
    }
    placed.push(spot);
    let (cx, cy, radius) = spot;
    let colour: [u8; 3] = std::array::from_fn(|c| {
        (shape.colour[c] as i32 + rng.random_range(-15..=15)).clamp(0, 255) as u8
    });
    let x0 = (cx - radius).floor().max(0.0) as u32;
    let x1 = ((cx + radius).ceil() as u32).min(image.width());
    let y0 = (cy - radius).floor().max(0.0) as u32;
    let y1 = ((cy + radius).ceil() as u32).min(image.height());
    for y in y0..y1 {
        for x in x0..x1 {
            let u = (x as f64 + 0.5 - cx) / radius;
            let v = (y as f64 + 0.5 - cy) / radius;
            if (shape.inside)(u, v) {
                image.put_pixel(x, y, image::Rgb(colour));
            }
        }
    }
}

fn image_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut words = [0u8; 32];
    words[..8].copy_from_slice(&seed.to_le_bytes());
    words[8..16].copy_from_slice(&(index as u64).to_le_bytes());
    words[16..24].copy_from_slice(b"synthimg");
    ChaCha8Rng::from_seed(words)
}

fn write_jpeg(image: &RgbImage, path: &Path) -> Result<(), DataError> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 92)
        .encode_image(image)
        .map_err(|e| DataError::Encode {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it, so a
/// reader never sees half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = BufWriter::new(std::fs::File::create(&temp)?);
        file.write_all(bytes)?;
        file.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        DataError::io(path, e)
    })
}
