//! The conventions every tool shares (issue 16, day-2 operations): one JSON document on stdout
//! for every usage error under `--json`, `--lock-timeout` honoured by every inventory open, and
//! the `--where` sandbox.

use crate::support::*;

/// Runs `tool args` with `home` as `PM_HOME` and checks a usage error under `--json`: exit 2,
/// clap's message on stderr, and exactly one JSON document on stdout saying what failed.
fn check_usage_error_is_one_json_document(home: &Home, tool: &str, args: &[&str]) {
    let run = Pm::new(tool)
        .env("PM_HOME", home.path().to_str().unwrap())
        .args(args)
        .run();
    let case = format!("{tool} {}", args.join(" "));
    assert_eq!(run.code(), 2, "{case}: {}\n{}", run.stdout(), run.stderr());
    assert!(run.stderr().contains("error:"), "{case}: {}", run.stderr());
    let stdout = run.stdout();
    let documents: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|err| panic!("{case}: stdout is not JSON ({err}): {stdout:?}"));
    assert_eq!(documents.len(), 1, "{case}: one document: {stdout:?}");
    let document = &documents[0];
    assert_eq!(document["failed"], true, "{case}: {document}");
    assert_eq!(document["changed"], false, "{case}: {document}");
    assert_eq!(document["exit_code"], 2, "{case}: {document}");
    let error = document["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{case}: {document}");
    assert!(!error.starts_with("error:"), "{case}: {document}");
    assert!(document["hint"].is_string(), "{case}: {document}");
}

#[test]
fn every_tool_prints_one_json_document_for_a_usage_error_under_json() {
    let home = Home::new();
    let unknown_flag = "unknown flag";
    let missing_value = "missing value";
    let bad_value = "bad value";
    let out_of_range = "out-of-range value";
    let missing_argument = "missing argument or subcommand";
    let cases: &[(&str, &str, &[&str])] = &[
        ("pm-mirror", unknown_flag, &["--json", "sync", "--bogus"]),
        ("pm-mirror", missing_argument, &["--json"]),
        (
            "pm-mirror",
            bad_value,
            &["sync", "--lock-timeout", "soon", "--json"],
        ),
        (
            "pm-activate",
            missing_value,
            &["key", "new", "--json", "--ttl"],
        ),
        ("pm-activate", unknown_flag, &["--bogus", "--json", "list"]),
        ("pm-agent", unknown_flag, &["--json", "status", "--nope"]),
        ("pm-agent", missing_argument, &["--json"]),
        ("pm-poll", bad_value, &["--json", "--timeout", "0s"]),
        ("pm-poll", bad_value, &["--deadline", "soon", "--json"]),
        ("pm-push", unknown_flag, &["--json", "update", "--bogus"]),
        (
            "pm-push",
            bad_value,
            &["update", "--all", "--wave-size", "0", "--json"],
        ),
        (
            "pm-rollback",
            out_of_range,
            &["--json", "--generation", "9", "--all"],
        ),
        (
            "pm-rollback",
            bad_value,
            &["--json", "--generation", "x", "--all"],
        ),
        ("pm-query", missing_argument, &["--json"]),
        (
            "pm-query",
            bad_value,
            &["--format", "json", "--max-rows", "-1", "SELECT 1"],
        ),
        (
            "pm-query",
            bad_value,
            &["--format=json", "--format", "xml", "SELECT 1"],
        ),
        ("pm-exporter", unknown_flag, &["--json"]),
        ("pm-exporter", bad_value, &["--json", "--listen", "nowhere"]),
        (
            "pm-exporter",
            bad_value,
            &["--listen", "127.0.0.1:0", "--allow", "x", "--json"],
        ),
        ("pm-doctor", bad_value, &["--json", "--exporter", "notaurl"]),
        ("pm-doctor", unknown_flag, &["--json", "--bogus"]),
        ("pm-lab", unknown_flag, &["--json"]),
        ("pm-lab", missing_value, &["agents", "--json", "--count"]),
    ];
    for (tool, _kind, args) in cases {
        check_usage_error_is_one_json_document(&home, tool, args);
    }
    // Every tool of the kit is in the table.
    for command in pm::kit::commands() {
        let tool = command.get_name();
        assert!(cases.iter().any(|case| case.0 == tool), "{tool} untested");
    }
    // Without --json, stdout stays empty (results only) and the exit status is still 2.
    let run = Pm::new("pm-push").args(["update", "--bogus"]).run();
    assert_eq!((run.code(), run.stdout().as_str()), (2, ""));
    // --help is not an error: its text, exit 0, also with --json.
    let run = Pm::new("pm-poll").args(["--json", "--help"]).run();
    assert_eq!(run.code(), 0);
    assert!(run.stdout().contains("Usage: pm-poll"), "{}", run.stdout());
    assert_eq!(home_entries(&home), 0, "a usage error creates nothing");
}

fn home_entries(home: &Home) -> usize {
    std::fs::read_dir(home.path()).unwrap().count()
}

#[test]
fn where_runs_in_pm_querys_sandbox_and_cannot_leave_its_parentheses() {
    let setup = AgentSetup::new();
    let secret = setup.tmp.path().join("secret.txt");
    std::fs::write(&secret, "one line\n").unwrap();
    let would_poll = |predicate: &str| {
        let run = Pm::poll(&setup.home)
            .args(["--dry-run", "--json", "--where", predicate])
            .run();
        (run.code(), run.json(), run.stderr())
    };
    // A condition on fleet_status, subqueries on other tables included, still selects hosts.
    for predicate in [
        "address IS NOT NULL",
        "host = '127.0.0.1' AND grp = 'default'",
        "host IN (SELECT host FROM hosts WHERE state = 'active')",
        "host <> ')' AND host <> '(--'",
        "true) OR (true",
    ] {
        let (code, report, stderr) = would_poll(predicate);
        assert_eq!(code, 0, "{predicate}: {stderr}");
        assert_eq!(
            report["would_poll"],
            serde_json::json!(["127.0.0.1"]),
            "{predicate}"
        );
    }
    // No file access: what pm-query refuses, --where refuses too.
    let read_file = format!(
        "(SELECT count(*) FROM read_text('{}')) = 1",
        secret.display()
    );
    let (code, report, stderr) = would_poll(&read_file);
    assert_eq!(code, 2, "{report}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(
        report["error"].as_str().unwrap().contains("disabled"),
        "{report}"
    );
    // Nothing after the condition: no set operation, modifier, clause or second statement.
    for predicate in [
        "false) UNION SELECT host FROM hosts --",
        "false) UNION ALL SELECT '127.0.0.1' --",
        "true) ORDER BY host LIMIT 0 --",
        "true) GROUP BY host HAVING count(*) > 5 --",
        "true) QUALIFY false --",
        "true); SELECT 1 --",
        "true) -- ",
    ] {
        let (code, report, stderr) = would_poll(predicate);
        assert_eq!(code, 2, "{predicate}: {report}");
        assert!(stderr.contains("--where"), "{predicate}: {stderr}");
        assert!(stderr.contains("hint:"), "{predicate}: {stderr}");
    }
    // pm-push resolves targets through the same owner.
    let run = Pm::push(&setup.home)
        .args(["update", "--dry-run", "--json", "--where"])
        .args([&read_file])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stdout());
}
