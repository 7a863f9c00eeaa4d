//! `pm-agent`: init, the activation protocol over real TLS with the test playing the manager,
//! mutual TLS afterwards, local status and reset, and the agent's footprint.

use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use pm::pki::ca::ManagerCa;
use pm::proto;
use pm::tls;
use serde_json::{Value, json};

use crate::support::{Pm, bin, free_port, runtime, write_private};

/// A well-formed activation key (`pmk1.<8 hex>.<secret>`).
fn make_key(id: &str, fill: char) -> String {
    format!("pmk1.{id}.{}", fill.to_string().repeat(43))
}

/// An agent state directory with its activation key file and listen address.
struct AgentDir {
    tmp: tempfile::TempDir,
    addr: SocketAddr,
}

impl AgentDir {
    /// `pm-agent init` with activation key `key` (none when empty).
    fn init(key: &str) -> AgentDir {
        let tmp = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = AgentDir { tmp, addr };
        let mut args = vec![
            "init".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--engine".into(),
            "clamav".into(),
            "--database-dir".into(),
            dir.tmp.path().join("db").display().to_string(),
            "--host-name".into(),
            "127.0.0.1".into(),
        ];
        if !key.is_empty() {
            write_private(&dir.key_file(), &format!("{key}\n"));
            args.push("--activation-key-file".into());
            args.push(dir.key_file().display().to_string());
        }
        let report = Pm::agent(&dir.state()).args(&args).json();
        assert_eq!(report["changed"], true);
        dir
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn key_file(&self) -> PathBuf {
        self.tmp.path().join("activation.key")
    }

    fn status(&self) -> Value {
        Pm::agent(&self.state()).args(["status"]).json()
    }

    fn start(&self) -> Running {
        Running::start(&self.state(), self.addr)
    }
}

/// A running `pm-agent run`, killed on drop.
pub(crate) struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Starts `pm-agent run` and waits until it completes TLS handshakes.
    pub(crate) fn start(state: &Path, addr: SocketAddr) -> Running {
        Running::start_with_env(state, addr, &[])
    }

    /// [`Running::start`] with more environment variables.
    pub(crate) fn start_with_env(state: &Path, addr: SocketAddr, env: &[(&str, &str)]) -> Running {
        let mut pm = Pm::agent(state).args(["run"]);
        for (key, value) in env {
            pm = pm.env(key, value);
        }
        let mut child = pm.command().stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let mut running = Running { child, stderr };
        let runtime = runtime();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("pm-agent run exited ({status}):\n{}", running.stderr());
            }
            let probe = runtime.block_on(tls::fetch_server_certificate(
                addr,
                Duration::from_millis(500),
            ));
            if probe.is_ok() {
                return running;
            }
            assert!(
                Instant::now() < deadline,
                "pm-agent run does not answer TLS on {addr}:\n{}",
                running.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it a signal by name (`TERM`, `HUP`).
    pub(crate) fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Its exit status, if it exits within `within`.
    pub(crate) fn wait_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manager: CA and client certificate in a temporary home.
pub(crate) struct Manager {
    home: tempfile::TempDir,
    ca: ManagerCa,
    identity: (PKey<Private>, X509),
}

impl Manager {
    pub(crate) fn new() -> Manager {
        let home = tempfile::tempdir().unwrap();
        let ca = ManagerCa::load_or_create(home.path()).unwrap();
        let identity = ca.client_identity(home.path()).unwrap();
        Manager { home, ca, identity }
    }

    fn ca_fingerprint(&self) -> String {
        tls::fingerprint(self.ca.certificate())
    }

    /// A mutual-TLS client: trusts the CA, presents the manager certificate.
    pub(crate) fn client(&self) -> reqwest::Client {
        fresh(tls::client_builder(
            Some(self.ca.certificate()),
            None,
            Some((&self.identity.0, &self.identity.1)),
        ))
    }
}

/// No connection reuse: every request makes a new TLS connection with the current settings.
pub(crate) fn fresh(builder: anyhow::Result<reqwest::ClientBuilder>) -> reqwest::Client {
    builder
        .unwrap()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client that pins the certificate the agent presents now (trust on first use).
async fn pinned(addr: SocketAddr) -> (reqwest::Client, String) {
    let cert = tls::fetch_server_certificate(addr, Duration::from_secs(5))
        .await
        .unwrap();
    let pin = tls::fingerprint(&cert);
    (fresh(tls::client_builder(None, Some(&pin), None)), pin)
}

/// A request; the status code and the JSON answer.
pub(crate) async fn call(
    client: &reqwest::Client,
    addr: SocketAddr,
    get: bool,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let url = format!("https://{addr}{path}");
    let request = if get {
        client.get(url)
    } else {
        client
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body.unwrap_or(json!({})))?)
    };
    let response = request.send().await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, value))
}

