//! Every SQL example of the README's "SQL surface" runs, read-only, with the stock DuckDB CLI
//! and with Python's duckdb, against an inventory that real agents and pm-poll filled.
//!
//! `PM_PRINT_EXAMPLES=1 cargo test --test it readme` prints each example's output (DuckDB's box
//! format), which is how the README's outputs were made.

use std::process::Command;

use crate::support::{AgentSetup, EICAR, Pm, duckdb};

/// The ```sql blocks between the README's example markers.
fn examples() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- sql-examples -->")
        .expect("README has <!-- sql-examples -->");
    let end = readme
        .find("<!-- /sql-examples -->")
        .expect("README has <!-- /sql-examples -->");
    let mut blocks = Vec::new();
    let mut rest = &readme[start..end];
    while let Some(open) = rest.find("```sql\n") {
        let body = &rest[open + 7..];
        let close = body.find("```").expect("a closed ```sql block");
        blocks.push(body[..close].trim().to_string());
        rest = &body[close + 3..];
    }
    blocks
}

#[test]
fn every_readme_sql_example_runs_in_the_duckdb_cli_and_python_duckdb() {
    let examples = examples();
    assert!(examples.len() >= 7, "found {} examples", examples.len());

    let setup = AgentSetup::with(|_| {}, &["--group", "web", "--name", "web-1"]);
    let mut other = setup.add_agent("db-1", &["--group", "db"]);
    setup.agent_cmd(&["update"]);
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    setup.agent_cmd(&["scan", dir.to_str().unwrap()]);
    Pm::poll(&setup.home).args(["--json"]).run();
    setup.publish(6);
    setup.agent_cmd(&["update"]);
    other.stop();
    Pm::poll(&setup.home)
        .args(["--json", "--timeout", "3s"])
        .run();

    let file = setup.home.path().join("inventory.duckdb");
    let file = file.to_str().unwrap();
    let print = std::env::var_os("PM_PRINT_EXAMPLES").is_some();
    for sql in &examples {
        let (code, csv, err) = duckdb(&["-readonly", "-csv", file, "-c", sql]);
        assert_eq!(code, 0, "duckdb CLI: {sql}\n{err}");
        let cli_rows = csv.lines().count().saturating_sub(1);
        assert!(
            cli_rows > 0,
            "the example returns rows on this fleet: {sql}"
        );
        let python = Command::new("python3")
            .args([
                "-c",
                "import duckdb, sys\n\
                 con = duckdb.connect(sys.argv[1], read_only=True)\n\
                 print(len(con.execute(sys.argv[2]).fetchall()))",
                file,
                sql,
            ])
            .output()
            .expect("python3 runs: pip install duckdb==1.5.6");
        assert!(
            python.status.success(),
            "python duckdb: {sql}\n{}",
            String::from_utf8_lossy(&python.stderr)
        );
        let python_rows: usize = String::from_utf8_lossy(&python.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(python_rows, cli_rows, "{sql}");
        if print {
            let (_, table, _) = duckdb(&["-readonly", file, "-c", sql]);
            println!("{sql}\n{table}");
        }
    }
}
