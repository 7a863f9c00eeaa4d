//! The inventory as users meet it: the stock DuckDB CLI reads it read-only, and a writer that
//! finds it locked waits, then fails clearly and changes nothing.

use std::time::{Duration, Instant};

use crate::support::{
    Home, Lab, Pm, duckdb, hold_read_write, manifest, sql, synced_at_3_with_6_upstream,
};

#[test]
fn the_duckdb_cli_reads_mirror_syncs_read_only() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();

    let file = home.path().join("inventory.duckdb");
    let file = file.to_str().unwrap();
    let (version, _, _) = duckdb(&["--version"]);
    assert_eq!(version, 0);
    let (code, out, err) = duckdb(&[
        "-readonly",
        "-csv",
        file,
        "-c",
        "SELECT product, result, versions, bytes_downloaded > 0 AS downloaded, coalesce(revision, '-') AS revision FROM mirror_syncs ORDER BY id",
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(
        rows,
        [
            "product,result,versions,downloaded,revision",
            "clamav,updated,test=3,true,r1",
            "clamav,updated,test=6,true,r2",
            "clamav,unchanged,test=6,false,-",
        ]
    );
    let (code, out, err) = duckdb(&[
        "-readonly",
        "-csv",
        "-noheader",
        file,
        "-c",
        "SELECT r.revision, f.version FROM revisions r JOIN revision_files f USING (revision) \
         WHERE f.path = 'clamav/test.cvd' ORDER BY r.serial; \
         SELECT revision FROM dist_history; SELECT count(*) FROM jobs WHERE kind = 'sync'",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["r1,3", "r2,6", "r2", "3"]);
    // Read-only really is read-only.
    let (code, _, _) = duckdb(&["-readonly", file, "-c", "DELETE FROM jobs"]);
    assert_ne!(code, 0);
}

#[test]
fn a_locked_inventory_makes_sync_wait_then_fail_clearly_having_changed_nothing() {
    let (_lab, home, before) = synced_at_3_with_6_upstream();

    // An interactive DuckDB CLI session holds the file open read-write until its stdin closes.
    let file = home.path().join("inventory.duckdb");
    let (mut session, stdin) = hold_read_write(&file);

    let started = Instant::now();
    let run = Pm::mirror(&home)
        .args(["sync", "--lock-timeout", "2s"])
        .run();
    let waited = started.elapsed();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(waited >= Duration::from_secs(2), "waited only {waited:?}");
    let stderr = run.stderr();
    assert!(stderr.contains("is locked by `duckdb`"), "{stderr}");
    assert!(
        stderr.contains("hint:") && stderr.contains("--lock-timeout"),
        "{stderr}"
    );
    assert_eq!(manifest(&home, "latest"), before, "nothing changed");

    drop(stdin);
    session.wait().unwrap();
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["revision"], "r2");
}

#[test]
fn first_runs_killed_while_creating_the_inventory_leave_none_or_a_complete_one() {
    // The first writer on a fresh home creates and migrates the inventory. Killed at any point
    // of that, it must leave either no inventory or a complete one that readers and the next
    // writer open: a log holding the first schema changes once made it unopenable.
    const STEPS: u32 = 16;
    let window = {
        let home = Home::new();
        let started = Instant::now();
        assert_eq!(Pm::activate(&home).args(["key", "new"]).run().code(), 0);
        started.elapsed()
    };
    let mut left_complete = 0;
    for step in 0..STEPS {
        let home = Home::new();
        let mut first = Pm::activate(&home)
            .args(["key", "new"])
            .command()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(window * step / STEPS);
        let _ = first.kill();
        first.wait().unwrap();

        let file = home.path().join("inventory.duckdb");
        if file.exists() {
            left_complete += 1;
            let (code, _, err) = duckdb(&[
                "-readonly",
                file.to_str().unwrap(),
                "-c",
                "SELECT count(*) FROM schema_migrations",
            ]);
            assert_eq!(code, 0, "step {step}: the DuckDB CLI cannot read it: {err}");
        }
        let next = Pm::activate(&home).args(["key", "new"]).run();
        assert_eq!(next.code(), 0, "step {step}: {}", next.stderr());
        let keys = sql(&home, "SELECT count(*) FROM activation_keys");
        assert!(
            keys == ["1"] || keys == ["2"],
            "step {step}: {keys:?} activation keys"
        );
        let strays: Vec<_> = std::fs::read_dir(home.path())
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".new-"))
            .collect();
        assert!(strays.is_empty(), "step {step}: left behind {strays:?}");
    }
    eprintln!("{left_complete} of {STEPS} killed first runs left an inventory");
}
