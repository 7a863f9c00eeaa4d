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

#[test]
fn reports_made_after_an_agents_state_is_restored_from_a_snapshot_are_recorded_once() {
    let mut setup = AgentSetup::new();
    let clean = setup.tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("a.txt"), "hello\n").unwrap();
    let infected = setup.tmp.path().join("infected");
    std::fs::create_dir_all(&infected).unwrap();
    std::fs::write(infected.join("eicar.com"), EICAR).unwrap();
    let clean = clean.to_str().unwrap();

    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    let (code, report) = push(&setup, &["scan", "--path", clean, "--all"]);
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
        let (code, report) = push(&setup, &["scan", "--path", clean, "--all"]);
        assert_eq!(code, 0, "{report}");
    }
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM scan_history"), ["4"]);

    // The snapshot is restored: the agent's report numbers go back, in the same stream.
    kill_agent(&mut setup);
    std::fs::remove_dir_all(setup.state()).unwrap();
    copy_tree(&snapshot, &setup.state());
    setup.run_agent();
    let infected = infected.to_str().unwrap();
    let (code, report) = push(&setup, &["scan", "--path", infected, "--all"]);
    assert_eq!(code, 0, "{report}");
    // The restored agent is back on r1: the push installs dist again.
    let (code, report) = push(&setup, &["update", "--all"]);
    assert_eq!(code, 0, "{report}");
    for _ in 0..2 {
        let run = Pm::poll(&setup.home).args(["--json"]).run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
    }

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
