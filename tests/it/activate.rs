//! `pm-activate key`: activation keys are shown once, stored only as a hash, live at most a
//! day, and can be listed and revoked.

use std::os::unix::fs::PermissionsExt;

use crate::support::{Home, Pm};

#[test]
fn a_new_key_is_shown_once_and_only_its_hash_is_stored() {
    let home = Home::new();
    let run = Pm::activate(&home)
        .args(["key", "new", "--ttl", "2h", "--json"])
        .env("RUST_LOG", "trace")
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let report = run.json();
    let key = report["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("pmk1."));
    assert!(report["expires_at"].as_str().is_some());
    assert_eq!(report["max_uses"], 1);
    assert!(!run.stderr().contains(&key), "the key is never logged");
    let secret = key.rsplit('.').next().unwrap();
    let inventory = std::fs::read(home.path().join("inventory.duckdb")).unwrap();
    assert!(
        !inventory
            .windows(secret.len())
            .any(|w| w == secret.as_bytes()),
        "no secret in the inventory"
    );

    let list = Pm::activate(&home).args(["key", "list"]).json();
    assert_eq!(list["keys"][0]["state"], "active");
    assert!(!list.to_string().contains(secret));
}

#[test]
fn a_key_file_is_private_and_never_overwritten() {
    let home = Home::new();
    let file = home.path().join("agent.key");
    let report = Pm::activate(&home)
        .args(["key", "new", "--reusable", "--out"])
        .args([&file])
        .json();
    assert!(
        report.get("key").is_none(),
        "written to the file, not printed"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&file).unwrap().starts_with("pmk1."));
    let again = Pm::activate(&home)
        .args(["key", "new", "--out"])
        .args([&file])
        .run();
    assert_eq!(again.code(), 2);
    assert!(again.stderr().contains("already exists"));
}

#[test]
fn keys_live_at_most_a_day_and_can_be_revoked() {
    let home = Home::new();
    let too_long = Pm::activate(&home)
        .args(["key", "new", "--ttl", "25h"])
        .run();
    assert_eq!(too_long.code(), 2);
    assert!(
        too_long.stderr().contains("at most 24h"),
        "{}",
        too_long.stderr()
    );

    let id = Pm::activate(&home).args(["key", "new"]).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let revoked = Pm::activate(&home).args(["key", "revoke", &id]).json();
    assert_eq!(revoked["changed"], true);
    let again = Pm::activate(&home).args(["key", "revoke", &id]).json();
    assert_eq!(again["changed"], false);
    let list = Pm::activate(&home).args(["key", "list"]).json();
    assert_eq!(list["keys"][0]["state"], "revoked");
    let unknown = Pm::activate(&home)
        .args(["key", "revoke", "deadbeef"])
        .run();
    assert_eq!(unknown.code(), 2);
}
