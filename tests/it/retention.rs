//! Retention (issue 16, day-2 operations): pm-poll prunes old polls by itself once a day, an
//! inventory's size is a metric, and what stays for ever can be bounded.

use std::time::{Duration, Instant};

use crate::support::*;

fn count(setup: &AgentSetup, sql_text: &str) -> i64 {
    sql(&setup.home, sql_text)[0].parse().unwrap()
}

fn poll_at(setup: &AgentSetup, now: Option<&str>) -> serde_json::Value {
    let mut pm = Pm::poll(&setup.home).args(["--json", "--timeout", "5s"]);
    if let Some(now) = now {
        pm = pm.env("PM_POLL_NOW", now);
    }
    let run = pm.run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    run.json()
}

#[test]
fn a_poll_prunes_polls_older_than_keep_polls_once_a_day_without_a_timer() {
    let setup = AgentSetup::new();
    let forty_days_ago = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    let prunes = "SELECT count(*) FROM jobs WHERE kind = 'prune'";
    // A poll 40 days ago: nothing is that old yet, but it is the first prune of this inventory.
    poll_at(&setup, Some(&forty_days_ago));
    assert_eq!(count(&setup, "SELECT count(*) FROM polls"), 1);
    // Ages are measured from the newest poll of an earlier run: the first poll after 38 days
    // without one prunes nothing new.
    let two_days_ago = (chrono::Utc::now() - chrono::Duration::days(2)).to_rfc3339();
    let report = poll_at(&setup, Some(&two_days_ago));
    assert_eq!(report["pruned"]["polls"], 0, "{report:#}");

    // Today's poll is the first in more than a day: it also deletes what is older than
    // keep_polls (30 days by default), records the prune as a job and says so.
    let report = poll_at(&setup, None);
    assert_eq!(report["pruned"]["polls"], 1, "{report:#}");
    assert_eq!(
        count(&setup, "SELECT count(*) FROM polls"),
        2,
        "the old poll is gone"
    );
    assert_eq!(
        count(
            &setup,
            "SELECT count(*) FROM polls WHERE polled_at > now() - INTERVAL 1 DAY"
        ),
        1,
        "today's poll stays"
    );
    let after_first_day = count(&setup, prunes);

    // Later polls the same day leave it alone.
    let report = poll_at(&setup, None);
    assert!(report.get("pruned").is_none(), "{report:#}");
    assert_eq!(count(&setup, prunes), after_first_day);
    assert_eq!(count(&setup, "SELECT count(*) FROM polls"), 3);

    // auto_prune = false: pm-poll --prune (from the operator's own timer) is the only way.
    let config = std::fs::read_to_string(setup.home.path().join("pm.toml")).unwrap();
    setup
        .home
        .config(&format!("{config}\n[poll]\nauto_prune = false\n"));
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let report = poll_at(&setup, Some(&tomorrow));
    assert!(report.get("pruned").is_none(), "{report:#}");
    assert_eq!(count(&setup, prunes), after_first_day);

    // keep_history reaches --prune; a dry run counts and records nothing.
    setup.home.config(&format!(
        "{config}\n[poll]\nauto_prune = false\nkeep_history = \"400d\"\n"
    ));
    let polls = count(&setup, "SELECT count(*) FROM polls");
    let report = Pm::poll(&setup.home).args(["--prune", "--dry-run"]).json();
    assert_eq!(report["changed"], false, "{report:#}");
    assert!(report["pruned"]["history_before"].is_string(), "{report:#}");
    assert_eq!(report["pruned"]["scans"], 0, "{report:#}");
    assert_eq!(count(&setup, "SELECT count(*) FROM polls"), polls);
    assert_eq!(count(&setup, prunes), after_first_day);
}

