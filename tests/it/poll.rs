//! `pm-poll` against real agents: what it records, that repeated polls record changes once,
//! unreachable and inactive hosts, and the views the DuckDB CLI reads.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{AgentSetup, EICAR, Pm, duckdb_cli, hold_read_write, sql};

pub(crate) fn host<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))
}

fn poll(setup: &AgentSetup, flags: &[&str]) -> (i32, Value) {
    let run = Pm::poll(&setup.home).args(["--json"]).args(flags).run();
    (run.code(), run.json())
}

fn eicar_dir(setup: &AgentSetup) -> std::path::PathBuf {
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    std::fs::write(dir.join("clean.txt"), "nothing to see\n").unwrap();
    dir
}

#[test]
fn a_poll_records_real_agents_once_and_a_second_poll_changes_nothing() {
    let setup = AgentSetup::new();
    let _other = setup.add_agent("web-2", &["--group", "web"]);
    // The first agent installs dist (test 3) and finds EICAR; the second has nothing yet.
    setup.agent_cmd(&["update"]);
    let dir = eicar_dir(&setup);
    setup.agent_cmd(&["scan", dir.to_str().unwrap()]);

    let (code, first) = poll(&setup, &[]);
    assert_eq!(code, 0, "{first}");
    assert_eq!(first["changed"], true);
    assert_eq!(first["summary"]["polled"], 2);
    assert_eq!(first["summary"]["ok"], 2);
    assert_eq!(first["summary"]["new_scans"], 1);
    assert_eq!(first["summary"]["new_findings"], 1);
    let scanned = host(&first, "127.0.0.1");
    assert_eq!(scanned["polled"], "ok");
    assert_eq!(scanned["version_colour"], "green", "{scanned}");
    assert_eq!(scanned["scan_colour"], "red", "{scanned}");
    assert_eq!(scanned["versions"], "test 3/3");
    let empty = host(&first, "web-2");
    assert_eq!(empty["version_colour"], "red", "nothing installed: {empty}");
    assert_eq!(empty["scan_colour"], "yellow", "no scan yet: {empty}");
    assert_eq!(empty["grp"], "web");

    // Nothing new on the agents: nothing new in the inventory but the poll rows.
    let (code, second) = poll(&setup, &[]);
    assert_eq!(code, 0);
    assert_eq!(second["changed"], false, "{second}");
    assert_eq!(second["summary"]["new_scans"], 0);
    assert_eq!(second["summary"]["version_changes"], 0);

    // A new version and another scan: recorded once each, however often we poll.
    setup.publish(6);
    setup.agent_cmd(&["update"]);
    setup.agent_cmd(&["scan", dir.to_str().unwrap()]);
    for _ in 0..3 {
        poll(&setup, &[]);
    }
    assert_eq!(
        sql(
            &setup.home,
            "SELECT component, coalesce(previous_version, '-'), version, revision \
             FROM version_history WHERE host = '127.0.0.1' AND component = 'test' \
             ORDER BY changed_at"
        ),
        ["test,-,3,r1", "test,3,6,r2"]
    );
    let alerts = sql(
        &setup.home,
        "SELECT host, path, signature, found_at IS NOT NULL FROM scan_alerts ORDER BY found_at",
    );
    let eicar = dir.join("eicar.com");
    let expected = format!("127.0.0.1,{},Eicar-Test-Signature,true", eicar.display());
    assert_eq!(alerts, [expected.clone(), expected], "one row per scan");
    assert_eq!(
        sql(&setup.home, "SELECT count(*) FROM polls"),
        ["10"],
        "5 polls of 2 hosts"
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT trigger, action, ok, revision FROM update_history \
             WHERE host = '127.0.0.1' ORDER BY started_at"
        ),
        ["local,update,true,r1", "local,update,true,r2"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT component, version, hosts, is_dist FROM version_drift \
             WHERE component = 'test' ORDER BY version"
        ),
        ["test,6,1,true"]
    );
}

