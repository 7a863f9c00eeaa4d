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
