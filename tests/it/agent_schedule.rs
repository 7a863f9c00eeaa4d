//! The agent's own schedule (`[schedule]` in agent.toml, or the manager's from
//! `pm-push schedule`): a running agent scans and updates by itself on per-second cron
//! expressions, bad expressions are refused at load (and by pm-push before any host is asked),
//! and `status` shows the next runs and where the schedule comes from.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::support::{AgentSetup, EICAR, Pm, sql, testdb};

/// An initialised (not activated) clamav agent with test.cvd 6 and a directory holding EICAR.
struct Scheduled {
    tmp: tempfile::TempDir,
    port: u16,
}

impl Scheduled {
    fn init() -> Scheduled {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("db");
        std::fs::create_dir(&db).unwrap();
        let cvd = db.join("test.cvd");
        std::fs::copy(testdb().join("test-6.cvd"), &cvd).unwrap();
        std::fs::set_permissions(&cvd, std::fs::Permissions::from_mode(0o644)).unwrap();
        let targets = tmp.path().join("targets");
        std::fs::create_dir(&targets).unwrap();
        std::fs::write(targets.join("eicar.com"), EICAR).unwrap();
        std::fs::write(targets.join("clean.txt"), "nothing here\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let agent = Scheduled { tmp, port };
        agent.init_cmd().json();
        agent
    }

    fn init_cmd(&self) -> Pm {
        Pm::agent(&self.state())
            .args(["init", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--engine", "clamav", "--host-name", "127.0.0.1"])
            .args(["--database-dir"])
            .args([self.tmp.path().join("db")])
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn targets(&self) -> PathBuf {
        self.tmp.path().join("targets")
    }

    fn configure(&self, lines: &str) {
        append(&self.state().join("agent.toml"), lines);
    }
}

fn append(path: &Path, lines: &str) {
    let mut text = std::fs::read_to_string(path).unwrap();
    text.push_str(lines);
    std::fs::write(path, text).unwrap();
}

/// Kills the agent when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_agent(state: &Path) -> Running {
    Running(
        Pm::agent(state)
            .args(["run"])
            .command()
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits up to `seconds` for `check` to give a value.
fn wait_for<T>(seconds: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_running_agent_scans_on_its_schedule_and_keeps_the_report() {
    let agent = Scheduled::init();
    agent.configure(&format!(
        "\n[schedule]\nscan = \"*/1 * * * * *\"\nscan_paths = [{:?}]\n",
        agent.targets().to_str().unwrap()
    ));
    let _running = run_agent(&agent.state());
    let scans = agent.state().join("scans");
    let report = wait_for(30, || {
        let entries = std::fs::read_dir(&scans).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .find(|text| text.contains("Eicar-Test-Signature"))
    })
    .expect("no scheduled scan report naming Eicar-Test-Signature in scans/ within 30 s");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report.to_string().contains("eicar.com"), "{report:#}");
    assert!(!report.to_string().contains("clean.txt\""), "{report:#}");
}

#[test]
fn an_activated_agent_updates_from_dist_on_its_schedule() {
    let mut setup = AgentSetup::new();
    if let Some(mut child) = setup.agent.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(!setup.db().join("test.cvd").exists());
    append(
        &setup.state().join("agent.toml"),
        "\n[schedule]\nupdate = \"*/1 * * * * *\"\n",
    );
    setup.run_agent();
    let revision = wait_for(60, || {
        let status = setup.agent_cmd(&["status"]);
        status["installed_revision"].as_str().map(str::to_string)
    })
    .expect("the scheduled update installed nothing within 60 s");
    assert!(!revision.is_empty());
    assert!(setup.db().join("test.cvd").exists());
    // The run is kept in updates/ and served to the manager.
    let (code, list) = setup.get("/v1/updates");
    assert_eq!(code, 200, "{list:#}");
    let runs = list["runs"].as_array().unwrap();
    let installed = runs
        .iter()
        .find(|run| run["report"]["changed"] == true)
        .unwrap_or_else(|| panic!("no run that installed: {list:#}"));
    assert_eq!(installed["trigger"], "schedule");
    assert_eq!(installed["report"]["revision"], revision.as_str());
    assert!(runs.len() <= 20);
    let kept = std::fs::read_dir(setup.state().join("updates"))
        .unwrap()
        .count();
    assert!((1..=20).contains(&kept), "{kept}");
}

#[test]
fn a_bad_cron_expression_is_refused_naming_the_key() {
    let agent = Scheduled::init();
    agent.configure("\n[schedule]\nupdate = \"every tuesday\"\n");
    for run in [
        agent.init_cmd().run(),
        Pm::agent(&agent.state()).args(["run"]).run(),
    ] {
        assert_ne!(run.code(), 0);
        let stderr = run.stderr();
        assert!(stderr.contains("agent.toml"), "{stderr}");
        assert!(stderr.contains("schedule.update"), "{stderr}");
        assert!(stderr.contains("every tuesday"), "{stderr}");
    }
}

#[test]
fn a_scheduled_scan_needs_absolute_scan_paths() {
    let agent = Scheduled::init();
    agent.configure("\n[schedule]\nscan = \"0 3 * * *\"\n");
    let run = Pm::agent(&agent.state()).args(["status"]).run();
    assert_ne!(run.code(), 0);
    assert!(
        run.stderr().contains("schedule.scan_paths"),
        "{}",
        run.stderr()
    );

    let agent = Scheduled::init();
    agent.configure("\n[schedule]\nscan = \"0 3 * * *\"\nscan_paths = [\"srv\"]\n");
    let run = Pm::agent(&agent.state()).args(["status"]).run();
    assert_ne!(run.code(), 0);
    assert!(run.stderr().contains("absolute"), "{}", run.stderr());
}

#[test]
fn status_shows_the_schedule_and_the_next_runs() {
    let agent = Scheduled::init();
    agent.configure(&format!(
        "\n[schedule]\nupdate = \"*/15 * * * *\"\nscan = \"0 3 * * *\"\nscan_paths = [{:?}]\n",
        agent.targets().to_str().unwrap()
    ));
    let status = Pm::agent(&agent.state()).args(["status"]).json();
    let schedule = status["schedule"].as_array().unwrap();
    assert_eq!(schedule.len(), 2, "{status:#}");
    assert_eq!(schedule[0]["job"], "update");
    assert_eq!(schedule[0]["expression"], "*/15 * * * *");
    assert_eq!(schedule[1]["job"], "scan");
    for entry in schedule {
        let next = entry["next_run"].as_str().expect("a next run");
        let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
        assert!(next > chrono::Utc::now(), "{next}");
    }
    let scan_next = chrono::DateTime::parse_from_rfc3339(schedule[1]["next_run"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Local);
    assert_eq!(
        chrono::Timelike::hour(&scan_next),
        3,
        "scan at 03:00 local time"
    );
    let text = Pm::agent(&agent.state()).args(["status"]).run();
    assert_eq!(text.code(), 0, "{}", text.stderr());
    assert!(
        text.stdout().contains("schedule update"),
        "{}",
        text.stdout()
    );
    assert!(text.stdout().contains("next run"), "{}", text.stdout());
}

/// The newest scan report id in an agent's `scans/`, if any.
fn newest_scan(state: &Path) -> Option<String> {
    std::fs::read_dir(state.join("scans"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .max()
}

#[test]
fn pm_push_schedule_sets_a_running_agents_schedule_and_clear_gives_it_back() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    let dir = dir.to_str().unwrap();
    let push = |args: &[&str]| {
        let run = Pm::push(&setup.home)
            .args(["schedule"])
            .args(args)
            .args(["--json"])
            .run();
        (run.code(), run.stdout(), run.stderr())
    };

    // Bad input is refused before any host is asked: no job, nothing on the agent.
    for (args, names) in [
        (
            vec!["--scan", "every tuesday", "--scan-path", dir],
            "--scan",
        ),
        (vec!["--update", "61 * * * *"], "--update"),
        (vec!["--scan", "0 3 * * *"], "--scan-path"),
        (
            vec!["--scan", "0 3 * * *", "--scan-path", "srv"],
            "--scan-path",
        ),
        (vec!["--scan-path", dir], "--scan-path"),
        (vec![], "--clear"),
    ] {
        let (code, _, stderr) = push(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM jobs WHERE kind = 'schedule'"
        ),
        ["0"]
    );
    assert_eq!(
        setup.agent_cmd(&["status"])["schedule"],
        serde_json::json!([])
    );

    // The running agent scans on the manager's schedule without a restart.
    let (code, stdout, stderr) = push(&["--scan", "*/1 * * * * *", "--scan-path", dir]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["summary"]["ok"], 1, "{report}");
    assert_eq!(report["hosts"][0]["host"], "127.0.0.1", "{report}");
    let scans = setup.state().join("scans");
    wait_for(30, || {
        std::fs::read_dir(&scans)
            .ok()?
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .find(|text| text.contains("Eicar-Test-Signature"))
    })
    .expect("no scheduled scan report naming Eicar-Test-Signature within 30 s");
    let status = setup.agent_cmd(&["status"]);
    let schedule = status["schedule"].as_array().unwrap();
    assert_eq!(schedule.len(), 1, "{status:#}");
    assert_eq!(schedule[0]["job"], "scan");
    assert_eq!(schedule[0]["expression"], "*/1 * * * * *");
    assert_eq!(schedule[0]["source"], "manager");
    let text = Pm::agent(&setup.state()).args(["status"]).run();
    assert!(
        text.stdout().contains("schedule scan (from manager)"),
        "{}",
        text.stdout()
    );
    // The manager's poll sees the schedule in effect.
    let (code, poll) = setup.get("/v1/poll");
    assert_eq!(code, 200, "{poll:#}");
    assert_eq!(poll["schedule"][0]["job"], "scan", "{poll:#}");
    assert_eq!(poll["schedule"][0]["expression"], "*/1 * * * * *");

    // The same schedule again changes nothing; the agent refuses a bad one itself too.
    let (code, stdout, _) = push(&["--scan", "*/1 * * * * *", "--scan-path", dir]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("\"changed\": false"), "{stdout}");
    let (code, refused) = setup.post(
        "/v1/setup/schedule",
        serde_json::json!({"update": "every tuesday"}),
    );
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("`update`"),
        "{refused}"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM jobs WHERE kind = 'schedule' AND status = 'ok'"
        ),
        ["2"]
    );

    // Clearing stops the scheduled scans: agent.toml (no schedule) applies again.
    let (code, stdout, _) = push(&["--clear"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("\"changed\": true"), "{stdout}");
    assert_eq!(
        setup.agent_cmd(&["status"])["schedule"],
        serde_json::json!([])
    );
    // A scan already under way finishes; after that no new report appears.
    std::thread::sleep(Duration::from_secs(3));
    let settled = newest_scan(&setup.state());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        newest_scan(&setup.state()),
        settled,
        "a scan ran after --clear"
    );
    let (_, poll) = setup.get("/v1/poll");
    assert_eq!(poll["schedule"], serde_json::json!([]), "{poll:#}");
}