#[test]
fn a_stopped_agent_is_recorded_unreachable_and_turns_inactive_after_the_threshold() {
    let setup = AgentSetup::new();
    let mut other = setup.add_agent("web-2", &[]);
    // A successful poll "40 minutes ago" (the injectable clock), then the agent stops.
    let earlier = (chrono::Utc::now() - chrono::Duration::minutes(40)).to_rfc3339();
    let run = Pm::poll(&setup.home)
        .args(["--json"])
        .env("PM_POLL_NOW", &earlier)
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    other.stop();

    let (code, report) = poll(&setup, &["--timeout", "3s"]);
    assert_eq!(code, 3, "some hosts failed: {report}");
    assert_eq!(report["summary"]["unreachable"], 1);
    let down = host(&report, "web-2");
    assert_eq!(down["polled"], "refused", "{down}");
    assert_eq!(down["reachable"], false);
    assert_eq!(down["inactive"], true, "last contact 40 min ago: {down}");
    assert!(
        down["error"]
            .as_str()
            .unwrap()
            .contains("pm-agent not running"),
        "{down}"
    );
    let up = host(&report, "127.0.0.1");
    assert_eq!(
        (up["reachable"].clone(), up["inactive"].clone()),
        (true.into(), false.into())
    );
    // Never dropped: every poll has its row, the failure with its kind.
    assert_eq!(
        sql(
            &setup.home,
            "SELECT ok, coalesce(error_kind, '-') FROM poll_history WHERE host = 'web-2' ORDER BY polled_at"
        ),
        ["true,-", "false,refused"]
    );
    assert_eq!(
        sql(
            &setup.home,
            "SELECT host, reason FROM stale_hosts ORDER BY host"
        ),
        ["127.0.0.1,behind dist", "web-2,inactive"],
        "the first agent never installed dist"
    );
    // A short threshold from pm.toml applies to the views at the next poll.
    std::fs::write(
        setup.home.path().join("pm.toml"),
        std::fs::read_to_string(setup.home.path().join("pm.toml")).unwrap()
            + "\n[poll]\ninactive_after = \"1h\"\n",
    )
    .unwrap();
    let (_, report) = poll(&setup, &["--timeout", "3s", "--host", "web-2"]);
    assert_eq!(report["summary"]["polled"], 1);
    assert_eq!(host(&report, "web-2")["inactive"], false, "40 min < 1 h");
}

