//! The setup steps after activation (profile, group, license), each reported and retried alone,
//! and the profiles the real clamscan then runs with.

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use crate::support::{AgentSetup, EICAR, Home, Pm};

fn steps(report: &Value) -> Vec<(String, bool)> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["ok"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn in_a_year() -> String {
    (chrono::Utc::now() + chrono::Duration::days(365))
        .format("%Y-%m-%d")
        .to_string()
}

fn register_license(home: &Home, content: &str) -> std::path::PathBuf {
    let file = home.path().join("site.lic");
    std::fs::write(&file, content).unwrap();
    let run = Pm::activate(home)
        .args(["license", "add"])
        .args([&file])
        .args(["--expires", &in_a_year(), "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(run.json()["changed"], true);
    file
}

fn host_again(setup: &AgentSetup, flags: &[&str]) -> (i32, Value) {
    let run = Pm::activate(&setup.home)
        .args(["host", &setup.addr.to_string(), "--json"])
        .args(flags)
        .run();
    (run.code(), run.json())
}

fn listed(home: &Home) -> Value {
    Pm::activate(home).args(["list"]).json()["hosts"][0].clone()
}

#[test]
fn activation_gives_the_agent_its_profile_group_and_license_and_scans_use_the_profile() {
    let setup = AgentSetup::with(
        |home| {
            Pm::activate(home)
                .args(["profile", "new", "servers", "--set", r"exclude=\.skip$"])
                .args(["--set", "max_filesize_mb=50"])
                .json();
            register_license(home, "LICENSE-ID=4711\n");
        },
        &["--profile", "servers", "--group", "web"],
    );
    let host = listed(&setup.home);
    assert_eq!(host["profile"], "servers");
    assert_eq!(host["group"], "web");
    assert_eq!(host["setup_failed"], serde_json::json!([]));
    assert!(host["license_sha256"].as_str().unwrap().len() == 64);

    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["group"], "web");
    assert_eq!(status["profile"]["name"], "servers");
    assert_eq!(status["profile"]["options"]["exclude"][0], r"\.skip$");
    assert_eq!(status["license"]["file_name"], "site.lic");
    let license = setup.state().join("license/site.lic");
    assert_eq!(
        std::fs::read_to_string(&license).unwrap(),
        "LICENSE-ID=4711\n"
    );
    assert_eq!(
        std::fs::metadata(&license).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The manager sees the same over mutual TLS.
    let (code, remote) = setup.get("/v1/status");
    assert_eq!(code, 200);
    assert_eq!(remote["profile"], "servers");
    assert_eq!(remote["group"], "web");
    assert!(remote["license_expires_at"].is_string());

    // The real clamscan runs with the profile: the excluded copy of EICAR is not reported.
    setup.agent_cmd(&["update"]);
    let dir = setup.tmp.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("eicar.com"), EICAR).unwrap();
    std::fs::write(dir.join("eicar.skip"), EICAR).unwrap();
    let report = setup.agent_cmd(&["scan", dir.to_str().unwrap()]);
    let found: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(found, [dir.join("eicar.com").to_str().unwrap()], "{report}");

    // Running host again changes nothing: the agent already has exactly this setup.
    let (code, again) = host_again(&setup, &[]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["profile"], "servers");
}

#[test]
fn a_failed_setup_step_is_reported_alone_and_retried_by_running_host_again() {
    let setup = AgentSetup::with(
        |home| {
            // A file-mode profile: a clamav agent refuses it.
            let conf = home.path().join("scan.conf");
            std::fs::write(&conf, "[filescan.options]\nMaxSize=134217727\n").unwrap();
            Pm::activate(home)
                .args(["profile", "new", "raw", "--file"])
                .args([&conf])
                .json();
        },
        &[],
    );
    let (code, report) = host_again(&setup, &["--profile", "raw", "--group", "db"]);
    assert_eq!(code, 3, "partial setup exits 3: {report}");
    let steps = steps(&report);
    assert!(steps.contains(&("profile".into(), false)), "{steps:?}");
    assert!(steps.contains(&("group".into(), true)), "{steps:?}");
    let failed = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "profile")
        .unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("form profiles only"),
        "{failed}"
    );
    // No license is registered: the step says so and does not fail.
    assert!(steps.contains(&("license".into(), true)), "{steps:?}");
    assert_eq!(
        listed(&setup.home)["setup_failed"],
        serde_json::json!(["profile"])
    );
    assert_eq!(setup.agent_cmd(&["status"])["group"], "db");

    // Fix the cause and run the same command again: only what is missing changes.
    Pm::activate(&setup.home)
        .args(["profile", "new", "raw", "--set", "scan_archive=no"])
        .json();
    let (code, report) = host_again(&setup, &["--profile", "raw"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["changed"], true);
    assert!(steps_ok(&report), "{report}");
    let host = listed(&setup.home);
    assert_eq!(host["setup_failed"], serde_json::json!([]));
    assert_eq!(host["group"], "db", "the group given before is kept");
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["profile"]["options"]["scan_archive"], false);
}

fn steps_ok(report: &Value) -> bool {
    steps(report).iter().all(|(_, ok)| *ok)
}

