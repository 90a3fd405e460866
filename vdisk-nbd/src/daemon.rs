//! `vdisk storage-daemon`: several exports in one process, like qemu-storage-daemon's
//! `--export`: any number of NBD (Unix socket), vhost-user-blk and FUSE exports, of
//! one image or several. Each image is opened once (writable when any of its exports
//! is) and shared by its exports; every export runs on its own threads; SIGTERM or
//! SIGINT stops them all, then each image is flushed and closed clean.
//!
//! ```text
//! vdisk storage-daemon \
//!   --export type=vhost-user-blk,image=a.qcow2,addr.path=/run/a.sock,writable=on,num-queues=2 \
//!   --export type=nbd,image=a.qcow2,addr.path=/run/a.nbd,name=a \
//!   --export type=fuse,image=b.raw,mountpoint=/srv/b.img,writable=on
//! ```

use crate::cli::{err, report_ready};
use crate::export::{DiscardMode, Export, ExportConfig};
use crate::exports::stop_on_signals;
use crate::server::{Server, ServerConfig};
use crate::stream::Listener;
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vdisk::{CacheMode, Format, Image, OpenOptions};
use vdisk_fuse::FuseExport;
use vdisk_vhost::{BlkConfig, VhostExport};

/// Arguments of `vdisk storage-daemon`.
#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    /// An export (repeat for more):
    /// `type=nbd,image=FILE,addr.path=SOCKET[,name=NAME][,tls-creds=ID[,tls-authz=ID]]`,
    /// `type=vhost-user-blk,image=FILE,addr.path=SOCKET[,num-queues=N]`,
    /// `type=fuse,image=FILE,mountpoint=FILE[,growable=on]`;
    /// each also takes `format=FMT`, `writable=on|off` (default off) and `id=NAME`.
    #[arg(long = "export", required = true, value_name = "OPTIONS")]
    pub exports: Vec<String>,
    /// Host cache mode of every image: none, writeback, writethrough, directsync, unsafe.
    #[arg(long = "cache")]
    pub cache: Option<String>,
    /// What TRIM / discard does: ignore (default) or unmap.
    #[arg(long = "discard", default_value = "ignore")]
    pub discard: String,
    /// Write the daemon's process id to this file.
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Nbd {
        socket: PathBuf,
        name: String,
        /// `tls-creds=ID` / `tls-authz=ID` (as qemu-storage-daemon's `--nbd-server`).
        tls: Option<(String, Option<String>)>,
    },
    Vhost {
        socket: PathBuf,
        queues: u16,
    },
    Fuse {
        mountpoint: PathBuf,
        growable: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Spec {
    id: String,
    image: PathBuf,
    format: Option<String>,
    writable: bool,
    kind: Kind,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parses one `--export` value (key=value pairs separated by commas).
fn parse_export(s: &str, n: usize) -> Result<Spec, String> {
    let mut kv = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--export '{s}': '{part}' is not key=value"))?;
        if kv.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("--export '{s}': '{k}' given twice"));
        }
    }
    let mut take = |k: &str| kv.remove(k);
    let ty = take("type").ok_or_else(|| format!("--export '{s}': Parameter 'type' is missing"))?;
    let image =
        take("image").ok_or_else(|| format!("--export '{s}': Parameter 'image' is missing"))?;
    let id = take("id").unwrap_or_else(|| format!("export{n}"));
    let format = take("format");
    let writable = match take("writable") {
        Some(v) => on_off("writable", &v)?,
        None => false,
    };
    let kind = match ty.as_str() {
        "nbd" | "vhost-user-blk" => {
            let socket = take("addr.path")
                .ok_or_else(|| format!("--export '{s}': Parameter 'addr.path' is missing"))?;
            if let Some(t) = take("addr.type") {
                if t != "unix" {
                    return Err(format!("--export '{s}': only addr.type=unix is supported"));
                }
            }
            if ty == "nbd" {
                let name = take("name").unwrap_or_else(|| id.clone());
                if name.len() > crate::proto::MAX_STRING {
                    return Err("export name too long".into());
                }
                let tls = match (take("tls-creds"), take("tls-authz")) {
                    (Some(c), a) => Some((c, a)),
                    (None, Some(_)) => {
                        return Err(format!("--export '{s}': tls-authz needs tls-creds"))
                    }
                    (None, None) => None,
                };
                Kind::Nbd {
                    socket: socket.into(),
                    name,
                    tls,
                }
            } else {
                let queues = match take("num-queues") {
                    Some(q) => q
                        .parse::<u16>()
                        .ok()
                        .filter(|q| (1..=64).contains(q))
                        .ok_or_else(|| format!("--export '{s}': num-queues must be 1 to 64"))?,
                    None => 1,
                };
                Kind::Vhost {
                    socket: socket.into(),
                    queues,
                }
            }
        }
        "fuse" => {
            let mountpoint = take("mountpoint")
                .ok_or_else(|| format!("--export '{s}': Parameter 'mountpoint' is missing"))?;
            let growable = match take("growable") {
                Some(v) => on_off("growable", &v)?,
                None => false,
            };
            Kind::Fuse {
                mountpoint: mountpoint.into(),
                growable,
            }
        }
        other => return Err(format!("--export '{s}': unknown export type '{other}'")),
    };
    if let Some(k) = kv.keys().next() {
        return Err(format!("--export '{s}': Invalid parameter '{k}'"));
    }
    Ok(Spec {
        id,
        image: image.into(),
        format,
        writable,
        kind,
    })
}

