//! `pm-push upgrade-agent`: pm-agent packages as a dist product (`kind = "agent"`), real agents
//! of `pm-lab agents --own-binary` replacing their own executable and restarting in place (same
//! PID), and upgrades that are refused with nothing changed.

use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::push::Fleet;
use crate::support::{AgentSetup, Home, Lab, Pm, bin};

const AGENT_PRODUCT: &str =
    "[[products]]\nname = \"agent\"\nkind = \"agent\"\ndir = \"agent-packages\"\n";

fn sha256(path: &Path) -> String {
    pm::manifest::hex(&openssl::sha::sha256(&std::fs::read(path).unwrap()))
}

fn package_name(version: &str) -> String {
    format!(
        "pm-agent-{version}-{}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// Adds the `agent` product to the manager's pm.toml and returns its (empty) directory.
fn with_agent_product(home: &Home, lab: &Lab) -> PathBuf {
    home.clamav_config(lab, AGENT_PRODUCT);
    let dir = home.path().join("agent-packages");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The pm-agent of this build with bytes appended: an ELF ignores them, so it runs and prints
/// the same version, but its sha256 differs.
fn new_package(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(bin("pm-agent")).unwrap();
    bytes.extend_from_slice(b"\npm-agent upgrade test package\n");
    let path = dir.join(package_name(env!("CARGO_PKG_VERSION")));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The first agent still runs `exe` (not replaced) and answers a poll.
fn still_serves(fleet: &Fleet, exe: &Path) {
    let running = std::fs::read_link(format!("/proc/{}/exe", pid(fleet, 0))).unwrap();
    assert_eq!(running, exe);
    let polled = Pm::poll(&fleet.setup.home).args(["--all", "--json"]).run();
    assert_eq!(
        polled.code(),
        0,
        "the agent still answers: {}",
        polled.stderr()
    );
}

fn sync_and_publish(home: &Home) -> Value {
    let synced = Pm::mirror(home).args(["sync"]).json();
    Pm::mirror(home).args(["publish"]).json();
    synced
}

fn agent_dir(fleet: &Fleet, n: usize) -> PathBuf {
    fleet.dir.join(format!("agent-{n:03}"))
}

fn pid(fleet: &Fleet, n: usize) -> u32 {
    fleet.lab["agents"][n]["pid"].as_u64().unwrap() as u32
}

fn results(report: &Value) -> Vec<String> {
    let mut results: Vec<String> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{} {}",
                h["host"].as_str().unwrap(),
                h["result"].as_str().unwrap()
            )
        })
        .collect();
    results.sort();
    results
}

#[test]
fn upgrade_agent_replaces_every_executable_in_place_and_a_rerun_skips_every_host() {
    let fleet = Fleet::start_with(3, &["--own-binary"]);
    let home = &fleet.setup.home;
    let packages = with_agent_product(home, &fleet.setup.lab);
    let package = new_package(&packages);
    // An older version of the same platform is ignored: the highest version wins.
    std::fs::copy("/bin/true", packages.join(package_name("0.0.1"))).unwrap();
    let synced = sync_and_publish(home);
    let agent = synced["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "agent")
        .unwrap();
    assert_eq!(agent["kind"], "agent", "{agent}");
    let component = format!(
        "pm-agent-{}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    assert_eq!(
        agent["components"][0]["name"],
        component.as_str(),
        "{agent}"
    );
    assert_eq!(
        agent["components"][0]["version"],
        env!("CARGO_PKG_VERSION"),
        "{agent}"
    );
    let published = home.repo(&format!(
        "dist/agent/{}",
        package_name(env!("CARGO_PKG_VERSION"))
    ));
    let new_sha = sha256(&package);
    assert_eq!(sha256(&published), new_sha);
    let old_sha = sha256(Path::new(bin("pm-agent")));
    for n in 0..3 {
        assert_eq!(sha256(&agent_dir(&fleet, n).join("pm-agent")), old_sha);
    }

    let (code, report) = fleet.push(&["upgrade-agent", "--all"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(
        results(&report),
        ["lab-000 ok", "lab-001 ok", "lab-002 ok"],
        "{report}"
    );
    for n in 0..3 {
        let exe = agent_dir(&fleet, n).join("pm-agent");
        assert_eq!(sha256(&exe), new_sha, "agent {n} runs the package");
        assert_eq!(
            sha256(&agent_dir(&fleet, n).join("pm-agent.previous")),
            old_sha,
            "agent {n} keeps the old executable"
        );
        // Same process, now running the new file (not the deleted old one): it exec'd itself.
        let running = std::fs::read_link(format!("/proc/{}/exe", pid(&fleet, n))).unwrap();
        assert_eq!(running, exe, "agent {n} restarted in place");
    }
    // Every agent answers a poll after its restart.
    let polled = Pm::poll(home).args(["--all", "--json"]).run();
    assert_eq!(polled.code(), 0, "{}\n{}", polled.stdout(), polled.stderr());

    let (code, again) = fleet.push(&["upgrade-agent", "--all"]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(
        results(&again),
        ["lab-000 skipped", "lab-001 skipped", "lab-002 skipped"],
        "{again}"
    );
    assert_eq!(again["summary"]["skipped"], 3, "{again}");
}

#[test]
fn a_package_that_does_not_run_as_pm_agent_fails_the_first_host_and_the_others_are_left_alone() {
    let fleet = Fleet::start_with(3, &["--own-binary"]);
    let home = &fleet.setup.home;
    let packages = with_agent_product(home, &fleet.setup.lab);
    // An ELF (so sync takes it) that is no pm-agent: `--version` does not name pm-agent 9.9.9.
    std::fs::copy("/bin/false", packages.join(package_name("9.9.9"))).unwrap();
    sync_and_publish(home);
    let exe = agent_dir(&fleet, 0).join("pm-agent");
    let before = sha256(&exe);
    let others: Vec<_> = (1..3)
        .map(|i| sha256(&agent_dir(&fleet, i).join("pm-agent")))
        .collect();

    // The first host goes alone: it fails, so the others are not even asked.
    let (code, report) = fleet.push(&["upgrade-agent", "--all"]);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["changed"], false, "{report}");
    assert_eq!(
        results(&report),
        [
            "lab-000 failed",
            "lab-001 not_attempted",
            "lab-002 not_attempted"
        ],
        "{report}"
    );
    assert_eq!(report["summary"]["not_attempted"], 2, "{report}");
    for (i, before) in (1..3).zip(&others) {
        assert_eq!(&sha256(&agent_dir(&fleet, i).join("pm-agent")), before);
    }
    let error = report["hosts"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("does not run as pm-agent 9.9.9"),
        "the reason is given: {error}"
    );
    assert_eq!(sha256(&exe), before, "the executable is unchanged");
    let leftovers: Vec<String> = std::fs::read_dir(agent_dir(&fleet, 0))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".pm-agent") || name.ends_with(".previous"))
        .collect();
    assert!(leftovers.is_empty(), "nothing left behind: {leftovers:?}");
    still_serves(&fleet, &exe);
}

#[test]
fn upgrade_agent_without_an_agent_product_in_dist_is_a_usage_error_with_a_hint() {
    let setup = AgentSetup::new();
    let run = Pm::push(&setup.home)
        .args(["upgrade-agent", "--all", "--json"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(
        run.stderr().contains("has no `agent` product"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("hint: add `[[products]]"),
        "{}",
        run.stderr()
    );
}

#[test]
fn sync_refuses_an_agent_package_that_is_not_elf_or_is_badly_named() {
    let lab = Lab::start(3);
    let home = Home::new();
    let packages = with_agent_product(&home, &lab);
    let script = packages.join(package_name("1.0.0"));
    std::fs::write(&script, "#!/bin/sh\nexit 1\n").unwrap();
    let run = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stdout().contains("is not an ELF executable"),
        "{}",
        run.stdout()
    );
    assert!(run.stdout().contains(&script.display().to_string()));

    std::fs::remove_file(&script).unwrap();
    let badly_named = packages.join("pm-agent-latest");
    std::fs::copy("/bin/true", &badly_named).unwrap();
    let run = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stdout().contains(
            "is not named like a pm-agent package: expected `pm-agent-<version>-<arch>-<os>`"
        ),
        "{}",
        run.stdout()
    );

    // Mended, the same directory syncs.
    std::fs::remove_file(&badly_named).unwrap();
    std::fs::copy("/bin/true", packages.join(package_name("1.0.0"))).unwrap();
    let synced = Pm::mirror(&home).args(["sync"]).json();
    assert!(
        home.repo(&format!("latest/agent/{}", package_name("1.0.0")))
            .is_file(),
        "{synced}"
    );
}

#[test]
fn pm_agent_upgrade_replaces_its_own_file_and_status_shows_the_new_sha256() {
    let setup = AgentSetup::new();
    let packages = with_agent_product(&setup.home, &setup.lab);
    let package = new_package(&packages);
    sync_and_publish(&setup.home);
    // A copy of pm-agent, so that the build's own binary is never replaced.
    let copy = setup.tmp.path().join("bin").join("pm-agent");
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(bin("pm-agent"), &copy).unwrap();
    let old_sha = sha256(&copy);
    let new_sha = sha256(&package);
    let local = |args: &[&str]| {
        let output = std::process::Command::new(&copy)
            .arg("--state")
            .arg(setup.state())
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    assert_eq!(local(&["status"])["agent_sha256"], old_sha.as_str());

    let report = local(&["upgrade"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["from_sha256"], old_sha.as_str(), "{report}");
    assert_eq!(report["to_sha256"], new_sha.as_str(), "{report}");
    assert_eq!(sha256(&copy), new_sha);
    assert_eq!(sha256(&copy.with_file_name("pm-agent.previous")), old_sha);
    assert_eq!(local(&["status"])["agent_sha256"], new_sha.as_str());
    assert_eq!(local(&["upgrade"])["changed"], false);
}

#[test]
fn a_package_that_prints_the_right_version_but_cannot_read_the_agents_state_is_refused() {
    let fleet = Fleet::start_with(1, &["--own-binary"]);
    let home = &fleet.setup.home;
    let packages = with_agent_product(home, &fleet.setup.lab);
    // A real ELF built here that answers `--version` as pm-agent 9.9.9 would and fails at
    // everything else: after an exec it would never serve, so it must never replace the agent.
    let source = packages.join("impostor.rs");
    std::fs::write(
        &source,
        r#"fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("pm-agent 9.9.9");
    } else {
        eprintln!("error: cannot read agent.toml");
        std::process::exit(1);
    }
}
"#,
    )
    .unwrap();
    let built = std::process::Command::new("rustc")
        .args(["-O", "-o"])
        .arg(packages.join(package_name("9.9.9")))
        .arg(&source)
        .output()
        .expect("rustc (it comes with cargo)");
    assert!(built.status.success(), "{built:?}");
    std::fs::remove_file(&source).unwrap();
    sync_and_publish(home);
    let exe = agent_dir(&fleet, 0).join("pm-agent");
    let before = sha256(&exe);

    let (code, report) = fleet.push(&["upgrade-agent", "--all"]);
    assert_eq!(code, 1, "{report}");
    let error = report["hosts"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("`status` cannot read this agent's state")
            && error.contains("cannot read agent.toml"),
        "the reason is given: {error}"
    );
    assert_eq!(sha256(&exe), before, "the executable is unchanged");
    still_serves(&fleet, &exe);
}
