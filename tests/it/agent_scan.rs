//! `pm-agent scan` and `POST /v1/scan` / `GET /v1/scans`: the real clamscan with ClamAV's signed
//! test database (test.cvd 6 detects EICAR), the `command` adapter with a script as the engine,
//! report keeping and pruning.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pm::proto;
use pm::tls;
use serde_json::{Value, json};

use crate::agent::{Manager, Running, activate, call, fresh};
use crate::support::{EICAR, Pm, free_port, runtime, testdb, write_private};

/// An initialised agent with a database dir holding test.cvd version 6, and scan targets.
struct ScanAgent {
    tmp: tempfile::TempDir,
    addr: SocketAddr,
}

impl ScanAgent {
    /// `pm-agent init --engine ENGINE` (with an activation key, so it can be activated).
    fn init(engine: &str) -> ScanAgent {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db");
        std::fs::create_dir(&db).unwrap();
        let cvd = db.join("test.cvd");
        std::fs::copy(testdb().join("test-6.cvd"), &cvd).unwrap();
        std::fs::set_permissions(&cvd, std::fs::Permissions::from_mode(0o644)).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let agent = ScanAgent { tmp, addr };
        write_private(&agent.key_file(), &format!("{}\n", key()));
        let report = Pm::agent(&agent.state())
            .args(["init", "--listen", &addr.to_string(), "--engine", engine])
            .args(["--host-name", "127.0.0.1", "--database-dir"])
            .args([&db])
            .args(["--activation-key-file"])
            .args([agent.key_file()])
            .json();
        assert_eq!(report["changed"], true);
        agent
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn key_file(&self) -> PathBuf {
        self.tmp.path().join("activation.key")
    }

    /// Appends lines to `agent.toml` (keys init does not take).
    fn configure(&self, lines: &str) {
        let path = self.state().join("agent.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(lines);
        std::fs::write(&path, text).unwrap();
    }

    /// A directory `name` holding the given files.
    fn dir(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, contents) in files {
            std::fs::write(dir.join(file), contents).unwrap();
        }
        dir
    }

    /// `pm-agent scan PATH... --json`: exit code and the one JSON document.
    fn scan(&self, paths: &[&Path]) -> (i32, Value) {
        let run = Pm::agent(&self.state())
            .args(["scan"])
            .args(paths)
            .args(["--json"])
            .run();
        (run.code(), run.json())
    }

    fn kept_reports(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state().join("scans"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn key() -> String {
    format!("pmk1.5ca0beef.{}", "s".repeat(43))
}

fn eicar_dir(agent: &ScanAgent) -> PathBuf {
    agent.dir(
        "infected",
        &[("eicar.com", EICAR), ("clean.txt", "nothing to see\n")],
    )
}

fn signatures(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["signature"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn clamscan_finds_eicar_and_counts_the_files() {
    let agent = ScanAgent::init("clamav");
    let dir = eicar_dir(&agent);
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 0, "an infected result is a successful scan: {report}");
    assert_eq!(report["changed"], false);
    assert_eq!(report["result"], "infected", "{report}");
    assert_eq!(report["engine"], "clamav");
    assert_eq!(report["files_scanned"], 2, "{report}");
    assert_eq!(
        signatures(&report),
        vec![(
            dir.join("eicar.com").display().to_string(),
            "Eicar-Test-Signature".to_string()
        )]
    );
    assert_eq!(report["paths"], json!([dir.display().to_string()]));
    assert!(report["error"].is_null());
    assert!(report["duration_seconds"].as_f64().unwrap() > 0.0);
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(report["started_at"].clone()).unwrap();
    let finished: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(report["finished_at"].clone()).unwrap();
    assert!(started <= finished);

    // The report is kept, private, under its id.
    let id = report["id"].as_str().unwrap();
    let kept = agent.state().join("scans").join(format!("{id}.json"));
    let stored: proto::ScanReport = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert_eq!(stored.result, proto::ScanResult::Infected);
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The text form names the file and the signature in a table; relative paths are resolved.
    let run = Pm::agent(&agent.state())
        .args(["scan", "infected"])
        .command()
        .current_dir(agent.tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("Eicar-Test-Signature"), "{stdout}");
    assert!(
        stdout.contains(&dir.join("eicar.com").display().to_string()),
        "{stdout}"
    );
    assert!(
        stdout.contains("infected: 1 finding(s), 2 file(s)"),
        "{stdout}"
    );
}

#[test]
fn clamscan_of_a_clean_directory_is_clean() {
    let agent = ScanAgent::init("clamav");
    let dir = agent.dir("clean", &[("a.txt", "hello\n"), ("b.txt", "world\n")]);
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["result"], "clean", "{report}");
    assert_eq!(report["files_scanned"], 2);
    assert_eq!(report["findings"], json!([]));
}

#[test]
fn a_missing_path_is_an_error_that_names_it() {
    let agent = ScanAgent::init("clamav");
    let missing = agent.tmp.path().join("no-such-dir");
    let (code, report) = agent.scan(&[&missing]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["result"], "error", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("`{}` does not exist", missing.display()))
            && error.contains("No such file or directory"),
        "{error}"
    );
    // Failed scans are kept too.
    assert_eq!(agent.kept_reports().len(), 1);
}

#[test]
fn a_missing_database_is_an_error() {
    let agent = ScanAgent::init("clamav");
    std::fs::remove_file(agent.tmp.path().join("db/test.cvd")).unwrap();
    let dir = eicar_dir(&agent);
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["result"], "error", "{report}");
    assert!(!report["error"].as_str().unwrap().is_empty());
}

/// Writes an executable engine script; it sees its arguments exactly as given.
fn engine_script(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("engine.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn the_command_adapter_runs_the_configured_argv_without_a_shell() {
    let agent = ScanAgent::init("command");
    let dir = agent.dir("target", &[("x.bin", "x")]);

    // Without `scan_command` the command engine cannot scan: a usage error.
    let run = Pm::agent(&agent.state()).args(["scan"]).args([&dir]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("scan_command"), "{}", run.stderr());

    let script = engine_script(
        agent.tmp.path(),
        "[ \"$1\" = --flag ] || exit 9\nshift\n\
         for p in \"$@\"; do echo \"$p: Fake.Sig FOUND\"; done\n\
         echo \"Scanned files: 7\"\nexit 1\n",
    );
    agent.configure(&format!(
        "scan_command = [{:?}, \"--flag\"]\n",
        script.display().to_string()
    ));
    // Init again with the same flags is still "already initialised", not a conflict.
    let rerun = Pm::agent(&agent.state())
        .args([
            "init",
            "--listen",
            &agent.addr.to_string(),
            "--engine",
            "command",
        ])
        .args(["--host-name", "127.0.0.1", "--database-dir"])
        .args([agent.tmp.path().join("db")])
        .json();
    assert_eq!(rerun["changed"], false);

    // A path with shell metacharacters arrives as one argument, untouched.
    let odd = agent.dir("a dir; touch pwned $(id)", &[]);
    let (code, report) = agent.scan(&[&dir, &odd]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["engine"], "command");
    assert_eq!(report["result"], "infected");
    assert_eq!(report["files_scanned"], 7);
    assert_eq!(
        signatures(&report),
        vec![
            (dir.display().to_string(), "Fake.Sig".to_string()),
            (odd.display().to_string(), "Fake.Sig".to_string()),
        ]
    );
    assert!(!agent.tmp.path().join("pwned").exists());

    // Exit 0 with no findings is clean; no summary line means the count is unknown.
    engine_script(agent.tmp.path(), "exit 0\n");
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["result"], "clean");
    assert!(report["files_scanned"].is_null());

    // Any other status is an error carrying the engine's stderr.
    engine_script(agent.tmp.path(), "echo 'licence expired' >&2\nexit 3\n");
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["result"], "error");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("exited with status 3") && error.contains("licence expired"),
        "{error}"
    );

