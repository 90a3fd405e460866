//! `vdisk bench` (pending).

/// Arguments of `vdisk bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs the subcommand; returns the exit code.
pub fn run(_a: Args) -> i32 {
    crate::common::error("bench: pending");
    1
}