#[test]
fn an_unknown_profile_is_refused_before_the_agent_or_the_key_is_touched() {
    let setup = AgentSetup::new();
    let (code, report) = host_again(&setup, &["--profile", "nope"]);
    assert_eq!(code, 2, "{report}");
    assert_eq!(report["changed"], false);
    let run = Pm::activate(&setup.home)
        .args(["host", &setup.addr.to_string(), "--profile", "nope"])
        .run();
    assert!(
        run.stderr().contains("there is no profile `nope`"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("pm-activate profile new nope"),
        "{}",
        run.stderr()
    );
    assert_eq!(listed(&setup.home)["profile"], "default");
}

#[test]
fn profiles_are_checked_and_default_or_used_ones_cannot_be_deleted() {
    let home = Home::new();
    let list = Pm::activate(&home).args(["profile", "list"]).json();
    assert_eq!(list["profiles"][0]["name"], "default");

    for (flags, expected) in [
        (vec!["--set", "max_recursion=1000"], "1..=100"),
        (vec!["--set", "shell=sh -c id"], "not a profile key"),
        (vec!["--set", "nonsense"], "key=value"),
    ] {
        let run = Pm::activate(&home)
            .args(["profile", "new", "bad"])
            .args(flags)
            .run();
        assert_eq!(run.code(), 2, "{}", run.stderr());
        assert!(run.stderr().contains(expected), "{}", run.stderr());
    }
    let run = Pm::activate(&home)
        .args(["profile", "new", "../etc", "--set", "scan_archive=no"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("../etc"), "{}", run.stderr());
    // Neither --set nor --file: nothing to save.
    let run = Pm::activate(&home).args(["profile", "new", "empty"]).run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(run.stderr().contains("--set"), "{}", run.stderr());

    let run = Pm::activate(&home)
        .args(["profile", "delete", "default"])
        .run();
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr().contains("cannot be deleted"),
        "{}",
        run.stderr()
    );

    let saved = Pm::activate(&home)
        .args(["profile", "new", "quick", "--set", "scan_archive=no"])
        .json();
    assert_eq!(saved["changed"], true);
    let again = Pm::activate(&home)
        .args(["profile", "new", "quick", "--set", "scan_archive=no"])
        .json();
    assert_eq!(
        again["changed"], false,
        "saving the same profile changes nothing"
    );
    let shown = Pm::activate(&home)
        .args(["profile", "show", "quick"])
        .json();
    assert_eq!(shown["profile"]["options"]["scan_archive"], false);
    let deleted = Pm::activate(&home)
        .args(["profile", "delete", "quick"])
        .json();
    assert_eq!(deleted["changed"], true);
    let run = Pm::activate(&home).args(["profile", "show", "quick"]).run();
    assert_eq!(run.code(), 2);
}

#[test]
fn licenses_are_kept_private_and_an_expired_one_is_refused() {
    let home = Home::new();
    let file = register_license(&home, "secret license\n");
    let listed = Pm::activate(&home).args(["license", "list"]).json();
    let sha = listed["licenses"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(listed["licenses"][0]["current"], true);
    let stored = home.path().join("licenses").join(&sha);
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let run = Pm::activate(&home)
        .args(["license", "add"])
        .args([&file])
        .args(["--expires", "2001-01-01"])
        .run();
    assert_eq!(run.code(), 2);
    assert!(run.stderr().contains("in the past"), "{}", run.stderr());
    let run = Pm::activate(&home).args(["license", "list"]).run();
    assert!(!run.stdout().contains("secret license"));
}

/// Red team C, item 6: a profile replaced while a host is down. The inventory says the host does
/// not have it yet (`setup: failed: profile`), pm-doctor names it, and `pm-activate host ADDR`
/// sends it once the host answers.
#[test]
fn a_profile_replaced_while_its_host_is_down_is_pending_until_activate_host_sends_it() {
    let mut setup = AgentSetup::new();
    if let Some(mut agent) = setup.agent.take() {
        agent.kill().unwrap();
        agent.wait().unwrap();
    }
    let run = Pm::activate(&setup.home)
        .args([
            "profile",
            "new",
            "default",
            "--set",
            r"exclude=\.bak$",
            "--json",
        ])
        .run();
    assert_eq!(run.code(), 3, "saved, not sent: partial: {}", run.stderr());
    assert_eq!(
        listed(&setup.home)["setup_failed"],
        serde_json::json!(["profile"]),
        "the inventory must not say the host has a profile it does not have"
    );
    setup.run_agent();
    assert!(setup.agent_cmd(&["status"])["profile"]["options"]["exclude"].is_null());
    let polled = Pm::poll(&setup.home).run();
    assert_eq!(polled.code(), 0, "{}", polled.stderr());
    assert_eq!(
        listed(&setup.home)["setup_failed"],
        serde_json::json!(["profile"])
    );
    let doctor = Pm::new("pm-doctor")
        .args(["--home", setup.home.path().to_str().unwrap(), "--json"])
        .run()
        .json();
    let check = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "setup")
        .unwrap_or_else(|| panic!("pm-doctor names no setup check: {doctor}"));
    assert_eq!(check["result"], "warn", "{check}");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1 (profile)"),
        "{check}"
    );
    assert!(
        check["hint"].as_str().unwrap().contains("pm-activate host"),
        "{check}"
    );
    let (code, report) = host_again(&setup, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(listed(&setup.home)["setup_failed"], serde_json::json!([]));
    assert_eq!(
        setup.agent_cmd(&["status"])["profile"]["options"]["exclude"][0],
        r"\.bak$"
    );
}
