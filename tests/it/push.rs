//! `pm-push update` on fleets of real agents (`pm-lab agents`, real TLS, ClamAV's test
//! databases): waves that stop themselves, idempotent re-runs, resume after kill -9.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab_agents::LabAgents;
use crate::support::{AgentSetup, Pm, duckdb, free_port, sql};

/// A manager (dist at test 3, served) and `count` real agents activated from `pm-lab agents`.
pub(crate) struct Fleet {
    pub(crate) setup: AgentSetup,
    _lab: LabAgents,
    pub(crate) dir: PathBuf,
    /// pm-lab's report: each agent's host name, address and pid.
    pub(crate) lab: Value,
}

impl Fleet {
    pub(crate) fn start(count: usize) -> Fleet {
        Fleet::start_with(count, &[])
    }

    /// Like `start`, with extra `pm-lab agents` flags (e.g. `--own-binary`).
    pub(crate) fn start_with(count: usize, lab_flags: &[&str]) -> Fleet {
        let setup = AgentSetup::new();
        let key_file = setup.tmp.path().join("fleet.key");
        Pm::activate(&setup.home)
            .args(["key", "new", "--reusable", "--out"])
            .args([&key_file])
            .json();
        let dir = setup.tmp.path().join("lab");
        let stdout = setup.tmp.path().join("lab.json");
        let log = setup.tmp.path().join("lab.log");
        let mut lab = LabAgents::start(
            &dir,
            count,
            free_port(),
            &key_file,
            &stdout,
            &log,
            lab_flags,
        );
        let report = lab.report(&stdout, &log, 120);
        let activated = Pm::activate(&setup.home)
            .args(["host", "--targets"])
            .args([dir.join("targets.txt")])
            .args(["--key-file"])
            .args([&key_file])
            .args(["--group", "lab", "--dist-url", &setup.server.base])
            .json();
        assert_eq!(activated["summary"]["activated"], count, "{activated}");
        // The AgentSetup's own agent is not part of the rollouts below.
        Pm::activate(&setup.home)
            .args(["deactivate", "127.0.0.1"])
            .json();
        Fleet {
            setup,
            _lab: lab,
            dir,
            lab: report,
        }
    }

    /// Makes agent `n`'s installs fail: its database directory becomes a plain file.
    pub(crate) fn break_agent(&self, n: usize) {
        let db = self.dir.join(format!("agent-{n:03}-db"));
        std::fs::remove_dir_all(&db).ok();
        std::fs::write(&db, "not a directory").unwrap();
    }

    pub(crate) fn mend_agent(&self, n: usize) {
        let db = self.dir.join(format!("agent-{n:03}-db"));
        std::fs::remove_file(&db).ok();
        std::fs::create_dir_all(&db).unwrap();
    }

