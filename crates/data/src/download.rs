//! Fetching, verifying and extracting dataset archives (fastai's PASCAL 2007
//! `.tgz` by default).
//!
//! The archive streams to a temporary file while its md5 is computed; only a
//! download of the expected size and checksum is extracted. Extraction goes
//! into a temporary folder beside the destination, refusing any entry that
//! would land outside it, and the finished folder is renamed into place with
//! a marker recording the checksum, so a later call sees a verified copy and
//! does nothing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::DataError;
use crate::dataset::is_safe_relative;

/// fastai's `URLs.PASCAL_2007`.
pub const PASCAL_2007_URL: &str = "https://s3.amazonaws.com/fast-ai-imagelocal/pascal_2007.tgz";
/// Size of [`PASCAL_2007_URL`] in bytes (fastai's `download_checks.py`).
pub const PASCAL_2007_SIZE: u64 = 1_637_796_771;
/// md5 of [`PASCAL_2007_URL`] (fastai's `download_checks.py`).
pub const PASCAL_2007_MD5: &str = "433b4706eb7c42bd74e7f784e3fdf244";

/// The file inside an extracted folder that records the verified md5.
pub const VERIFIED_MARKER: &str = ".multilabel-verified";

/// Progress of [`download_archive`], for the caller to render.
#[derive(Debug, Clone, PartialEq)]
pub enum DownloadEvent {
    /// A verified copy is already at `path`; nothing was fetched.
    AlreadyPresent {
        path: PathBuf,
    },
    Started {
        url: String,
        total: u64,
    },
    Downloaded {
        done: u64,
        total: u64,
    },
    /// Size and md5 match; extraction starts.
    Verified {
        md5: String,
    },
    Extracting {
        entries: u64,
    },
    Finished {
        path: PathBuf,
    },
}

/// Where datasets go by default: `$MULTILABEL_DATA`, else `data`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("MULTILABEL_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// Downloads fastai's PASCAL 2007 archive into `cache_dir/pascal_2007`
/// (see [`download_archive`]) and returns that folder.
pub fn download_pascal_2007(
    cache_dir: &Path,
    on_event: &mut dyn FnMut(DownloadEvent),
) -> Result<PathBuf, DataError> {
    download_archive(
        PASCAL_2007_URL,
        PASCAL_2007_SIZE,
        PASCAL_2007_MD5,
        &cache_dir.join("pascal_2007"),
        on_event,
    )
}

/// Fetches the `.tgz` at `url`, checks it is `expected_size` bytes with md5
/// `expected_md5`, and extracts it to the folder `dest` (an archive holding
/// a single top-level folder has that folder's contents at `dest`).
/// Returns `dest`. Does nothing when `dest` holds a copy verified with the
/// same md5; refuses to touch a `dest` that exists without that marker.
pub fn download_archive(
    url: &str,
    expected_size: u64,
    expected_md5: &str,
    dest: &Path,
    on_event: &mut dyn FnMut(DownloadEvent),
) -> Result<PathBuf, DataError> {
    let expected_md5 = expected_md5.to_ascii_lowercase();
    if dest.exists() {
        let marker = std::fs::read_to_string(dest.join(VERIFIED_MARKER)).unwrap_or_default();
        if marker.trim() == expected_md5 {
            on_event(DownloadEvent::AlreadyPresent {
                path: dest.to_path_buf(),
            });
            return Ok(dest.to_path_buf());
        }
        return Err(DataError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            DataError::Config(format!(
                "{}: destination has no folder name",
                dest.display()
            ))
        })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let archive = parent.join(format!(".{name}.download"));
    let staging = parent.join(format!(".{name}.extract-{}", std::process::id()));

    let result = fetch(url, expected_size, &expected_md5, &archive, on_event).and_then(|()| {
        on_event(DownloadEvent::Verified {
            md5: expected_md5.clone(),
        });
        extract_into_place(&archive, &staging, dest, &expected_md5, on_event)
    });
    // The archive is only a means to the folder: remove it either way. A
    // failed extraction leaves no half-filled folder behind either.
    let _ = std::fs::remove_file(&archive);
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    on_event(DownloadEvent::Finished {
        path: dest.to_path_buf(),
    });
    Ok(dest.to_path_buf())
}