#[test]
fn targets_select_hosts_and_unknown_names_are_refused() {
    let setup = AgentSetup::new();
    let _other = setup.add_agent("db-1", &["--group", "db", "--label", "site=paris"]);
    let (code, report) = poll(&setup, &["--group", "db"]);
    assert_eq!(code, 0);
    assert_eq!(report["summary"]["polled"], 1);
    assert_eq!(report["hosts"][0]["host"], "db-1");
    let (_, report) = poll(&setup, &["--label", "site=paris", "--cidr", "127.0.0.0/8"]);
    assert_eq!(report["summary"]["polled"], 1);
    let (_, report) = poll(&setup, &["--where", "grp = 'default'"]);
    assert_eq!(report["hosts"][0]["host"], "127.0.0.1");
    let (code, report) = poll(&setup, &["--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(
        report["would_poll"],
        serde_json::json!(["127.0.0.1", "db-1"])
    );
    assert_eq!(report["changed"], false);
    let run = Pm::poll(&setup.home).args(["--host", "nobody"]).run();
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr()
            .contains("not active hosts of this manager: nobody"),
        "{}",
        run.stderr()
    );
    let run = Pm::poll(&setup.home)
        .args(["--where", "no_such_column = 1"])
        .run();
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr().contains("DESCRIBE fleet_status"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_poll_waits_for_a_reader_and_fails_clearly_when_a_writer_keeps_the_lock() {
    let setup = AgentSetup::new();
    let file = setup.home.path().join("inventory.duckdb");
    // Readers come and go while pm-poll runs: pm-poll waits for them, and a reader that
    // meets the write (milliseconds) retries, as DuckDB readers must.
    let reader = std::thread::spawn({
        let file = file.clone();
        move || {
            for _ in 0..5 {
                let mut attempts = 0;
                loop {
                    let out = Command::new(duckdb_cli())
                        .args(["-readonly", file.to_str().unwrap(), "-c"])
                        .arg("SELECT count(*) FROM fleet_status")
                        .output()
                        .unwrap();
                    if out.status.success() {
                        break;
                    }
                    let err = String::from_utf8_lossy(&out.stderr);
                    attempts += 1;
                    assert!(err.contains("lock") && attempts < 200, "{err}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    let (code, report) = poll(&setup, &["--lock-timeout", "30s"]);
    reader.join().unwrap();
    assert_eq!(code, 0, "{report}");

    // A read-write session holds the file: pm-poll polls, waits, then says what happened.
    let (mut session, stdin) = hold_read_write(&file);
    let started = Instant::now();
    let run = Pm::poll(&setup.home).args(["--lock-timeout", "2s"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        run.stderr().contains("is locked by `duckdb`"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("nothing was recorded"),
        "{}",
        run.stderr()
    );
    drop(stdin);
    session.wait().unwrap();
    assert_eq!(
        sql(&setup.home, "SELECT count(*) FROM polls"),
        ["1"],
        "only the first poll"
    );
}

#[test]
fn watch_repeats_with_one_json_line_per_round_and_concurrent_writers_both_land() {
    let setup = AgentSetup::new();
    let run = Pm::poll(&setup.home)
        .args(["--json", "--watch", "1s", "--count", "2"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let rounds: Vec<Value> = run
        .stdout()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["changed"], true);
    assert_eq!(rounds[1]["changed"], false);

    // Another writer at the same time: each waits its turn, nothing is lost.
    let writers: Vec<_> = (0..3)
        .map(|n| {
            let poll = Pm::poll(&setup.home)
                .args(["--json"])
                .command()
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let profile = Pm::activate(&setup.home)
                .args([
                    "profile",
                    "new",
                    &format!("p{n}"),
                    "--set",
                    "detect_pua=yes",
                ])
                .command()
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            (poll, profile)
        })
        .collect();
    for (mut poll, mut profile) in writers {
        assert!(poll.wait().unwrap().success());
        assert!(profile.wait().unwrap().success());
    }
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM polls"), ["5"]);
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM profiles WHERE name LIKE 'p%'"
        ),
        ["3"]
    );
}

#[test]
fn prune_drops_old_polls_and_keeps_versions_and_scans() {
    let setup = AgentSetup::new();
    // Only --prune prunes here (retention.rs tests the prune pm-poll runs by itself).
    let config = std::fs::read_to_string(setup.home.path().join("pm.toml")).unwrap();
    setup
        .home
        .config(&format!("{config}\n[poll]\nauto_prune = false\n"));
    setup.agent_cmd(&["update"]);
    let earlier = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    Pm::poll(&setup.home)
        .args(["--json"])
        .env("PM_POLL_NOW", &earlier)
        .run();
    poll(&setup, &[]);
    let pruned = Pm::poll(&setup.home).args(["--prune"]).json();
    assert_eq!(pruned["deleted_polls"], 1, "{pruned}");
    assert_eq!(pruned["changed"], true);
    assert_eq!(sql(&setup.home, "SELECT count(*) FROM polls"), ["1"]);
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM version_history WHERE component = 'test'"
        ),
        ["1"]
    );
    let again = Pm::poll(&setup.home).args(["--prune"]).json();
    assert_eq!(again["changed"], false);
}

/// Red team A item 10: a host that never installed a whole product of dist (a feed added
/// later) is behind dist, though every component it has is at dist's version. What the agent
/// would not install (the feed's README) does not count.
#[test]
fn a_host_missing_a_whole_product_of_dist_is_behind_dist_and_yellow() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    let (code, report) = poll(&setup, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(host(&report, "127.0.0.1")["version_colour"], "green");

    // The feed arrives on the manager (a site hash database and a README); dist has it, the
    // host not yet.
    let feed = setup.tmp.path().join("feed");
    std::fs::create_dir_all(feed.join("sigs")).unwrap();
    std::fs::write(
        feed.join("sigs/site.hdb"),
        "44d88612fea8a8f36de82e1278abb02f:68:Pm.Site.Sample\n",
    )
    .unwrap();
    std::fs::write(feed.join("README.txt"), "not a database").unwrap();
    setup.lab.upstream.set_feed(&feed, "1").unwrap();
    setup.home.clamav_and_feed_config(&setup.lab);
    Pm::mirror(&setup.home).args(["sync"]).json();
    Pm::mirror(&setup.home).args(["publish"]).json();

    let (code, report) = poll(&setup, &[]);
    assert_eq!(code, 0, "{report}");
    let row = host(&report, "127.0.0.1");
    assert_eq!(row["version_colour"], "yellow", "{row}");
    assert_eq!(row["versions"], "sigs/site.hdb -/1, test 3/3", "{row}");
    assert_eq!(
        sql(
            &setup.home,
            "SELECT product, component, installed_version, dist_version, behind_by, missing \
             FROM host_versions ORDER BY product, component"
        ),
        [
            "clamav,test,3,3,0,false",
            "vendor,sigs/site.hdb,NULL,1,1,true",
            // The agent's own version, which dist does not compare.
            "NULL,pm-agent,0.1.0,NULL,NULL,false"
        ]
    );
    assert_eq!(
        sql(&setup.home, "SELECT host, reason FROM stale_hosts"),
        ["127.0.0.1,behind dist"]
    );
    let server = crate::exporter::exporter(&setup.home, &[]);
    let body = crate::exporter::scrape(&server);
    let labels = r#"{host="127.0.0.1",group="default"}"#;
    assert_eq!(
        crate::exporter::value(&body, &format!("pm_host_version_status{labels}")),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        crate::exporter::value(
            &body,
            r#"pm_host_component_missing{host="127.0.0.1",group="default",product="vendor",component="sigs/site.hdb"}"#
        ),
        Some(1.0),
        "{body}"
    );

    // Once the host installs it, it is green again and nothing is missing.
    setup.agent_cmd(&["update"]);
    let (code, report) = poll(&setup, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(host(&report, "127.0.0.1")["version_colour"], "green");
    assert_eq!(
        sql(
            &setup.home,
            "SELECT count(*) FROM host_versions WHERE missing"
        ),
        ["0"]
    );
}