    /// Waits (at most a minute) until a running rollout has recorded its canary as ok.
    pub(crate) fn wait_for_canary(&self) {
        let file = self.setup.home.path().join("inventory.duckdb");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // pm-push holds the file for its writes: a read may meet one and is tried again.
            let (_, recorded, _) = duckdb(&[
                "-readonly",
                "-csv",
                "-noheader",
                file.to_str().unwrap(),
                "-c",
                "SELECT count(*) FROM rollout_hosts WHERE result = 'ok'",
            ]);
            if recorded.trim() == "1" {
                return;
            }
            assert!(Instant::now() < deadline, "the canary was never recorded");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn push(&self, args: &[&str]) -> (i32, Value) {
        let run = Pm::push(&self.setup.home).args(args).args(["--json"]).run();
        (run.code(), run.json())
    }
}

fn results(report: &Value) -> Vec<(String, i64, String)> {
    let mut rows: Vec<(String, i64, String)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["wave"].as_i64().unwrap(),
                h["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn count(report: &Value, result: &str) -> u64 {
    report["summary"][result].as_u64().unwrap()
}

#[test]
fn a_rollout_of_50_agents_stops_after_the_wave_with_too_many_failures_and_a_rerun_finishes_it() {
    let fleet = Fleet::start(50);
    fleet.setup.publish(6);
    for n in [12, 15, 19] {
        fleet.break_agent(n);
    }
    let (code, report) = fleet.push(&[
        "update",
        "--canary",
        "1",
        "--wave-size",
        "10",
        "--max-failures",
        "2",
    ]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["state"], "stopped");
    assert_eq!(report["stopped_at_wave"], 2);
    assert_eq!(report["revision"], "r2");
    assert_eq!(
        (
            count(&report, "ok"),
            count(&report, "failed"),
            count(&report, "not_attempted")
        ),
        (18, 3, 29),
        "canary + wave 1 + 7 of wave 2 ok; 3 failed; waves 3..5 untouched"
    );
    for (host, wave, result) in results(&report) {
        let n: usize = host.trim_start_matches("lab-").parse().unwrap();
        let expected = match n {
            12 | 15 | 19 => "failed",
            0..=20 => "ok",
            _ => "not_attempted",
        };
        assert_eq!(result, expected, "{host} (wave {wave})");
    }
    let failed = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "lab-012")
        .unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("could not install"),
        "{failed}"
    );
    // Untouched hosts still have nothing installed; the audit log has every attempt.
    assert_eq!(
        sql(
            &fleet.setup.home,
            "SELECT wave, ok, failed, not_attempted FROM rollout_progress ORDER BY wave"
        ),
        [
            "0,1,0,0", "1,10,0,0", "2,7,3,0", "3,0,0,10", "4,0,0,10", "5,0,0,9"
        ]
    );
    let status = Pm::push(&fleet.setup.home).args(["status"]).json();
    assert_eq!(status["state"], "stopped");

    // Mend the three and resume: the waves not attempted run; the failed hosts stay failed in
    // that job, and a new update takes them and skips everyone already on r2.
    for n in [12, 15, 19] {
        fleet.mend_agent(n);
    }
    let job = report["job_id"].as_i64().unwrap().to_string();
    let (code, resumed) = fleet.push(&["resume", &job]);
    assert_eq!(code, 3, "{resumed}");
    assert_eq!(resumed["state"], "done");
    assert_eq!(count(&resumed, "ok"), 47);
    let (code, rerun) = fleet.push(&["update", "--wave-size", "10"]);
    assert_eq!(code, 0, "{rerun}");
    assert_eq!(count(&rerun, "ok"), 3, "{rerun}");
    assert_eq!(count(&rerun, "skipped"), 47);
    assert_eq!(rerun["changed"], true);
    let (code, again) = fleet.push(&["update"]);
    assert_eq!(code, 0);
    assert_eq!(again["changed"], false, "everyone is on dist: {again}");
    assert_eq!(count(&again, "skipped"), 50);
    assert_eq!(
        sql(
            &fleet.setup.home,
            "SELECT count(*) FROM fleet_status WHERE installed_revision = 'r2'"
        ),
        ["50"]
    );
}

