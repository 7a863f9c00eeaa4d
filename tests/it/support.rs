//! The harness: a lab upstream in-process, a temporary manager home, and a runner for the real
//! binaries (`Pm::mirror(&home).args(["sync"]).json()`).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use pm::lab::{Fault, FaultKind, LabUpstream};

/// Path of a binary of this package.
pub fn bin(name: &str) -> &'static str {
    match name {
        "pm-mirror" => env!("CARGO_BIN_EXE_pm-mirror"),
        "pm-lab" => env!("CARGO_BIN_EXE_pm-lab"),
        "pm-activate" => env!("CARGO_BIN_EXE_pm-activate"),
        "pm-agent" => env!("CARGO_BIN_EXE_pm-agent"),
        "pm-poll" => env!("CARGO_BIN_EXE_pm-poll"),
        "pm-push" => env!("CARGO_BIN_EXE_pm-push"),
        "pm-rollback" => env!("CARGO_BIN_EXE_pm-rollback"),
        "pm-query" => env!("CARGO_BIN_EXE_pm-query"),
        "pm-exporter" => env!("CARGO_BIN_EXE_pm-exporter"),
        "pm-doctor" => env!("CARGO_BIN_EXE_pm-doctor"),
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

    /// [`Home::clamav_config`] plus the lab's `files` feed as product `vendor`.
    pub fn clamav_and_feed_config(&self, lab: &Lab) -> &Home {
        self.clamav_config(
            lab,
            &format!(
                "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
                lab.url("/vendor/index.json")
            ),
        )
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

    /// Any command line (e.g. a binary wrapped in a sandbox), run like the others.
    pub fn wrap(command: Command) -> Pm {
        Pm { command }
    }

    /// `pm-activate --home HOME`.
    pub fn activate(home: &Home) -> Pm {
        let mut pm = Pm::new("pm-activate");
        pm.command.arg("--home").arg(home.path());
        pm
    }

    /// `pm-agent --state STATE_DIR`.
    pub fn agent(state_dir: &Path) -> Pm {
        let mut pm = Pm::new("pm-agent");
        pm.command
            .arg("--state")
            .arg(state_dir)
            .env_remove("PM_AGENT_STATE");
        pm
    }

    /// `pm-push --home HOME`.
    pub fn push(home: &Home) -> Pm {
        let mut pm = Pm::new("pm-push");
        pm.command.arg("--home").arg(home.path());
        pm
    }

    /// `pm-rollback --home HOME`.
    pub fn rollback(home: &Home) -> Pm {
        let mut pm = Pm::new("pm-rollback");
        pm.command.arg("--home").arg(home.path());
        pm
    }

    /// `pm-poll --home HOME`.
    pub fn poll(home: &Home) -> Pm {
        let mut pm = Pm::new("pm-poll");
        pm.command.arg("--home").arg(home.path());
        pm
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

    /// Adds a path argument.
    pub fn arg_path(self, path: &Path) -> Pm {
        self.args([path.as_os_str()])
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

/// A running server (`pm-mirror serve`, `pm-exporter`), stopped on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// What it printed on stderr after its address.
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `pm-mirror serve` on a free loopback port and waits for its address.
    pub fn start(home: &Home) -> Server {
        Server::spawn(Pm::mirror(home).args(["serve", "--listen", "127.0.0.1:0"]))
    }

    /// Starts a server that prints `... on http(s)://ADDR/` on stderr and waits for that line.
    pub fn spawn(server: Pm) -> Server {
        let mut child = server.command().stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("the server printed its address")
                .unwrap();
            if let Some(at) = line.find("on http://").or_else(|| line.find("on https://")) {
                break line[at + 3..].trim_end_matches('/').to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Server {
            child,
            base,
            stderr,
        }
    }

    /// Stops it with SIGTERM, as systemd does, and returns what it printed on stderr.
    pub fn stop(mut self) -> Vec<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "the server exited with {exit}");
        // The reader thread ends with the pipe; give it a moment to take the last lines.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::sync::Arc::strong_count(&self.stderr) > 1 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn run(program: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!("`{program}` cannot run ({err}): apt-get install clamav clamav-freshclam")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

fn clamscan(db: &Path, file: &Path) -> (i32, String) {
    run(
        "clamscan",
        &[
            "--no-summary",
            "-d",
            db.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    )
}

/// A stock freshclam pointed at a `pm-mirror serve` at `base` (publishing test.cvd version 6)
/// updates a database from test-1 to test-6; the real clamscan then finds EICAR, which test-1
/// does not detect. A second run is a cheap "up to date".
pub fn freshclam_updates_test_1_to_6(base: &str, mirror_option: &str, expected_file: &str) {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("db");
    std::fs::create_dir(&db).unwrap();
    std::fs::write(
        db.join("test.cvd"),
        std::fs::read(testdb().join("test-1.cvd")).unwrap(),
    )
    .unwrap();
    let eicar = work.path().join("eicar.com");
    std::fs::write(&eicar, EICAR).unwrap();
    let (code, text) = clamscan(&db, &eicar);
    assert_eq!(code, 0, "test-1 does not detect EICAR yet: {text}");

    let config = work.path().join("freshclam.conf");
    std::fs::write(
        &config,
        format!(
            "DatabaseDirectory {}\nDatabaseOwner root\n{mirror_option} {base}/clamav\nScriptedUpdates yes\n\
             ExcludeDatabase daily\nExcludeDatabase main\nExcludeDatabase bytecode\nExtraDatabase test\n\
             Foreground yes\n",
            db.display(),
        ),
    )
    .unwrap();
    let freshclam = [
        "--config-file",
        config.to_str().unwrap(),
        "--no-dns",
        "--stdout",
        "--no-warnings",
    ];
    let (code, text) = run("freshclam", &freshclam);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{expected_file} updated (version: 6")),
        "{text}"
    );
    let (code, text) = clamscan(&db, &eicar);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Eicar-Test-Signature FOUND"), "{text}");

    // Asking again is a cheap "up to date", never an error or a cool-down.
    let (code, text) = run("freshclam", &freshclam);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is up-to-date (version: 6"), "{text}");
}

/// Writes a secret file the way an operator should: mode 0600.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A manager at lab version 3, published and served, and an agent activated by it.
pub struct AgentSetup {
    pub lab: Lab,
    pub home: Home,
    pub server: Server,
    pub tmp: tempfile::TempDir,
    pub addr: SocketAddr,
    pub agent: Option<std::process::Child>,
}

impl AgentSetup {
    pub fn new() -> AgentSetup {
        AgentSetup::with(|_| {}, &[])
    }

    /// Like `new`, with `prepare` run on the manager home before the activation and extra
    /// `pm-activate host` flags (e.g. `--profile P`).
    pub fn with(prepare: impl FnOnce(&Home), host_flags: &[&str]) -> AgentSetup {
        let lab = Lab::start(3);
        let home = Home::new();
        home.clamav_config(&lab, "");
        Pm::mirror(&home).args(["sync"]).json();
        Pm::mirror(&home).args(["publish"]).json();
        let server = Server::start(&home);
        let tmp = tempfile::tempdir().unwrap();
        let key_file = tmp.path().join("activation.key");
        Pm::activate(&home)
            .args(["key", "new", "--out"])
            .args([&key_file])
            .json();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut setup = AgentSetup {
            lab,
            home,
            server,
            tmp,
            addr,
            agent: None,
        };
        Pm::agent(&setup.state())
            .args(["init", "--listen", &addr.to_string(), "--engine", "clamav"])
            .args(["--host-name", "127.0.0.1", "--database-dir"])
            .args([setup.db()])
            .args(["--activation-key-file"])
            .args([&key_file])
            .json();
        setup.run_agent();
        prepare(&setup.home);
        let run = Pm::activate(&setup.home)
            .args(["host", &addr.to_string(), "--key-file"])
            .args([&key_file])
            .args(["--dist-url", &setup.server.base, "--json"])
            .args(host_flags)
            .run();
        assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
        setup
    }

    pub fn run_agent(&mut self) {
        self.agent = Some(spawn_agent(&self.state(), self.addr));
    }

    /// Another agent on a free loopback port, initialised with a fresh key and activated by
    /// the same manager (`host_flags`: extra `pm-activate host` flags).
    pub fn add_agent(&self, host_name: &str, host_flags: &[&str]) -> ExtraAgent {
        self.add_agent_reached_at(host_name, host_flags, |addr| addr)
    }

    /// [`AgentSetup::add_agent`], activated at the address `reach` gives for the agent's own
    /// (e.g. a proxy in front of it), so the manager reaches it only there.
    pub fn add_agent_reached_at(
        &self,
        host_name: &str,
        host_flags: &[&str],
        reach: impl FnOnce(SocketAddr) -> SocketAddr,
    ) -> ExtraAgent {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("activation.key");
        Pm::activate(&self.home)
            .args(["key", "new", "--out"])
            .args([&key_file])
            .json();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut agent = ExtraAgent {
            dir,
            addr,
            child: None,
        };
        Pm::agent(&agent.state())
            .args(["init", "--listen", &addr.to_string(), "--engine", "clamav"])
            .args(["--host-name", host_name, "--database-dir"])
            .args([agent.db()])
            .args(["--activation-key-file"])
            .args([&key_file])
            .json();
        agent.start();
        let run = Pm::activate(&self.home)
            .args(["host", &reach(addr).to_string(), "--key-file"])
            .args([&key_file])
            .args(["--dist-url", &self.server.base, "--json"])
            .args(host_flags)
            .run();
        assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
        agent
    }

    /// Enrols the agent again, as an operator does: the agent stopped, the host deactivated
    /// (its serial revoked), a new activation key (`key_flags`: e.g. `--reusable`), `pm-agent
    /// reset --activation-key-file`, the agent started, `pm-activate host`.
    pub fn reactivate(&mut self, key_flags: &[&str]) {
        let mut agent = self.agent.take().unwrap();
        agent.kill().unwrap();
        agent.wait().unwrap();
        let deactivated = Pm::activate(&self.home)
            .args(["deactivate", "127.0.0.1"])
            .run();
        assert_eq!(deactivated.code(), 3, "{}", deactivated.stderr());
        let key_file = self.tmp.path().join("again.key");
        Pm::activate(&self.home)
            .args(["key", "new"])
            .args(key_flags)
            .args(["--out"])
            .args([&key_file])
            .json();
        Pm::agent(&self.state())
            .args(["reset", "--activation-key-file"])
            .args([&key_file])
            .json();
        self.run_agent();
        let run = Pm::activate(&self.home)
            .args(["host", &self.addr.to_string(), "--key-file"])
            .args([&key_file])
            .args(["--dist-url", &self.server.base])
            .run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn db(&self) -> PathBuf {
        self.tmp.path().join("db")
    }

    /// The lab moves to `version`; the manager syncs and publishes it.
    pub fn publish(&self, version: u32) {
        self.lab.upstream.set_version(version).unwrap();
        Pm::mirror(&self.home).args(["sync"]).json();
        Pm::mirror(&self.home).args(["publish"]).json();
    }

    pub fn agent_cmd(&self, args: &[&str]) -> serde_json::Value {
        Pm::agent(&self.state()).args(args).json()
    }

    /// A mutual-TLS GET as the manager.
    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let ca = pm::pki::ca::ManagerCa::load_or_create(self.home.path()).unwrap();
        let identity = ca.client_identity(self.home.path()).unwrap();
        let client = pm::tls::client_builder(
            Some(ca.certificate()),
            None,
            Some((&identity.0, &identity.1)),
        )
        .unwrap()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
        runtime().block_on(async {
            let response = client
                .get(format!("https://{}{path}", self.addr))
                .send()
                .await
                .unwrap();
            let code = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            (
                code,
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            )
        })
    }

    /// A mutual-TLS POST as the manager.
    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let ca = pm::pki::ca::ManagerCa::load_or_create(self.home.path()).unwrap();
        let identity = ca.client_identity(self.home.path()).unwrap();
        let client = pm::tls::client_builder(
            Some(ca.certificate()),
            None,
            Some((&identity.0, &identity.1)),
        )
        .unwrap()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
        runtime().block_on(async {
            let response = client
                .post(format!("https://{}{path}", self.addr))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .send()
                .await
                .unwrap();
            let code = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            (
                code,
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            )
        })
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `pm-agent run` and waits until it answers TLS.
pub fn spawn_agent(state: &Path, addr: SocketAddr) -> std::process::Child {
    let mut command = Pm::agent(state).args(["run"]).command();
    command.stderr(Stdio::null());
    spawn_agent_command(command, addr)
}

/// Starts a `pm-agent run` command line (e.g. under libfaketime) and waits until it answers
/// TLS at `addr`.
pub fn spawn_agent_command(mut command: Command, addr: SocketAddr) -> std::process::Child {
    let mut child = command.spawn().unwrap();
    let runtime = runtime();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while runtime
        .block_on(pm::tls::fetch_server_certificate(
            addr,
            std::time::Duration::from_millis(500),
        ))
        .is_err()
    {
        assert!(child.try_wait().unwrap().is_none(), "pm-agent run exited");
        assert!(
            std::time::Instant::now() < deadline,
            "pm-agent run does not answer"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

/// A second (third, ...) agent of an [`AgentSetup`] manager.
pub struct ExtraAgent {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub child: Option<std::process::Child>,
}

impl ExtraAgent {
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    pub fn start(&mut self) {
        self.child = Some(spawn_agent(&self.state(), self.addr));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for AgentSetup {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The DuckDB CLI (PyPI `duckdb-cli`), or `$PM_DUCKDB_CLI`.
pub fn duckdb_cli() -> String {
    std::env::var("PM_DUCKDB_CLI").unwrap_or_else(|_| "duckdb".into())
}

pub fn duckdb(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(duckdb_cli())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the duckdb CLI runs: pip install duckdb-cli==1.5.6");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.code().unwrap_or(-1),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Rows of a read-only query through the DuckDB CLI, as CSV lines without the header.
pub fn sql(home: &Home, query: &str) -> Vec<String> {
    let file = home.path().join("inventory.duckdb");
    let (code, out, err) = duckdb(&[
        "-readonly",
        "-csv",
        "-noheader",
        file.to_str().unwrap(),
        "-c",
        query,
    ]);
    assert_eq!(code, 0, "{query}: {err}");
    out.lines().map(str::to_string).collect()
}

/// An interactive DuckDB CLI session that holds `file` open read-write until its stdin (the
/// second value) is dropped. It returns once the kernel lists the session's write lock: a fixed
/// sleep was too short on a loaded machine (the command under test then found the file free),
/// and a session that met a reader (an exporter's refresh) ends at once and is started again.
pub fn hold_read_write(file: &Path) -> (Child, std::process::ChildStdin) {
    use std::io::Write;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut session = Command::new(duckdb_cli())
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = session.stdin.take().unwrap();
        writeln!(stdin, "SELECT 1;").unwrap();
        while session.try_wait().unwrap().is_none() {
            if holds_write_lock(file) {
                return (session, stdin);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the DuckDB CLI did not lock `{}`",
                file.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the DuckDB CLI never opened `{}` read-write",
            file.display()
        );
    }
}

/// Whether some process holds a POSIX write lock on `file` (`/proc/locks`: `N: POSIX ADVISORY
/// WRITE PID MAJOR:MINOR:INODE START END`, the device numbers in hex). The PID is not compared:
/// the `duckdb` on PATH may be a wrapper (pyenv) whose child opens the file.
pub fn holds_write_lock(file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = std::fs::metadata(file) else {
        return false;
    };
    let dev = metadata.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", metadata.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"POSIX")
            && fields.get(3) == Some(&"WRITE")
            && fields.get(5) == Some(&id.as_str())
    })
}

/// What a [`FaultProxy`] does to each connection it accepts (the mode at accept time applies
/// for the connection's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Forward both ways untouched.
    Pass,
    /// Forward, sleeping this long before each chunk in either direction.
    Delay(std::time::Duration),
    /// Accept and close at once (FIN before any byte).
    Drop,
    /// Accept and reset: SO_LINGER 0, then close (RST).
    Reset,
    /// Forward until this many bytes went back to the client, then close both sides.
    CutAfter(u64),
    /// Accept and never forward nor close: the client waits for its own timeout.
    Stall,
}

/// A fault-injecting TCP proxy on a loopback port in front of `target`, on its own runtime;
/// it counts the connections it accepted (each is one connection attempt of the client).
pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: std::sync::Arc<std::sync::Mutex<NetFault>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    // Dropping the runtime closes every socket, stalled ones included.
    _runtime: tokio::runtime::Runtime,
}

impl FaultProxy {
    pub fn start(target: SocketAddr) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = std::sync::Arc::new(std::sync::Mutex::new(NetFault::Pass));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (shared_mode, counter) = (mode.clone(), accepted.clone());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let fault = *shared_mode.lock().unwrap();
                tokio::spawn(proxy_connection(client, target, fault));
            }
        });
        FaultProxy {
            addr,
            mode,
            accepted,
            _runtime: runtime,
        }
    }

    /// The mode of connections accepted from now on.
    pub fn set(&self, fault: NetFault) {
        *self.mode.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn proxy_connection(client: tokio::net::TcpStream, target: SocketAddr, fault: NetFault) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (delay, mut budget) = match fault {
        NetFault::Drop => return,
        NetFault::Reset => {
            let _ = client.set_zero_linger();
            return;
        }
        NetFault::Stall => {
            // Hold the socket open until the proxy goes away.
            let _held = client;
            std::future::pending::<()>().await;
            return;
        }
        NetFault::Pass => (None, u64::MAX),
        NetFault::Delay(delay) => (Some(delay), u64::MAX),
        NetFault::CutAfter(n) => (None, n),
    };
    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let n = n.min(usize::try_from(budget).unwrap_or(usize::MAX));
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            budget -= n as u64;
            if budget == 0 {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    // A cut ends the whole connection: the client must not keep a half-open one.
    tokio::select! {
        _ = downstream => {}
        _ = async { upstream.await; std::future::pending::<()>().await } => {}
    }
}

/// `GET base+path` over plain HTTP: status and body.
pub fn http_get(base: &str, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    runtime().block_on(async {
        let response = client
            .get(format!("{base}{path}"))
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}
