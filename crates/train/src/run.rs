//! Run folders: `runs/<name>/` with the model bundle, config, logs and
//! resumable state, every file written atomically.
//!
//! ```text
//! runs/<name>/model.safetensors   weights (VarMap names, running statistics included)
//! runs/<name>/model.json          ModelMeta: what eval/predict need to rebuild the model
//! runs/<name>/config.json         the resolved training configuration
//! runs/<name>/state.safetensors   TrainState + optimizer moments + weights, for --resume
//! runs/<name>/finished.json       the TrainState of that checkpoint once training has ended
//! runs/<name>/history.csv         one row per epoch
//! runs/<name>/events.jsonl        every event
//! runs/latest                     symlink to the newest run
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CandleContext, Error, Result};
use crate::events::SmoothedLoss;
use crate::optim::AdamState;

/// Everything `eval` and `predict` need besides the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub arch: String,
    pub base_width: usize,
    /// Class names in output order.
    pub vocab: Vec<String>,
    pub image_size: usize,
    /// Per-channel normalization applied to [0, 1] pixels.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The decision threshold chosen for this model.
    pub threshold: f32,
    /// One threshold per class, in vocab order, chosen by `eval --per-class
    /// --save`; where present, `predict` uses them instead of `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_thresholds: Option<Vec<f32>>,
    /// The model crate's full configuration (head included), as it serializes it.
    pub model: serde_json::Value,
}

/// Where training stands, saved with the weights and optimizer moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub seed: u64,
    /// Index of the fit in progress within the session (fine_tune: 0 frozen, 1 unfrozen).
    pub fit: usize,
    /// Epoch of that fit to continue from.
    pub epoch: usize,
    /// First batch of that epoch not yet trained.
    pub batch: usize,
    /// Optimizer steps taken so far over all fits (seeds dropout).
    pub global_step: u64,
    pub smooth_loss: SmoothedLoss,
    pub frozen: bool,
    /// True once the last fit has completed.
    pub finished: bool,
}

/// A resumable checkpoint as read back from `state.safetensors`.
#[derive(Debug)]
pub struct Checkpoint {
    pub state: TrainState,
    /// Model tensors by VarMap name.
    pub weights: HashMap<String, Tensor>,
    pub optimizer: AdamState,
}

const STATE_KEY: &str = "train_state";
const STEPS_KEY: &str = "optimizer_steps";