    // An engine that cannot be started is an error report too.
    std::fs::remove_file(&script).unwrap();
    let (code, report) = agent.scan(&[&dir]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("cannot run"),
        "{report}"
    );
}

#[test]
fn only_the_last_n_reports_are_kept() {
    let agent = ScanAgent::init("clamav");
    agent.configure("scan_reports_keep = 3\n");
    let dir = agent.dir("clean", &[("a.txt", "hello\n")]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (code, report) = agent.scan(&[&dir]);
        assert_eq!(code, 0, "{report}");
        ids.push(report["id"].as_str().unwrap().to_string());
    }
    let newest: Vec<String> = ids[2..].iter().map(|id| format!("{id}.json")).collect();
    assert_eq!(agent.kept_reports(), newest);
}

/// Starts the agent and activates it as a manager would; the manager's mutual-TLS client.
fn start_and_activate(agent: &ScanAgent) -> (Running, Manager) {
    let running = Running::start(&agent.state(), agent.addr);
    let manager = Manager::new();
    let (code, answer) = runtime().block_on(activate(agent.addr, &manager, &key()));
    assert_eq!(code, 200, "{answer}");
    (running, manager)
}

#[test]
fn the_manager_scans_over_mutual_tls_and_lists_the_reports() {
    let agent = ScanAgent::init("clamav");
    let dir = eicar_dir(&agent);
    let (_running, manager) = start_and_activate(&agent);
    let client = manager.client();
    runtime().block_on(async {
        {
            let path = dir.display().to_string();
            let (code, report) = call(
                &client,
                agent.addr,
                false,
                proto::SCAN_PATH,
                Some(json!({ "paths": [path] })),
            )
            .await
            .unwrap();
            assert_eq!(code, 200, "{report}");
            let report: proto::ScanReport = serde_json::from_value(report).unwrap();
            assert_eq!(report.result, proto::ScanResult::Infected);
            assert_eq!(report.files_scanned, Some(2));
            assert_eq!(
                report.findings,
                vec![proto::ScanFinding {
                    path: dir.join("eicar.com").display().to_string(),
                    signature: "Eicar-Test-Signature".into(),
                }]
            );

            // Relative paths, options and empty lists are refused before any engine runs.
            for paths in [json!(["-r"]), json!(["infected"]), json!([])] {
                let (code, answer) = call(
                    &client,
                    agent.addr,
                    false,
                    proto::SCAN_PATH,
                    Some(json!({ "paths": paths })),
                )
                .await
                .unwrap();
                assert_eq!(code, 400, "{answer}");
                assert_eq!(answer["code"], "bad_request");
            }

            // A second scan (clean), then the list: newest first.
            let clean = agent.dir("clean", &[("a.txt", "a\n")]);
            let (code, second) = call(
                &client,
                agent.addr,
                false,
                proto::SCAN_PATH,
                Some(json!({ "paths": [clean.display().to_string()] })),
            )
            .await
            .unwrap();
            assert_eq!(code, 200, "{second}");
            assert_eq!(second["result"], "clean");
            let (code, list) = call(&client, agent.addr, true, proto::SCANS_PATH, None)
                .await
                .unwrap();
            assert_eq!(code, 200, "{list}");
            let list: proto::ScanList = serde_json::from_value(list).unwrap();
            let ids: Vec<&str> = list.reports.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(
                ids,
                vec![second["id"].as_str().unwrap(), report.id.as_str()]
            );

            // Without a client certificate there is no scan.
            let cert = tls::fetch_server_certificate(agent.addr, Duration::from_secs(5))
                .await
                .unwrap();
            let anonymous = fresh(tls::client_builder(
                None,
                Some(&tls::fingerprint(&cert)),
                None,
            ));
            let refused = call(
                &anonymous,
                agent.addr,
                false,
                proto::SCAN_PATH,
                Some(json!({ "paths": [path] })),
            )
            .await;
            assert!(
                refused.is_err(),
                "a client without a certificate must not even complete TLS: {refused:?}"
            );
        }
    });
    // The CLI sees the reports the API made.
    assert_eq!(agent.kept_reports().len(), 2);
}