type Job = Box<dyn FnOnce(&UnixStream, &dyn Fn()) -> Result<(), String> + Send>;

/// Runs the daemon; returns the exit code.
pub fn run(a: DaemonArgs) -> i32 {
    match run_inner(&a) {
        Ok(code) => code,
        Err(e) => err(e),
    }
}

fn run_inner(a: &DaemonArgs) -> Result<i32, String> {
    let specs = a
        .exports
        .iter()
        .enumerate()
        .map(|(i, s)| parse_export(s, i))
        .collect::<Result<Vec<_>, _>>()?;
    let cache = match a.cache.as_deref() {
        None => CacheMode::Writeback,
        Some(m) => CacheMode::parse(m).ok_or_else(|| format!("Invalid cache mode '{m}'"))?,
    };
    let discard = match a.discard.as_str() {
        "ignore" | "off" => DiscardMode::Ignore,
        "unmap" | "on" => DiscardMode::Unmap,
        other => return Err(format!("Invalid discard mode `{other}'")),
    };
    // One open image per file, writable when any export of it is.
    let mut images: BTreeMap<PathBuf, (Option<String>, bool)> = BTreeMap::new();
    let mut keys = Vec::new();
    for s in &specs {
        let key = std::fs::canonicalize(&s.image)
            .map_err(|e| format!("Failed to open '{}': {e}", s.image.display()))?;
        let entry = images
            .entry(key.clone())
            .or_insert((s.format.clone(), false));
        if s.format.is_some() && entry.0.is_some() && entry.0 != s.format {
            return Err(format!(
                "'{}' is exported with two different formats",
                s.image.display()
            ));
        }
        if entry.0.is_none() {
            entry.0 = s.format.clone();
        }
        entry.1 |= s.writable;
        keys.push(key);
    }
    let mut opened: BTreeMap<PathBuf, Arc<Image>> = BTreeMap::new();
    for (path, (format, writable)) in &images {
        let format = format
            .as_deref()
            .map(|f| Format::parse(f).map_err(|e| e.to_string()))
            .transpose()?;
        let img = Image::open(
            path,
            &OpenOptions {
                format,
                read_only: !writable,
                cache,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| format!("Failed to open '{}': {e}", path.display()))?;
        opened.insert(path.clone(), Arc::new(img));
    }
    let mut jobs: Vec<(String, Job)> = Vec::new();
    for (s, key) in specs.into_iter().zip(keys) {
        let img = opened[&key].clone();
        let ro = !s.writable;
        let what = format!("export '{}'", s.id);
        let job: Job = match s.kind {
            Kind::Nbd { socket, name, tls } => {
                let tls = match tls {
                    None => None,
                    Some((creds, authz)) => {
                        use vdisk::storage::nbd::tls;
                        let creds = tls::lookup(&creds, tls::Endpoint::Server)
                            .map_err(|e| format!("{what}: Failed to get TLS creds: {e}"))?;
                        let authz = authz.as_deref().map(tls::lookup_authz).transpose()?;
                        Some(tls::ServerTls { creds, authz })
                    }
                };
                let listener = Listener::unix(&socket)
                    .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
                let inline = crate::export::inline_max_for(&img, cache.direct());
                let export = Arc::new(
                    Export::new(
                        img,
                        ExportConfig {
                            name,
                            description: None,
                            read_only: ro,
                            multi_conn: true,
                            allocation_depth: false,
                            discard,
                        },
                    )
                    .with_inline_max(inline)
                    .with_async_io(cache.direct()),
                );
                let server = Server::new(
                    listener,
                    export,
                    ServerConfig {
                        persistent: true,
                        max_clients: 0,
                        tls,
                        ..ServerConfig::default()
                    },
                )
                .map_err(|e| e.to_string())?;
                Box::new(move |stop, ready| {
                    ready();
                    let r = server.run(stop).map(|_| ()).map_err(|e| e.to_string());
                    server.listener().cleanup();
                    r
                })
            }
            Kind::Vhost { socket, queues } => {
                let export = VhostExport {
                    socket,
                    blk: BlkConfig {
                        read_only: ro,
                        num_queues: queues,
                        unmap: discard == DiscardMode::Unmap,
                        serial: s.id.clone(),
                        ..BlkConfig::default()
                    },
                };
                Box::new(move |stop, ready| {
                    vdisk_vhost::serve(img, &export, stop, ready).map_err(|e| e.to_string())
                })
            }
            Kind::Fuse {
                mountpoint,
                growable,
            } => {
                let export = FuseExport {
                    mountpoint,
                    read_only: ro,
                    growable,
                    threads: 4,
                };
                Box::new(move |stop, ready| {
                    vdisk_fuse::serve(img, &export, stop, ready).map_err(|e| e.to_string())
                })
            }
        };
        jobs.push((what, job));
    }
    let stop = stop_on_signals()?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file '{}': {e}", p.display()))?;
    }
    let pending = Arc::new(AtomicUsize::new(jobs.len()));
    let mut threads = Vec::new();
    for (what, job) in jobs {
        let stop = stop.try_clone().map_err(|e| e.to_string())?;
        let pending = pending.clone();
        let t = std::thread::Builder::new()
            .name("vdisk-export".into())
            .spawn(move || {
                let ready = || {
                    if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                        report_ready();
                    }
                };
                let r = job(&stop, &ready).map_err(|e| format!("{what}: {e}"));
                if r.is_err() {
                    // One export failing stops the others too.
                    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
                }
                r
            })
            .map_err(|e| format!("cannot start an export thread: {e}"))?;
        threads.push(t);
    }
    let mut code = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => code = err(e),
            Err(_) => code = err("an export thread panicked"),
        }
    }
    for (path, img) in &opened {
        if let Err(e) = img.flush().and_then(|()| img.close()) {
            code = err(format!("closing '{}': {e}", path.display()));
        }
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_options() {
        let s = parse_export(
            "type=vhost-user-blk,image=a.qcow2,addr.path=/s,num-queues=4,writable=on,format=qcow2",
            0,
        )
        .unwrap();
        assert_eq!(
            s.kind,
            Kind::Vhost {
                socket: "/s".into(),
                queues: 4
            }
        );
        assert!(s.writable);
        assert_eq!(s.id, "export0");
        let s = parse_export("type=nbd,image=a,addr.path=/n,id=x", 3).unwrap();
        assert_eq!(
            s.kind,
            Kind::Nbd {
                socket: "/n".into(),
                name: "x".into(),
                tls: None
            }
        );
        assert!(!s.writable);
        let s = parse_export("type=fuse,image=a,mountpoint=/m,growable=on", 1).unwrap();
        assert_eq!(
            s.kind,
            Kind::Fuse {
                mountpoint: "/m".into(),
                growable: true
            }
        );
        for bad in [
            "image=a,addr.path=/s",
            "type=nbd,addr.path=/s",
            "type=nbd,image=a",
            "type=nbd,image=a,addr.path=/s,bogus=1",
            "type=nbd,image=a,addr.path=/s,addr.type=inet",
            "type=vhost-user-blk,image=a,addr.path=/s,num-queues=0",
            "type=fuse,image=a",
            "type=fuse,image=a,mountpoint=/m,writable=maybe",
            "type=iscsi,image=a",
            "type=nbd,image=a,image=b,addr.path=/s",
            "type",
        ] {
            assert!(parse_export(bad, 0).is_err(), "{bad}");
        }
    }
}
