//! `pm-rollback` on real agents: the fleet back to a backup generation only when every target
//! did it (OK == Total), and one host back to a local backup or a served revision.

use serde_json::Value;

use crate::agent_install::sigtool_version;
use crate::push::Fleet;
use crate::support::{AgentSetup, Pm, sql};

fn rollback(setup: &AgentSetup, args: &[&str]) -> (i32, Value) {
    let run = Pm::rollback(&setup.home).args(args).args(["--json"]).run();
    (run.code(), run.json())
}

fn results(report: &Value) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[test]
fn a_fleet_rollback_rotates_dist_back_only_when_every_target_did_it() {
    let fleet = Fleet::start(4);
    fleet.setup.publish(6);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");

    // One agent does not answer: the others roll back, dist stays, the output names it.
    let pid = fleet.lab["agents"][3]["pid"].as_u64().unwrap();
    std::process::Command::new("kill")
        .args(["-s", "STOP", &pid.to_string()])
        .status()
        .unwrap();
    let (code, report) = rollback(&fleet.setup, &["--generation", "1", "--timeout", "3s"]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["dist_rolled_back"], false);
    assert_eq!(report["dist_before"], "r2");
    assert_eq!(report["dist_after"], "r2");
    assert_eq!(
        results(&report),
        [
            ("lab-000".into(), "ok".into()),
            ("lab-001".into(), "ok".into()),
            ("lab-002".into(), "ok".into()),
            ("lab-003".into(), "failed".into()),
        ]
    );
    let run = Pm::rollback(&fleet.setup.home)
        .args(["--generation", "1", "--timeout", "3s"])
        .run();
    assert!(
        run.stderr().contains("dist stays at r2") && run.stderr().contains("lab-003"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        sql(
            &fleet.setup.home,
            "SELECT action, revision FROM dist_history ORDER BY id DESC LIMIT 1"
        ),
        ["publish,r2"],
        "dist did not move"
    );

    // Once it answers again, the same command finishes: the three already on r1 are skipped.
    std::process::Command::new("kill")
        .args(["-s", "CONT", &pid.to_string()])
        .status()
        .unwrap();
    let (code, report) = rollback(&fleet.setup, &["--generation", "1"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["dist_rolled_back"], true);
    assert_eq!(report["dist_after"], "r1");
    assert_eq!(report["summary"]["skipped"], 3);
    for n in 0..4 {
        let db = fleet.dir.join(format!("agent-{n:03}-db"));
        assert_eq!(
            sigtool_version(&db),
            "3",
            "agent {n} shows the older version"
        );
    }
    // The rolled-back revision is not re-pushed: dist is r1, so an update changes nothing,
    // and publishing r2 again needs `--again`.
    let (code, again) = fleet.push(&["update"]);
    assert_eq!(code, 0);
    assert_eq!(again["changed"], false, "{again}");
    let run = Pm::mirror(&fleet.setup.home).args(["publish"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("--again"), "{}", run.stderr());
}

#[test]
fn one_host_rolls_back_to_a_local_backup_or_a_served_revision() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    setup.publish(6);
    setup.agent_cmd(&["update"]);
    let (code, report) = rollback(&setup, &["--host", "127.0.0.1", "--to", "backup:1"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["result"], "ok");
    assert_eq!(report["report"]["revision"], "r1");
    assert_eq!(sigtool_version(&setup.db()), "3");
    let (code, report) = rollback(&setup, &["--host", "127.0.0.1", "--to", "r2"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["report"]["revision"], "r2");
    assert_eq!(sigtool_version(&setup.db()), "6");
    let (code, report) = rollback(&setup, &["--host", "127.0.0.1", "--to", "r1"]);
    assert_eq!(code, 0, "served as backup/1: {report}");
    assert_eq!(sigtool_version(&setup.db()), "3");
    let (code, _) = rollback(&setup, &["--host", "127.0.0.1", "--to", "r9"]);
    assert_eq!(code, 2);
    let (code, _) = rollback(&setup, &["--host", "127.0.0.1", "--to", "backup:7"]);
    assert_eq!(code, 2);
    assert_eq!(
        sql(&setup.home, "SELECT installed_revision FROM fleet_status"),
        ["r1"],
        "the host's state was polled after each rollback"
    );
    // Part of the fleet: the host rolls back (here it is there already), dist stays.
    let (code, report) = rollback(&setup, &["--generation", "1", "--host", "127.0.0.1"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["targets_ok"], true);
    assert_eq!(report["dist_rolled_back"], false);
    // No target, no rollback: dist does not move on an empty selection.
    let (code, report) = rollback(&setup, &["--generation", "1", "--group", "nope"]);
    assert_eq!(code, 2, "{report}");
    assert_eq!(
        sql(
            &setup.home,
            "SELECT action FROM dist_history ORDER BY id DESC LIMIT 1"
        ),
        ["publish"]
    );
}

#[test]
fn a_fleet_rollback_stopped_by_a_failed_host_names_the_same_pm_rollback_as_next_step_and_it_works()
{
    let fleet = Fleet::start(3);
    let home = &fleet.setup.home;
    fleet.setup.publish(6);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    fleet.break_agent(1);
    let run = Pm::rollback(home)
        .args(["--generation", "1", "--wave-size", "1"])
        .run();
    assert_eq!(run.code(), 3, "{}{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    // Not `pm-push resume` (refused for a rollback), not `pm-push update` (it would undo it).
    assert!(
        !stderr.contains("pm-push resume") && !stderr.contains("pm-push update"),
        "{stderr}"
    );
    let next = stderr
        .lines()
        .filter(|l| l.starts_with("hint: "))
        .find_map(|l| {
            let start = l.find("`pm-rollback ")? + 1;
            let end = start + l[start..].find('`')?;
            Some(l[start..end].to_string())
        })
        .unwrap_or_else(|| panic!("no `pm-rollback ...` in a hint: {stderr}"));
    let status = Pm::push(home)
        .args(["status", &sql(home, "SELECT max(job_id) FROM rollouts")[0]])
        .run();
    assert!(
        status.stderr().contains(&next) && !status.stderr().contains("pm-push resume"),
        "pm-push status names the same next step: {}",
        status.stderr()
    );

    // The step printed is the step that works.
    fleet.mend_agent(1);
    let words = shlex::split(&next).unwrap();
    assert_eq!(words[0], "pm-rollback");
    let again = Pm::new("pm-rollback")
        .args(&words[1..])
        .args(["--json"])
        .run();
    assert_eq!(again.code(), 0, "{next}: {}", again.stderr());
    let report = again.json();
    assert_eq!(report["dist_rolled_back"], true, "{report}");
    for n in 0..3 {
        let db = fleet.dir.join(format!("agent-{n:03}-db"));
        assert_eq!(sigtool_version(&db), "3", "agent {n}");
    }
}

/// Red team A item 5 (found before the mirror part's fix; kept as the fleet path's guard):
/// after a fleet rollback latest is the rolled-back revision, every routine publish refuses it,
/// and one must still re-sign dist, or agents refuse dist once `dist_valid_for` passed.
#[test]
fn after_a_fleet_rollback_a_refused_publish_re_signs_dist_and_agents_accept_it() {
    let setup = AgentSetup::new();
    let config = std::fs::read_to_string(setup.home.path().join("pm.toml")).unwrap();
    setup
        .home
        .config(&format!("{config}\n[serve]\ndist_valid_for = \"14s\"\n"));
    setup.publish(4);
    let run = Pm::push(&setup.home).args(["update", "--all"]).run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let (code, report) = rollback(&setup, &["--generation", "1"]);
    assert_eq!(code, 0, "{report}");
    let rolled_back = std::time::Instant::now();
    let statement = || -> Value {
        serde_json::from_slice(&std::fs::read(setup.home.repo("view/dist.json")).unwrap()).unwrap()
    };
    let signed = statement();
    assert_eq!(signed["revision"], "r1", "{signed}");

    // The sync timer's publish, once a seventh of the validity passed: refused, re-signed.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let run = Pm::mirror(&setup.home).args(["publish"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("was rolled back"), "{}", run.stderr());
    let re_signed = statement();
    assert_eq!(re_signed["revision"], "r1");
    assert!(
        re_signed["dist_serial"].as_u64() > signed["dist_serial"].as_u64(),
        "{signed} -> {re_signed}"
    );

    // Past the rollback's statement, the agent still takes dist (the re-signed one).
    std::thread::sleep(
        std::time::Duration::from_millis(14_500).saturating_sub(rolled_back.elapsed()),
    );
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["revision"], "r1", "{report}");
}

/// Three hosts on dist r3 (test 5), backup/1 r2 (test 4).
fn fleet_on_r3() -> Fleet {
    let fleet = Fleet::start(3);
    for version in [4, 5] {
        fleet.setup.publish(version);
        let (code, pushed) = fleet.push(&["update"]);
        assert_eq!(code, 0, "{pushed}");
    }
    fleet
}

/// Red team A, item 2: a fleet rollback that did not finish, then the sync timer's publish.
#[test]
fn a_publish_during_an_unfinished_fleet_rollback_makes_running_it_again_refused_with_what_to_do() {
    let fleet = fleet_on_r3();
    let home = &fleet.setup.home;
    // dist r3 (test 5), backup/1 r2 (test 4). One host cannot install: the rollback runs its
    // waves (one failure allowed) and ends with that host behind.
    fleet.break_agent(2);
    let (code, report) = rollback(&fleet.setup, &["--generation", "1", "--max-failures", "1"]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(
        (&report["revision"], &report["state"]),
        (&"r2".into(), &"done".into())
    );
    let job = report["job_id"].as_i64().unwrap().to_string();
    let status = Pm::push(home).args(["status", &job]).run();
    assert!(
        status.stderr().contains("run the same pm-rollback again")
            && status.stderr().contains("--generation 1 --max-failures 1"),
        "pm-push status names the next step of a rollback that left a host behind: {}",
        status.stderr()
    );
    // The sync timer publishes test 6: dist r4, backup/1 r3 (the revision rolled back from).
    fleet.setup.lab.upstream.set_version(6).unwrap();
    Pm::mirror(home).args(["sync"]).json();
    let published = Pm::mirror(home).args(["publish"]).run();
    assert_eq!(published.code(), 0, "{}", published.stderr());
    assert!(
        published
            .stderr()
            .contains(&format!("fleet rollback job {job} to r2 has not finished")),
        "publish warns: {}",
        published.stderr()
    );
    fleet.mend_agent(2);

    // The printed next step, run again: refused, nothing moves, and it says what to do.
    let again = Pm::rollback(home).args(["--generation", "1"]).run();
    assert_eq!(again.code(), 2, "{}{}", again.stdout(), again.stderr());
    let stderr = again.stderr();
    assert!(
        stderr.contains("would now install r3, the revision it was rolling back from, not r2")
            && stderr.contains("--generation 2")
            && stderr.contains("lab-000, lab-001"),
        "{stderr}"
    );
    assert_eq!(
        sql(
            home,
            "SELECT action, revision FROM dist_history ORDER BY id DESC LIMIT 1"
        ),
        ["publish,r4"],
        "dist did not move"
    );
    assert_eq!(
        sql(
            home,
            "SELECT host, kind, revision FROM host_holds ORDER BY host"
        ),
        ["lab-000,fleet-rollback,r2", "lab-001,fleet-rollback,r2"],
        "the hosts it moved stay held"
    );
    let status = Pm::push(home).args(["status", &job]).run();
    assert!(
        status.stderr().contains("would now install r3")
            && status.stderr().contains("--generation 2")
            && !status.stderr().contains("run the same pm-rollback again"),
        "pm-push status says so too: {}",
        status.stderr()
    );

    // The step it names finishes the rollback to r2.
    let (code, report) = rollback(&fleet.setup, &["--generation", "2"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["dist_rolled_back"], true, "{report}");
    assert_eq!(report["dist_after"], "r2");
    for n in 0..3 {
        let db = fleet.dir.join(format!("agent-{n:03}-db"));
        assert_eq!(sigtool_version(&db), "4", "agent {n}");
    }
}

/// Red team A, item 15: the dry run says what the real run then does to dist.
#[test]
fn a_dry_run_of_a_fleet_rollback_predicts_the_dist_the_real_run_leaves() {
    let setup = AgentSetup::new();
    Pm::push(&setup.home).args(["update"]).json();
    setup.publish(6);
    Pm::push(&setup.home).args(["update"]).json();
    // Every host held: nothing to ask, and dist still rotates back.
    Pm::push(&setup.home)
        .args(["hold", "--all", "--reason", "x"])
        .json();
    let (code, part) = rollback(
        &setup,
        &["--generation", "1", "--host", "127.0.0.1", "--dry-run"],
    );
    assert_eq!(code, 0, "{part}");
    assert_eq!(
        (&part["dist_rolled_back"], &part["dist_after"]),
        (&false.into(), &"r2".into()),
        "part of the fleet: dist stays: {part}"
    );
    let (code, planned) = rollback(&setup, &["--generation", "1", "--dry-run"]);
    assert_eq!(code, 0, "{planned}");
    let text = Pm::rollback(&setup.home)
        .args(["--generation", "1", "--dry-run"])
        .run();
    assert!(
        text.stdout().contains("dist would roll back: r2 -> r1"),
        "{}",
        text.stdout()
    );
    let (code, done) = rollback(&setup, &["--generation", "1"]);
    assert_eq!(code, 0, "{done}");
    assert_eq!(done["dist_after"], "r1", "{done}");
    for field in ["dist_rolled_back", "dist_before", "dist_after"] {
        assert_eq!(planned[field], done[field], "{field}: {planned} / {done}");
    }
}

/// Red team C, item 3: a fleet rollback that stopped, then a publish, then the rollback
/// finished by naming the generation that serves its revision now (another job): the first
/// job is finished, and its status offers no command (the one it was run with would now roll
/// dist back further).
#[test]
fn a_stopped_fleet_rollback_finished_by_another_run_is_finished_and_names_no_next_step() {
    let fleet = fleet_on_r3();
    let home = &fleet.setup.home;
    fleet.break_agent(2);
    let (code, report) = rollback(&fleet.setup, &["--generation", "1", "--wave-size", "1"]);
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["revision"], "r2", "{report}");
    let job = report["job_id"].as_i64().unwrap().to_string();
    fleet.setup.lab.upstream.set_version(6).unwrap();
    Pm::mirror(home).args(["sync"]).json();
    let published = Pm::mirror(home).args(["publish"]).run();
    assert_eq!(published.code(), 0, "{}", published.stderr());
    fleet.mend_agent(2);
    let (code, finished) = rollback(&fleet.setup, &["--generation", "2"]);
    assert_eq!(code, 0, "{finished}");
    assert_eq!(finished["dist_after"], "r2", "{finished}");

    let status = Pm::push(home).args(["status", &job]).run();
    let stderr = status.stderr();
    assert!(
        !stderr.contains("pm-rollback --generation") && !stderr.contains("hint:"),
        "no next step once dist is its revision: {stderr}"
    );
    assert!(stderr.contains("it is finished"), "{stderr}");
    let json = Pm::push(home).args(["status", &job, "--json"]).run().json();
    assert_eq!(json["finished"], true, "{json}");
    assert!(json.get("next_step").is_none(), "{json}");
}

/// Red team C, item 10: a rollback with target flags is not a fleet rollback: it never makes
/// publish warn, nor refuses another one, once it is done.
#[test]
fn a_rollback_of_part_of_the_fleet_is_never_an_unfinished_fleet_rollback() {
    let fleet = Fleet::start(2);
    let home = &fleet.setup.home;
    fleet.setup.publish(5);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    let (code, report) = rollback(&fleet.setup, &["--generation", "1", "--host", "lab-000"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["state"], "done", "{report}");

    fleet.setup.lab.upstream.set_version(6).unwrap();
    Pm::mirror(home).args(["sync"]).json();
    let published = Pm::mirror(home).args(["publish"]).run();
    assert_eq!(published.code(), 0, "{}", published.stderr());
    assert!(
        !published.stderr().contains("has not finished"),
        "publish does not warn about a rollback of part of the fleet: {}",
        published.stderr()
    );
    let other = Pm::rollback(home)
        .args(["--generation", "1", "--host", "lab-001"])
        .run();
    assert_eq!(other.code(), 0, "{}{}", other.stdout(), other.stderr());
    assert!(
        !other.stderr().contains("dist rotates"),
        "{}",
        other.stderr()
    );
}
