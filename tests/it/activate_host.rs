//! `pm-activate host | deactivate | list`: the manager side of activation, the real
//! `pm-activate` binary over real TLS against an in-test agent built from `pm::tls` and
//! `pm::proto` (it follows the protocol of `pm::proto` like pm-agent does: pinned self-signed
//! certificate, HMAC proofs bound to it, then a CA-signed certificate and required client
//! certificates).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use pm::pki::ca::{AgentIdentity, make_csr};
use pm::proto;
use pm::tls::{ClientAuth, TlsConnectInfo, TlsHandle, TlsListener, TlsServerConfig};

use crate::support::{Home, Pm};

/// What the in-test agent knows.
struct AgentState {
    name: String,
    key: Option<String>,
    identity: (PKey<Private>, X509),
    self_signed: X509,
    /// (agent nonce, manager nonce) of the pending challenge.
    pending: Option<(String, String)>,
    /// Fingerprint of the manager CA once activated.
    manager_ca: Option<String>,
    /// Answer deactivation with an error (to test a deactivation the agent did not take).
    refuse_deactivate: bool,
    handle: Option<TlsHandle>,
}

#[derive(Clone)]
struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
    addr: SocketAddr,
    _runtime: Arc<tokio::runtime::Runtime>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        serde_json::to_string(&proto::ErrorResponse {
            code: code.into(),
            message: message.into(),
        })
        .unwrap(),
    )
        .into_response()
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    (StatusCode::OK, serde_json::to_string(value).unwrap()).into_response()
}

async fn challenge(
    State(state): State<Arc<Mutex<AgentState>>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<proto::ChallengeRequest>(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "not a challenge");
    };
    let mut state = state.lock().unwrap();
    if let Some(ca) = &state.manager_ca {
        return error(
            StatusCode::CONFLICT,
            "already_activated",
            &format!("already activated by the manager with CA {ca}"),
        );
    }
    let Some(key) = state.key.clone() else {
        return error(
            StatusCode::CONFLICT,
            "no_activation_key",
            "this agent holds no activation key",
        );
    };
    let agent_nonce = proto::nonce();
    let proof = proto::agent_proof(
        &key,
        &info.local_fingerprint,
        &request.manager_nonce,
        &agent_nonce,
    );
    state.pending = Some((agent_nonce.clone(), request.manager_nonce));
    let csr = make_csr(&state.identity.0, &state.name).unwrap();
    json(&proto::ChallengeResponse {
        agent_nonce,
        agent_proof: proof,
        csr_pem: String::from_utf8(csr).unwrap(),
        host_name: state.name.clone(),
        agent_version: "0.0.0-fake".into(),
        engine: "clamav".into(),
    })
}

async fn complete(
    State(state): State<Arc<Mutex<AgentState>>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<proto::ActivateRequest>(&body) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "not an activation");
    };
    let mut state = state.lock().unwrap();
    let (Some(key), Some((agent_nonce, manager_nonce))) = (state.key.clone(), state.pending.take())
    else {
        return error(StatusCode::CONFLICT, "no_challenge", "no pending challenge");
    };
    let expected =
        proto::manager_proof(&key, &info.local_fingerprint, &agent_nonce, &manager_nonce);
    if request.agent_nonce != agent_nonce || !proto::proofs_equal(&expected, &request.manager_proof)
    {
        return error(
            StatusCode::FORBIDDEN,
            "wrong_key",
            "the manager proof does not match",
        );
    }
    let ca = X509::from_pem(request.ca_pem.as_bytes()).unwrap();
    let cert = X509::from_pem(request.agent_certificate_pem.as_bytes()).unwrap();
    assert!(pm::pki::ca::verify_issued_by(&cert, &ca));
    assert!(request.dist_url.starts_with("http"));
    assert!(request.manifest_key_pem.contains("PUBLIC KEY"));
    let config = TlsServerConfig {
        key: state.identity.0.clone(),
        cert: cert.clone(),
        client_auth: ClientAuth::Required { ca: ca.clone() },
    };
    state.handle.as_ref().unwrap().reload(&config).unwrap();
    state.key = None;
    state.manager_ca = Some(pm::tls::fingerprint(&ca));
    json(&proto::ActivateResponse {
        certificate_serial: pm::pki::ca::serial_hex(&cert).unwrap(),
        certificate_fingerprint: pm::tls::fingerprint(&cert),
    })
}

