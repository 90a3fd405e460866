//! A single-node Garage S3 server on loopback for the S3 tests: a temp dir with its
//! config, metadata and data, one bucket and one key allowed to read and write it.
//! The server is killed when the fixture is dropped. `garage` must be installed
//! (scripts/test installs it): a missing binary fails the test loudly.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Garage.
pub struct Garage {
    child: Option<Child>,
    cfg: PathBuf,
    /// The S3 API port on 127.0.0.1.
    pub port: u16,
    /// The bucket made for the test.
    pub bucket: String,
    /// The access key id allowed on it.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The garage binary: on PATH, else cargo's bin folder.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    }) {
        return p;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let p = home.join(".cargo/bin/garage");
    assert!(
        p.is_file(),
        "garage is not installed (scripts/test installs it: cargo install garage --locked \
         --no-default-features --features lmdb,bundled-libs)"
    );
    p
}

impl Garage {
    /// Starts a server under `dir/garage-PORT` with bucket `golden`.
    pub fn start(dir: &Path) -> Garage {
        let port = free_port();
        let rpc = free_port();
        let gd = dir.join(format!("garage-{port}"));
        std::fs::create_dir_all(&gd).unwrap();
        let cfg = gd.join("garage.toml");
        let secret: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
        std::fs::write(
            &cfg,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\napi_bind_addr = \"127.0.0.1:{port}\"\ns3_region = \"garage\"\n",
                d = gd.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(gd.join("server.log")).unwrap();
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&cfg)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let mut g = Garage {
            child: Some(child),
            cfg,
            port,
            bucket: "golden".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        // The node id, once the server answers.
        let t0 = Instant::now();
        let id = loop {
            let o = g.cli_run(&["status"]);
            if let Some(id) = o.as_ref().ok().and_then(|out| {
                out.lines()
                    .skip_while(|l| !l.starts_with("ID"))
                    .nth(1)
                    .and_then(|l| l.split_whitespace().next())
                    .map(str::to_string)
            }) {
                break id;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage did not come up: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", "golden"]);
        let k = g.cli(&["key", "create", "vdisk-test"]);
        let field = |name: &str| {
            k.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no '{name}' in garage's key create output: {k}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "golden",
            "--key",
            "vdisk-test",
        ]);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage's S3 API is not listening"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        g
    }

    fn cli_run(&self, args: &[&str]) -> Result<String, String> {
        let o = Command::new("timeout")
            .arg("30")
            .arg(garage_bin())
            .arg("-c")
            .arg(&self.cfg)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run garage");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() {
            Ok(out)
        } else {
            Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
        }
    }

    /// Runs `garage -c CFG args...`; panics when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_run(args)
            .unwrap_or_else(|e| panic!("garage {args:?} failed: {e}"))
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points an S3 client at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), "garage".into()),
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            // Nothing from the developer's own AWS setup.
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
        ]
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u8
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}