#[test]
fn an_agent_that_is_not_activated_refuses_scans() {
    let agent = ScanAgent::init("clamav");
    let dir = eicar_dir(&agent);
    let _running = Running::start(&agent.state(), agent.addr);
    runtime().block_on(async {
        let cert = tls::fetch_server_certificate(agent.addr, Duration::from_secs(5))
            .await
            .unwrap();
        let client = fresh(tls::client_builder(
            None,
            Some(&tls::fingerprint(&cert)),
            None,
        ));
        for (get, path, body) in [
            (
                false,
                proto::SCAN_PATH,
                Some(json!({ "paths": [dir.display().to_string()] })),
            ),
            (true, proto::SCANS_PATH, None),
        ] {
            let (code, answer) = call(&client, agent.addr, get, path, body).await.unwrap();
            assert_eq!(code, 403, "{answer}");
            assert_eq!(answer["code"], "not_activated");
        }
    });
    assert!(!agent.state().join("scans").exists());
}

#[test]
fn a_command_engine_without_scan_command_answers_conflict() {
    let agent = ScanAgent::init("command");
    let dir = agent.dir("target", &[("x.bin", "x")]);
    let (_running, manager) = start_and_activate(&agent);
    let client = manager.client();
    runtime().block_on(async {
        let (code, answer) = call(
            &client,
            agent.addr,
            false,
            proto::SCAN_PATH,
            Some(json!({ "paths": [dir.display().to_string()] })),
        )
        .await
        .unwrap();
        assert_eq!(code, 409, "{answer}");
        assert_eq!(answer["code"], "engine_not_configured");
        assert!(
            answer["message"].as_str().unwrap().contains("scan_command"),
            "{answer}"
        );
    });
}