async fn status(State(state): State<Arc<Mutex<AgentState>>>) -> Response {
    let state = state.lock().unwrap();
    json(&proto::AgentStatus {
        host_name: state.name.clone(),
        agent_version: "0.0.0-fake".into(),
        agent_sha256: None,
        upgrade_error: None,
        activated: state.manager_ca.is_some(),
        manager_ca_fingerprint: state.manager_ca.clone(),
        engine: "clamav".into(),
        group: None,
        profile: None,
        license_expires_at: None,
        hold: None,
        reports_hold: false,
        manifest_key: None,
    })
}

async fn deactivate(
    State(state): State<Arc<Mutex<AgentState>>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    let mut state = state.lock().unwrap();
    if state.refuse_deactivate {
        return error(StatusCode::SERVICE_UNAVAILABLE, "busy", "try again later");
    }
    assert!(info.peer.is_some_and(|p| p.verified));
    reset(&mut state);
    json(&serde_json::json!({"deactivated": true}))
}

/// The setup steps: accepted from the manager (mutual TLS) and otherwise ignored (so they
/// never change anything; the real agent's are tested in `activate_setup`).
async fn setup_step(ConnectInfo(info): ConnectInfo<TlsConnectInfo>) -> Response {
    assert!(info.peer.is_some_and(|p| p.verified));
    json(&proto::SetupResponse::from(false))
}

fn reset(state: &mut AgentState) {
    state.manager_ca = None;
    state.pending = None;
    let config = TlsServerConfig {
        key: state.identity.0.clone(),
        cert: state.self_signed.clone(),
        client_auth: ClientAuth::None,
    };
    state.handle.as_ref().unwrap().reload(&config).unwrap();
}

impl FakeAgent {
    /// An agent called `name` holding `key`, on a free loopback port.
    fn start(name: &str, key: Option<&str>) -> FakeAgent {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (pkey, cert) = AgentIdentity::generate(name).unwrap();
        let state = Arc::new(Mutex::new(AgentState {
            name: name.into(),
            key: key.map(str::to_string),
            identity: (pkey.clone(), cert.clone()),
            self_signed: cert.clone(),
            pending: None,
            manager_ca: None,
            refuse_deactivate: false,
            handle: None,
        }));
        let app = Router::new()
            .route(proto::CHALLENGE_PATH, post(challenge))
            .route(proto::ACTIVATE_PATH, post(complete))
            .route(proto::STATUS_PATH, get(status))
            .route(proto::DEACTIVATE_PATH, post(deactivate))
            .route(proto::PROFILE_PATH, post(setup_step))
            .route(proto::GROUP_PATH, post(setup_step))
            .route(proto::LICENSE_PATH, post(setup_step))
            .with_state(state.clone());
        let config = TlsServerConfig {
            key: pkey,
            cert,
            client_auth: ClientAuth::None,
        };
        let listener = runtime
            .block_on(TlsListener::bind("127.0.0.1:0".parse().unwrap(), &config))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        state.lock().unwrap().handle = Some(listener.handle());
        runtime.spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<TlsConnectInfo>(),
            )
            .await
            .unwrap();
        });
        FakeAgent {
            state,
            addr,
            _runtime: Arc::new(runtime),
        }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn activated(&self) -> bool {
        self.state.lock().unwrap().manager_ca.is_some()
    }
}

/// A new key of `home` written to a 0600 file; returns the file and the key text.
fn new_key(home: &Home, file: &str, extra: &[&str]) -> (PathBuf, String) {
    let path = home.path().join(file);
    Pm::activate(home)
        .args(["key", "new", "--out"])
        .args([&path])
        .args(extra)
        .json();
    let text = std::fs::read_to_string(&path).unwrap().trim().to_string();
    (path, text)
}

fn activate(
    home: &Home,
    agent: &FakeAgent,
    key_file: &PathBuf,
    extra: &[&str],
) -> crate::support::Run {
    Pm::activate(home)
        .args(["host", &agent.address(), "--key-file"])
        .args([key_file])
        .args(["--dist-url", "http://127.0.0.1:8080", "--json"])
        .args(extra)
        .run()
}

