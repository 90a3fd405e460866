//! `vdisk serve`: qemu-nbd's command line on top of [`crate::server::Server`].

use crate::export::{DiscardMode, Export, ExportConfig};
use crate::server::{Server, ServerConfig};
use crate::stream::Listener;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vdisk::hook::{DetectZeroes, DetectZeroesMode};
use vdisk::{CacheMode, Format, Image, OpenOptions};

/// Environment variable through which a `--fork` parent hands its child the pipe to
/// report readiness on.
const READY_FD_ENV: &str = "VDISK_NBD_READY_FD";

/// Arguments of `vdisk serve` (the options of qemu-nbd that make sense here).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Export the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Export an internal snapshot (read-only): `snapshot.id=…,snapshot.name=…` or an
    /// ID or name.
    #[arg(short = 'l', long = "load-snapshot")]
    pub load_snapshot: Option<String>,
    /// Serve a temporary qcow2 overlay on FILE: writes never reach FILE and are
    /// thrown away when the server exits.
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,
    /// Trace options, as qemu-nbd's `-T` (accepted; vdisk has no trace events).
    #[arg(short = 'T', long = "trace", value_name = "TRACE")]
    pub trace: Vec<String>,
    /// Export name (default: the empty name).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    pub export_name: String,
    /// Export description shown to clients that list exports.
    #[arg(short = 'D', long = "description")]
    pub description: Option<String>,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    pub port: u16,
    /// Address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    pub bind: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket")]
    pub socket: Option<PathBuf>,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,
    /// Number of clients served at once (0: unlimited).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    pub shared: usize,
    /// Export the persistent dirty bitmap NAME as the qemu:dirty-bitmap:NAME metadata
    /// context (repeatable).
    #[arg(short = 'B', long = "bitmap")]
    pub bitmaps: Vec<String>,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Host cache mode: none, writeback, writethrough, directsync, unsafe.
    #[arg(long = "cache")]
    pub cache: Option<String>,
    /// Same as --cache=none.
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// AIO mode of the image's files: threads, native (with --cache=none) or io_uring.
    #[arg(long = "aio")]
    pub aio: Option<String>,
    /// What TRIM does: ignore (default) or unmap.
    #[arg(long = "discard", default_value = "ignore")]
    pub discard: String,
    /// Turn all-zero writes into zero writes: off (default), on, unmap.
    #[arg(long = "detect-zeroes", default_value = "off")]
    pub detect_zeroes: String,
    /// Seconds a client gets to complete the handshake (0: no limit).
    #[arg(long = "handshake-limit", default_value_t = 10)]
    pub handshake_limit: u64,
    /// Run in the background once the socket is listening.
    #[arg(long = "fork")]
    pub fork: bool,
    /// Write the server's process id to this file.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Log connection events to stderr.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Treat FILENAME as a key=value option list (`driver=qcow2,file.filename=X,
    /// encrypt.key-secret=ID`), as qemu-nbd's --image-opts.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Serve the image as a vhost-user-blk device on this Unix socket instead of NBD
    /// (one VMM at a time, which may reconnect, until SIGTERM).
    #[arg(long = "vhost-user-blk", value_name = "SOCKET")]
    pub vhost_user_blk: Option<PathBuf>,
    /// Request queues of the vhost-user-blk device (1-64).
    #[arg(long = "num-queues", default_value_t = 1)]
    pub num_queues: u16,
    /// Export the image through FUSE as one regular file mounted over MOUNTPOINT (an
    /// existing regular file) instead of NBD; with --vhost-user-blk, both at once.
    #[arg(long = "fuse", value_name = "MOUNTPOINT")]
    pub fuse: Option<PathBuf>,
    /// FUSE export: writes past the end grow the image.
    #[arg(long = "growable")]
    pub growable: bool,
    /// Require TLS with the credentials object ID (`--object tls-creds-x509,id=ID,
    /// dir=DIR,endpoint=server` or `tls-creds-psk,…`): clients must send
    /// NBD_OPT_STARTTLS first.
    #[arg(long = "tls-creds", value_name = "ID")]
    pub tls_creds: Option<String>,
    /// Allow only the client identity of the `authz-simple` object ID (the client
    /// certificate's distinguished name, or the PSK username).
    #[arg(long = "tls-authz", value_name = "ID")]
    pub tls_authz: Option<String>,
    /// Host name to check a server certificate against (qemu-nbd's client side;
    /// accepted with --tls-creds, unused by a server).
    #[arg(long = "tls-hostname", value_name = "HOSTNAME")]
    pub tls_hostname: Option<String>,
    /// Image file to export.
    pub filename: PathBuf,
}

pub(crate) fn err(msg: impl std::fmt::Display) -> i32 {
    eprintln!("vdisk: {}", vdisk::error::strip_os_error(&msg.to_string()));
    1
}

/// Everything `run` needs, validated.
struct Plan {
    open: OpenOptions,
    export: ExportConfig,
    server: ServerConfig,
}

