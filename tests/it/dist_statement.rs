//! Rollback and freeze attacks at the agent (SECURITY.md sections 2 and 3): the signed dist
//! statement makes an agent refuse an old dist replayed to it, a dist stripped of its statement,
//! a statement paired with another revision's manifest, and a dist nobody re-signed for longer
//! than `[serve] dist_valid_for`; an explicit rollback still goes back.

use std::path::Path;

use crate::agent_install::sigtool_version;
use crate::support::{AgentSetup, Home, Pm, Server};

/// Points the agent's dist URL at `base`, as a network that redirects it would.
fn redirect_dist(setup: &AgentSetup, base: &str) {
    let record = setup.state().join("manager/manager.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    value["dist_url"] = base.into();
    std::fs::write(&record, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

/// A home serving a copy of `from`'s repository as it is now.
fn copy_of_repo(from: &Home) -> Home {
    let copy = Home::new();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(from.path().join("repo"))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    copy
}

fn update_refused(setup: &AgentSetup, says: &str) {
    let run = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    assert!(run.stderr().contains(says), "{}", run.stderr());
    assert!(run.stderr().contains("hint:"), "{}", run.stderr());
}

fn accepted_serial(setup: &AgentSetup) -> u64 {
    let path = setup.state().join("manager/dist-statement.json");
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    value["dist_serial"].as_u64().unwrap()
}

fn view_file(home: &Home, name: &str) -> std::path::PathBuf {
    home.path().join("repo/view").join(name)
}

#[test]
fn an_agent_refuses_a_replayed_older_dist_a_stripped_or_mismatched_statement_but_follows_an_explicit_rollback()
 {
    let setup = AgentSetup::new();
    let db = setup.db();
    // What the manager served at r1 (test 3), kept by an attacker.
    let old = copy_of_repo(&setup.home);
    setup.publish(6);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(sigtool_version(&db), "6", "{report}");
    assert_eq!(accepted_serial(&setup), 2);
    let installed = std::fs::read(setup.state().join("installed.json")).unwrap();

    // The network replays the old, genuinely signed dist.
    let replay = Server::start(&old);
    redirect_dist(&setup, &replay.base);
    update_refused(&setup, "older than one this agent already accepted");

    // ... or strips the statement so the agent cannot compare.
    for name in ["dist.json", "dist.sig"] {
        std::fs::remove_file(view_file(&old, name)).unwrap();
    }
    update_refused(&setup, "serves no signed dist statement");

    // ... or pairs the current statement with the old manifest.
    for name in ["dist.json", "dist.sig"] {
        std::fs::copy(view_file(&setup.home, name), view_file(&old, name)).unwrap();
    }
    update_refused(&setup, "the manifest served is r1");

    // ... or alters the statement.
    let mut forged = std::fs::read(view_file(&old, "dist.json")).unwrap();
    let at = forged.iter().position(|b| *b == b'2').unwrap();
    forged[at] = b'9';
    std::fs::write(view_file(&old, "dist.json"), forged).unwrap();
    update_refused(&setup, "its signature does not verify");

    // Nothing of it reached the database or the agent's records.
    assert_eq!(sigtool_version(&db), "6");
    assert_eq!(
        std::fs::read(setup.state().join("installed.json")).unwrap(),
        installed
    );
    assert_eq!(accepted_serial(&setup), 2);

    // The operator's rollback goes back: dist moves to r1 with a newer statement.
    redirect_dist(&setup, &setup.server.base);
    let rollback = Pm::mirror(&setup.home)
        .args(["rollback", "--generation", "1"])
        .json();
    assert_eq!(rollback["to"], "r1", "{rollback}");
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["action"], "rollback", "{report}");
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(accepted_serial(&setup), 3);
}

#[test]
fn an_agent_refuses_a_dist_not_re_signed_in_time_and_publish_re_signs_it() {
    let setup = AgentSetup::with(
        |home| {
            let config = home.path().join("pm.toml");
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str("\n[serve]\ndist_valid_for = \"7s\"\n");
            std::fs::write(&config, text).unwrap();
        },
        &[],
    );
    let db = setup.db();
    // The setup published before pm.toml said 7s; this publish signs with it.
    setup.publish(6);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(sigtool_version(&db), "6", "{report}");

    // A frozen dist: the same statement, served after it expired.
    std::thread::sleep(std::time::Duration::from_millis(7500));
    update_refused(&setup, "expired at");
    assert_eq!(sigtool_version(&db), "6");
    // The manager's own check says so too.
    assert_eq!(doctor_statement(&setup.home)["result"], "fail");

    // The manager's timer runs publish: with nothing new, it re-signs dist.
    let publish = Pm::mirror(&setup.home).args(["publish"]).json();
    assert_eq!(publish["changed"], false, "{publish}");
    assert_eq!(publish["re_signed"], true, "{publish}");
    // Right after, it does not sign again: a seventh of the validity (1 s) has not passed.
    let again = Pm::mirror(&setup.home).args(["publish"]).json();
    assert_eq!(again["re_signed"], false, "{again}");
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], false, "{report}");
    assert!(Path::new(&view_file(&setup.home, "dist.json")).exists());
    // 7 s of validity is under the 2 days pm-doctor wants left: a warning, not a failure.
    assert_eq!(doctor_statement(&setup.home)["result"], "warn");
}

/// pm-doctor's `dist statement` check.
fn doctor_statement(home: &Home) -> serde_json::Value {
    let run = Pm::new("pm-doctor")
        .args(["--home", home.path().to_str().unwrap(), "--json"])
        .run();
    run.json()["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "dist statement")
        .cloned()
        .unwrap_or_else(|| panic!("no dist statement check: {}", run.stdout()))
}