/// Step 1 with the pinned client: the challenge answer, checked against `key` when given.
async fn challenge(
    client: &reqwest::Client,
    addr: SocketAddr,
    manager: &Manager,
    manager_nonce: &str,
) -> (u16, Value) {
    let request = proto::ChallengeRequest {
        manager_nonce: manager_nonce.to_string(),
        manager_ca_fingerprint: manager.ca_fingerprint(),
    };
    call(
        client,
        addr,
        false,
        proto::CHALLENGE_PATH,
        Some(serde_json::to_value(request).unwrap()),
    )
    .await
    .unwrap()
}

/// Step 2: the manager's proof with `key`, a certificate for the CSR.
async fn complete(
    client: &reqwest::Client,
    addr: SocketAddr,
    manager: &Manager,
    key: &str,
    pin: &str,
    answer: &proto::ChallengeResponse,
    manager_nonce: &str,
) -> (u16, Value) {
    let cert = manager
        .ca
        .sign_agent_csr(answer.csr_pem.as_bytes(), "127.0.0.1")
        .unwrap();
    let manifest_key = PKey::generate_ed25519().unwrap();
    let request = proto::ActivateRequest {
        agent_nonce: answer.agent_nonce.clone(),
        manager_proof: proto::manager_proof(key, pin, &answer.agent_nonce, manager_nonce),
        ca_pem: String::from_utf8(manager.ca.certificate_pem().unwrap()).unwrap(),
        agent_certificate_pem: String::from_utf8(cert.to_pem().unwrap()).unwrap(),
        manifest_key_pem: String::from_utf8(manifest_key.public_key_to_pem().unwrap()).unwrap(),
        dist_url: "http://127.0.0.1:8080/".into(),
        host_name: "127.0.0.1".into(),
    };
    call(
        client,
        addr,
        false,
        proto::ACTIVATE_PATH,
        Some(serde_json::to_value(request).unwrap()),
    )
    .await
    .unwrap()
}

/// The whole activation as a manager holding `key` does it; returns the step 2 answer.
pub(crate) async fn activate(addr: SocketAddr, manager: &Manager, key: &str) -> (u16, Value) {
    let (client, pin) = pinned(addr).await;
    let nm = proto::nonce();
    let (code, answer) = challenge(&client, addr, manager, &nm).await;
    assert_eq!(code, 200, "{answer}");
    let answer: proto::ChallengeResponse = serde_json::from_value(answer).unwrap();
    assert!(
        proto::proofs_equal(
            &answer.agent_proof,
            &proto::agent_proof(key, &pin, &nm, &answer.agent_nonce)
        ),
        "the agent proves it holds the key, bound to the pinned certificate"
    );
    complete(&client, addr, manager, key, &pin, &answer, &nm).await
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_makes_a_private_state_and_prints_the_fingerprint() {
    let key = make_key("0123abcd", 'a');
    let dir = AgentDir::init(&key);
    let state = dir.state();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("agent.key")), 0o600);
    assert_eq!(mode(&state.join("activation.key")), 0o600);
    assert_eq!(
        std::fs::read_to_string(state.join("activation.key"))
            .unwrap()
            .trim(),
        key
    );
    let status = dir.status();
    assert_eq!(status["activated"], false);
    assert_eq!(status["activation_key_stored"], true);
    assert_eq!(status["engine"], "clamav");
    assert_eq!(status["listen"], dir.addr.to_string());
    let fingerprint = status["certificate_fingerprint"].as_str().unwrap();
    assert!(fingerprint.starts_with("sha256:") && fingerprint.len() == 71);

    // The same init again changes nothing and prints the same fingerprint.
    let args = [
        "init",
        "--listen",
        &dir.addr.to_string(),
        "--engine",
        "clamav",
        "--database-dir",
        &dir.tmp.path().join("db").display().to_string(),
        "--host-name",
        "127.0.0.1",
    ];
    let again = Pm::agent(&state).args(args).json();
    assert_eq!(again["changed"], false);
    assert_eq!(again["fingerprint"], fingerprint);
    // Different settings are refused with a hint.
    let mut other = args.to_vec();
    other[4] = "command";
    let run = Pm::agent(&state).args(&other).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stderr().contains("already initialised"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());

    // A file that is not an activation key is bad input, and nothing is created.
    let bad = tempfile::tempdir().unwrap();
    write_private(&bad.path().join("key"), "not a key\n");
    let run = Pm::agent(&bad.path().join("state"))
        .args(["init", "--listen", "127.0.0.1", "--engine", "clamav"])
        .args(["--database-dir", "/tmp/db", "--activation-key-file"])
        .args([bad.path().join("key")])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(!bad.path().join("state").exists());

    // Local commands on a directory without state say how to create it.
    let run = Pm::agent(&bad.path().join("state")).args(["status"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stderr().contains("hint: run `pm-agent"),
        "{}",
        run.stderr()
    );

    // Text output prints the fingerprint too.
    let plain = Pm::agent(&state).args(args).run();
    assert!(plain.stdout().contains(fingerprint), "{}", plain.stdout());
}

