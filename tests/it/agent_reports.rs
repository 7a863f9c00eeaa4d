//! Issue 16, red team A items 1, 11, 12 and 13, on real agents: what an agent reports is what
//! happened on the host. Reports made after its state was restored from a snapshot reach the
//! inventory once; a scan whose engine scanned none of the files its paths hold, or that could
//! not reach a path (a dangling link, a directory past the engine's depth limit), is not
//! `clean`; a missing path fails a scan that found something elsewhere; database files removed
//! by hand show in the poll and make the next push install again.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{AgentSetup, EICAR, Pm, sql};

/// `pm-push ARGS --json` on the setup's manager: exit code and the one JSON document.
fn push(setup: &AgentSetup, args: &[&str]) -> (i32, Value) {
    let run = Pm::push(&setup.home).args(args).args(["--json"]).run();
    (run.code(), run.json())
}

/// Stops the setup's agent the hard way (a VM powered off or snapshotted).
fn kill_agent(setup: &mut AgentSetup) {
    if let Some(mut child) = setup.agent.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `cp -a FROM TO`: a copy as a backup tool or a VM snapshot keeps it (modes, times).
fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .args([from, to])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// Two `pm-poll` runs: what the first takes, the second must not take again.
fn poll_twice(setup: &AgentSetup) {
    for _ in 0..2 {
        let run = Pm::poll(&setup.home).args(["--json"]).run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
    }
}

/// A host whose agent's state is restored from a snapshot after the manager recorded four
/// reports made since (an install run and three clean scans): the setup, a clean and an
/// infected directory.
fn restored_after_four_reports() -> (AgentSetup, String, String) {
    let mut setup = AgentSetup::new();
    let clean = setup.tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("a.txt"), "hello\n").unwrap();
    let infected = setup.tmp.path().join("infected");
    std::fs::create_dir_all(&infected).unwrap();
    std::fs::write(infected.join("eicar.com"), EICAR).unwrap();
    let clean = clean.to_str().unwrap().to_string();

    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    let (code, report) = push(&setup, &["scan", "--path", &clean, "--all"]);
    assert_eq!(code, 0, "{report}");

    // The snapshot: the VM is stopped and its disk copied.
    kill_agent(&mut setup);
    let snapshot = setup.tmp.path().join("snapshot");
    copy_tree(&setup.state(), &snapshot);
    setup.run_agent();
    setup.publish(4);
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    for _ in 0..3 {
        let (code, report) = push(&setup, &["scan", "--path", &clean, "--all"]);
        assert_eq!(code, 0, "{report}");
    }
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM scan_history"), ["4"]);

    // The snapshot is restored: the agent's report numbers go back, in the same stream.
    kill_agent(&mut setup);
    std::fs::remove_dir_all(setup.state()).unwrap();
    copy_tree(&snapshot, &setup.state());
    setup.run_agent();
    let infected = infected.to_str().unwrap().to_string();
    (setup, clean, infected)
}

#[test]
fn reports_made_after_an_agents_state_is_restored_from_a_snapshot_are_recorded_once() {
    let (setup, _, infected) = restored_after_four_reports();
    let (code, report) = push(&setup, &["scan", "--path", &infected, "--all"]);
    assert_eq!(code, 0, "{report}");
    // The restored agent is back on r1: the push installs dist again.
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    poll_twice(&setup);

    assert_eq!(
        sql(
            &setup.home,
            "SELECT result, findings FROM scan_history ORDER BY started_at"
        ),
        ["clean,0", "clean,0", "clean,0", "clean,0", "infected,1"],
        "the scan made after the restore is recorded, and nothing twice"
    );
    assert_eq!(
        sql(&setup.home, "SELECT count(*) FROM scan_alerts"),
        ["1"],
        "its finding is an alert"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT last_scan_result, last_scan_findings, scan_colour, installed_revision FROM fleet_status"
        ),
        ["infected,1,red,r2"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT revision FROM update_history ORDER BY started_at"
        ),
        ["r1", "r2", "r2"],
        "the install run made after the restore is recorded too, once"
    );
}

#[test]
fn reports_made_after_a_restore_are_recorded_even_when_they_outnumber_the_reports_it_lost() {
    let (setup, clean, infected) = restored_after_four_reports();
    // Before any poll, the restored agent makes more reports than the restore took back (its
    // numbers pass the manager's cursor again): EICAR first, then clean scans.
    for path in [&infected, &clean, &clean, &clean, &clean] {
        Pm::agent(&setup.state())
            .args(["scan", path.as_str(), "--json"])
            .run();
    }
    poll_twice(&setup);
    assert_eq!(
        sql(
            &setup.home,
            "SELECT result, count(*) FROM scan_history GROUP BY result ORDER BY result"
        ),
        ["clean,8", "infected,1"],
        "every scan once: four from before the restore, five after"
    );
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM scan_alerts"), ["1"]);
}

