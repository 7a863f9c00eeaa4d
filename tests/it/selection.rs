//! Target selections as the operator wrote them (issue 16): wave CSVs in the seed's
//! `update_list.csv` format (bare IPs, quoted fields, a BOM, sparse wave numbers) run in the
//! waves written; a selection that matches nothing is refused alike by every tool, and a fleet
//! with no active host is nothing to do for every tool.

use serde_json::Value;

use crate::push::Fleet;
use crate::support::{AgentSetup, Pm, sql};

/// `(host, wave, result)` of a rollout report, by host.
fn plan(report: &Value) -> Vec<(String, Value, String)> {
    let mut rows: Vec<(String, Value, String)> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["wave"].clone(),
                h["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn row(host: &str, wave: Value, result: &str) -> (String, Value, String) {
    (host.to_string(), wave, result.to_string())
}

#[test]
fn a_wave_csv_in_the_seed_format_runs_in_the_waves_as_written() {
    let fleet = Fleet::start(4);
    let home = &fleet.setup.home;
    fleet.setup.publish(6);
    // lab-003 (127.0.0.5) is on dist already.
    let (code, _) = fleet.push(&["update", "--host", "lab-003"]);
    assert_eq!(code, 0);
    // update_list.csv as a Windows editor saves it: a BOM, CRLF, quoted fields, bare IPs (the
    // seed's `IP,n`) next to names, and the operator's own sparse wave numbers.
    let file = fleet.setup.tmp.path().join("update_list.csv");
    std::fs::write(
        &file,
        "\u{feff}\"127.0.0.2\",\"5\"\r\n127.0.0.3,7\r\n\"lab-002\",5\r\n127.0.0.5,7\r\n",
    )
    .unwrap();
    let targets = file.to_str().unwrap();
    let wave = |n: i64| Value::from(n);
    // The plan (a dry run), then the rollout: the file's waves, no canary of pm-push's own, a
    // skipped host in no wave.
    for (run, result) in [(&["--dry-run"][..], "pending"), (&[], "ok")] {
        let mut args = vec!["update", "--targets", targets];
        args.extend(run);
        let (code, report) = fleet.push(&args);
        assert_eq!(code, 0, "{report}");
        assert_eq!(
            plan(&report),
            [
                row("lab-000", wave(5), result),
                row("lab-001", wave(7), result),
                row("lab-002", wave(5), result),
                row("lab-003", Value::Null, "skipped"),
            ],
            "{report}"
        );
    }
    assert_eq!(
        sql(
            home,
            "SELECT wave, hosts, ok, skipped FROM rollout_progress \
             WHERE job_id = (SELECT max(job_id) FROM rollouts) ORDER BY wave NULLS FIRST"
        ),
        ["NULL,1,0,1", "5,2,2,0", "7,1,1,0"]
    );
    let text = Pm::push(home).args(["status"]).run();
    assert!(
        !text.stdout().contains("-1"),
        "no wave -1 in the table: {}",
        text.stdout()
    );

    // A BOM before a `host,wave` header: the header is a header, not a host.
    std::fs::write(&file, "\u{feff}host,wave\nlab-000,1\n").unwrap();
    let (code, planned) = fleet.push(&["update", "--targets", targets, "--dry-run"]);
    assert_eq!(code, 0, "{planned}");
    assert_eq!(plan(&planned), [row("lab-000", Value::Null, "skipped")]);

    // What the operator cannot have meant is refused, naming the lines.
    let refused = |text: &str, expected: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let run = Pm::push(home)
            .args(["update", "--targets", targets, "--dry-run"])
            .run();
        assert_eq!(run.code(), 2, "{text:?}: {}", run.stderr());
        for part in expected {
            assert!(
                run.stderr().contains(part),
                "{text:?}: `{part}` not in {}",
                run.stderr()
            );
        }
        assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    };
    refused(
        "lab-000,1\nlab-001,2\n127.0.0.2,3\n",
        &["update_list.csv:1", "update_list.csv:3", "lab-000"],
    );
    refused("lab-000,0\n", &["update_list.csv:1", "wave 0"]);
    refused("lab-000,1\nlab-001\n", &["update_list.csv:2", "no wave"]);
    refused("# nobody\n\n", &["update_list.csv", "lists no host"]);
}