/// Streams `url` to `file`, checking size and md5 on the way.
fn fetch(
    url: &str,
    expected_size: u64,
    expected_md5: &str,
    file: &Path,
    on_event: &mut dyn FnMut(DownloadEvent),
) -> Result<(), DataError> {
    let download_error = |message: String| DataError::Download {
        url: url.to_string(),
        message,
    };
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .build();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| download_error(e.to_string()))?;
    on_event(DownloadEvent::Started {
        url: url.to_string(),
        total: expected_size,
    });
    let mut reader = response.into_reader();
    let mut out = BufWriter::new(File::create(file).map_err(|e| DataError::io(file, e))?);
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut done: u64 = 0;
    let mut last_report: u64 = 0;
    let report_every = (expected_size / 500).max(1 << 20);
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(download_error(format!("after {done} bytes: {e}"))),
        };
        done += n as u64;
        if done > expected_size {
            // Stop early rather than fill the disk with the wrong file.
            return Err(DataError::SizeMismatch {
                url: url.to_string(),
                expected: expected_size,
                actual: done,
            });
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])
            .map_err(|e| DataError::io(file, e))?;
        if done - last_report >= report_every || done == expected_size {
            last_report = done;
            on_event(DownloadEvent::Downloaded {
                done,
                total: expected_size,
            });
        }
    }
    out.flush().map_err(|e| DataError::io(file, e))?;
    if done != expected_size {
        return Err(DataError::SizeMismatch {
            url: url.to_string(),
            expected: expected_size,
            actual: done,
        });
    }
    let actual = format!("{:x}", hasher.finalize());
    if actual != expected_md5 {
        return Err(DataError::ChecksumMismatch {
            url: url.to_string(),
            expected: expected_md5.to_string(),
            actual,
        });
    }
    Ok(())
}

fn extract_into_place(
    archive_path: &Path,
    staging: &Path,
    dest: &Path,
    md5: &str,
    on_event: &mut dyn FnMut(DownloadEvent),
) -> Result<(), DataError> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(|e| DataError::io(staging, e))?;
    let extract_error = |message: String| DataError::Extract {
        archive: archive_path.to_path_buf(),
        message,
    };
    let file = File::open(archive_path).map_err(|e| DataError::io(archive_path, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    let mut entries: u64 = 0;
    for entry in archive
        .entries()
        .map_err(|e| extract_error(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| extract_error(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| extract_error(e.to_string()))?
            .into_owned();
        let unsafe_entry = || DataError::UnsafeArchiveEntry {
            archive: archive_path.to_path_buf(),
            entry: path.display().to_string(),
        };
        if !is_safe_relative(&path) {
            return Err(unsafe_entry());
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            // Links may only point down into the archive: an absolute
            // target or any `..` could reach outside through other links.
            let target = entry
                .link_name()
                .map_err(|e| extract_error(e.to_string()))?
                .ok_or_else(unsafe_entry)?;
            let downward = target
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !downward {
                return Err(unsafe_entry());
            }
        } else if !(kind.is_file() || kind.is_dir() || kind.is_contiguous()) {
            return Err(extract_error(format!(
                "entry `{}` has an unsupported type ({kind:?})",
                path.display()
            )));
        }
        let unpacked = entry
            .unpack_in(staging)
            .map_err(|e| extract_error(format!("entry `{}`: {e}", path.display())))?;
        if !unpacked {
            return Err(unsafe_entry());
        }
        entries += 1;
        if entries.is_multiple_of(1000) {
            on_event(DownloadEvent::Extracting { entries });
        }
    }
    on_event(DownloadEvent::Extracting { entries });

    // An archive of one top-level folder (fastai's are) becomes `dest`
    // itself; otherwise the staging folder does.
    let top: Vec<PathBuf> = std::fs::read_dir(staging)
        .map_err(|e| DataError::io(staging, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let root = match &top[..] {
        [only] if only.is_dir() && !only.is_symlink() => only.clone(),
        _ => staging.to_path_buf(),
    };
    let marker = root.join(VERIFIED_MARKER);
    std::fs::write(&marker, format!("{md5}\n")).map_err(|e| DataError::io(&marker, e))?;
    std::fs::rename(&root, dest).map_err(|e| DataError::io(dest, e))
}