/// A run folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates the folder (and its parents) and checks that it is writable.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        // Fail now, not after an epoch of training, if nothing can be written.
        let probe = path.join(".write-test");
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }

    /// Opens an existing run folder (following a `latest` symlink).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_dir() {
            return Err(Error::Io {
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such run folder"),
                path,
            });
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model_weights_path(&self) -> PathBuf {
        self.path.join("model.safetensors")
    }
    pub fn model_meta_path(&self) -> PathBuf {
        self.path.join("model.json")
    }
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn state_path(&self) -> PathBuf {
        self.path.join("state.safetensors")
    }
    /// The marker that says the checkpoint in `state.safetensors` is the
    /// end of training (see [`RunDir::mark_finished`]).
    pub fn finished_path(&self) -> PathBuf {
        self.path.join("finished.json")
    }
    pub fn history_path(&self) -> PathBuf {
        self.path.join("history.csv")
    }
    pub fn events_path(&self) -> PathBuf {
        self.path.join("events.jsonl")
    }

    /// Writes the model bundle: weights first, then `model.json`, so a
    /// `model.json` always describes weights that are complete.
    pub fn save_model(&self, varmap: &VarMap, meta: &ModelMeta) -> Result<()> {
        let tensors = varmap_tensors(varmap);
        let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
            .map_err(|e| Error::Invalid(format!("cannot serialize the model weights: {e}")))?;
        atomic_write(&self.model_weights_path(), &bytes)?;
        self.save_json(&self.model_meta_path(), meta)
    }

    /// Rewrites `model.json` alone (atomically), for settings chosen after
    /// training such as per-class thresholds; the weights stay as they are.
    pub fn save_model_meta(&self, meta: &ModelMeta) -> Result<()> {
        self.save_json(&self.model_meta_path(), meta)
    }

    /// Reads `model.json`.
    pub fn load_model_meta(&self) -> Result<ModelMeta> {
        load_json(&self.model_meta_path())
    }

    /// Reads `model.safetensors`.
    pub fn load_model_weights(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.model_weights_path();
        let bytes = read(&path)?;
        candle_core::safetensors::load_buffer(&bytes, device)
            .ctx(|| format!("reading {}", path.display()))
    }

    /// Writes `config.json`.
    pub fn save_config<T: Serialize>(&self, config: &T) -> Result<()> {
        self.save_json(&self.config_path(), config)
    }

    /// Reads `config.json`.
    pub fn load_config<T: DeserializeOwned>(&self) -> Result<T> {
        load_json(&self.config_path())
    }

    /// Writes weights, optimizer moments and `state` as one file, so the
    /// three can never disagree after a crash.
    pub fn save_checkpoint(
        &self,
        state: &TrainState,
        varmap: &VarMap,
        optimizer: &AdamState,
    ) -> Result<()> {
        let mut tensors: BTreeMap<String, Tensor> = varmap_tensors(varmap)
            .into_iter()
            .map(|(k, v)| (format!("model.{k}"), v))
            .collect();
        for (k, v) in &optimizer.tensors {
            tensors.insert(format!("opt.{k}"), v.clone());
        }
        let mut metadata = HashMap::new();
        metadata.insert(STATE_KEY.to_string(), to_json(state));
        metadata.insert(STEPS_KEY.to_string(), to_json(&optimizer.steps));
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
                .map_err(|e| Error::Invalid(format!("cannot serialize the training state: {e}")))?;
        // A marker left from an earlier end of training must not vouch for
        // this checkpoint (it would not match it anyway; this keeps the
        // folder tidy). Removed first: a crash in between leaves a
        // checkpoint that is merely not marked finished.
        self.clear_finished()?;
        atomic_write(&self.state_path(), &bytes)
    }

    /// Marks the checkpoint whose state is `state` as the end of training
    /// by writing that state to `finished.json`, instead of rewriting the
    /// whole `state.safetensors` (weights and optimizer moments) to flip
    /// one flag. [`RunDir::load_checkpoint`] reports `finished` when the
    /// marker holds the checkpoint's own state; a later checkpoint removes it.
    pub fn mark_finished(&self, state: &TrainState) -> Result<()> {
        let state = TrainState {
            finished: true,
            ..state.clone()
        };
        self.save_json(&self.finished_path(), &state)
    }

    fn clear_finished(&self) -> Result<()> {
        let path = self.finished_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Whether `finished.json` marks the checkpoint whose state is `state`.
    fn is_marked_finished(&self, state: &TrainState) -> Result<bool> {
        let path = self.finished_path();
        if !path.exists() {
            return Ok(false);
        }
        let marked: TrainState = load_json(&path).map_err(|e| {
            Error::Invalid(format!(
                "{e}; {} should hold the state of a finished checkpoint: delete it to resume",
                path.display()
            ))
        })?;
        Ok(marked
            == TrainState {
                finished: true,
                ..state.clone()
            })
    }

    /// Reads `state.safetensors`; `None` when the run has no checkpoint.
    pub fn load_checkpoint(&self, device: &Device) -> Result<Option<Checkpoint>> {
        let path = self.state_path();
        if !path.exists() {
            return Ok(None);
        }
        let bytes = read(&path)?;
        let invalid =
            |what: &str| Error::Invalid(format!("{}: {what}; start a new run", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| invalid(&format!("not a safetensors file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let parse = |key: &str| -> Result<serde_json::Value> {
            let text = metadata
                .get(key)
                .ok_or_else(|| invalid(&format!("metadata {key} missing")))?;
            serde_json::from_str(text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })
        };
        let mut state: TrainState =
            serde_json::from_value(parse(STATE_KEY)?).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        state.finished |= self.is_marked_finished(&state)?;
        let steps: BTreeMap<String, u64> =
            serde_json::from_value(parse(STEPS_KEY)?).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        let all = candle_core::safetensors::load_buffer(&bytes, device)
            .ctx(|| format!("reading {}", path.display()))?;
        let mut weights = HashMap::new();
        let mut optimizer = AdamState {
            steps,
            ..AdamState::default()
        };
        for (name, tensor) in all {
            if let Some(rest) = name.strip_prefix("model.") {
                weights.insert(rest.to_string(), tensor);
            } else if let Some(rest) = name.strip_prefix("opt.") {
                optimizer.tensors.insert(rest.to_string(), tensor);
            }
        }
        Ok(Some(Checkpoint {
            state,
            weights,
            optimizer,
        }))
    }

    /// Points `<parent>/latest` at this run (a symlink on Unix, a text file
    /// holding the folder name elsewhere), replacing the old pointer atomically.
    pub fn mark_latest(&self) -> Result<()> {
        let parent = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.file_name().ok_or_else(|| {
            Error::Invalid(format!("run folder {} has no name", self.path.display()))
        })?;
        let latest = parent.join("latest");
        if self.path.canonicalize().ok() == latest.canonicalize().ok() && latest.exists() {
            return Ok(());
        }
        #[cfg(unix)]
        {
            let temp = parent.join(format!(".latest.tmp-{}", std::process::id()));
            let _ = std::fs::remove_file(&temp);
            std::os::unix::fs::symlink(name, &temp)
                .and_then(|()| std::fs::rename(&temp, &latest))
                .map_err(|source| Error::Io {
                    path: latest.clone(),
                    source,
                })
        }
        #[cfg(not(unix))]
        {
            atomic_write(&latest, name.to_string_lossy().as_bytes())
        }
    }

    fn save_json<T: Serialize + ?Sized>(&self, path: &Path, value: &T) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        text.push('\n');
        atomic_write(path, text.as_bytes())
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it
/// over `path`, so readers see the old file or the new one, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} is not a file path", path.display())))?;
    let temp = parent.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(io)
}

fn varmap_tensors(varmap: &VarMap) -> BTreeMap<String, Tensor> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn load_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Serializes plain data (no maps with non-string keys), which cannot fail.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes to JSON")
}
