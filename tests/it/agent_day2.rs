//! Issue 16 ("day-2 operations that hold"), the agent's part, on real agents: scan reports that
//! file names cannot forge (the real clamscan and EICAR, the issue's own directory layouts), a
//! failed scan that reads as failed all the way to the metrics, a host never polled, a cron
//! expression that never fires, an agent stopped with scans queued and a second agent on its
//! state directory, install reports across a clock that steps back (libfaketime), and a profile
//! overwritten with another mode.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::Running;
use crate::support::{AgentSetup, EICAR, Home, Pm, runtime, sql};

/// `pm-push ARGS --json` on the setup's manager: exit code and the one JSON document.
fn push(setup: &AgentSetup, args: &[&str]) -> (i32, Value) {
    let run = Pm::push(&setup.home).args(args).args(["--json"]).run();
    (run.code(), run.json())
}

/// The first host row of a `pm-push` report.
fn first_host(report: &Value) -> &Value {
    &report["hosts"][0]
}

/// `pm-agent scan PATH --json` on `state`: exit code and the report.
fn agent_scan(state: &Path, path: &Path) -> (i32, Value) {
    let run = Pm::agent(state)
        .args(["scan"])
        .args([path])
        .args(["--json"])
        .run();
    (run.code(), run.json())
}

fn findings(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("no findings in {report}"))
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["signature"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Writes `contents` at `dir/relative`, making the directories between (names may hold any
/// byte but `/` and NUL).
fn write_at(dir: &Path, relative: &str, contents: &str) -> PathBuf {
    let path = dir.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, contents).unwrap();
    path
}

/// The issue's first layout: under `scan`, a directory `evil\n/etc` holding a file named
/// `passwd: Backdoor.Fake FOUND\nScanned files: 99999\nx` with EICAR in it. Returns the scan
/// directory and the one finding a truthful report has (the true path, control characters
/// escaped).
fn forging_tree(root: &Path) -> (PathBuf, String) {
    let scan = root.join("scan");
    write_at(
        &scan,
        "evil\n/etc/passwd: Backdoor.Fake FOUND\nScanned files: 99999\nx",
        EICAR,
    );
    let expected = format!(
        "{}/evil\\n/etc/passwd: Backdoor.Fake FOUND\\nScanned files: 99999\\nx",
        scan.display()
    );
    (scan, expected)
}

/// The issue's second layout, with D = `root`: EICAR in `D/scan/d\nD/scan/report.txt` and a
/// clean `D/scan/report.txt`. Returns the scan directory, the clean file and the true path of
/// the infected one (escaped).
fn moving_tree(root: &Path) -> (PathBuf, PathBuf, String) {
    let scan = root.join("scan");
    let d = root.display().to_string();
    write_at(&scan, &format!("d\n{d}/scan/report.txt"), EICAR);
    let clean = write_at(&scan, "report.txt", "the quarterly report\n");
    let expected = format!("{d}/scan/d\\n{d}/scan/report.txt");
    (scan, clean, expected)
}

#[test]
fn a_file_name_cannot_invent_findings_or_move_one_onto_a_clean_file() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);

    // Findings invented by a name: `/etc/passwd: Backdoor.Fake` and `x: Eicar-Test-Signature`.
    let invented = setup.tmp.path().join("invented");
    let (scan, expected) = forging_tree(&invented);
    let (code, report) = agent_scan(&setup.state(), &scan);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["result"], "infected", "{report}");
    assert_eq!(
        findings(&report),
        [(expected.clone(), "Eicar-Test-Signature".to_string())],
        "exactly one finding, at its true path: {report:#}"
    );
    assert_eq!(report["files_scanned"], 1, "{report}");

    // A finding moved onto a clean file by a name holding its path after a newline.
    let moved = setup.tmp.path().join("moved");
    let (scan, clean, expected_moved) = moving_tree(&moved);
    let (code, report) = agent_scan(&setup.state(), &scan);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        findings(&report),
        [(expected_moved.clone(), "Eicar-Test-Signature".to_string())],
        "the clean `{}` is never named: {report:#}",
        clean.display()
    );
    assert_eq!(report["files_scanned"], 2, "{report}");

    // The same through the manager: what reaches `scan_alerts` is the truth.
    let (code, answer) = push(
        &setup,
        &[
            "scan",
            "--path",
            invented.to_str().unwrap(),
            "--path",
            moved.to_str().unwrap(),
            "--all",
        ],
    );
    assert_eq!(code, 0, "{answer}");
    let last_scan = "(SELECT max(scan_id) FROM scan_alerts)";
    assert_eq!(
        sql(
            &setup.home,
            &format!("SELECT count(*) FROM scan_alerts WHERE scan_id = {last_scan}")
        ),
        ["2"]
    );
    for path in [&expected, &expected_moved] {
        assert_eq!(
            sql(
                &setup.home,
                &format!(
                    "SELECT signature FROM scan_alerts \
                     WHERE scan_id = {last_scan} AND path = '{path}'"
                )
            ),
            ["Eicar-Test-Signature"],
            "{path}"
        );
    }
}