fn plan(a: &ServeArgs) -> Result<Plan, String> {
    if a.image_opts && a.format.is_some() {
        return Err("--image-opts and -f are mutually exclusive".into());
    }
    let format = a
        .format
        .as_deref()
        .map(|f| Format::parse(f).map_err(|e| e.to_string()))
        .transpose()?;
    let mut cache = match a.cache.as_deref() {
        None => CacheMode::Writeback,
        Some(m) => CacheMode::parse(m).ok_or_else(|| format!("Invalid cache mode '{m}'"))?,
    };
    if a.nocache {
        cache = CacheMode::None;
    }
    let aio = match a.aio.as_deref() {
        None => vdisk::AioMode::Threads,
        Some(m) => vdisk::AioMode::parse(m).ok_or_else(|| format!("invalid aio mode '{m}'"))?,
    };
    let discard = match a.discard.as_str() {
        "ignore" | "off" => DiscardMode::Ignore,
        "unmap" | "on" => DiscardMode::Unmap,
        other => return Err(format!("Invalid discard mode `{other}'")),
    };
    let detect_zeroes = match a.detect_zeroes.as_str() {
        "off" => DetectZeroesMode::Off,
        "on" => DetectZeroesMode::On,
        "unmap" => DetectZeroesMode::Unmap,
        other => return Err(format!("Invalid detect-zeroes mode `{other}'")),
    };
    if detect_zeroes == DetectZeroesMode::Unmap && discard != DiscardMode::Unmap {
        return Err(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                .into(),
        );
    }
    if a.export_name.len() > crate::proto::MAX_STRING {
        return Err("export name too long".into());
    }
    if a.description
        .as_ref()
        .is_some_and(|d| d.len() > crate::proto::MAX_STRING)
    {
        return Err("export description too long".into());
    }
    let tls = server_tls(a)?;
    // -l implies a read-only export, as with qemu-nbd.
    let read_only = a.read_only || a.load_snapshot.is_some();
    Ok(Plan {
        open: OpenOptions {
            format,
            read_only,
            cache,
            aio,
            image_opts: a.image_opts,
            discard: match discard {
                DiscardMode::Ignore => vdisk::policy::DiscardMode::Ignore,
                DiscardMode::Unmap => vdisk::policy::DiscardMode::Unmap,
            },
            // Zero detection is the image's business: the export only writes.
            hooks: DetectZeroes::for_mode(detect_zeroes, discard == DiscardMode::Unmap)
                .into_iter()
                .collect(),
            ..OpenOptions::default()
        },
        export: ExportConfig {
            name: a.export_name.clone(),
            description: a.description.clone(),
            read_only,
            multi_conn: a.shared != 1,
            allocation_depth: a.allocation_depth,
            discard,
        },
        server: ServerConfig {
            persistent: a.persistent,
            max_clients: a.shared,
            handshake_timeout: if a.handshake_limit == 0 {
                Duration::from_secs(u32::MAX as u64)
            } else {
                Duration::from_secs(a.handshake_limit)
            },
            tls,
            ..ServerConfig::default()
        },
    })
}

/// `--tls-creds`/`--tls-authz`/`--tls-hostname`, checked with qemu-nbd's words.
fn server_tls(a: &ServeArgs) -> Result<Option<vdisk::storage::nbd::tls::ServerTls>, String> {
    use vdisk::storage::nbd::tls;
    let Some(id) = &a.tls_creds else {
        if a.tls_authz.is_some() {
            return Err("--tls-authz is not permitted without --tls-creds".into());
        }
        if a.tls_hostname.is_some() {
            return Err("--tls-hostname is not permitted without --tls-creds".into());
        }
        return Ok(None);
    };
    if a.vhost_user_blk.is_some() || a.fuse.is_some() {
        return Err("--tls-creds is only for NBD exports".into());
    }
    let creds = tls::lookup(id, tls::Endpoint::Server)
        .map_err(|e| format!("Failed to get TLS creds: {e}"))?;
    let authz = a.tls_authz.as_deref().map(tls::lookup_authz).transpose()?;
    Ok(Some(tls::ServerTls { creds, authz }))
}

