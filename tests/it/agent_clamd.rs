//! The `clamav` engine with a real clamd: `pm-agent update` installs into the directory clamd
//! loads and tells it to `RELOAD`; `pm-agent scan` goes through the real `clamdscan`, and falls
//! back to the real `clamscan` when the profile has scan options or clamd does not answer.
//!
//! ClamAV's test databases: test-1 and test-2 do not detect EICAR, test-3 and later do.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{AgentSetup, EICAR, ExtraAgent, Home, Lab, Pm, Server, free_port};

/// The first test database version that detects EICAR.
const DETECTS_EICAR: u32 = 3;
/// How long clamd may take to start or to reload the test databases.
const CLAMD_WAIT: Duration = Duration::from_secs(60);

/// A real `clamd --foreground` on a socket in its own temporary directory, killed on drop.
struct Clamd {
    child: Option<Child>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Clamd {
    /// Starts clamd over `database_dir` (TCP off, no log file, no syslog) and waits until it
    /// answers `PING`.
    fn start(database_dir: &Path) -> Clamd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("clamd.sock");
        let conf = dir.path().join("clamd.conf");
        std::fs::write(
            &conf,
            format!(
                "LocalSocket {}\nDatabaseDirectory {}\nForeground yes\nTemporaryDirectory {}\n",
                socket.display(),
                database_dir.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("clamd")
            .arg("--foreground")
            .arg(format!("--config-file={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("`clamd` cannot run ({err}): apt-get install clamav-daemon clamdscan")
            });
        let mut clamd = Clamd {
            child: Some(child),
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + CLAMD_WAIT;
        while clamd.ping().as_deref() != Some("PONG") {
            let exited = clamd.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "clamd exited: {exited:?}");
            assert!(Instant::now() < deadline, "clamd does not answer PING");
            std::thread::sleep(Duration::from_millis(100));
        }
        clamd
    }

    fn ping(&self) -> Option<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(b"zPING\0").ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).ok()?;
        Some(
            String::from_utf8_lossy(&answer)
                .trim_end_matches('\0')
                .to_string(),
        )
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A manager whose lab, and so whose first dist, is at `version`, and an agent it activated.
fn manager_at(version: u32) -> (AgentSetup, ExtraAgent) {
    let lab = Lab::start(version);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let manager = AgentSetup {
        server: Server::start(&home),
        lab,
        home,
        tmp: tempfile::tempdir().unwrap(),
        addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        agent: None,
    };
    let agent = manager.add_agent("127.0.0.1", &[]);
    (manager, agent)
}

/// `pm-agent ARGS --json` on `agent`.
fn agent_json(agent: &ExtraAgent, args: &[&str]) -> Value {
    Pm::agent(&agent.state()).args(args).json()
}

/// Adds `clamd_socket` to the agent's agent.toml (read by each `pm-agent` command).
fn use_clamd(agent: &ExtraAgent, socket: &Path) {
    let file = agent.state().join("agent.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("clamd_socket"), "{text}");
    text = format!("clamd_socket = {:?}\n{text}", socket.to_str().unwrap());
    std::fs::write(&file, text).unwrap();
}

/// A directory holding the EICAR test file and a clean file.
fn eicar_and_clean(agent: &ExtraAgent) -> PathBuf {
    let dir = agent.dir.path().join("scan-me");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    std::fs::write(dir.join("clean.txt"), "nothing to see").unwrap();
    dir
}

/// `pm-agent -v scan --json DIR`: the report and the logs.
fn scan(agent: &ExtraAgent, dir: &Path) -> (Value, String) {
    let run = Pm::agent(&agent.state())
        .args(["-v", "scan", "--json"])
        .args([dir])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    (run.json(), run.stderr())
}

/// Whether `report` found exactly EICAR in `dir`.
fn eicar_found(report: &Value, dir: &Path) -> bool {
    report["result"] == "infected"
        && report["findings"]
            == serde_json::json!([{
                "path": dir.join("eicar.com"),
                "signature": "Eicar-Test-Signature",
            }])
}

#[test]
fn scans_go_through_clamd_which_reloads_an_update_and_clamscan_takes_over_when_clamd_stops() {
    let (manager, agent) = manager_at(DETECTS_EICAR - 1);
    let installed = agent_json(&agent, &["update"]);
    assert_eq!(installed["changed"], true, "{installed}");
    assert_eq!(
        installed["reloaded"], false,
        "no clamd_socket yet: {installed}"
    );
    let mut clamd = Clamd::start(&agent.db());
    use_clamd(&agent, &clamd.socket);
    let dir = eicar_and_clean(&agent);

    // clamd has the installed test database, which does not know EICAR yet.
    let (report, logs) = scan(&agent, &dir);
    assert_eq!(report["program"], "clamdscan", "{report}\n{logs}");
    assert_eq!(report["engine"], "clamav");
    assert_eq!(report["result"], "clean", "{report}\n{logs}");
    assert_eq!(report["findings"], serde_json::json!([]));
    // clamdscan prints no "Scanned files:" line.
    assert_eq!(report["files_scanned"], Value::Null, "{report}");
    let conf = std::fs::read_to_string(agent.state().join("clamdscan.conf")).unwrap();
    assert_eq!(
        conf,
        format!(
            "LocalSocket {}\nExcludePath [[:cntrl:]]\nMaxDirectoryRecursion 256\n",
            clamd.socket.display()
        )
    );

    // The manager publishes a database that detects EICAR; the update tells clamd to reload.
    manager.publish(DETECTS_EICAR);
    let installed = agent_json(&agent, &["update"]);
    assert_eq!(installed["changed"], true, "{installed}");
    assert_eq!(installed["reloaded"], true, "{installed}");
    // clamd reloads in the background: scans through it find EICAR once it has.
    let deadline = Instant::now() + CLAMD_WAIT;
    loop {
        let (report, logs) = scan(&agent, &dir);
        assert_eq!(report["program"], "clamdscan", "{report}\n{logs}");
        if eicar_found(&report, &dir) {
            break;
        }
        assert_eq!(report["result"], "clean", "{report}\n{logs}");
        assert!(Instant::now() < deadline, "clamd never reloaded: {report}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A name that would forge clamdscan's output (issue 16): clamdscan skips it (ExcludePath),
    // clamscan scans the file through an alias, and the one finding names the true path.
    let forged = agent.dir.path().join("forged");
    let planted = forged.join("evil\n/etc/passwd: Backdoor.Fake FOUND\nx");
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, EICAR).unwrap();
    let (report, logs) = scan(&agent, &forged);
    assert_eq!(report["program"], "clamdscan", "{report}\n{logs}");
    assert_eq!(
        report["findings"],
        serde_json::json!([{
            "path": format!("{}/evil\\n/etc/passwd: Backdoor.Fake FOUND\\nx", forged.display()),
            "signature": "Eicar-Test-Signature",
        }]),
        "{report}\n{logs}"
    );

    // EICAR 16 directories down: clamdscan's walk goes as deep as the agent's (its default
    // limit, 15, skipped it in silence).
    let deep = agent.dir.path().join("deep");
    let mut bottom = deep.clone();
    for level in 1..=16 {
        bottom.push(format!("d{level}"));
    }
    std::fs::create_dir_all(&bottom).unwrap();
    std::fs::write(bottom.join("eicar.com"), EICAR).unwrap();
    let (report, logs) = scan(&agent, &deep);
    assert_eq!(report["program"], "clamdscan", "{report}\n{logs}");
    assert!(eicar_found(&report, &bottom), "{report}\n{logs}");

    // clamd stops: the scan still runs, with clamscan over the database directory, and warns.
    clamd.stop();
    let (report, logs) = scan(&agent, &dir);
    assert_eq!(report["program"], "clamscan", "{report}\n{logs}");
    assert!(eicar_found(&report, &dir), "{report}");
    assert_eq!(report["files_scanned"], 2, "{report}");
    assert!(
        logs.contains("WARN") && logs.contains("clamd does not answer on its socket"),
        "{logs}"
    );
}

#[test]
fn a_profile_with_scan_options_scans_with_clamscan_although_clamd_runs() {
    let (manager, agent) = manager_at(DETECTS_EICAR);
    let installed = agent_json(&agent, &["update"]);
    assert_eq!(installed["changed"], true, "{installed}");
    let clamd = Clamd::start(&agent.db());
    use_clamd(&agent, &clamd.socket);
    let dir = eicar_and_clean(&agent);
    std::fs::write(dir.join("eicar.skip"), EICAR).unwrap();

    // Without a profile, clamd scans all three files.
    let (report, logs) = scan(&agent, &dir);
    assert_eq!(report["program"], "clamdscan", "{report}\n{logs}");
    assert_eq!(report["findings"].as_array().unwrap().len(), 2, "{report}");

    // The manager gives the host a profile that skips `*.skip`: clamscan applies it.
    Pm::activate(&manager.home)
        .args(["profile", "new", "skip", "--set", r"exclude=\.skip$"])
        .json();
    Pm::activate(&manager.home)
        .args(["host", &agent.addr.to_string(), "--profile", "skip"])
        .json();
    let (report, logs) = scan(&agent, &dir);
    assert_eq!(report["program"], "clamscan", "{report}\n{logs}");
    assert!(eicar_found(&report, &dir), "{report}");
    assert_eq!(report["files_scanned"], 2, "{report}");
    assert!(
        logs.contains("clamdscan cannot take per scan"),
        "the reason is logged: {logs}"
    );
    assert_eq!(clamd.ping().as_deref(), Some("PONG"));
}
