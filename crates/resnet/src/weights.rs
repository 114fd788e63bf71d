//! Pretrained body weights from a safetensors file or a Hugging Face hub repo.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};
use serde::{Deserialize, Serialize};

use crate::ResNetError;
use crate::error::WithName;

/// The book's weights: torchvision's ImageNet V1 ResNet-50, as published by timm.
pub const DEFAULT_HUB_REPO: &str = "timm/resnet50.tv_in1k";

/// The file read from a hub repo.
pub const HUB_WEIGHTS_FILE: &str = "model.safetensors";

/// Where pretrained weights come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightsSource {
    /// Keep the random initialisation.
    None,
    /// A local safetensors file with torchvision/timm or transformers names.
    File(PathBuf),
    /// `model.safetensors` of a hub repo (e.g. `timm/resnet50.tv_in1k`),
    /// through the standard cache (`HF_HOME`, `HF_ENDPOINT` honoured).
    /// `offline` reads only the cache.
    Hub { repo: String, offline: bool },
}

impl Default for WeightsSource {
    fn default() -> Self {
        WeightsSource::Hub {
            repo: DEFAULT_HUB_REPO.to_string(),
            offline: false,
        }
    }
}

/// What [`load_pretrained`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The file read (`None` for [`WeightsSource::None`]).
    pub path: Option<PathBuf>,
    /// Variables overwritten, by network name.
    pub loaded: Vec<String>,
    /// File tensors deliberately ignored: the old classifier (`fc.*`,
    /// `classifier.*`) and `num_batches_tracked` counters.
    pub skipped: Vec<String>,
    /// Whether names were mapped from the transformers layout (`microsoft/resnet-50`).
    pub mapped_from_transformers: bool,
}

/// Copies pretrained body weights into the ResNet variables of `varmap`,
/// a network built at the root of `varmap` (no prefix); see
/// [`load_pretrained_at`] for one inside a larger model.
///
/// Every body variable (all except `head.*`) must be in the file with the
/// same shape, and every file tensor must be used, except the replaced
/// classifier and `num_batches_tracked`; otherwise nothing is loaded and the
/// error lists all missing, unexpected and mis-shaped tensors. Values are
/// converted to each variable's dtype and device.
pub fn load_pretrained(varmap: &VarMap, source: &WeightsSource) -> Result<LoadReport, ResNetError> {
    load_pretrained_at(varmap, "", source)
}

/// [`load_pretrained`] for a ResNet built under `prefix` in a larger
/// `varmap` (with `VarBuilder::pp(prefix)`; a `VarBuilder`'s own prefix is
/// `vb.prefix()`): only the variables named `prefix.…` are the network's,
/// the rest of the model is left alone. `""` is the root. The report names
/// tensors as the network does, without the prefix.
pub fn load_pretrained_at(
    varmap: &VarMap,
    prefix: &str,
    source: &WeightsSource,
) -> Result<LoadReport, ResNetError> {
    let path = match source {
        WeightsSource::None => return Ok(LoadReport::default()),
        WeightsSource::File(path) => path.clone(),
        WeightsSource::Hub { repo, offline } => hub_file(repo, *offline)?,
    };
    let origin = match source {
        WeightsSource::Hub { repo, .. } => format!("hub repo {repo} ({})", path.display()),
        _ => path.display().to_string(),
    };
    load_file(varmap, prefix, &path, &origin)
}

/// The local path of `model.safetensors` of `repo`, downloading it unless `offline`.
pub fn hub_file(repo: &str, offline: bool) -> Result<PathBuf, ResNetError> {
    if offline {
        let cache = Cache::from_env();
        return cache
            .repo(Repo::model(repo.to_string()))
            .get(HUB_WEIGHTS_FILE)
            .ok_or_else(|| ResNetError::NotCached {
                repo: repo.to_string(),
                file: HUB_WEIGHTS_FILE.to_string(),
                cache: cache.path().clone(),
            });
    }
    let hub_error = |source| ResNetError::Hub {
        repo: repo.to_string(),
        file: HUB_WEIGHTS_FILE.to_string(),
        source: Box::new(source),
    };
    // Libraries do not print: no progress bar.
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(hub_error)?;
    api.model(repo.to_string())
        .get(HUB_WEIGHTS_FILE)
        .map_err(hub_error)
}

