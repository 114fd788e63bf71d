//! One module per group of subcommands. Each exposes clap `Args` structs and
//! a `fn(args) -> anyhow::Result<()>` per subcommand.

pub mod common;
pub mod data;
pub mod eval;
pub mod plot;
pub mod predict;
pub mod progress;
pub mod train;

/// Exit status for an error: 130 when the user interrupted, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let interrupted = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<multilabel_train::Error>(),
            Some(multilabel_train::Error::Interrupted { .. })
        )
    });
    if interrupted { 130 } else { 1 }
}
