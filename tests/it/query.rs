//! `pm-query`: read-only SQL against the inventory as a table, CSV or JSON; writes, bad SQL and
//! a missing inventory exit 2 with a hint.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Home, Pm, Run};

/// `pm-query --home HOME ARGS...` (the harness's `Pm::new` knows only the older binaries).
fn query<I, S>(home: &Home, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(env!("CARGO_BIN_EXE_pm-query"))
        .arg("--home")
        .arg(home.path())
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("PM_HOME")
        .output()
        .unwrap();
    Run { output }
}

/// A home whose inventory has two jobs: two activation keys made by `pm-activate`.
fn home_with_two_jobs() -> Home {
    let home = Home::new();
    Pm::activate(&home).args(["key", "new"]).json();
    Pm::activate(&home).args(["key", "new"]).json();
    home
}

const ALL_KINDS: &str = "SELECT 1::HUGEINT AS huge, [1, 2] AS list, {'a': 1} AS struct, \
     NULL AS nothing, TIMESTAMPTZ '2026-03-01 12:34:56.5+00' AS at, true AS yes, \
     12.50::DECIMAL(5,2) AS price, '\\x00\\xAB'::BLOB AS bytes, DATE '2026-03-01' AS day, \
     INTERVAL 90 MINUTE AS took, MAP {'k': [1]} AS map, 18446744073709551615::UBIGINT AS big, \
     'a,\"b\"' AS text";