/// `dir/d1/d2/.../dN` made, with EICAR at the bottom; the bottom directory.
fn eicar_levels_down(dir: &Path, levels: usize) -> std::path::PathBuf {
    let mut deep = dir.to_owned();
    for level in 1..=levels {
        deep.push(format!("d{level}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("eicar.com"), EICAR).unwrap();
    deep
}

#[test]
fn a_scan_that_could_not_reach_the_files_of_its_paths_is_not_clean() {
    let setup = AgentSetup::new();
    setup.publish(6);
    setup.agent_cmd(&["update"]);

    // EICAR 16 directories down: clamscan's own limit (15) used to skip it in silence.
    let deep = setup.tmp.path().join("deep");
    eicar_levels_down(&deep, 16);
    let (code, report) = push(&setup, &["scan", "--path", deep.to_str().unwrap(), "--all"]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report["hosts"][0]["detail"]
            .as_str()
            .is_some_and(|m| m.starts_with("infected: 1 finding(s), 1 file(s) scanned")),
        "{report}"
    );

    // Deeper than the agent's limit: the scan says what it left, and fails.
    let deeper = setup.tmp.path().join("deeper");
    eicar_levels_down(&deeper, 257);
    let (code, report) = push(
        &setup,
        &["scan", "--path", deeper.to_str().unwrap(), "--all"],
    );
    assert_eq!(code, 3, "{report}");
    let error = report["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is more than 256 directory levels below the path asked for"),
        "{report}"
    );

    // A link whose target is not mounted is a path that is not there.
    let link = setup.tmp.path().join("data-link");
    std::os::unix::fs::symlink("/mnt/not-mounted", &link).unwrap();
    let (code, report) = push(&setup, &["scan", "--path", link.to_str().unwrap(), "--all"]);
    assert_eq!(code, 3, "a scan of nothing is failed: {report}");
    let error = report["hosts"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is a link to `/mnt/not-mounted`, which does not resolve"),
        "{report}"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT result, findings FROM scan_history ORDER BY started_at"
        ),
        ["infected,1", "error,0", "error,0"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT last_scan_result, scan_colour FROM fleet_status"
        ),
        ["error,red"],
        "never green: the last complete scan found EICAR"
    );
}

#[test]
fn a_missing_path_fails_a_scan_that_found_something_in_another_path() {
    let setup = AgentSetup::new();
    setup.publish(6);
    setup.agent_cmd(&["update"]);
    let infected = setup.tmp.path().join("infected");
    std::fs::create_dir_all(&infected).unwrap();
    std::fs::write(infected.join("eicar.com"), EICAR).unwrap();
    let (code, report) = push(
        &setup,
        &[
            "scan",
            "--path",
            "/does/not/exist",
            "--path",
            infected.to_str().unwrap(),
            "--all",
        ],
    );
    assert_eq!(code, 3, "{report}");
    let host = &report["hosts"][0];
    assert_eq!(host["result"], "failed", "{host}");
    assert!(
        host["error"].as_str().is_some_and(
            |e| e.contains("`/does/not/exist` does not exist") && e.contains("1 finding(s)")
        ),
        "the error names the path and the findings: {host}"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT result, findings, error LIKE '%/does/not/exist%' FROM scan_history"
        ),
        ["error,1,true"]
    );
    assert_eq!(
        sql(&setup.home, "SELECT count(*) FROM scan_alerts"),
        ["1"],
        "what it found is still an alert"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT last_scan_findings, scan_colour FROM fleet_status"
        ),
        ["1,red"]
    );
}

#[test]
fn database_files_removed_on_the_host_show_in_the_poll_and_the_next_push_installs_them_again() {
    let setup = AgentSetup::new();
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    let status = || {
        let run = Pm::poll(&setup.home).args(["--json"]).run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
        sql(
            &setup.home,
            "SELECT coalesce(installed_revision, '-'), versions, version_colour FROM fleet_status",
        )
    };
    assert_eq!(status(), ["r1,test 3/3,green"]);

    // Someone empties the database directory by hand.
    for entry in std::fs::read_dir(setup.db()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    assert_eq!(
        status(),
        ["-,test -/3,red"],
        "the poll shows what the directory holds, not what was installed"
    );
    let status_text = Pm::agent(&setup.state()).args(["status"]).run().stdout();
    assert!(
        status_text.contains("`test.cvd` is missing from"),
        "pm-agent status says it too: {status_text}"
    );

    // The push does not skip the host: it installs dist again.
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["hosts"][0]["result"], "ok", "{report}");
    assert!(setup.db().join("test.cvd").is_file());
    assert_eq!(status(), ["r1,test 3/3,green"]);
}
