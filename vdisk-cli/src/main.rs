//! `vdisk`: a drop-in for qemu-img (same subcommands, options, JSON and exit codes),
//! plus `vdisk io` (qemu-io's command language) and `vdisk serve` (an NBD server).

mod cmd;
mod common;
mod multicall;
mod output;
mod progress;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vdisk",
    version,
    about = "Disk image tool: qcow2, QED and raw; qemu-img compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Define an object, as qemu-img's `--object`: `secret,id=ID,data=STRING` or
    /// `secret,id=ID,file=PATH` (`,format=raw|base64`); images name secrets by id
    /// (`encrypt.key-secret=ID`, `key-secret=ID`). Accepted by every subcommand.
    #[arg(long = "object", global = true, value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Trace options, as qemu-img's standard option `-T` before the subcommand
    /// (accepted so scripts run unchanged; vdisk has no trace events).
    #[arg(short = 'T', long = "trace", value_name = "TRACE")]
    trace: Vec<String>,
}

// Parsed once per process: the size of the largest arguments (serve's) costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Change options of an existing image.
    Amend(cmd::amend::Args),
    /// Copy an image (or part of it) into a new image, dd style.
    Dd(cmd::dd::Args),
    /// Compute the size a new image needs.
    Measure(cmd::measure::Args),
    /// Commit the changes of an image into its backing file.
    Commit(cmd::commit::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(cmd::snapshot::Args),
    /// Change the persistent dirty bitmaps of an image.
    Bitmap(cmd::bitmap::Args),
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
    // An option given twice is no error: the last one wins, as with QEMU's getopt
    // (scripts build command lines in layers), in every subcommand.
    let mut command = Cli::command().args_override_self(true);
    let names: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for n in names {
        command = command.mut_subcommand(n, |s| s.args_override_self(true));
    }
    let cli = command
        .try_get_matches_from(multicall::args())
        .and_then(|m| Cli::from_arg_matches(&m))
        .unwrap_or_else(|e| {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            multicall::exit(code);
        });
    // SIGPIPE stays ignored (Rust's default) in every command: a server closing a
    // socket mid-write must give an error, not kill the process. The commands that
    // print a result die of SIGPIPE only when stdout's reader goes away
    // (`common::stdout_write`), as qemu-img; `io` and `serve` never do (`io` must still
    // close its image: `vdisk io -c write -c 'read -v' | head`).
    let trace = match &cli.command {
        Command::Io(a) => &a.trace,
        Command::Serve(a) => &a.trace,
        _ => &cli.trace,
    };
    if let Err(e) = common::accept_trace(trace) {
        common::error(e);
        multicall::exit(1);
    }
    for o in &cli.object {
        // TLS credentials and authz objects (NBD), else secrets.
        if let Some(r) = vdisk::storage::nbd::tls::define_object(o) {
            if let Err(e) = r {
                common::error(e);
                std::process::exit(1);
            }
        } else if let Err(e) = vdisk::crypto::secret::define_object(o) {
            common::error(e);
            std::process::exit(1);
        }
    }
    if matches!(cli.command, Command::Serve(_) | Command::StorageDaemon(_)) {
        one_malloc_arena();
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
        Command::Snapshot(a) => cmd::snapshot::run(a),
        Command::Commit(a) => cmd::commit::run(a),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Dd(a) => cmd::dd::run(a),
        Command::Amend(a) => cmd::amend::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Bitmap(a) => cmd::bitmap::run(a),
        Command::Io(a) => cmd::io::run(a),
        Command::Serve(a) => vdisk_nbd::cli::run(a),
        Command::StorageDaemon(a) => vdisk_nbd::daemon::run(a),
    };
    multicall::exit(code);
}

/// Servers use one malloc arena. glibc gives each new thread its own arena (up to eight
/// per CPU), and a connection's seventeen threads each touched one: 0.2-0.4 MiB of a
/// small server's peak RSS. Their allocations are small and rare (payload buffers come
/// from the aligned pool), so sharing one arena costs no measurable throughput.
/// `MALLOC_ARENA_MAX` in the environment still wins, as glibc documents.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter; this runs before any thread is spawned.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
