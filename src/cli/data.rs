//! `synth`, `show-batch` and `download`: built by the dataset issue.

use anyhow::bail;
use clap::Args;

#[derive(Debug, Args)]
pub struct SynthArgs {}

#[derive(Debug, Args)]
pub struct ShowBatchArgs {}

#[derive(Debug, Args)]
pub struct DownloadArgs {}

pub fn synth(_args: SynthArgs) -> anyhow::Result<()> {
    bail!("synth is not implemented yet")
}

pub fn show_batch(_args: ShowBatchArgs) -> anyhow::Result<()> {
    bail!("show-batch is not implemented yet")
}

pub fn download(_args: DownloadArgs) -> anyhow::Result<()> {
    bail!("download is not implemented yet")
}
