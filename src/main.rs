//! `multilabel`: the command-line front end. Glue only: parse flags, build a
//! validated plan, call the library crates, render their events.

mod cli;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

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
    /// Fine-tune a ResNet with fastai's recipe (freeze, one cycle, unfreeze, one cycle)
    Train(cli::train::TrainArgs),
    /// Evaluate a run: accuracy_multi at a threshold, loss, mAP, F1, threshold sweep
    Eval(cli::eval::EvalArgs),
    /// Predict labels with a saved run for image files, folders or a CSV of file names
    Predict(cli::predict::PredictArgs),
    /// fastai's learning-rate finder: loss against an exponentially growing learning rate
    LrFind(cli::train::LrFindArgs),
    /// Offline demo: synthetic data, a narrow ResNet trained from scratch on the CPU
    Demo(cli::eval::DemoArgs),
    /// Write a synthetic PASCAL-layout dataset (train.csv + train/*.jpg)
    Synth(cli::data::SynthArgs),
    /// Draw a batch as a PNG grid with each image's labels under it
    ShowBatch(cli::data::ShowBatchArgs),
    /// Download and verify fastai's PASCAL VOC 2007 archive
    Download(cli::data::DownloadArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return flag_error(&err),
    };
    // Training allocates and frees gigabytes per step; keep that memory
    // mapped for the next step instead of page-faulting it in again.
    multilabel_resnet::cpu::keep_freed_memory();
    // This thread drives training: run it as one of the pool's threads, so
    // that each parallel op does not put it to sleep and wake it again.
    multilabel_resnet::cpu::use_main_thread_in_pool();
    let result = match cli.command {
        Command::Train(args) => cli::train::train(args),
        Command::Eval(args) => cli::eval::eval(args),
        Command::Predict(args) => cli::predict::predict(args),
        Command::LrFind(args) => cli::train::lr_find(args),
        Command::Demo(args) => cli::eval::demo(args),
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

/// Prints a flag-parse error and returns the exit status: 0 for `--help` and
/// `--version`, else 1 like every other error (clap's own convention is 2).
fn flag_error(err: &clap::Error) -> ExitCode {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args_os()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    match negative_value_hint(&args) {
        Some(hint) => eprintln!("error: {hint}"),
        None => {
            let _ = err.print();
        }
    }
    ExitCode::FAILURE
}

/// For `--flag -0.1`, which clap reads as a flag `-0` with `--flag` left
/// without a value: a message that says how to pass a negative value.
fn negative_value_hint(args: &[String]) -> Option<String> {
    let command = Cli::command();
    let subcommand = command.find_subcommand(args.get(1)?)?;
    args.windows(2).skip(2).find_map(|pair| {
        let (flag, value) = (&pair[0], &pair[1]);
        let long = flag.strip_prefix("--")?;
        if !value.starts_with('-') || value.parse::<f64>().is_err() {
            return None;
        }
        let arg = subcommand
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long))?;
        arg.get_action().takes_values().then(|| {
            format!(
                "{flag} {value}: a value starting with `-` must be joined to its flag; write {flag}={value}"
            )
        })
    })
}