#[test]
fn activation_then_only_mutual_tls_with_the_manager_ca() {
    let key = make_key("0badcafe", 'k');
    let dir = AgentDir::init(&key);
    let manager = Manager::new();
    let agent = dir.start();
    let addr = dir.addr;
    let runtime = runtime();
    runtime.block_on(async {
        // Not activated: only the activation calls answer.
        let (client, _) = pinned(addr).await;
        let (code, body) = call(&client, addr, true, proto::STATUS_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 403);
        assert_eq!(body["code"], "not_activated");
        let (code, body) = call(&client, addr, false, proto::DEACTIVATE_PATH, None)
            .await
            .unwrap();
        assert_eq!((code, body["code"].as_str()), (403, Some("not_activated")));
        let (code, _) = call(&client, addr, true, proto::CHALLENGE_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 403);

        let (code, answer) = activate(addr, &manager, &key).await;
        assert_eq!(code, 200, "{answer}");
        let answer: proto::ActivateResponse = serde_json::from_value(answer).unwrap();
        let presented = tls::fetch_server_certificate(addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(tls::fingerprint(&presented), answer.certificate_fingerprint);
        assert_eq!(
            pm::pki::ca::serial_hex(&presented).unwrap(),
            answer.certificate_serial
        );

        // Mutual TLS with the manager certificate.
        let (code, status) = call(&manager.client(), addr, true, proto::STATUS_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 200, "{status}");
        let status: proto::AgentStatus = serde_json::from_value(status).unwrap();
        assert!(status.activated);
        assert_eq!(
            status.manager_ca_fingerprint.as_deref(),
            Some(manager.ca_fingerprint().as_str())
        );
        assert_eq!(status.host_name, "127.0.0.1");

        // No client certificate, or one from another CA: refused.
        let anonymous = fresh(tls::client_builder(
            Some(manager.ca.certificate()),
            None,
            None,
        ));
        assert!(
            call(&anonymous, addr, true, proto::STATUS_PATH, None)
                .await
                .is_err()
        );
        let intruder = Manager::new();
        let foreign = fresh(tls::client_builder(
            Some(manager.ca.certificate()),
            None,
            Some((&intruder.identity.0, &intruder.identity.1)),
        ));
        assert!(
            call(&foreign, addr, true, proto::STATUS_PATH, None)
                .await
                .is_err()
        );
        // The old pin no longer matches: the agent presents its issued certificate.
        assert!(
            call(&client, addr, true, proto::STATUS_PATH, None)
                .await
                .is_err()
        );

        // A second activation is refused, naming the manager and what to do.
        let (code, body) = challenge(&manager.client(), addr, &manager, &proto::nonce()).await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["code"], "already_activated");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(&manager.ca_fingerprint()), "{message}");
        assert!(message.contains("run `pm-agent reset`"), "{message}");
    });
    assert!(!agent.stderr().contains(&key), "the key is never logged");
    assert!(agent.stderr().contains("activated"), "{}", agent.stderr());

    // Local state: activated, key forgotten.
    let state = dir.state();
    assert!(!state.join("activation.key").exists());
    let status = dir.status();
    assert_eq!(status["activated"], true);
    assert_eq!(status["manager_ca_fingerprint"], manager.ca_fingerprint());
    assert_eq!(status["dist_url"], "http://127.0.0.1:8080/");
    assert_eq!(status["activation_key_stored"], false);
    assert!(state.join("manager/manifest-signing.pub.pem").is_file());

    // A restarted agent is still activated and still requires the manager certificate.
    drop(agent);
    let agent = dir.start();
    runtime.block_on(async {
        let (code, _) = call(&manager.client(), addr, true, proto::STATUS_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 200);
        let (client, _) = pinned(addr).await;
        assert!(
            call(&client, addr, true, proto::STATUS_PATH, None)
                .await
                .is_err()
        );
    });

    // Reset (with a new key) makes it activatable again after a restart, by another manager.
    drop(agent);
    let new_key = make_key("fee1dead", 'n');
    write_private(&dir.key_file(), &new_key);
    let report = Pm::agent(&state)
        .args(["reset", "--activation-key-file"])
        .args([dir.key_file()])
        .json();
    assert_eq!(report["changed"], true);
    assert_eq!(report["was_activated"], true);
    let status = dir.status();
    assert_eq!(status["activated"], false);
    assert_eq!(status["activation_key_stored"], true);
    assert!(!state.join("manager").exists());
    let agent = dir.start();
    let second = Manager::new();
    runtime.block_on(async {
        let (code, body) = activate(addr, &second, &new_key).await;
        assert_eq!(code, 200, "{body}");
        // The first manager is no longer trusted; the second is.
        assert!(
            call(&manager.client(), addr, true, proto::STATUS_PATH, None)
                .await
                .is_err()
        );
        let (code, _) = call(&second.client(), addr, true, proto::STATUS_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 200);

        // Deactivation over mutual TLS: the agent forgets the manager at once.
        let (code, body) = call(&second.client(), addr, false, proto::DEACTIVATE_PATH, None)
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["activated"], false);
        let (client, _) = pinned(addr).await;
        let (code, body) = call(&client, addr, true, proto::STATUS_PATH, None)
            .await
            .unwrap();
        assert_eq!((code, body["code"].as_str()), (403, Some("not_activated")));
        // No key is left, so it cannot be activated again without a reset.
        let (code, body) = challenge(&client, addr, &second, &proto::nonce()).await;
        assert_eq!(
            (code, body["code"].as_str()),
            (409, Some("no_activation_key"))
        );
    });
    drop(agent);
    assert_eq!(dir.status()["activated"], false);
    drop(second.home);
}