#[test]
fn jobs_print_as_a_table_with_the_row_count_on_stderr() {
    let home = home_with_two_jobs();
    let run = query(&home, ["SELECT id, kind FROM jobs ORDER BY id"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let stdout = run.stdout();
    assert!(stdout.contains("| id | kind"), "{stdout}");
    assert_eq!(stdout.matches("| key-new").count(), 2, "{stdout}");
    assert_eq!(run.stderr().trim(), "2 rows");
}

#[test]
fn every_kind_of_value_prints_as_json_csv_and_table() {
    let home = home_with_two_jobs();
    let json = query(&home, [ALL_KINDS, "--format", "json"]);
    assert_eq!(json.code(), 0, "{}", json.stderr());
    let document = json.json();
    assert_eq!(
        document,
        serde_json::json!({
            "changed": false,
            "columns": ["huge", "list", "struct", "nothing", "at", "yes", "price", "bytes",
                        "day", "took", "map", "big", "text"],
            "rows": [{
                "huge": 1, "list": [1, 2], "struct": {"a": 1}, "nothing": null,
                "at": "2026-03-01T12:34:56.500Z", "yes": true, "price": 12.5, "bytes": "00ab",
                "day": "2026-03-01", "took": "PT1H30M", "map": {"k": [1]},
                "big": 18446744073709551615u64, "text": "a,\"b\"",
            }],
            "row_count": 1,
            "truncated": false,
        })
    );
    let global_json = query(&home, [ALL_KINDS, "--json"]);
    assert_eq!(global_json.json(), document, "--json is --format json");

    let csv = query(&home, [ALL_KINDS, "--format", "csv"]);
    assert_eq!(csv.code(), 0, "{}", csv.stderr());
    assert_eq!(
        csv.stdout(),
        "huge,list,struct,nothing,at,yes,price,bytes,day,took,map,big,text\n\
         1,\"[1,2]\",\"{\"\"a\"\":1}\",,2026-03-01T12:34:56.500Z,true,12.50,00ab,2026-03-01,\
         PT1H30M,\"{\"\"k\"\":[1]}\",18446744073709551615,\"a,\"\"b\"\"\"\n"
    );

    let table = query(&home, [ALL_KINDS]);
    assert_eq!(table.code(), 0, "{}", table.stderr());
    assert!(
        table
            .stdout()
            .contains("| 1    | [1,2] | {\"a\":1} |         | 2026-03-01T12:34:56.500Z |"),
        "{}",
        table.stdout()
    );
    assert_eq!(table.stderr().trim(), "1 row");
}

#[test]
fn now_is_an_rfc_3339_utc_instant() {
    let home = home_with_two_jobs();
    let document = query(&home, ["SELECT now() AS at", "--json"]).json();
    let at = document["rows"][0]["at"].as_str().unwrap();
    let parsed = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    assert!(at.ends_with('Z'), "{at}");
    assert!((chrono::Utc::now() - parsed.to_utc()).num_seconds().abs() < 60);
}

#[test]
fn max_rows_stops_the_table_and_json_but_says_so() {
    let home = home_with_two_jobs();
    let sql = "SELECT * FROM range(10) t(n)";
    let document = query(&home, [sql, "--json", "--max-rows", "3"]).json();
    assert_eq!(document["row_count"], 3);
    assert_eq!(document["truncated"], true);
    assert_eq!(document["rows"].as_array().unwrap().len(), 3);

    let table = query(&home, [sql, "--max-rows", "3"]);
    assert_eq!(table.code(), 0);
    assert!(table.stderr().contains("3 rows"), "{}", table.stderr());
    assert!(table.stderr().contains("--max-rows"), "{}", table.stderr());

    let csv = query(&home, [sql, "--format", "csv"]);
    assert_eq!(csv.stdout().lines().count(), 11, "csv has no default limit");
}

#[test]
fn a_write_is_refused_and_changes_nothing() {
    let home = home_with_two_jobs();
    for write in [
        "DELETE FROM jobs",
        "CREATE TABLE mine (x INTEGER)",
        "COPY jobs TO 'jobs.csv'",
    ] {
        let run = query(&home, [write]);
        assert_eq!(run.code(), 2, "{write}: {}", run.stderr());
        assert!(
            run.stderr().contains("error: pm-query is read-only;"),
            "{write}: {}",
            run.stderr()
        );
        assert!(run.stderr().contains("hint:"), "{}", run.stderr());
        assert!(run.stdout().is_empty(), "{}", run.stdout());
    }
    let document = query(&home, ["SELECT count(*) AS n FROM jobs", "--json"]).json();
    assert_eq!(document["rows"][0]["n"], 2);
}

#[test]
fn a_syntax_error_shows_duckdbs_message_and_where_to_look() {
    let home = home_with_two_jobs();
    let run = query(&home, ["SELEC * FROM jobs"]);
    assert_eq!(run.code(), 2);
    let stderr = run.stderr();
    assert!(
        stderr.contains("Parser Error: syntax error at or near \"SELEC\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("hint:") && stderr.contains("duckdb_views() WHERE NOT internal"),
        "{stderr}"
    );

    let json = query(&home, ["SELECT * FROM no_such_table", "--json"]);
    assert_eq!(json.code(), 2);
    let document = json.json();
    assert_eq!(document["failed"], true);
    assert!(
        document["error"]
            .as_str()
            .unwrap()
            .contains("no_such_table"),
        "{document}"
    );
}

#[test]
fn a_missing_inventory_exits_2_with_a_hint() {
    let home = Home::new();
    let run = query(&home, ["SELECT 1"]);
    assert_eq!(run.code(), 2);
    let stderr = run.stderr();
    assert!(stderr.contains("error: no inventory at"), "{stderr}");
    assert!(
        stderr.contains("hint: run pm-mirror sync or pm-activate first"),
        "{stderr}"
    );
    assert!(
        !home.path().join("inventory.duckdb").exists(),
        "pm-query never creates it"
    );
}

#[test]
fn query_works_while_another_process_reads_the_inventory() {
    let home = home_with_two_jobs();
    let cli = std::env::var("PM_DUCKDB_CLI").unwrap_or_else(|_| "duckdb".into());
    let mut session = Command::new(cli)
        .arg("-readonly")
        .arg(home.path().join("inventory.duckdb"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the duckdb CLI runs: pip install duckdb-cli==1.5.6");
    let mut stdin = session.stdin.take().unwrap();
    writeln!(stdin, "SELECT count(*) FROM jobs;").unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let run = query(
        &home,
        [
            "SELECT kind FROM jobs",
            "--format",
            "csv",
            "--lock-timeout",
            "2s",
        ],
    );
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(run.stdout(), "kind\nkey-new\nkey-new\n");

    drop(stdin);
    session.wait().unwrap();
}