/// Every tool that takes a target selection, with arguments that are otherwise valid.
fn tools(setup: &AgentSetup) -> Vec<(&'static str, Vec<String>)> {
    let scan_dir = setup.tmp.path().to_str().unwrap().to_string();
    let strings = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    vec![
        ("pm-push", strings(&["update"])),
        ("pm-push", strings(&["profile", "default"])),
        ("pm-push", strings(&["license"])),
        ("pm-push", strings(&["scan", "--path", &scan_dir])),
        ("pm-push", strings(&["schedule", "--update", "0 3 * * *"])),
        ("pm-push", strings(&["upgrade-agent"])),
        ("pm-push", strings(&["hold"])),
        ("pm-push", strings(&["release"])),
        ("pm-rollback", strings(&["--generation", "1"])),
        ("pm-poll", Vec::new()),
    ]
}

fn run(setup: &AgentSetup, tool: &str, args: &[String], extra: &[&str]) -> crate::support::Run {
    Pm::new(tool)
        .args(["--home"])
        .args([setup.home.path()])
        .args(args)
        .args(extra)
        .run()
}

#[test]
fn an_empty_selection_is_refused_alike_by_every_tool_and_an_empty_fleet_is_nothing_to_do() {
    let setup = AgentSetup::new();
    let home = &setup.home;
    setup.publish(6);
    let license = setup.tmp.path().join("site.lic");
    std::fs::write(&license, "LICENSE-ID=1\n").unwrap();
    Pm::activate(home)
        .args(["license", "add"])
        .args([&license])
        .args(["--expires", "2099-01-01"])
        .json();
    let jobs = || sql(home, "SELECT count(*) FROM jobs");
    let dist = || {
        sql(
            home,
            "SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1",
        )
    };
    let (jobs_before, dist_before) = (jobs(), dist());

    // A selection that matches no active host: the same refusal everywhere, nothing asked.
    for (tool, args) in tools(&setup) {
        let context = format!("{tool} {}", args.join(" "));
        let refused = run(&setup, tool, &args, &["--group", "nope", "--json"]);
        assert_eq!(refused.code(), 2, "{context}: {}", refused.stderr());
        assert!(
            refused
                .stderr()
                .contains("error: no active host matches the selection (--group nope)")
                && refused.stderr().contains("hint: "),
            "{context}: {}",
            refused.stderr()
        );
        assert_eq!(jobs(), jobs_before, "{context} recorded a job");
    }

    // A fleet with no active host: nothing to do, said the same way, exit 0.
    Pm::activate(home).args(["deactivate", "127.0.0.1"]).json();
    let (jobs_before, dist_before_empty) = (jobs(), dist());
    assert_eq!(dist_before_empty, dist_before);
    for (tool, args) in tools(&setup) {
        let context = format!("{tool} {}", args.join(" "));
        for extra in [&["--json"][..], &[]] {
            let done = run(&setup, tool, &args, extra);
            assert_eq!(done.code(), 0, "{context}: {}", done.stderr());
            assert!(
                done.stderr()
                    .contains("note: this manager has no active host: nothing to do"),
                "{context}: {}",
                done.stderr()
            );
            assert!(
                !done.stdout().contains("dry run"),
                "{context}: not a dry run: {}",
                done.stdout()
            );
            if !extra.is_empty() {
                assert_eq!(done.json()["changed"], false, "{context}");
            }
        }
        assert_eq!(jobs(), jobs_before, "{context} recorded a job");
    }
    assert_eq!(dist(), dist_before, "dist stays");
}
