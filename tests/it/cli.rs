//! The conventions every tool shares (issue 16, day-2 operations): one JSON document on stdout
//! for every usage error under `--json`, `--lock-timeout` honoured by every inventory open, and
//! the `--where` sandbox.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

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
    let flags_disagree = "flags that disagree";
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
        // Red team A, item 16: flags that disagree, found after parsing.
        (
            "pm-query",
            flags_disagree,
            &["--json", "--format", "csv", "SELECT 1"],
        ),
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

/// A `--where` predicate that keeps the tool's first, read-only inventory connection open for
/// a moment (counting 300 million rows), long enough to see it open.
const SLOW_WHERE: &str = "(SELECT count(*) FROM range(300000000)) > 0";

/// How long a tool may take past its `--lock-timeout` of 1 s (process start, retry steps,
/// a loaded machine), far below the 30 s a hard-coded wait would take.
const LOCK_SLACK: Duration = Duration::from_secs(8);

/// Runs `pm` (with `--lock-timeout 1s` and [`SLOW_WHERE`] among its flags): once its first
/// inventory connection is open, waits for the inventory's write lock (`F_SETLKW`), which the
/// kernel grants the moment that connection closes, so every later open of the tool meets a
/// writer. Returns the run and how long the tool lived after the lock was taken.
fn run_meeting_a_writer_after_the_first_read(pm: Pm, file: &Path) -> (Run, Duration) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = pm
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fd_dir = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let opened = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !opened(&fd_dir) {
        assert!(
            Instant::now() < deadline,
            "the tool never opened `{}`",
            file.display()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the tool ended before its first read"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    rustix::fs::fcntl_lock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let locked_at = Instant::now();
    let output = child.wait_with_output().unwrap();
    let lived = locked_at.elapsed();
    drop(lock);
    assert!(output.status.signal().is_none(), "{:?}", output.status);
    (Run { output }, lived)
}

fn check_waited_about_its_lock_timeout(tool: &str, run: &Run, lived: Duration) {
    assert_eq!(run.code(), 1, "{tool}: {}\n{}", run.stdout(), run.stderr());
    let stderr = run.stderr();
    assert!(stderr.contains("is locked by"), "{tool}: {stderr}");
    assert!(stderr.contains("--lock-timeout"), "{tool}: {stderr}");
    assert!(
        lived < Duration::from_secs(1) + LOCK_SLACK,
        "{tool} waited {lived:?} for a writer with --lock-timeout 1s: {stderr}"
    );
}

#[test]
fn poll_push_and_rollback_honour_lock_timeout_in_every_inventory_open() {
    let setup = AgentSetup::new();
    setup.publish(4);
    let file = setup
        .home
        .path()
        .join("inventory.duckdb")
        .canonicalize()
        .unwrap();
    let common = ["--lock-timeout", "1s", "--where", SLOW_WHERE];
    // After the targets are read, the TLS client reads the revoked certificates.
    let runs = [
        ("pm-poll", Pm::poll(&setup.home).args(common)),
        (
            "pm-push schedule",
            Pm::push(&setup.home)
                .args(["schedule", "--clear"])
                .args(common),
        ),
        (
            "pm-rollback --host",
            Pm::rollback(&setup.home)
                .args(["--host", "127.0.0.1", "--to", "backup:1"])
                .args(common),
        ),
    ];
    for (tool, pm) in runs {
        let (run, lived) = run_meeting_a_writer_after_the_first_read(pm, &file);
        check_waited_about_its_lock_timeout(tool, &run, lived);
    }
}

#[test]
fn every_tool_that_opens_the_inventory_waits_its_lock_timeout_for_a_writer() {
    let setup = AgentSetup::new();
    let file = setup.home.path().join("inventory.duckdb");
    let (mut session, stdin) = hold_read_write(&file);
    let key = setup.tmp.path().join("k.key");
    let runs: [(&str, Pm); 8] = [
        ("pm-mirror sync", Pm::mirror(&setup.home).args(["sync"])),
        ("pm-mirror status", Pm::mirror(&setup.home).args(["status"])),
        (
            "pm-activate key new",
            Pm::activate(&setup.home)
                .args(["key", "new", "--out"])
                .args([&key]),
        ),
        ("pm-activate list", Pm::activate(&setup.home).args(["list"])),
        ("pm-poll", Pm::poll(&setup.home)),
        (
            "pm-push update",
            Pm::push(&setup.home).args(["update", "--all"]),
        ),
        (
            "pm-rollback --host",
            Pm::rollback(&setup.home).args(["--host", "127.0.0.1", "--to", "backup:1"]),
        ),
        (
            "pm-query",
            Pm::new("pm-query")
                .args(["--home"])
                .args([setup.home.path()])
                .args(["SELECT count(*) FROM hosts"]),
        ),
    ];
    for (tool, pm) in runs {
        let started = Instant::now();
        let run = pm.args(["--lock-timeout", "1s"]).run();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1),
            "{tool} waited only {waited:?}"
        );
        check_waited_about_its_lock_timeout(tool, &run, waited);
    }
    drop(stdin);
    session.wait().unwrap();
}