/// Makes `levels` directories of 250-letter names under `top`, opened by handle (their path is
/// soon longer than PATH_MAX), with `file` holding `contents` at the bottom.
fn deep_tree(top: &Path, levels: usize, file: &str, contents: &str) {
    use rustix::fs::{CWD, Mode, OFlags};
    let name = "n".repeat(250);
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::openat(CWD, top, flags, Mode::empty()).unwrap();
    for _ in 0..levels {
        rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(&dir, name.as_str(), flags, Mode::empty()).unwrap();
    }
    let fd = rustix::fs::openat(
        &dir,
        file,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&fd, contents.as_bytes()).unwrap();
}

/// Red team C, item 5: EICAR under a path longer than PATH_MAX.
#[test]
fn a_file_whose_path_is_longer_than_the_engine_can_open_makes_the_scan_error_naming_it() {
    let agent = ScanAgent::init("clamav");
    let top = agent.dir("long", &[("clean.txt", "nothing to see\n")]);
    deep_tree(&top, 20, "eicar.com", EICAR);
    let (_, report) = agent.scan(&[&top]);
    assert_eq!(report["result"], "error", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("longer than the engine can open") && error.contains("/eicar.com`"),
        "{error}"
    );
    assert_eq!(
        report["files_scanned"], 1,
        "the sibling was scanned: {report}"
    );
}

/// Whether process `pid` still runs (a zombie nobody reaped has ended).
fn runs(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// Red team C, item 11: SIGKILL of an agent mid-scan left the engine running as an orphan.
#[test]
fn an_engine_dies_with_an_agent_killed_mid_scan() {
    let agent = ScanAgent::init("command");
    let dir = agent.dir("target", &[("x.bin", "x")]);
    let pid_file = agent.tmp.path().join("engine.pid");
    let script = engine_script(
        agent.tmp.path(),
        &format!("echo $$ > {}\nexec sleep 60\n", pid_file.display()),
    );
    agent.configure(&format!(
        "scan_command = [{:?}]\n",
        script.display().to_string()
    ));
    let mut scan = Pm::agent(&agent.state())
        .args(["scan"])
        .args([&dir])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let engine = loop {
        if let Ok(pid) = std::fs::read_to_string(&pid_file)
            && !pid.trim().is_empty()
        {
            break pid.trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the engine never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(runs(&engine));
    scan.kill().unwrap();
    scan.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while runs(&engine) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let orphan = runs(&engine);
    if orphan {
        let _ = std::process::Command::new("kill")
            .args(["-9", &engine])
            .status();
    }
    assert!(
        !orphan,
        "the engine (pid {engine}) scans on after its agent was killed"
    );
}

/// Red team C, item 13: a path asked for that is a loop of links (`la -> lb -> la`) was
/// reported as a link that does not resolve, "is it mounted?".
#[test]
fn a_path_that_is_a_loop_of_links_is_an_error_that_says_it_is_a_loop() {
    let agent = ScanAgent::init("clamav");
    let la = agent.tmp.path().join("la");
    std::os::unix::fs::symlink("lb", &la).unwrap();
    std::os::unix::fs::symlink("la", agent.tmp.path().join("lb")).unwrap();
    let (code, report) = agent.scan(&[&la]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["result"], "error", "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("loop of symbolic links") && !error.contains("mounted"),
        "{error}"
    );
}
