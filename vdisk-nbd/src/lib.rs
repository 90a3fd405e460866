//! NBD server front-end for vdisk images (pending).

pub mod cli {
    //! `vdisk serve` arguments.

    /// Arguments of `vdisk serve`.
    #[derive(clap::Args)]
    pub struct ServeArgs {
        /// Arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        pub rest: Vec<String>,
    }

    /// Runs the server; returns the exit code.
    pub fn run(_a: ServeArgs) -> i32 {
        eprintln!("vdisk: serve: pending");
        1
    }
}
