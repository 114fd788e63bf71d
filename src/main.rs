//! `multilabel`: the command-line front end. Glue only: parse flags, build a
//! validated plan, call the library crates, render their events.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Multi-label image classification in pure Rust on candle: fine-tune an
/// ImageNet ResNet on PASCAL VOC 2007 the way fastai's book (chapter 6) does.
#[derive(Debug, Parser)]
#[command(name = "multilabel", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a synthetic PASCAL-layout dataset (train.csv + train/*.jpg)
    Synth(cli::data::SynthArgs),
    /// Draw a batch as a PNG grid with each image's labels under it
    ShowBatch(cli::data::ShowBatchArgs),
    /// Download and verify fastai's PASCAL VOC 2007 archive
    Download(cli::data::DownloadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Synth(args) => cli::data::synth(args),
        Command::ShowBatch(args) => cli::data::show_batch(args),
        Command::Download(args) => cli::data::download(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