fn hosts(home: &Home) -> Vec<serde_json::Value> {
    Pm::activate(home).args(["list"]).json()["hosts"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_host_is_activated_listed_and_a_second_run_only_reapplies_its_setup() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &[]);
    let agent = FakeAgent::start("web-1", Some(&key));

    // Without a dist URL nothing happens and the key is not spent.
    let run = Pm::activate(&home)
        .args(["host", &agent.address(), "--key-file"])
        .args([&file])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("[serve] url"), "{}", run.stderr());
    assert!(!agent.activated());
    // A dry run checks key, agent and dist URL (here from pm.toml) and changes nothing; its
    // `changed` says the agent would be activated (Ansible's check mode).
    home.config("[serve]\nurl = \"http://127.0.0.1:8080\"\n");
    let dry = Pm::activate(&home)
        .args(["host", &agent.address(), "--dry-run", "--key-file"])
        .args([&file])
        .json();
    assert_eq!(dry["changed"], true);
    assert_eq!(dry["action"], "dry-run");
    assert!(!agent.activated());

    let run = activate(
        &home,
        &agent,
        &file,
        &["--group", "web", "--label", "site=paris"],
    );
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(!run.stderr().contains(&key), "the key is never logged");
    let report = run.json();
    assert_eq!(report["changed"], true);
    assert_eq!(report["host"], "web-1");
    assert_eq!(report["address"], agent.address());
    let serial = report["certificate_serial"].as_str().unwrap().to_string();
    assert!(!serial.is_empty());
    let steps: Vec<_> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    for step in [
        "activate", "verify", "profile", "group", "license", "labels",
    ] {
        assert!(steps.contains(&(step.to_string(), true)), "{steps:?}");
    }
    assert!(agent.activated());
    // The issued certificate names the host and the IP the manager reaches it at, so a client
    // that only trusts the CA (no pin) can call it by address.
    let ca = pm::pki::ca::ManagerCa::load_or_create(home.path()).unwrap();
    let identity = ca.client_identity(home.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let presented = runtime
        .block_on(pm::tls::fetch_server_certificate(
            agent.addr,
            std::time::Duration::from_secs(5),
        ))
        .unwrap();
    let names: Vec<String> = presented
        .subject_alt_names()
        .unwrap()
        .iter()
        .map(|n| {
            n.dnsname()
                .map(str::to_string)
                .or_else(|| n.ipaddress().map(|ip| format!("{ip:?}")))
                .unwrap()
        })
        .collect();
    assert!(names.contains(&"web-1".to_string()), "{names:?}");
    assert!(names.contains(&"[127, 0, 0, 1]".to_string()), "{names:?}");
    let client = pm::tls::client(
        Some(ca.certificate()),
        None,
        Some((&identity.0, &identity.1)),
    )
    .unwrap();
    let status = runtime
        .block_on(
            client
                .get(format!("https://{}{}", agent.address(), proto::STATUS_PATH))
                .send(),
        )
        .unwrap();
    assert!(status.status().is_success());

    let listed = hosts(&home);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["host"], "web-1");
    assert_eq!(listed[0]["group"], "web");
    assert_eq!(listed[0]["profile"], "default");
    assert_eq!(listed[0]["state"], "active");
    assert_eq!(listed[0]["agent_version"], "0.0.0-fake");
    assert_eq!(listed[0]["labels"]["site"], "paris");
    assert!(listed[0]["activated_at"].is_string());
    let table = Pm::activate(&home).args(["list"]).run();
    assert!(table.stdout().contains("web-1"), "{}", table.stdout());

    // The same command again: the agent is ours, so only the steps are re-applied (over
    // mutual TLS, the spent key is not needed), and nothing changes.
    let again = activate(
        &home,
        &agent,
        &file,
        &["--group", "web", "--label", "site=paris"],
    );
    assert_eq!(again.code(), 0, "{}", again.stderr());
    let again = again.json();
    assert_eq!(again["action"], "reapplied");
    assert_eq!(again["changed"], false);
    assert_eq!(again["certificate_serial"], serial.as_str());

    // A new group, without a key at all.
    let moved = Pm::activate(&home)
        .args(["host", &agent.address(), "--group", "db", "--json"])
        .run();
    assert_eq!(moved.code(), 0, "{}", moved.stderr());
    assert_eq!(moved.json()["changed"], true);
    assert_eq!(hosts(&home)[0]["group"], "db");

    let keys = Pm::activate(&home).args(["key", "list"]).json();
    assert_eq!(keys["keys"][0]["state"], "used");
}

