//! Holds (issue 16): a host rolled back by hand stays where it was put, on its own schedule,
//! through pushes, rollouts and restarts, until `pm-push release`; holds set on purpose with
//! `pm-push hold [--until]` end by themselves on the manager and on the agent, also when the
//! agent's clock is off; rollouts report held hosts as `held`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::push::Fleet;
use crate::support::{AgentSetup, Pm, bin, spawn_agent_command, sql};

/// The revision the agent in `state` has installed, as its own record says.
fn installed(state: &Path) -> String {
    Pm::agent(state).args(["status"]).json()["installed_revision"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits (at most `seconds`) until the agent in `state` has `revision` installed.
fn wait_installed(state: &Path, revision: &str, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        if installed(state) == revision {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The agent stays on `revision` for `seconds` (its schedule fires every second meanwhile).
fn stays_on(state: &Path, revision: &str, seconds: u64, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        assert_eq!(installed(state), revision, "{context}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn host_result<'a>(report: &'a Value, host: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("{host} not in {report}"))
}

/// The agent installed r1 (test 3), then r2 (test 6) on its schedule, which installs dist
/// every second.
fn every_second_on_r2(setup: &AgentSetup) {
    Pm::agent(&setup.state()).args(["update"]).json();
    Pm::push(&setup.home)
        .args(["schedule", "--update", "* * * * * *"])
        .json();
    setup.publish(6);
    assert!(
        wait_installed(&setup.state(), "r2", 20),
        "the schedule did not install r2"
    );
}

#[test]
fn a_host_rolled_back_by_hand_stays_held_through_its_schedule_pushes_and_restarts_until_released() {
    let mut setup = AgentSetup::new();
    let state = setup.state();
    every_second_on_r2(&setup);
    let back = Pm::rollback(&setup.home)
        .args(["--host", "127.0.0.1", "--to", "backup:1"])
        .json();
    assert_eq!(back["report"]["revision"], "r1", "{back}");
    // Its schedule (every second) leaves it there.
    stays_on(
        &state,
        "r1",
        2,
        "the schedule rolled the host forward again",
    );
    let status = Pm::agent(&state).args(["status"]).json();
    assert_eq!(status["hold"]["kind"], "rollback", "{status}");

    // A fleet push leaves it there too and says why.
    let pushed = Pm::push(&setup.home).args(["update"]).json();
    assert_eq!(pushed["state"], "done", "{pushed}");
    assert_eq!(pushed["summary"]["held"], 1, "{pushed}");
    assert_eq!(pushed["changed"], false, "{pushed}");
    let line = host_result(&pushed, "127.0.0.1");
    assert_eq!(line["result"], "held", "{pushed}");
    assert_eq!(
        line["wave"],
        Value::Null,
        "a held host is in no wave: {pushed}"
    );
    assert!(
        line["error"].as_str().unwrap().contains("backup:1"),
        "the reason names the rollback: {pushed}"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT held, hold_kind, installed_revision FROM fleet_status"
        ),
        ["true,rollback,r1"]
    );
    assert_eq!(
        sql(&setup.home, "SELECT count(*) FROM stale_hosts"),
        ["0"],
        "a held host behind dist is held there on purpose, not stale"
    );

    // A restart of the agent keeps the hold (it is on disk).
    if let Some(mut child) = setup.agent.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    setup.run_agent();
    stays_on(&state, "r1", 2, "the restarted agent forgot its hold");

    // Released, the host follows dist again: its schedule installs r2 by itself.
    let released = Pm::push(&setup.home)
        .args(["release", "--host", "127.0.0.1"])
        .json();
    assert_eq!(released["changed"], true, "{released}");
    assert!(wait_installed(&state, "r2", 20), "released, not updated");
    assert_eq!(
        Pm::agent(&state).args(["status"]).json()["hold"],
        Value::Null
    );
    assert_eq!(sql(&setup.home, "SELECT held FROM fleet_status"), ["false"]);
    let again = Pm::push(&setup.home)
        .args(["release", "--host", "127.0.0.1"])
        .json();
    assert_eq!(again["changed"], false, "releasing twice changes nothing");
}

/// `pm-agent run` under libfaketime, its clock `offset` from the machine's: preloaded into
/// pm-agent itself (not the `faketime` wrapper, whose child would outlive a kill).
pub(crate) fn spawn_agent_with_clock(state: &Path, addr: SocketAddr, offset: &str) -> Child {
    let mut command = Command::new(bin("pm-agent"));
    command
        .arg("--state")
        .arg(state)
        .arg("run")
        .env_remove("PM_AGENT_STATE")
        .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    spawn_agent_command(command, addr)
}

#[test]
fn a_hold_until_a_time_ends_by_itself_on_the_manager_and_on_an_agent_an_hour_ahead() {
    let mut setup = AgentSetup::new();
    let state = setup.state();
    // The agent's clock runs an hour ahead of the manager's.
    if let Some(mut child) = setup.agent.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    setup.agent = Some(spawn_agent_with_clock(&state, setup.addr, "+1h"));
    Pm::agent(&state).args(["update"]).json();
    setup.publish(6);
    assert_eq!(installed(&state), "r1");

    // A maintenance window of 8 seconds from now, by the manager's clock; then the agent's
    // schedule installs dist every second.
    let held = Pm::push(&setup.home)
        .args(["hold", "--until", "8s", "--reason", "change freeze"])
        .json();
    let set_at = Instant::now();
    assert_eq!(held["summary"]["ok"], 1, "{held}");
    Pm::push(&setup.home)
        .args(["schedule", "--update", "* * * * * *"])
        .json();
    assert_eq!(
        sql(&setup.home, "SELECT held, hold_reason FROM fleet_status"),
        ["true,change freeze"]
    );
    // The agent took the hold by its own clock, an hour ahead.
    let status = Pm::agent(&state).args(["status"]).json();
    let taken: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(status["hold"]["set_at"].clone()).unwrap();
    assert!(
        taken - chrono::Utc::now() > chrono::Duration::minutes(50),
        "the agent's clock is not ahead: {status}"
    );
    let pushed = Pm::push(&setup.home).args(["update"]).json();
    assert_eq!(host_result(&pushed, "127.0.0.1")["result"], "held");
    // The agent an hour ahead still holds: its window is 8 s of its own time, not a moment
    // already an hour past.
    let window = Duration::from_secs(8);
    while set_at.elapsed() + Duration::from_millis(1500) < window {
        assert_eq!(installed(&state), "r1", "the hold ended early on the agent");
        std::thread::sleep(Duration::from_millis(250));
    }
    // After the window both sides let go by themselves: the schedule installs dist.
    assert!(
        wait_installed(&state, "r2", 20),
        "the hold did not end on the agent"
    );
    assert_eq!(sql(&setup.home, "SELECT held FROM fleet_status"), ["false"]);
    let holds = Pm::push(&setup.home).args(["holds"]).json();
    assert_eq!(holds["holds"], serde_json::json!([]), "{holds}");

    // A time already past is refused, naming it.
    let run = Pm::push(&setup.home)
        .args(["hold", "--until", "2020-01-01"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("2020-01-01") && run.stderr().contains("hint: "),
        "{}",
        run.stderr()
    );
}

#[test]
fn rollouts_report_held_hosts_and_a_fleet_rollback_moves_dist_without_waiting_for_them() {
    let fleet = Fleet::start(3);
    let home = &fleet.setup.home;
    let state = |n: usize| fleet.dir.join(format!("agent-{n:03}"));
    let (code, first) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{first}");
    let (code, held) = fleet.push(&["hold", "--host", "lab-001", "--reason", "db migration"]);
    assert_eq!(code, 0, "{held}");
    fleet.setup.publish(6);

    let (code, pushed) = fleet.push(&["update", "--wave-size", "1"]);
    assert_eq!(code, 0, "held hosts are not failures: {pushed}");
    assert_eq!(pushed["state"], "done", "{pushed}");
    assert_eq!(pushed["summary"]["ok"], 2, "{pushed}");
    assert_eq!(pushed["summary"]["held"], 1, "{pushed}");
    assert_eq!(host_result(&pushed, "lab-001")["result"], "held");
    assert_eq!(installed(&state(1)), "r1");
    assert_eq!(
        sql(
            home,
            "SELECT wave, ok, held FROM rollout_progress WHERE job_id = (SELECT max(job_id) FROM rollouts) ORDER BY wave NULLS FIRST"
        ),
        ["NULL,0,1", "0,1,0", "1,1,0"]
    );

    // A fleet rollback leaves the held host alone, and it does not count against OK == Total:
    // dist moves back once every host that is not held is back.
    let (code, back) = {
        let run = Pm::rollback(home)
            .args(["--generation", "1", "--json"])
            .run();
        (run.code(), run.json())
    };
    assert_eq!(code, 0, "{back}");
    assert_eq!(back["dist_rolled_back"], true, "{back}");
    assert_eq!(back["summary"]["held"], 1, "{back}");
    assert_eq!(host_result(&back, "lab-001")["result"], "held");
    for n in [0, 2] {
        assert_eq!(installed(&state(n)), "r1");
    }
    // A hold the agent took itself (a rollback by hand on the host) is learnt by the next
    // push that meets it; the manager did not know it.
    Pm::mirror(home).args(["publish", "--again"]).json();
    let (code, _) = fleet.push(&["release", "--host", "lab-001"]);
    assert_eq!(code, 0);
    // lab-002 (on r1) stays on the manager's backup/1 (r1) by hand, on the host.
    Pm::agent(&state(2))
        .args(["update", "--generation", "1"])
        .json();
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    assert_eq!(host_result(&pushed, "lab-000")["result"], "ok", "{pushed}");
    assert_eq!(host_result(&pushed, "lab-001")["result"], "ok", "{pushed}");
    assert_eq!(
        host_result(&pushed, "lab-002")["result"],
        "held",
        "{pushed}"
    );
    assert_eq!(installed(&state(2)), "r1");
    assert_eq!(
        sql(
            home,
            "SELECT host, held FROM fleet_status WHERE host LIKE 'lab-%' ORDER BY host"
        ),
        ["lab-000,false", "lab-001,false", "lab-002,true"]
    );
    // `pm-agent update` by hand installs dist (the operator on the host asked for it) and the
    // host stays held.
    let run = Pm::agent(&state(2)).args(["update"]).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(run.stderr().contains("held"), "{}", run.stderr());
    assert_eq!(installed(&state(2)), "r2");
    assert_eq!(
        Pm::agent(&state(2)).args(["status"]).json()["hold"]["kind"],
        "rollback"
    );
}

/// One agent that installed r1 then r6, rolled back by hand (`pm-rollback --to backup:1`) to r1.
fn rolled_back_by_hand_to_r1() -> AgentSetup {
    let setup = AgentSetup::new();
    let state = setup.state();
    Pm::agent(&state).args(["update"]).json();
    setup.publish(6);
    Pm::agent(&state).args(["update"]).json();
    let back = Pm::rollback(&setup.home)
        .args(["--host", "127.0.0.1", "--to", "backup:1"])
        .json();
    assert_eq!(back["report"]["revision"], "r1", "{back}");
    setup
}

/// Red team A, item 9: a maintenance window over a host rolled back by hand.
#[test]
fn a_timed_hold_keeps_a_hand_rollbacks_hold_and_the_host_stays_rolled_back_when_it_ends() {
    let setup = rolled_back_by_hand_to_r1();
    let state = setup.state();
    let planned = Pm::push(&setup.home)
        .args(["hold", "--host", "127.0.0.1", "--until", "3s", "--dry-run"])
        .json();
    assert_eq!(
        planned["would_skip"],
        serde_json::json!(["127.0.0.1"]),
        "{planned}"
    );
    a_window_of_3s_is_skipped_for_the_rollback_hold(
        &setup,
        "maintenance window",
        "kept its rollback hold at r1",
    );
    // The window is over: the host is still held where it was rolled back to.
    std::thread::sleep(Duration::from_secs(4));
    let pushed = Pm::push(&setup.home).args(["update"]).json();
    assert_eq!(
        host_result(&pushed, "127.0.0.1")["result"],
        "held",
        "{pushed}"
    );
    assert_eq!(installed(&state), "r1", "the hand rollback was undone");
    assert_eq!(
        sql(&setup.home, "SELECT held, hold_kind FROM fleet_status"),
        ["true,rollback"]
    );
}

/// Red team A, item 14: the manager records a hold or a release whatever the agent answers.
#[test]
fn hold_release_and_license_of_a_host_that_does_not_answer_are_partial_and_changed() {
    let mut setup = AgentSetup::new();
    if let Some(mut agent) = setup.agent.take() {
        agent.kill().unwrap();
        agent.wait().unwrap();
    }
    let run = |args: &[&str]| {
        let run = Pm::push(&setup.home).args(args).args(["--json"]).run();
        (run.code(), run.json())
    };
    let (code, held) = run(&["hold", "--host", "127.0.0.1", "--until", "4h"]);
    assert_eq!(code, 3, "recorded on the manager, not on the agent: {held}");
    assert_eq!(held["changed"], true, "{held}");
    let line = host_result(&held, "127.0.0.1");
    assert_eq!(
        (&line["result"], &line["changed"]),
        (&"failed".into(), &true.into())
    );
    assert_eq!(
        sql(&setup.home, "SELECT kind, on_agent FROM host_holds"),
        ["hold,false"]
    );
    let (code, released) = run(&["release", "--host", "127.0.0.1"]);
    assert_eq!(code, 3, "{released}");
    assert_eq!(released["changed"], true, "{released}");
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM host_holds"), ["0"]);
    // Nothing left to change on the manager, and the agent still does not answer: failed.
    let (code, again) = run(&["release", "--host", "127.0.0.1"]);
    assert_eq!(code, 1, "{again}");
    assert_eq!(again["changed"], false, "{again}");
    // A license registered by the same command is a change on the manager too.
    let file = setup.tmp.path().join("site.lic");
    std::fs::write(&file, "LICENSE-ID=4711\n").unwrap();
    let license: [&str; 6] = [
        "license",
        file.to_str().unwrap(),
        "--expires",
        "2099-01-01",
        "--host",
        "127.0.0.1",
    ];
    let (code, sent) = run(&license);
    assert_eq!((code, &sent["changed"]), (3, &true.into()), "{sent}");
    let (code, again) = run(&license);
    assert_eq!((code, &again["changed"]), (1, &false.into()), "{again}");
}

/// Red team C, item 7: an agent that lost its rollback hold (state restored from before it) is
/// seen by the next poll, and `pm-push hold` gives the rollback hold back instead of skipping it.
#[test]
fn a_rollback_hold_the_agent_lost_is_seen_by_a_poll_and_given_back_by_pm_push_hold() {
    let mut setup = rolled_back_by_hand_to_r1();
    let state = setup.state();
    // The agent loses its hold, as a state restored from a snapshot taken before it would.
    if let Some(mut agent) = setup.agent.take() {
        agent.kill().unwrap();
        agent.wait().unwrap();
    }
    let file = state.join("setup.json");
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    saved["hold"] = Value::Null;
    std::fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();
    setup.run_agent();
    assert!(Pm::agent(&state).args(["status"]).json()["hold"].is_null());
    let polled = Pm::poll(&setup.home).args(["--host", "127.0.0.1"]).run();
    assert_eq!(polled.code(), 0, "{}", polled.stderr());
    assert!(
        polled
            .stderr()
            .contains("does not have the rollback hold the manager has in force"),
        "the poll says so: {}",
        polled.stderr()
    );
    assert_eq!(
        sql(&setup.home, "SELECT kind, on_agent FROM host_holds"),
        ["rollback,false"],
        "the manager must not say the agent has a hold it lost"
    );
    let run = Pm::push(&setup.home)
        .args(["hold", "--host", "127.0.0.1", "--reason", "re", "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let held = run.json();
    let line = host_result(&held, "127.0.0.1");
    assert_eq!(
        (&line["result"], &line["changed"]),
        (&"ok".into(), &true.into()),
        "{held}"
    );
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("gave back its rollback hold"),
        "{held}"
    );
    assert_eq!(
        Pm::agent(&state).args(["status"]).json()["hold"]["kind"],
        "rollback"
    );
    assert_eq!(
        sql(&setup.home, "SELECT kind, on_agent FROM host_holds"),
        ["rollback,true"]
    );
    // Given back, it is left alone again.
    let again = Pm::push(&setup.home)
        .args(["hold", "--host", "127.0.0.1", "--reason", "re"])
        .json();
    assert_eq!(
        host_result(&again, "127.0.0.1")["result"],
        "skipped",
        "{again}"
    );
    assert_eq!(installed(&state), "r1");
}

/// Red team C, item 13: a hold with no end does not read `released` in the `until` column.
#[test]
fn a_hold_with_no_end_reads_no_end_in_the_until_column_not_released() {
    let setup = AgentSetup::new();
    let run = Pm::push(&setup.home)
        .args(["hold", "--all", "--reason", "freeze"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let holds = Pm::push(&setup.home).args(["holds"]).run();
    assert_eq!(holds.code(), 0, "{}", holds.stderr());
    let row = holds
        .stdout()
        .lines()
        .find(|l| l.contains("freeze"))
        .unwrap_or_else(|| panic!("{}", holds.stdout()))
        .to_string();
    assert!(
        !row.contains("released") && row.contains("no end"),
        "{}",
        holds.stdout()
    );
}

/// An agent on r2 that the operator on the host rolled back to its backup 1 (r1) with
/// `pm-agent rollback`, which the manager does not know of.
fn rolled_back_on_the_host() -> AgentSetup {
    let setup = AgentSetup::new();
    let state = setup.state();
    Pm::agent(&state).args(["update"]).json();
    setup.publish(6);
    Pm::agent(&state).args(["update"]).json();
    let run = Pm::agent(&state)
        .args(["rollback", "--to", "backup:1"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    setup
}

/// `pm-push hold --until 3s --reason REASON` on the one host, held by a rollback: the host is
/// `skipped` with `detail` said, the note names it, and its agent keeps the rollback hold.
fn a_window_of_3s_is_skipped_for_the_rollback_hold(setup: &AgentSetup, reason: &str, detail: &str) {
    let state = setup.state();
    let run = Pm::push(&setup.home)
        .args(["hold", "--host", "127.0.0.1", "--until", "3s"])
        .args(["--reason", reason, "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let held = run.json();
    let line = host_result(&held, "127.0.0.1");
    assert_eq!(line["result"], "skipped", "said per host: {held}");
    assert_eq!(line["changed"], false, "{held}");
    assert!(line["detail"].as_str().unwrap().contains(detail), "{held}");
    assert!(
        run.stderr().contains("keep their rollback hold"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        Pm::agent(&state).args(["status"]).json()["hold"]["kind"],
        "rollback"
    );
}

/// Red team C, item 2: a window sent to an agent rolled back on the host itself
/// (`pm-agent rollback`), which the manager did not know of.
#[test]
fn a_window_over_a_rollback_by_hand_on_the_host_is_skipped_and_the_host_stays_rolled_back() {
    let setup = rolled_back_on_the_host();
    let state = setup.state();
    assert_eq!(installed(&state), "r1");
    a_window_of_3s_is_skipped_for_the_rollback_hold(&setup, "window2", "kept its rollback hold");
    // The manager learnt the agent's hold instead of recording the window.
    assert_eq!(
        sql(&setup.home, "SELECT held, hold_kind FROM fleet_status"),
        ["true,rollback"]
    );
    std::thread::sleep(Duration::from_secs(4));
    let pushed = Pm::push(&setup.home).args(["update"]).json();
    assert_eq!(
        host_result(&pushed, "127.0.0.1")["result"],
        "held",
        "{pushed}"
    );
    assert_eq!(installed(&state), "r1", "the hand rollback was undone");
}

/// Red team C, item 2: the manager learns a rollback the agent took itself from the next poll.
#[test]
fn a_poll_learns_a_rollback_taken_on_the_host() {
    let setup = rolled_back_on_the_host();
    assert_eq!(sql(&setup.home, "SELECT held FROM fleet_status"), ["false"]);
    let run = Pm::poll(&setup.home).args(["-q"]).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        sql(&setup.home, "SELECT held, hold_kind FROM fleet_status"),
        ["true,rollback"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT on_agent FROM holds WHERE released_at IS NULL"
        ),
        ["true"]
    );
}