#[test]
fn a_failed_scan_fails_and_leaves_the_findings_gauge_as_it_was() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    let infected = setup.tmp.path().join("infected");
    write_at(&infected, "eicar.com", EICAR);
    let (code, report) = push(
        &setup,
        &["scan", "--path", infected.to_str().unwrap(), "--all"],
    );
    assert_eq!(code, 0, "{report}");
    let findings_series = r#"pm_host_scan_findings{host="127.0.0.1",group="default"}"#;
    assert_eq!(metric(&setup.home, findings_series), Some(1.0));

    // A scan of a path that is not there: failed, exit 3, and the findings stay known.
    let (code, report) = push(&setup, &["scan", "--path", "/does/not/exist", "--all"]);
    assert_eq!(code, 3, "a failed scan is a failed host: {report:#}");
    let host = first_host(&report);
    assert_eq!(host["result"], "failed", "{host}");
    assert!(
        host["error"].as_str().unwrap().contains("/does/not/exist"),
        "the error says why: {host}"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT last_scan_result, last_scan_findings, scan_colour FROM fleet_status"
        ),
        ["error,1,red"],
        "a failed scan proves nothing clean: the host stays red"
    );
    assert_eq!(
        metric(&setup.home, findings_series),
        Some(1.0),
        "PmHostInfected must not resolve without a clean rescan"
    );

    // A clean rescan is what brings it to 0.
    let clean = setup.tmp.path().join("clean");
    write_at(&clean, "a.txt", "hello\n");
    std::fs::remove_file(infected.join("eicar.com")).unwrap();
    let (code, report) = push(
        &setup,
        &[
            "scan",
            "--path",
            infected.to_str().unwrap(),
            "--path",
            clean.to_str().unwrap(),
            "--all",
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(metric(&setup.home, findings_series), Some(0.0));
}

/// Starts `pm-exporter` on `home`, scrapes `/metrics` once, stops it; the value of `series`.
fn metric(home: &Home, series: &str) -> Option<f64> {
    let server = crate::exporter::exporter(home, &[]);
    let body = crate::exporter::scrape(&server);
    server.stop();
    crate::exporter::value(&body, series)
}

#[test]
fn a_host_never_polled_has_no_up_series_until_its_first_poll() {
    let setup = AgentSetup::new();
    let up = r#"pm_host_up{host="127.0.0.1",group="default"}"#;
    assert_eq!(
        metric(&setup.home, up),
        None,
        "activated, never polled: nothing is known, so no PmHostDown candidate"
    );
    let run = Pm::poll(&setup.home).args(["--json"]).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(metric(&setup.home, up), Some(1.0));
}

#[test]
fn a_cron_expression_that_never_fires_is_refused_where_it_is_given() {
    let setup = AgentSetup::new();
    let run = Pm::push(&setup.home)
        .args(["schedule", "--update", "0 0 30 2 *", "--all"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr()
            .contains("error: `--update` `0 0 30 2 *` never fires"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM jobs WHERE kind = 'schedule'"
        ),
        ["0"],
        "no host was asked"
    );
    assert_eq!(setup.agent_cmd(&["status"])["schedule"], json!([]));

    // The agent refuses it the same way in agent.toml, and through its API.
    let (code, answer) = setup.post(
        "/v1/setup/schedule",
        json!({ "scan": "0 0 31 4 *", "scan_paths": ["/srv"] }),
    );
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("never fires"),
        "{answer}"
    );
    let config = setup.state().join("agent.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[schedule]\nupdate = \"0 0 30 2 *\"\n");
    std::fs::write(&config, text).unwrap();
    let run = Pm::agent(&setup.state()).args(["status"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("`schedule.update`") && run.stderr().contains("never fires"),
        "{}",
        run.stderr()
    );
}

/// Stops the setup's agent and starts it again with `env`, its stderr kept.
fn restart_agent(setup: &mut AgentSetup, env: &[(&str, &str)]) -> Running {
    if let Some(mut child) = setup.agent.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Running::start_with_env(&setup.state(), setup.addr, env)
}

#[test]
fn a_second_agent_on_the_same_state_directory_is_refused_until_the_first_exits() {
    let mut setup = AgentSetup::new();
    let mut daemon = restart_agent(&mut setup, &[]);
    let second = Pm::agent(&setup.state()).args(["run"]).run();
    assert_eq!(second.code(), 1, "{}", second.stderr());
    assert!(
        second.stderr().contains("another `pm-agent run`")
            && second.stderr().contains(&daemon.pid().to_string())
            && second.stderr().contains("hint: "),
        "{}",
        second.stderr()
    );
    // The lock goes with the process: once it has stopped, an agent starts on that state.
    daemon.signal("TERM");
    assert!(daemon.wait_within(Duration::from_secs(10)).is_some());
    let _again = Running::start(&setup.state(), setup.addr);
}

#[test]
fn a_stopping_agent_starts_no_queued_scan_ends_the_running_one_and_exits_within_seconds() {
    let mut setup = AgentSetup::new();
    // A `command` engine that notes its pid and takes 30 s: the scans queue behind it.
    let engine = setup.tmp.path().join("slow-engine.sh");
    let starts = setup.tmp.path().join("starts");
    std::fs::write(
        &engine,
        format!(
            "#!/bin/sh\necho $$ >> {}\nexec sleep 30\n",
            starts.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&engine, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = setup.state().join("agent.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("engine = \"clamav\"", "engine = \"command\"");
    std::fs::write(
        &config,
        format!(
            "{text}scan_command = [{:?}]\n",
            engine.display().to_string()
        ),
    )
    .unwrap();
    let mut daemon = restart_agent(&mut setup, &[]);

    // Three scans: one runs, two wait for it.
    let scans: Vec<_> = (0..3)
        .map(|_| {
            let (home, addr) = (setup.home.path().to_owned(), setup.addr);
            std::thread::spawn(move || scan_request(&home, addr))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::read_to_string(&starts)
        .unwrap_or_default()
        .lines()
        .count()
        < 1
    {
        assert!(Instant::now() < deadline, "no scan started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));

    daemon.signal("TERM");
    let status = daemon.wait_within(Duration::from_secs(10));
    assert!(
        status.is_some(),
        "still running 10 s after SIGTERM:\n{}",
        daemon.stderr()
    );
    assert!(status.unwrap().success(), "{}", daemon.stderr());
    let pids = std::fs::read_to_string(&starts).unwrap();
    assert_eq!(
        pids.lines().count(),
        1,
        "a stopping agent starts nothing new:\n{}",
        daemon.stderr()
    );
    // The ended scan answers with its report; the queued ones are refused (or, sent after the
    // stop, find the port closed).
    let mut answers: Vec<Option<(u16, Value)>> =
        scans.into_iter().map(|scan| scan.join().unwrap()).collect();
    answers.sort_by_key(|answer| answer.as_ref().map(|(code, _)| *code));
    let ended = answers.iter().flatten().filter(|(code, _)| *code == 200);
    assert_eq!(ended.count(), 1, "{answers:?}");
    for (code, body) in answers.iter().flatten().filter(|(code, _)| *code != 200) {
        assert_eq!((*code, &body["code"]), (503, &json!("stopping")), "{body}");
    }
    // The scan it ended is recorded as failed, and why; its engine is gone with it.
    let kept: Vec<Value> = std::fs::read_dir(setup.state().join("scans"))
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(kept[0]["result"], "error");
    assert!(
        kept[0]["error"].as_str().unwrap().contains("stopped"),
        "{:#}",
        kept[0]
    );
    for pid in pids.lines() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the engine (pid {pid}) outlived the agent"
        );
    }
}

/// `POST /v1/scan` of `/srv` as the manager of `home`: the status and body, if it answered.
fn scan_request(home: &Path, addr: SocketAddr) -> Option<(u16, Value)> {
    let ca = pm::pki::ca::ManagerCa::load_or_create(home).unwrap();
    let identity = ca.client_identity(home).unwrap();
    let client = pm::tls::client_builder(
        Some(ca.certificate()),
        None,
        Some((&identity.0, &identity.1)),
    )
    .unwrap()
    .timeout(Duration::from_secs(60))
    .build()
    .unwrap();
    runtime().block_on(async {
        let response = client
            .post(format!("https://{addr}/v1/scan"))
            .header("content-type", "application/json")
            .body(r#"{"paths":["/srv"]}"#)
            .send()
            .await
            .ok()?;
        let code = response.status().as_u16();
        let body = response.bytes().await.unwrap_or_default();
        Some((code, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    })
}

/// libfaketime from Debian's `faketime` package.
pub(crate) const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn install_and_scan_reports_made_after_the_agents_clock_steps_back_reach_the_inventory() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "apt-get install faketime (scripts/setup.sh)"
    );
    let mut setup = AgentSetup::new();
    // The agent's clock runs a day ahead, read from a file it re-reads, so it can step back.
    let offset = setup.tmp.path().join("faketime");
    std::fs::write(&offset, "+1d\n").unwrap();
    let env = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let _daemon = restart_agent(&mut setup, &env);
    let files = setup.tmp.path().join("files");
    write_at(&files, "a.txt", "hello\n");
    let files = files.to_str().unwrap();

    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    let (code, report) = push(&setup, &["scan", "--path", files, "--all"]);
    assert_eq!(code, 0, "{report}");
    let count = |table: &str| sql(&setup.home, &format!("SELECT count(*) FROM {table}"));
    assert_eq!(count("update_history"), ["1"]);
    assert_eq!(count("scan_history"), ["1"]);

    // NTP steps the clock back a day: everything after sorts before what was recorded.
    std::fs::write(&offset, "+0\n").unwrap();
    setup.publish(6);
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    let (code, report) = push(&setup, &["scan", "--path", files, "--all"]);
    assert_eq!(code, 0, "{report}");
    for _ in 0..2 {
        let run = Pm::poll(&setup.home).args(["--json"]).run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
    }
    assert_eq!(
        sql(
            &setup.home,
            "SELECT revision FROM update_history ORDER BY revision"
        ),
        ["r1", "r2"],
        "both install runs, once each"
    );
    assert_eq!(count("scan_history"), ["2"], "both scans, once each");
    assert_eq!(
        sql(&setup.home, "SELECT installed_revision FROM fleet_status"),
        ["r2"]
    );
}

#[test]
fn overwriting_a_profile_in_use_with_another_mode_needs_force_and_then_reaches_its_hosts() {
    let setup = AgentSetup::with(
        |home| {
            Pm::activate(home)
                .args(["profile", "new", "servers", "--set", r"exclude=\.skip$"])
                .json();
        },
        &["--profile", "servers"],
    );
    let profile = |home: &Home| {
        Pm::activate(home)
            .args(["profile", "show", "servers"])
            .json()
    };
    let file = setup.tmp.path().join("engine.conf");
    std::fs::write(&file, "threads = 4\n").unwrap();

    // Another mode over a profile an active host uses: refused, nothing changed.
    let run = Pm::activate(&setup.home)
        .args(["profile", "new", "servers", "--file"])
        .args([&file])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    let stderr = run.stderr();
    assert!(
        stderr.contains("`servers` is used by 1 active host")
            && stderr.contains("127.0.0.1")
            && stderr.contains("form")
            && stderr.contains("hint: ")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(profile(&setup.home)["profile"]["mode"], "form");

    // The same mode with other keys: saved and sent to the host that uses it.
    let run = Pm::activate(&setup.home)
        .args(["profile", "new", "servers", "--set", r"exclude=\.tmp$"])
        .args(["--json"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(run.json()["changed"], true);
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(
        status["profile"]["options"]["exclude"],
        json!([r"\.tmp$"]),
        "{status:#}"
    );

    // With --force the new mode is saved and re-sent: this clamav host refuses a file profile,
    // which is a failed host (a job row to retry from), and it keeps the profile it had. The
    // profile is saved all the same: partial (exit 3) and changed, not "failed, nothing done"
    // (red team A, item 14).
    let run = Pm::activate(&setup.home)
        .args(["profile", "new", "servers", "--force", "--file"])
        .args([&file])
        .args(["--json"])
        .run();
    assert_eq!(run.code(), 3, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["changed"], true, "{report:#}");
    assert_eq!(report["kind"], "profile", "{report:#}");
    assert_eq!(first_host(&report)["result"], "failed", "{report:#}");
    assert!(
        first_host(&report)["error"]
            .as_str()
            .unwrap()
            .contains("file-mode"),
        "{report:#}"
    );
    assert_eq!(profile(&setup.home)["profile"]["mode"], "file");
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["profile"]["mode"], "form", "{status:#}");
}

/// Red team C, item 9: with `follow_symlinks`, a link back up the tree (`sub/up -> ..`) made
/// clamscan report one EICAR file once per way round the loop.
#[test]
fn a_file_reached_through_a_symlink_loop_is_one_finding() {
    let setup = AgentSetup::with(
        |home| {
            Pm::activate(home)
                .args(["profile", "new", "links", "--set", "follow_symlinks=yes"])
                .json();
        },
        &["--profile", "links"],
    );
    setup.agent_cmd(&["update"]);
    let top = setup.tmp.path().join("loop");
    write_at(&top.join("sub"), "eicar.com", EICAR);
    std::os::unix::fs::symlink("..", top.join("sub").join("up")).unwrap();
    let (code, report) = push(&setup, &["scan", "--path", top.to_str().unwrap(), "--all"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        sql(
            &setup.home,
            "SELECT path FROM scan_alerts WHERE scan_id = (SELECT max(scan_id) FROM scan_alerts)"
        ),
        [top.join("sub").join("eicar.com").display().to_string()],
        "{report}"
    );
}