#[test]
fn a_wrong_key_and_a_replayed_agent_nonce_are_refused() {
    let key = make_key("12345678", 'r');
    let dir = AgentDir::init(&key);
    let manager = Manager::new();
    let _agent = dir.start();
    let addr = dir.addr;
    runtime().block_on(async {
        let (client, pin) = pinned(addr).await;
        let nm = proto::nonce();
        let (code, answer) = challenge(&client, addr, &manager, &nm).await;
        assert_eq!(code, 200);
        let answer: proto::ChallengeResponse = serde_json::from_value(answer).unwrap();
        // A manager with another key sees that the agent's proof does not match...
        let wrong = make_key("12345678", 'w');
        assert!(!proto::proofs_equal(
            &answer.agent_proof,
            &proto::agent_proof(&wrong, &pin, &nm, &answer.agent_nonce)
        ));
        // ...and the agent refuses its proof.
        let (code, body) = complete(&client, addr, &manager, &wrong, &pin, &answer, &nm).await;
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["code"], "wrong_key");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("does not hold this agent's activation key")
        );
        // The agent nonce was single-use: replaying it, even with the right proof, is stale.
        let (code, body) = complete(&client, addr, &manager, &key, &pin, &answer, &nm).await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(body["code"], "stale_challenge");
        // So is a nonce the agent never issued.
        let mut made_up = answer.clone();
        made_up.agent_nonce = proto::nonce();
        let (code, body) = complete(&client, addr, &manager, &key, &pin, &made_up, &nm).await;
        assert_eq!(
            (code, body["code"].as_str()),
            (400, Some("stale_challenge"))
        );

        // The right key still activates it, and a completed nonce cannot be replayed.
        let nm = proto::nonce();
        let (_, answer) = challenge(&client, addr, &manager, &nm).await;
        let answer: proto::ChallengeResponse = serde_json::from_value(answer).unwrap();
        let (code, body) = complete(&client, addr, &manager, &key, &pin, &answer, &nm).await;
        assert_eq!(code, 200, "{body}");
        let (code, body) =
            complete(&manager.client(), addr, &manager, &key, &pin, &answer, &nm).await;
        assert_eq!(
            (code, body["code"].as_str()),
            (409, Some("already_activated"))
        );
    });
}