/// Runs the server; returns the exit code (0 after a clean shutdown).
pub fn run(a: ServeArgs) -> i32 {
    if a.fork && std::env::var_os(READY_FD_ENV).is_none() {
        return fork_and_wait();
    }
    crate::log::set_verbose(a.verbose);
    let plan = match plan(&a) {
        Ok(p) => p,
        Err(e) => return err(e),
    };
    let opened = if a.snapshot {
        open_snapshot(&a.filename, &plan.open)
    } else {
        Image::open(&a.filename, &plan.open)
            .map_err(|e| format!("Failed to blk_new_open '{}': {e}", a.filename.display()))
    };
    let opened = opened.and_then(|i| match &a.load_snapshot {
        None => Ok(i),
        Some(l) => {
            let p = vdisk::SnapshotParam::parse(l)
                .map_err(|_| format!("Failed in parsing snapshot param `{l}'"))?;
            i.snapshot_load_param(&p)
                .map_err(|e| format!("Failed to load snapshot: {e}"))?;
            Ok(i)
        }
    });
    let image = match opened {
        Ok(i) => Arc::new(i),
        Err(e) => return err(e),
    };
    if a.vhost_user_blk.is_some() || a.fuse.is_some() {
        return crate::exports::run(&a, image, plan.export.discard);
    }
    let inline = crate::export::inline_max_for(&image, plan.open.cache.direct());
    let export = Export::new(image.clone(), plan.export)
        .with_inline_max(inline)
        .with_async_io(plan.open.cache.direct());
    let export = if a.snapshot && !a.bitmaps.is_empty() {
        // `-s -B`: the bitmaps of FILE itself (the overlay has none), read once now.
        let mut o = plan.open.clone();
        o.read_only = true;
        Image::open(&a.filename, &o)
            .map_err(|e| format!("Failed to blk_new_open '{}': {e}", a.filename.display()))
            .and_then(|base| export.with_bitmaps_of(&base, &a.bitmaps))
    } else {
        export.with_bitmaps(&a.bitmaps)
    };
    let export = match export {
        Ok(e) => Arc::new(e),
        Err(e) => return err(e),
    };
    let listener = match &a.socket {
        Some(p) => Listener::unix(p).map_err(|e| format!("cannot listen on {}: {e}", p.display())),
        None => Listener::tcp(&a.bind, a.port)
            .map_err(|e| format!("cannot listen on {}:{}: {e}", a.bind, a.port)),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => return err(e),
    };
    // Signals go to a socket the accept loop polls: no work happens in the handler.
    let (stop_rx, stop_tx) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return err(e),
    };
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let tx = match stop_tx.try_clone() {
            Ok(t) => t,
            Err(e) => return err(e),
        };
        if let Err(e) = signal_hook::low_level::pipe::register(sig, tx) {
            return err(format!("cannot install signal handler: {e}"));
        }
    }
    let server = match Server::new(listener, export.clone(), plan.server) {
        Ok(s) => s,
        Err(e) => return err(e),
    };
    if let Some(p) = &a.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            server.listener().cleanup();
            return err(format!("Failed to write pid file '{}': {e}", p.display()));
        }
    }
    report_ready();
    let result = server.run(&stop_rx);
    server.listener().cleanup();
    drop(server);
    drop(export);
    let mut code = 0;
    if let Err(e) = result {
        code = err(format!("server failed: {e}"));
    }
    // Everything acknowledged must be durable, and formats mark themselves clean.
    if let Err(e) = image.flush().and_then(|()| image.close()) {
        code = err(format!("closing '{}': {e}", a.filename.display()));
    }
    // The pid file stays, as qemu-nbd leaves it.
    code
}

/// `-s`: opens `file` under a temporary qcow2 overlay (see
/// [`Image::open_temp_overlay`]), with qemu-nbd's wording for each failure.
fn open_snapshot(file: &std::path::Path, opts: &OpenOptions) -> Result<Image, String> {
    use vdisk::image::OverlayError;
    Image::open_temp_overlay(file, opts).map_err(|e| match e {
        OverlayError::Base(e) => format!("Failed to blk_new_open '{}': {e}", file.display()),
        OverlayError::Name(m) => format!("Failed to blk_new_open '{}': {m}", file.display()),
        e @ OverlayError::Create { .. } => e.to_string(),
        OverlayError::Overlay(e) => format!(
            "Failed to open '{}' with a snapshot overlay: {e}",
            file.display()
        ),
    })
}

/// In a `--fork` child: tell the waiting parent the server is listening, and stop
/// writing to the terminal the parent had.
pub(crate) fn report_ready() {
    let Some(v) = std::env::var_os(READY_FD_ENV) else {
        return;
    };
    let Some(fd) = v.to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
        return;
    };
    if fd < 3 {
        return;
    }
    // SAFETY: the parent passed us this descriptor for exactly this purpose and
    // nothing else in this process uses it; we take ownership and close it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(b"R");
    drop(f);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard error descriptor of this process.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO);
        }
    }
}

/// `--fork`: start the same command as a detached child and exit once it is listening
/// (0) or has failed (its exit code). Re-executing rather than calling fork() keeps
/// this safe in a multi-threaded process and keeps the image opened (and locked) only
/// by the process that serves it.
fn fork_and_wait() -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return err(format!("cannot find own executable: {e}")),
    };
    let args: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two descriptors of a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here.
    let mut rd = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let wr = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    let wfd = fds[1];
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(READY_FD_ENV, wfd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::fcntl(wfd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return err(format!("cannot start the server process: {e}")),
    };
    drop(wr);
    let mut b = [0u8; 1];
    match rd.read(&mut b) {
        Ok(1) => 0,
        _ => match child.wait() {
            Ok(st) => st.code().unwrap_or(1).max(1),
            Err(e) => err(e),
        },
    }
}
