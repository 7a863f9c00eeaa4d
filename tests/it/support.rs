//! The harness: a lab upstream in-process, a temporary manager home, and a runner for the real
//! binaries (`Pm::mirror(&home).args(["sync"]).json()`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pm::lab::{Fault, FaultKind, LabUpstream};

/// Path of a binary of this package.
pub fn bin(name: &str) -> &'static str {
    match name {
        "pm-mirror" => env!("CARGO_BIN_EXE_pm-mirror"),
        "pm-lab" => env!("CARGO_BIN_EXE_pm-lab"),
        other => panic!("unknown binary {other}"),
    }
}

/// ClamAV's signed test databases.
pub fn testdb() -> PathBuf {
    pm::lab::testdb_dir()
}

/// A lab upstream served on a loopback port by its own runtime.
pub struct Lab {
    pub runtime: tokio::runtime::Runtime,
    pub upstream: LabUpstream,
    pub addr: SocketAddr,
}

impl Lab {
    /// Starts the upstream at ClamAV test database `version`.
    pub fn start(version: u32) -> Lab {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let upstream = LabUpstream::new(&testdb(), version).unwrap();
        let addr = runtime.block_on(upstream.spawn("127.0.0.1:0")).unwrap();
        Lab {
            runtime,
            upstream,
            addr,
        }
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Injects a fault on paths ending with `suffix`, `times` times.
    pub fn fault(&self, kind: FaultKind, suffix: &str, times: Option<u32>) {
        self.upstream.inject(Fault {
            kind,
            path_suffix: Some(suffix.into()),
            times,
        });
    }

    /// Requests to `/clamav/` answered since the log was last cleared.
    pub fn clamav_requests(&self) -> Vec<pm::lab::LoggedRequest> {
        self.upstream
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/clamav/"))
            .collect()
    }
}

/// A manager home in a temporary directory.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `pm.toml`.
    pub fn config(&self, text: &str) -> &Home {
        std::fs::write(self.path().join("pm.toml"), text).unwrap();
        self
    }

    /// A `pm.toml` with the lab's ClamAV feed (database `test`), fast retries, plus `extra`.
    pub fn clamav_config(&self, lab: &Lab, extra: &str) -> &Home {
        self.config(&format!(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{}\"\ndatabases = [\"test\"]\n{extra}\n\
             [http]\ntimeout = \"3s\"\nretries = 2\nbackoff = \"50ms\"\n",
            lab.url("/clamav")
        ))
    }

    /// A path inside the repository, e.g. `latest/clamav/test.cvd`.
    pub fn repo(&self, path: &str) -> PathBuf {
        self.path().join("repo").join(path)
    }
}

/// A finished run of a binary.
pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// stdout as the one JSON document it must be.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|err| {
            panic!(
                "stdout is not one JSON document ({err}):\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
}

/// A command line of one of our binaries.
pub struct Pm {
    command: Command,
}

impl Pm {
    pub fn new(name: &str) -> Pm {
        let mut command = Command::new(bin(name));
        command
            .stdin(Stdio::null())
            .env_remove("RUST_LOG")
            .env_remove("PM_HOME");
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            command.env_remove(var);
        }
        Pm { command }
    }

    /// `pm-mirror --home HOME`.
    pub fn mirror(home: &Home) -> Pm {
        let mut pm = Pm::new("pm-mirror");
        pm.command.arg("--home").arg(home.path());
        pm
    }

    pub fn args<I, S>(mut self, args: I) -> Pm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Pm {
        self.command.env(key, value);
        self
    }

    pub fn run(mut self) -> Run {
        Run {
            output: self.command.output().unwrap(),
        }
    }

    /// Runs with `--json`, expects exit 0 and returns the document.
    pub fn json(self) -> serde_json::Value {
        let run = self.args(["--json"]).run();
        assert_eq!(
            run.code(),
            0,
            "stdout:\n{}\nstderr:\n{}",
            run.stdout(),
            run.stderr()
        );
        run.json()
    }

    /// The underlying command, to spawn it.
    pub fn command(self) -> Command {
        self.command
    }
}

/// The manifest of a repository generation (`latest`, `dist`, `backup/1`).
pub fn manifest(home: &Home, generation: &str) -> pm::manifest::Manifest {
    let bytes = std::fs::read(home.repo(generation).join("manifest.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Version of `component` of `product` in a manifest.
pub fn component_version(
    manifest: &pm::manifest::Manifest,
    product: &str,
    component: &str,
) -> String {
    manifest
        .product(product)
        .and_then(|p| p.components.iter().find(|c| c.name == component))
        .map(|c| c.version.clone())
        .unwrap_or_else(|| panic!("{product}/{component} not in {}", manifest.revision))
}

/// Writes `n` files of a `files` feed with contents derived from `seed`.
pub fn write_feed(dir: &Path, seed: &str, n: usize) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..n {
        let path = if i % 2 == 0 {
            dir.join(format!("file{i}.dat"))
        } else {
            dir.join(format!("sub/file{i}.dat"))
        };
        std::fs::write(path, format!("{seed}-{i}-").repeat(100 + i)).unwrap();
    }
}

/// A home that synced test.cvd version 3 from a lab that now offers version 6; returns the
/// manifest of latest at version 3, to check later that a failed sync changed nothing.
pub fn synced_at_3_with_6_upstream() -> (Lab, Home, pm::manifest::Manifest) {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    let before = manifest(&home, "latest");
    lab.upstream.set_version(6).unwrap();
    (lab, home, before)
}
