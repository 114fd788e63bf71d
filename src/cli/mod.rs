//! One module per group of subcommands. Each exposes clap `Args` structs and
//! a `fn(args) -> anyhow::Result<()>` per subcommand.

pub mod data;

/// Exit status for an error: 130 when the user interrupted, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.to_string().contains("interrupted")) {
        130
    } else {
        1
    }
}