#[test]
fn an_agent_without_an_activation_key_says_so_and_takes_one_up_on_sighup() {
    let dir = AgentDir::init("");
    let agent = dir.start();
    let manager = Manager::new();
    let runtime = runtime();
    let old_pin = runtime.block_on(async {
        let (client, pin) = pinned(dir.addr).await;
        let (code, body) = challenge(&client, dir.addr, &manager, &proto::nonce()).await;
        assert_eq!(code, 409, "{body}");
        assert_eq!(body["code"], "no_activation_key");
        assert!(body["message"].as_str().unwrap().contains("pm-agent reset"));
        pin
    });

    // `reset` with a key, then SIGHUP: the running agent presents its new identity and
    // activates without a restart.
    let key = make_key("5eed5eed", 'h');
    write_private(&dir.key_file(), &key);
    let report = Pm::agent(&dir.state())
        .args(["reset", "--activation-key-file"])
        .args([dir.key_file()])
        .json();
    assert_ne!(report["fingerprint"], old_pin);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pinned(dir.addr).await.1 != report["fingerprint"] {
            assert!(Instant::now() < deadline, "no reload: {}", agent.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (code, body) = activate(dir.addr, &manager, &key).await;
        assert_eq!(code, 200, "{body}");
    });
    assert!(agent.stderr().contains("SIGHUP"), "{}", agent.stderr());
}

#[test]
fn the_agent_is_small_does_not_link_duckdb_and_stops_on_sigterm() {
    let ldd = std::process::Command::new("ldd")
        .arg(bin("pm-agent"))
        .output()
        .expect("ldd runs");
    let libraries = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success(), "{libraries}");
    assert!(
        !libraries.to_lowercase().contains("duckdb"),
        "pm-agent links DuckDB:\n{libraries}"
    );

    let dir = AgentDir::init(&make_key("abcdef01", 's'));
    let mut agent = dir.start();
    std::thread::sleep(Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    eprintln!("pm-agent run idle VmRSS: {rss_kb} kB");
    assert!(
        rss_kb < 20 * 1024,
        "idle RSS {rss_kb} kB is not under 20 MB"
    );

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < deadline, "pm-agent ignores SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0), "{}", agent.stderr());
}

#[test]
fn an_agents_own_certificate_cannot_drive_another_agent() {
    let setup = crate::support::AgentSetup::new();
    let other = setup.add_agent("other.example", &[]);
    // The other agent's CA-issued identity, as a compromised host would hold it.
    let cert =
        pm::pki::ca::load_certificate(&other.state().join(pm::agent::ISSUED_CERT_FILE)).unwrap();
    let key = PKey::private_key_from_pem(
        &std::fs::read(other.state().join(pm::agent::KEY_FILE)).unwrap(),
    )
    .unwrap();
    let eku = cert.extended_key_usage().unwrap();
    assert!(!eku.contains(openssl::x509::X509ExtendedKeyUsage::SSL_CLIENT));
    let ca = ManagerCa::load_or_create(setup.home.path()).unwrap();
    let client = tls::client_builder(Some(ca.certificate()), None, Some((&key, &cert)))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let outcome = runtime().block_on(async {
        client
            .get(format!("https://{}/v1/status", setup.addr))
            .send()
            .await
            .map(|response| response.status().as_u16())
    });
    // The handshake refuses a certificate without clientAuth; were it accepted (a certificate
    // issued before agents lost clientAuth), the agent answers 403.
    match outcome {
        Err(_) | Ok(403) => {}
        Ok(code) => panic!("an agent's certificate got {code} from another agent"),
    }
    // The manager's client certificate still works.
    assert_eq!(setup.get("/v1/status").0, 200);
}

#[test]
fn the_manager_refuses_an_agent_presenting_a_revoked_certificate() {
    let mut setup = crate::support::AgentSetup::new();
    assert_eq!(Pm::poll(&setup.home).run().code(), 0);
    // What a thief copies off the host: its key and CA-issued certificate.
    let stolen = tempfile::tempdir().unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(setup.state())
        .arg(stolen.path())
        .status()
        .unwrap();
    assert!(copied.success());
    let stolen_state = stolen.path().join("state");

    // The operator deactivates the host (its serial is revoked) and enrols it again.
    setup.reactivate(&[]);
    assert_eq!(Pm::poll(&setup.home).run().code(), 0);

    // The thief answers at the host's address with the old identity.
    let mut agent = setup.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    setup.agent = Some(crate::support::spawn_agent(&stolen_state, setup.addr));
    for run in [
        Pm::poll(&setup.home).args(["--json"]).run(),
        Pm::push(&setup.home)
            .args(["update", "--host", "127.0.0.1", "--json"])
            .run(),
    ] {
        assert_ne!(run.code(), 0, "{}", run.stdout());
        let said = format!("{}{}", run.stdout(), run.stderr());
        assert!(said.contains("revoked"), "{said}");
    }
}