#[test]
fn the_exporter_reports_the_inventory_file_size() {
    let setup = AgentSetup::new();
    poll_at(&setup, None);
    let server = Server::spawn(
        Pm::new("pm-exporter")
            .args(["--listen", "127.0.0.1:0", "--refresh", "1s"])
            .env("PM_HOME", setup.home.path().to_str().unwrap()),
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let size = loop {
        let body = runtime().block_on(async {
            let response = client
                .get(format!("{}/metrics", server.base))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            response.text().await.unwrap()
        });
        if let Some(line) = body
            .lines()
            .find(|l| l.starts_with("pm_inventory_size_bytes "))
        {
            break line["pm_inventory_size_bytes ".len()..]
                .parse::<f64>()
                .unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no pm_inventory_size_bytes: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let file = |name: &str| {
        std::fs::metadata(setup.home.path().join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let on_disk = file("inventory.duckdb") + file("inventory.duckdb.wal");
    assert_eq!(size, on_disk as f64);
}

/// Red team A item 3: a manager whose clock ran far ahead (an NTP misstep, a wrong RTC after a
/// reboot) must not prune the history as if it had aged. Real agent, real pm-poll under
/// libfaketime, real inventory.
/// A fleet that keeps 90 days of history, updated and polled 3 times on the right clock.
fn fleet_keeping_history() -> AgentSetup {
    let setup = AgentSetup::new();
    let config = std::fs::read_to_string(setup.home.path().join("pm.toml")).unwrap();
    setup
        .home
        .config(&format!("{config}\n[poll]\nkeep_history = \"90d\"\n"));
    let run = Pm::push(&setup.home).args(["update", "--all"]).run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    for _ in 0..3 {
        // The second of them prunes (the first prune of this inventory, measured from the
        // first), with no warning: a clock in step with the agents' and no poll stamped ahead.
        let run = Pm::poll(&setup.home).args(["--json"]).run();
        assert_eq!(run.code(), 0, "{}", run.stderr());
        assert!(!run.stderr().contains("WARN"), "{}", run.stderr());
    }
    setup
}

/// The history a prune too early would take: polls not stamped ahead, install runs, versions.
fn history(setup: &AgentSetup) -> [i64; 3] {
    [
        "SELECT count(*) FROM polls WHERE polled_at <= now()",
        "SELECT count(*) FROM update_runs",
        "SELECT count(*) FROM component_versions",
    ]
    .map(|q| count(setup, q))
}

/// Where a prune measured ages from, from its `pruned` report, must not be after the real
/// clock (a little slack for the run itself).
fn assert_measured_from_the_real_clock(report: &serde_json::Value) {
    let as_of = report["pruned"]["as_of"].as_str().unwrap_or_default();
    let as_of = chrono::DateTime::parse_from_rfc3339(as_of)
        .unwrap_or_else(|_| panic!("no pruned.as_of: {report:#}"));
    assert!(
        as_of <= chrono::Utc::now() + chrono::Duration::minutes(5),
        "{report:#}"
    );
}

/// Stops the setup's agent: no poll reaches it.
fn stop_agent(setup: &mut AgentSetup) {
    let mut agent = setup.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// The setup's own host, polled alone.
const SETUP_HOST: [&str; 4] = ["--timeout", "5s", "--host", "127.0.0.1"];

/// `pm-poll` of the setup's own host at the clock `offset` (under libfaketime), exit `code`:
/// it prunes nothing, says `why` on stderr, and the history is still `before`.
fn poll_without_prune(setup: &AgentSetup, offset: &str, code: i32, why: &str, before: [i64; 3]) {
    let run = crate::host_identity::at(offset, "pm-poll", &setup.home, &SETUP_HOST);
    assert_eq!(run.code(), code, "{}\n{}", run.stdout(), run.stderr());
    assert!(run.json().get("pruned").is_none(), "{}", run.stdout());
    assert!(run.stderr().contains(why), "{}", run.stderr());
    assert_eq!(history(setup), before);
}

/// Starts the agent with its clock `offset` (under libfaketime) and polls its host at the same
/// `offset`: the daily prune runs, measured from the real clock, and deletes none of `before`.
fn prune_with_agent_as_far_ahead(setup: &mut AgentSetup, offset: &str, before: [i64; 3]) {
    // libfaketime preloaded into pm-agent itself (not the `faketime` wrapper, whose child
    // would outlive a kill), so stopping the agent stops it.
    let mut command = Pm::agent(&setup.state()).args(["run"]).command();
    command
        .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stderr(std::process::Stdio::null());
    setup.agent = Some(spawn_agent_command(command, setup.addr));
    let run = crate::host_identity::at(offset, "pm-poll", &setup.home, &SETUP_HOST);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    let report = run.json();
    assert_eq!(report["pruned"]["polls"], 0, "{report:#}\n{}", run.stderr());
    assert_measured_from_the_real_clock(&report);
    assert_eq!(history(setup), before);
}

#[test]
fn a_manager_clock_far_ahead_never_prunes_history_and_its_prune_does_not_block_later_ones() {
    use crate::host_identity::at;

    let mut setup = fleet_keeping_history();
    let before = history(&setup);
    assert!(before[0] >= 4 && before[1] >= 1, "{before:?}");

    // 1. The agent is down and the clock is 100 days ahead: the first prune of this inventory
    // is due, but ages are measured from the newest poll of an earlier run, not the clock.
    stop_agent(&mut setup);
    // Nor does `pm-poll --prune` on that clock: a poll no agent answered dates nothing.
    for (args, code) in [(&["--timeout", "2s"][..], 1), (&["--prune"], 0)] {
        let run = at("+100d", "pm-poll", &setup.home, args);
        assert_eq!(run.code(), code, "{}\n{}", run.stdout(), run.stderr());
        let after = history(&setup);
        assert_eq!(after, before, "{}\n{}", run.stdout(), run.stderr());
    }

    // 2. The agent answers and its clock says this manager is 102 days ahead: no prune runs
    // (it is due again), a warning says why; the polls are recorded.
    setup.run_agent();
    poll_without_prune(&setup, "+102d", 0, "ahead of its agents", before);

    // 3. `pm-poll --prune` on that clock is refused with what to do, and deletes nothing.
    let run = at("+102d", "pm-poll", &setup.home, &["--prune"]);
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    assert_eq!(history(&setup), before);
    // pm-doctor says so too.
    let run = at("+102d", "pm-doctor", &setup.home, &[]);
    assert!(
        run.stdout().contains("days ahead of its agents'"),
        "{}",
        run.stdout()
    );

    // 4. Two days on, the agent down: no poll can check the clock, so none prunes, and says
    // so. Once the agent answers (its clock two days on too), the prune job stamped 100 days
    // ahead does not hold off the daily prune, which deletes nothing recent and keeps the
    // polls stamped ahead.
    stop_agent(&mut setup);
    poll_without_prune(&setup, "+2d", 1, "no agent answered this poll", before);
    prune_with_agent_as_far_ahead(&mut setup, "+2d", before);
    assert_eq!(
        count(
            &setup,
            "SELECT count(*) FROM polls WHERE polled_at > now() + INTERVAL 50 DAY"
        ),
        2,
        "the polls stamped ahead stay"
    );
}

/// Red team C item 1: polls stamped by a run whose agents found the clock far ahead never date
/// a later prune: not when no agent answers (that poll does not prune, and `pm-poll --prune`
/// measures from the last run found in step), nor when the one agent answering (`--host`) is
/// as far ahead as the manager, twice. Real agents (one's clock under libfaketime), real
/// pm-poll under libfaketime, real inventory.
#[test]
fn polls_stamped_while_the_clock_was_ahead_never_let_a_later_prune_delete_history() {
    use crate::host_identity::at;

    let mut setup = fleet_keeping_history();
    let _other = setup.add_agent("web-2", &[]);
    // Once 300 days ahead while the agent answers: no prune (as documented), but the polls
    // stay, stamped 300 days ahead.
    let run = at("+300d", "pm-poll", &setup.home, &["--timeout", "5s"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert!(run.json().get("pruned").is_none(), "{}", run.stdout());
    // The clock right again.
    let run = Pm::poll(&setup.home).args(["--json"]).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let before = history(&setup);
    assert!(before[1] >= 1, "{before:?}");

    // 1. The clock ahead again, the agent down: nothing can contradict the clock, so the poll
    // prunes nothing and says so; `pm-poll --prune` measures from the last poll found in step.
    stop_agent(&mut setup);
    poll_without_prune(&setup, "+301d", 1, "no agent answered this poll", before);
    let run = at("+301d", "pm-poll", &setup.home, &["--prune"]);
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    assert_measured_from_the_real_clock(&run.json());
    assert_eq!(history(&setup), before);

    // 2. The one agent answering is as far ahead as the manager: this run finds the clocks in
    // step, but a prune measures from an earlier run found in step, not from the polls the
    // run 300 days ahead stamped.
    prune_with_agent_as_far_ahead(&mut setup, "+303d", before);
    // 3. And again two days on: the run before did not vouch for the clock (one agent of two
    // answered), so this one too measures from the real clock.
    stop_agent(&mut setup);
    prune_with_agent_as_far_ahead(&mut setup, "+305d", before);
}