#[test]
fn an_interrupted_rollout_says_where_it_stopped_and_resume_finishes_it() {
    let fleet = Fleet::start(6);
    fleet.setup.publish(6);
    let (code, plan) = fleet.push(&["update", "--wave-size", "2", "--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(plan["state"], "planned");
    assert_eq!(count(&plan, "pending"), 6);
    assert_eq!(
        plan["waves"].as_array().unwrap().len(),
        4,
        "canary + 3 waves of 2: {plan}"
    );

    let mut child = Pm::push(&fleet.setup.home)
        .args(["update", "--wave-size", "2", "--pause", "3s", "--json"])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once the canary is recorded, during the pause before wave 1.
    fleet.wait_for_canary();
    let live = Pm::push(&fleet.setup.home).args(["status"]).json();
    assert_eq!(live["state"], "running", "its process runs: {live}");
    child.kill().unwrap();
    child.wait().unwrap();

    let status = Pm::push(&fleet.setup.home).args(["status"]).json();
    assert_eq!(status["state"], "interrupted", "{status}");
    assert_eq!(count(&status, "ok"), 1);
    assert_eq!(count(&status, "pending"), 5);
    let job = status["job_id"].as_i64().unwrap().to_string();
    let (code, resumed) = fleet.push(&["resume", &job]);
    assert_eq!(code, 0, "{resumed}");
    assert_eq!(resumed["state"], "done");
    assert_eq!(count(&resumed, "ok"), 6);
    // Every host was asked once, the canary's attempt is not repeated.
    assert_eq!(
        sql(
            &fleet.setup.home,
            &format!("SELECT count(*) FROM job_results WHERE job_id = {job} AND result = 'ok'")
        ),
        ["6"]
    );
    let (_, status) = fleet.push(&["status", &job]);
    assert_eq!(status["state"], "done");
}

#[test]
fn profile_license_and_scan_reach_every_target_with_a_result_per_host() {
    let setup = AgentSetup::new();
    let mut other = setup.add_agent("web-2", &["--group", "web"]);
    Pm::activate(&setup.home)
        .args(["profile", "new", "quick", "--set", "scan_archive=no"])
        .json();
    let push = |args: &[&str]| {
        let run = Pm::push(&setup.home).args(args).args(["--json"]).run();
        (run.code(), run.json())
    };
    let (code, report) = push(&["profile", "quick"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["summary"]["ok"], 2);
    assert_eq!(report["changed"], true);
    let (_, again) = push(&["profile", "quick"]);
    assert_eq!(again["changed"], false, "{again}");
    let listed = Pm::activate(&setup.home).args(["list"]).json();
    assert!(
        listed["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["profile"] == "quick"),
        "{listed}"
    );
    let (code, _) = push(&["profile", "nope"]);
    assert_eq!(code, 2);

    let license = setup.tmp.path().join("site.lic");
    std::fs::write(&license, "LICENSE-ID=1\n").unwrap();
    let expires = (chrono::Utc::now() + chrono::Duration::days(30))
        .format("%Y-%m-%d")
        .to_string();
    let (code, report) = push(&[
        "license",
        license.to_str().unwrap(),
        "--expires",
        &expires,
        "--group",
        "web",
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["summary"]["targets"], 1,
        "only the web group: {report}"
    );
    let status = Pm::agent(&other.state()).args(["status"]).json();
    assert_eq!(status["license"]["file_name"], "site.lic");

    // A scan: the report comes back per host and lands in the inventory.
    setup.agent_cmd(&["update"]);
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), crate::support::EICAR).unwrap();
    let (code, report) = push(&[
        "scan",
        "--path",
        dir.to_str().unwrap(),
        "--host",
        "127.0.0.1",
    ]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report["hosts"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("infected: 1 finding"),
        "{report}"
    );
    assert_eq!(
        sql(&setup.home, "SELECT host, signature FROM scan_alerts"),
        ["127.0.0.1,Eicar-Test-Signature"]
    );

    // A target that does not answer: its own failed row, the others go on (exit 3).
    other.stop();
    let (code, report) = push(&["profile", "default"]);
    assert_eq!(code, 3, "{report}");
    let down = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "web-2")
        .unwrap();
    assert_eq!(down["result"], "failed");
    assert!(
        down["error"].as_str().unwrap().contains("unreachable"),
        "{down}"
    );
}

#[test]
fn ctrl_c_during_the_pause_stops_before_the_next_wave() {
    let fleet = Fleet::start(3);
    fleet.setup.publish(6);
    let mut child = Pm::push(&fleet.setup.home)
        .args(["update", "--wave-size", "1", "--pause", "20s", "--json"])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    fleet.wait_for_canary();
    // Meanwhile another rollout is refused: one at a time changes the fleet.
    let second = Pm::push(&fleet.setup.home).args(["update"]).run();
    assert_eq!(second.code(), 1, "{}", second.stderr());
    assert!(
        second.stderr().contains("another rollout"),
        "{}",
        second.stderr()
    );
    std::process::Command::new("kill")
        .args(["-s", "INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "pm-push did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(3), "stopped with one host done");
    let status = Pm::push(&fleet.setup.home).args(["status"]).json();
    assert_eq!(status["state"], "interrupted", "{status}");
    assert_eq!(count(&status, "ok"), 1);
    assert_eq!(
        count(&status, "pending"),
        2,
        "the next waves were not started"
    );
}

#[test]
fn a_rollout_followed_by_a_later_one_is_not_resumed_and_a_new_update_finishes_the_fleet() {
    let fleet = Fleet::start(2);
    let home = &fleet.setup.home;
    fleet.setup.publish(6);
    let mut child = Pm::push(home)
        .args(["update", "--wave-size", "1", "--pause", "3s", "--json"])
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    fleet.wait_for_canary();
    child.kill().unwrap();
    child.wait().unwrap();
    let status = Pm::push(home).args(["status"]).json();
    assert_eq!(status["state"], "interrupted", "{status}");
    let job = status["job_id"].as_i64().unwrap().to_string();
    let canary = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["result"] == "ok")
        .unwrap()["host"]
        .as_str()
        .unwrap()
        .to_string();
    // A later rollout takes the canary back to r1: the interrupted one's `ok` for it is stale,
    // and resuming it would report done with the canary behind.
    let back = Pm::rollback(home)
        .args(["--generation", "1", "--host", &canary])
        .json();
    assert_eq!(back["summary"]["ok"], 1, "{back}");
    let run = Pm::push(home).args(["resume", &job]).run();
    assert_eq!(run.code(), 2, "{}{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains("was followed by rollout") && run.stderr().contains("hint: "),
        "{}",
        run.stderr()
    );
    // Rolled back alone (dist stays), the canary is held there until released.
    let (code, report) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(count(&report, "held"), 1, "{report}");
    let (code, _) = fleet.push(&["release", "--host", &canary]);
    assert_eq!(code, 0);
    let (code, report) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(count(&report, "ok"), 1, "{report}");
    assert_eq!(
        sql(
            home,
            "SELECT count(*) FROM fleet_status WHERE host LIKE 'lab-%' AND installed_revision = 'r2'"
        ),
        ["2"]
    );
}

#[test]
fn an_update_with_every_host_on_dist_ends_its_job_and_every_job_ends_after_it_started() {
    let setup = AgentSetup::new();
    let home = &setup.home;
    let first = Pm::push(home).args(["update"]).json();
    assert_eq!(first["summary"]["ok"], 1, "{first}");
    // The idempotent re-run (the Ansible rollout does one every time): nothing to ask.
    for _ in 0..2 {
        let again = Pm::push(home).args(["update"]).json();
        assert_eq!(again["state"], "done", "{again}");
        assert_eq!(again["summary"]["skipped"], 1, "{again}");
        let status = Pm::push(home).args(["status"]).run();
        assert_eq!(status.code(), 0, "{}", status.stderr());
        assert!(
            status.stdout().contains(": done"),
            "the re-run is done, not interrupted: {}",
            status.stdout()
        );
        assert!(
            !status.stderr().contains("resume"),
            "nothing to resume: {}",
            status.stderr()
        );
    }
    // Every other kind of job that writes the jobs table from pm-push and pm-rollback.
    setup.publish(6);
    Pm::push(home).args(["update"]).json();
    Pm::rollback(home)
        .args(["--host", "127.0.0.1", "--to", "backup:1"])
        .json();
    Pm::push(home).args(["profile", "default"]).json();
    assert_eq!(
        sql(
            home,
            "SELECT count(*) FROM rollouts WHERE state = 'running'"
        ),
        ["0"]
    );
    assert_eq!(
        sql(
            home,
            "SELECT count(*) FROM jobs WHERE finished_at IS NULL OR finished_at < started_at"
        ),
        ["0"],
        "{:?}",
        sql(
            home,
            "SELECT id, kind, started_at, finished_at, status FROM jobs"
        )
    );
}