fn load_file(
    varmap: &VarMap,
    prefix: &str,
    path: &Path,
    origin: &str,
) -> Result<LoadReport, ResNetError> {
    let read_error = |source| ResNetError::ReadWeights {
        path: path.to_path_buf(),
        source,
    };
    // Safety: the file is only read, and is not expected to change while mapped.
    let file = unsafe { MmapedSafetensors::new(path) }.map_err(read_error)?;
    let file_names: Vec<String> = file.tensors().into_iter().map(|(name, _)| name).collect();
    let mapped_from_transformers = file_names.iter().any(|n| n.starts_with("resnet.embedder."));

    let mut skipped = Vec::new();
    // Network name → file name.
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for file_name in &file_names {
        let name = if mapped_from_transformers {
            transformers_to_torchvision(file_name)
        } else {
            Some(file_name.clone())
        };
        match name {
            Some(name) if is_skipped(&name) => skipped.push(file_name.clone()),
            Some(name) => {
                wanted.insert(name, file_name.clone());
            }
            None if file_name.starts_with("classifier.") => skipped.push(file_name.clone()),
            None => unexpected.push(file_name.clone()),
        }
    }

    let all_vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    // The network's variables, by the network's own names.
    let vars: BTreeMap<String, &candle_core::Var> = if prefix.is_empty() {
        all_vars.iter().map(|(n, v)| (n.clone(), v)).collect()
    } else {
        let lead = format!("{}.", prefix.trim_end_matches('.'));
        all_vars
            .iter()
            .filter_map(|(n, v)| n.strip_prefix(&lead).map(|rest| (rest.to_string(), v)))
            .collect()
    };
    if vars.is_empty() && !prefix.is_empty() {
        return Err(ResNetError::NoNetworkAt {
            prefix: prefix.to_string(),
        });
    }
    let body: BTreeSet<&String> = vars.keys().filter(|n| !n.starts_with("head.")).collect();
    let missing: Vec<String> = body
        .iter()
        .filter(|name| !wanted.contains_key(name.as_str()))
        .map(|name| name.to_string())
        .collect();
    let mut mis_shaped = Vec::new();
    for (name, file_name) in &wanted {
        match vars.get(name) {
            Some(var) if !name.starts_with("head.") => {
                let view = file.get(file_name).map_err(read_error)?;
                if view.shape() != var.dims() {
                    mis_shaped.push((name.clone(), var.dims().to_vec(), view.shape().to_vec()));
                }
            }
            _ => unexpected.push(file_name.clone()),
        }
    }
    if !missing.is_empty() || !unexpected.is_empty() || !mis_shaped.is_empty() {
        unexpected.sort();
        return Err(ResNetError::WeightsMismatch {
            origin: origin.to_string(),
            missing,
            unexpected,
            mis_shaped,
        });
    }

    let mut loaded = Vec::with_capacity(wanted.len());
    for (name, file_name) in &wanted {
        let var = vars[name];
        let value: Tensor = file.load(file_name, &Device::Cpu).map_err(read_error)?;
        let value = value
            .to_dtype(var.dtype())
            .and_then(|v| v.to_device(var.device()))
            .with_name(name)?;
        var.set(&value).with_name(name)?;
        loaded.push(name.clone());
    }
    skipped.sort();
    Ok(LoadReport {
        path: Some(path.to_path_buf()),
        loaded,
        skipped,
        mapped_from_transformers,
    })
}

/// The old classifier (or an old fastai head) and BatchNorm batch counters are never loaded.
fn is_skipped(name: &str) -> bool {
    name.starts_with("fc.") || name.starts_with("head.") || name.ends_with(".num_batches_tracked")
}

/// Maps a transformers `ResNetModel` name (`microsoft/resnet-50`) to
/// torchvision's; `None` for names with no body counterpart.
pub fn transformers_to_torchvision(name: &str) -> Option<String> {
    let norm_tensor = |rest: &str| -> Option<String> {
        let tensor = rest.strip_prefix("normalization.")?;
        Some(tensor.to_string())
    };
    if let Some(rest) = name.strip_prefix("resnet.embedder.embedder.") {
        if rest == "convolution.weight" {
            return Some("conv1.weight".into());
        }
        return norm_tensor(rest).map(|t| format!("bn1.{t}"));
    }
    let rest = name.strip_prefix("resnet.encoder.stages.")?;
    let mut parts = rest.splitn(4, '.');
    let stage: usize = parts.next()?.parse().ok()?;
    if parts.next()? != "layers" {
        return None;
    }
    let block: usize = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    let prefix = format!("layer{}.{block}", stage + 1);
    if let Some(rest) = rest.strip_prefix("shortcut.") {
        if rest == "convolution.weight" {
            return Some(format!("{prefix}.downsample.0.weight"));
        }
        return norm_tensor(rest).map(|t| format!("{prefix}.downsample.1.{t}"));
    }
    let rest = rest.strip_prefix("layer.")?;
    let (index, rest) = rest.split_once('.')?;
    let j = index.parse::<usize>().ok()? + 1;
    if rest == "convolution.weight" {
        return Some(format!("{prefix}.conv{j}.weight"));
    }
    norm_tensor(rest).map(|t| format!("{prefix}.bn{j}.{t}"))
}

#[cfg(test)]
mod tests {
    use super::transformers_to_torchvision as map;

    #[test]
    fn maps_transformers_names() {
        let cases = [
            (
                "resnet.embedder.embedder.convolution.weight",
                Some("conv1.weight"),
            ),
            (
                "resnet.embedder.embedder.normalization.running_var",
                Some("bn1.running_var"),
            ),
            (
                "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight",
                Some("layer1.0.downsample.0.weight"),
            ),
            (
                "resnet.encoder.stages.3.layers.2.shortcut.normalization.bias",
                Some("layer4.2.downsample.1.bias"),
            ),
            (
                "resnet.encoder.stages.2.layers.5.layer.2.convolution.weight",
                Some("layer3.5.conv3.weight"),
            ),
            (
                "resnet.encoder.stages.1.layers.0.layer.0.normalization.num_batches_tracked",
                Some("layer2.0.bn1.num_batches_tracked"),
            ),
            ("classifier.1.weight", None),
            ("resnet.pooler.weight", None),
        ];
        for (from, to) in cases {
            assert_eq!(map(from).as_deref(), to, "{from}");
        }
    }
}
