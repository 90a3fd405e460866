//! `vdisk`: a drop-in for qemu-img (same subcommands, options, JSON and exit codes),
//! plus `vdisk io` (qemu-io's command language) and `vdisk serve` (an NBD server).

mod cmd;
mod common;
mod output;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vdisk",
    version,
    about = "Disk image tool: qcow2, QED and raw; qemu-img compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new image.
    Create(cmd::create::Args),
    /// Show information about an image.
    Info(cmd::info::Args),
    /// Check an image for consistency (and repair it with -r).
    Check(cmd::check::Args),
    /// Show the allocation map of an image.
    Map(cmd::map::Args),
    /// Compare the guest contents of two images.
    Compare(cmd::compare::Args),
    /// Convert an image to another format.
    Convert(cmd::convert::Args),
    /// Change the size of an image.
    Resize(cmd::resize::Args),
    /// Change the backing file of an image.
    Rebase(cmd::rebase::Args),
    /// Run a simple I/O benchmark on an image.
    Bench(cmd::bench::Args),
    /// Run qemu-io style commands on an image.
    Io(cmd::io::Args),
    /// Serve an image over NBD (like qemu-nbd).
    Serve(vdisk_nbd::cli::ServeArgs),
    /// Serve several exports (NBD, vhost-user-blk, FUSE) in one process (like
    /// qemu-storage-daemon).
    StorageDaemon(vdisk_nbd::daemon::DaemonArgs),
}

fn main() {
    // Usage errors exit with 1 like qemu-img (clap's default is 2, which `compare`
    // and `check` use for other meanings); --help and --version still exit 0.
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let code = if e.use_stderr() { 1 } else { 0 };
        let _ = e.print();
        std::process::exit(code);
    });
    if !matches!(cli.command, Command::Serve(_) | Command::StorageDaemon(_)) {
        // Like qemu-img, die quietly when the reader of our output goes away
        // (`vdisk info | head`) instead of failing on EPIPE. The NBD server keeps Rust's
        // ignored SIGPIPE: a vanishing client must only end its own connection.
        // SAFETY: setting a signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match cli.command {
        Command::Create(a) => cmd::create::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Resize(a) => cmd::resize::run(a),
        Command::Rebase(a) => cmd::rebase::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Io(a) => cmd::io::run(a),
        Command::Serve(a) => vdisk_nbd::cli::run(a),
        Command::StorageDaemon(a) => vdisk_nbd::daemon::run(a),
    };
    std::process::exit(code);
}