#[test]
fn a_wrong_or_unknown_key_is_refused_with_what_to_do() {
    let home = Home::new();
    let (_, agent_key) = new_key(&home, "agent.key", &[]);
    let (other_file, _) = new_key(&home, "other.key", &[]);
    let agent = FakeAgent::start("web-2", Some(&agent_key));

    // (A key file others can read is refused: an_activation_key_file_others_can_read_...)
    let run = activate(&home, &agent, &other_file, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("wrong activation key") && run.stderr().contains("different key"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint:"), "{}", run.stderr());
    assert!(!agent.activated());
    // The refused attempt did not spend the key it was given.
    let keys = Pm::activate(&home).args(["key", "list"]).json();
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["uses"] == 0)
    );

    // A key of another manager is not known here.
    let elsewhere = Home::new();
    let (foreign, _) = new_key(&elsewhere, "foreign.key", &[]);
    let run = activate(&home, &agent, &foreign, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("is not known to this manager"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("pm-activate key new"),
        "{}",
        run.stderr()
    );
    // --json failures are one JSON document too.
    let failure = run.json();
    assert_eq!(failure["failed"], true);
    assert_eq!(failure["exit_code"], 1);
}

#[test]
fn a_replayed_single_use_key_is_refused() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &[]);
    let first = FakeAgent::start("web-3", Some(&key));
    let second = FakeAgent::start("web-4", Some(&key));
    let run = activate(&home, &first, &file, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let run = activate(&home, &second, &file, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("was already used"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("pm-activate key new"),
        "{}",
        run.stderr()
    );
    assert!(!second.activated());
    assert_eq!(hosts(&home).len(), 1);
}

#[test]
fn an_expired_key_is_refused() {
    let home = Home::new();
    let past = chrono::Utc::now() - chrono::Duration::hours(3);
    let key = pm::activate::generate_key(Some(1), std::time::Duration::from_secs(3600), None, past)
        .unwrap();
    let inventory =
        pm::inventory::Inventory::open(home.path(), std::time::Duration::from_secs(5)).unwrap();
    inventory.insert_activation_key(&key.record).unwrap();
    drop(inventory);
    let file = home.path().join("expired.key");
    crate::support::write_private(&file, &key.text);
    let agent = FakeAgent::start("web-5", Some(&key.text));
    let run = activate(&home, &agent, &file, &[]);
    assert_eq!(run.code(), 1);
    assert!(run.stderr().contains("expired at"), "{}", run.stderr());
    assert!(
        run.stderr().contains("pm-activate key new"),
        "{}",
        run.stderr()
    );
    assert!(!agent.activated());
}

#[test]
fn an_agent_activated_by_another_manager_needs_a_reset_first() {
    let first = Home::new();
    let second = Home::new();
    let (file, key) = new_key(&first, "agent.key", &[]);
    let agent = FakeAgent::start("web-6", Some(&key));
    assert_eq!(activate(&first, &agent, &file, &[]).code(), 0);

    let (other_file, other_key) = new_key(&second, "agent.key", &[]);
    agent.state.lock().unwrap().key = Some(other_key);
    let run = activate(&second, &agent, &other_file, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr()
            .contains("already activated by another manager"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("pm-agent reset"), "{}", run.stderr());
    // The refusal came before the key was spent.
    let keys = Pm::activate(&second).args(["key", "list"]).json();
    assert_eq!(keys["keys"][0]["uses"], 0);

    // After a reset on the host, the second manager takes it over.
    reset(&mut agent.state.lock().unwrap());
    let run = activate(&second, &agent, &other_file, &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn an_unreachable_agent_names_the_address_and_the_network_error() {
    let home = Home::new();
    let (file, _) = new_key(&home, "agent.key", &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let run = Pm::activate(&home)
        .args(["host", &address, "--key-file"])
        .args([&file])
        .args(["--dist-url", "http://127.0.0.1:8080"])
        .run();
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr()
            .contains(&format!("agent `{address}` is unreachable")),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("refused"), "{}", run.stderr());
    assert!(run.stderr().contains("pm-agent run"), "{}", run.stderr());
}

#[test]
fn deactivation_makes_the_agent_forget_and_a_revoked_serial_is_refused() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &["--reusable"]);
    let agent = FakeAgent::start("web-7", Some(&key));
    let report = activate(&home, &agent, &file, &[]).json();
    let serial = report["certificate_serial"].as_str().unwrap().to_string();

    let run = Pm::activate(&home)
        .args(["deactivate", "web-7", "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let done = run.json();
    assert_eq!(done["agent_forgot"], true);
    assert_eq!(done["certificate_serial"], serial.as_str());
    assert!(!agent.activated(), "the agent forgot the manager");
    let listed = hosts(&home);
    assert_eq!(listed[0]["state"], "deactivated", "history is kept");
    let inventory =
        pm::inventory::Inventory::open_read_only(home.path(), std::time::Duration::from_secs(5))
            .unwrap()
            .unwrap();
    assert_eq!(
        inventory
            .query_strings("SELECT serial FROM revoked_certificates")
            .unwrap(),
        vec![serial.clone()]
    );
    drop(inventory);
    // Deactivating again changes nothing.
    let again = Pm::activate(&home).args(["deactivate", "web-7"]).json();
    assert_eq!(again["changed"], false);

    // Activated again (reusable key), then deactivated while the agent refuses: the host is
    // still marked and its serial revoked, with exit 3; the agent keeps presenting the revoked
    // certificate, which is refused from then on.
    agent.state.lock().unwrap().key = Some(key.clone());
    let report = activate(&home, &agent, &file, &[]);
    assert_eq!(report.code(), 0, "{}", report.stderr());
    let second_serial = report.json()["certificate_serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second_serial, serial);
    assert_eq!(hosts(&home)[0]["state"], "active");
    agent.state.lock().unwrap().refuse_deactivate = true;
    let run = Pm::activate(&home).args(["deactivate", "web-7"]).run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert!(run.stderr().contains("pm-agent reset"), "{}", run.stderr());
    assert_eq!(hosts(&home)[0]["state"], "deactivated");
    assert!(agent.activated());

    let run = activate(&home, &agent, &file, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains(&format!(
            "certificate serial {second_serial} of web-7 was revoked"
        )),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("pm-agent reset"), "{}", run.stderr());
}

/// A real `pm-agent` (init + run) on a free loopback port, killed on drop.
struct RealAgent {
    tmp: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<std::process::Child>,
}

impl RealAgent {
    fn start(key_file: &std::path::Path) -> RealAgent {
        let tmp = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut agent = RealAgent {
            tmp,
            addr,
            child: None,
        };
        Pm::agent(&agent.state())
            .args(["init", "--listen", &addr.to_string(), "--engine", "clamav"])
            .args(["--database-dir"])
            .args([agent.tmp.path().join("db")])
            .args(["--activation-key-file"])
            .args([key_file])
            .json();
        agent.run();
        agent
    }

    fn run(&mut self) {
        self.child = Some(crate::support::spawn_agent(&self.state(), self.addr));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn activated(&self) -> bool {
        Pm::agent(&self.state()).args(["status"]).json()["activated"] == true
    }
}

impl Drop for RealAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_real_pm_agent_is_activated_refuses_another_manager_and_forgets_on_deactivation() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &[]);
    let mut agent = RealAgent::start(&file);
    let address = agent.addr.to_string();
    Pm::activate(&home)
        .args(["profile", "new", "strict", "--set", "detect_pua=yes"])
        .json();
    let run = Pm::activate(&home)
        .args(["host", &address, "--name", "real-1", "--key-file"])
        .args([&file])
        .args([
            "--dist-url",
            "http://127.0.0.1:8080",
            "--profile",
            "strict",
            "--json",
        ])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(!run.stderr().contains(&key));
    let report = run.json();
    assert_eq!(report["host"], "real-1");
    assert!(
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ok"] == true)
    );
    assert!(agent.activated());
    let listed = hosts(&home);
    assert_eq!(listed[0]["host"], "real-1");
    assert_eq!(listed[0]["profile"], "strict");
    assert_eq!(listed[0]["state"], "active");
    assert!(
        listed[0]["agent_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );

    // Another manager is refused until `pm-agent reset` on the host.
    let other = Home::new();
    let (other_file, _) = new_key(&other, "agent.key", &[]);
    let run = Pm::activate(&other)
        .args(["host", &address, "--key-file"])
        .args([&other_file])
        .args(["--dist-url", "http://127.0.0.1:8080"])
        .run();
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr()
            .contains("already activated by another manager"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("pm-agent reset"), "{}", run.stderr());

    // Deactivation: the agent forgets the manager, the host is kept as deactivated.
    let done = Pm::activate(&home).args(["deactivate", "real-1"]).json();
    assert_eq!(done["agent_forgot"], true);
    assert!(!agent.activated());
    assert_eq!(hosts(&home)[0]["state"], "deactivated");
    agent.stop();
}

#[test]
fn a_real_pm_agent_refuses_a_wrong_key_a_replayed_key_and_a_revoked_certificate() {
    let home = Home::new();
    let (file, _) = new_key(&home, "agent.key", &[]);
    let (other_file, _) = new_key(&home, "other.key", &[]);
    let first = RealAgent::start(&file);
    let second = RealAgent::start(&file);
    let third = RealAgent::start(&other_file);
    let activate = |agent: &RealAgent, key_file: &PathBuf| {
        Pm::activate(&home)
            .args(["host", &agent.addr.to_string(), "--key-file"])
            .args([key_file])
            .args(["--dist-url", "http://127.0.0.1:8080"])
            .run()
    };

    // The manager holds `file`, the third agent `other_file`.
    let run = activate(&third, &file);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("wrong activation key"),
        "{}",
        run.stderr()
    );
    assert!(!third.activated());

    let run = activate(&first, &file);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let name = hosts(&home)[0]["host"].as_str().unwrap().to_string();
    let serial = hosts(&home)[0]["certificate_serial"]
        .as_str()
        .unwrap()
        .to_string();
    // The single-use key, replayed toward a second agent that holds it too.
    let run = activate(&second, &file);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("was already used"),
        "{}",
        run.stderr()
    );
    assert!(!second.activated());

    // Deactivated while the agent is down: marked, revoked, exit 3; back up, it still
    // presents the revoked certificate, which is refused.
    let mut first = first;
    first.stop();
    let run = Pm::activate(&home).args(["deactivate", &name]).run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert!(run.stderr().contains("warning:"), "{}", run.stderr());
    first.run();
    let run = activate(&first, &file);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains(&format!(
            "certificate serial {serial} of {name} was revoked"
        )),
        "{}",
        run.stderr()
    );
}

#[test]
fn bulk_activation_reports_each_target_and_a_name_is_not_taken_twice() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &["--reusable"]);
    let agents: Vec<_> = (0..3)
        .map(|i| FakeAgent::start(&format!("bulk-{i}"), Some(&key)))
        .collect();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut list = String::from("# fleet\n");
    for agent in &agents {
        list.push_str(&format!("{},1\n", agent.address()));
    }
    list.push_str(&format!("{dead}\n\n"));
    let targets = home.path().join("targets.txt");
    std::fs::write(&targets, list).unwrap();
    let run = Pm::activate(&home)
        .args(["host", "--targets"])
        .args([&targets])
        .args(["--key-file"])
        .args([&file])
        .args([
            "--dist-url",
            "http://127.0.0.1:8080",
            "--group",
            "bulk",
            "--json",
        ])
        .run();
    assert_eq!(run.code(), 3, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["summary"]["activated"], 3, "{report}");
    assert_eq!(report["summary"]["failed"], 1, "{report}");
    assert!(
        report["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("is unreachable")
    );
    assert!(agents.iter().all(FakeAgent::activated));
    let listed = hosts(&home);
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|h| h["group"] == "bulk"));

    // Another agent calling itself `bulk-0` does not take over that host's name.
    let impostor = FakeAgent::start("bulk-0", Some(&key));
    let run = activate(&home, &impostor, &file, &[]);
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("cannot take its name"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("--name"), "{}", run.stderr());
    let run = activate(&home, &impostor, &file, &["--name", "bulk-9"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn an_activation_key_file_others_can_read_is_refused_by_the_manager_and_the_agent() {
    let home = Home::new();
    let (file, key) = new_key(&home, "agent.key", &[]);
    let agent = FakeAgent::start("web-9", Some(&key));
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&file, perms).unwrap();
    let run = activate(&home, &agent, &file, &[]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("readable by other users (mode 644)"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("pm-activate key revoke"),
        "{}",
        run.stderr()
    );
    assert!(!agent.activated());
    assert!(hosts(&home).is_empty());

    let state = tempfile::tempdir().unwrap();
    let run = Pm::agent(&state.path().join("state"))
        .args(["init", "--listen", "127.0.0.1:1", "--engine", "clamav"])
        .args([
            "--database-dir",
            "/nonexistent-pm-db",
            "--activation-key-file",
        ])
        .args([&file])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("readable by other users"),
        "{}",
        run.stderr()
    );
    assert!(!state.path().join("state").join("agent.toml").exists());
}
