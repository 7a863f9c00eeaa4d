//! Agents and the manifest key (docs/keys.md, Agents): a fleet follows a rotation at its next
//! update and reports the key it holds; a rotation statement the old key did not sign is
//! refused; after a lost key the operator's trust step (`pm-agent trust-key`) is the way back.

use std::path::Path;

use pm::manifest::hex;
use pm::pki::SigningKey;
use pm::pki::rotation::{KeyChain, SignedRotation};
use serde_json::Value;

use crate::agent_install::sigtool_version;
use crate::push::Fleet;
use crate::support::{AgentSetup, Home, Pm, sql};

/// The fingerprint of the manifest key an agent's state directory holds.
fn agent_key(state: &Path) -> String {
    let pem = std::fs::read(state.join("manager/manifest-signing.pub.pem")).unwrap();
    pm::pki::parse_public_key(&pem, Path::new("pub.pem"))
        .unwrap()
        .0
}

/// The fingerprint of the manager's current manifest key.
fn manager_key(home: &Home) -> String {
    let pem = std::fs::read(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap();
    pm::pki::parse_public_key(&pem, Path::new("pub.pem"))
        .unwrap()
        .0
}

/// The agent's record of the keys it moved to.
fn history(state: &Path) -> Value {
    let path = state.join("manager/key-rotations.json");
    std::fs::read(&path)
        .map(|bytes| serde_json::from_slice(&bytes).unwrap())
        .unwrap_or(Value::Null)
}

/// pm-doctor's `manifest keys` check.
fn doctor_keys_check(home: &Home) -> Value {
    let (_, report) = crate::doctor::json(crate::doctor::doctor(home));
    crate::doctor::check(&report, "manifest keys").clone()
}

#[test]
fn a_fleet_follows_a_rotation_at_its_next_rollout_reports_the_new_key_and_rolls_back_to_a_backup_signed_before_it()
 {
    let fleet = Fleet::start(3);
    let home = &fleet.setup.home;
    fleet.setup.publish(4);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    let old_key = manager_key(home);

    let rotated = Pm::mirror(home)
        .args(["key", "rotate", "--reason", "yearly rotation"])
        .json();
    let new_key = rotated["new_key"].as_str().unwrap().to_string();
    assert_ne!(new_key, old_key);
    assert_eq!(Pm::poll(home).run().code(), 0);
    let check = doctor_keys_check(home);
    assert_eq!(check["result"], "warn", "{check}");
    assert!(
        check["message"].as_str().unwrap().contains(
            "3 hosts still trust an older manifest key: they follow at their next update: \
             lab-000, lab-001, lab-002"
        ),
        "{check}"
    );
    // Nothing new to install: a rollout still moves them on (hosts on an older key are not
    // "already on dist"), as docs/keys.md's steps after a theft say.
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    assert!(!pushed.to_string().contains("already on"), "{pushed}");
    for n in 0..3 {
        let state = fleet.dir.join(format!("agent-{n:03}"));
        assert_eq!(
            agent_key(&state),
            new_key,
            "agent {n} followed without a new revision"
        );
    }
    assert_eq!(Pm::poll(home).run().code(), 0);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "{pushed}");
    assert_eq!(
        pushed.to_string().matches("already on").count(),
        3,
        "followed hosts on dist are skipped again: {pushed}"
    );
    fleet.setup.publish(5);
    let (code, pushed) = fleet.push(&["update"]);
    assert_eq!(code, 0, "the rollout after the rotation: {pushed}");
    for n in 0..3 {
        let state = fleet.dir.join(format!("agent-{n:03}"));
        assert_eq!(agent_key(&state), new_key, "agent {n} holds the new key");
        let history = history(&state);
        assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
        assert_eq!(history[0]["previous_key"], old_key.as_str());
        assert_eq!(history[0]["new_key"], new_key.as_str());
        assert_eq!(history[0]["sequence"], 1);
        assert_eq!(history[0]["reason"], "yearly rotation");
        assert_eq!(history[0]["how"], "rotation statement");
        let db = fleet.dir.join(format!("agent-{n:03}-db"));
        assert_eq!(sigtool_version(&db), "5", "agent {n} installed r3");
    }
    let polled = Pm::poll(home).run();
    assert_eq!(polled.code(), 0, "{}", polled.stderr());
    assert_eq!(
        sql(
            home,
            "SELECT host, manifest_key FROM host_state WHERE host LIKE 'lab-%' ORDER BY host"
        ),
        (0..3)
            .map(|n| format!("lab-{n:03},{new_key}"))
            .collect::<Vec<_>>()
    );
    let check = doctor_keys_check(home);
    assert_eq!(check["result"], "ok", "{check}");

    // A fleet rollback to backup 1 (r2, published before the rotation) works.
    let run = Pm::rollback(home)
        .args(["--generation", "1", "--json"])
        .run();
    assert_eq!(run.code(), 0, "{}\n{}", run.stdout(), run.stderr());
    for n in 0..3 {
        let db = fleet.dir.join(format!("agent-{n:03}-db"));
        assert_eq!(sigtool_version(&db), "4", "agent {n} rolled back to r2");
    }
}

#[test]
fn a_rotation_statement_the_agents_key_did_not_sign_is_refused_and_the_agent_keeps_its_key_and_installs_nothing()
 {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    let installed_before = std::fs::read(setup.state().join("installed.json")).unwrap();
    let trusted = agent_key(&setup.state());
    setup.publish(4);

    // Mallory names the agent's key in a statement she signs with her own, towards a key she
    // holds, and signs dist's manifest with that key.
    let [mallory, next] = [(); 2].map(|_| SigningKey::generate().unwrap());
    let mut forged = SignedRotation::sign(&mallory, &next, 1, "forged").unwrap();
    let mut rotation = forged.rotation().unwrap();
    rotation.previous_key = trusted.clone();
    forged.statement = serde_json::to_string_pretty(&rotation).unwrap();
    forged.previous_signature = hex(&mallory.sign(forged.statement.as_bytes()).unwrap());
    forged.next_signature = hex(&next.sign(forged.statement.as_bytes()).unwrap());
    let chain = KeyChain {
        format: 1,
        rotations: vec![forged],
    };
    let view = setup.home.repo("view");
    std::fs::write(view.join("keys.json"), chain.to_bytes()).unwrap();
    let dist = view.join("dist");
    let manifest = std::fs::read(dist.join("manifest.json")).unwrap();
    std::fs::remove_file(dist.join("manifest.sig")).unwrap();
    std::fs::write(dist.join("manifest.sig"), next.sign(&manifest).unwrap()).unwrap();

    let run = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stderr()
            .contains("the manager's key chain does not verify from the key this agent trusts")
            && run.stderr().contains("key rotation 1")
            && run.stderr().contains("hint:"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        agent_key(&setup.state()),
        trusted,
        "the agent keeps its key"
    );
    assert_eq!(history(&setup.state()), Value::Null, "no rotation recorded");
    assert_eq!(
        std::fs::read(setup.state().join("installed.json")).unwrap(),
        installed_before,
        "nothing installed"
    );
    assert_eq!(sigtool_version(&setup.db()), "3");
}

#[test]
fn after_a_lost_key_an_update_names_the_trust_step_and_trust_key_with_the_right_fingerprint_brings_the_agent_back()
 {
    let setup = AgentSetup::new();
    let home = &setup.home;
    setup.agent_cmd(&["update"]);
    let old_key = agent_key(&setup.state());
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(home.path().join(file)).unwrap();
    }
    let rotated = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost", "--reason", "disk lost"])
        .json();
    let new_key = rotated["new_key"].as_str().unwrap().to_string();
    setup.publish(4);
    assert_eq!(Pm::poll(home).run().code(), 0);
    let check = doctor_keys_check(home);
    assert_eq!(check["result"], "fail", "{check}");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("1 hosts trust a key this manager no longer has: 127.0.0.1"),
        "{check}"
    );
    assert!(
        check["hint"]
            .as_str()
            .unwrap()
            .contains("pm-agent trust-key"),
        "{check}"
    );

    let update = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(update.code(), 1, "{}", update.stderr());
    assert!(
        update.stderr().contains("pm-agent trust-key --fingerprint"),
        "{}",
        update.stderr()
    );

    // A fingerprint that is not the manager's key's, or not a fingerprint: refused, nothing
    // changes.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let run = Pm::agent(&setup.state())
        .args(["trust-key", "--fingerprint", &wrong])
        .run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stderr().contains(&new_key) && run.stderr().contains("hint:"),
        "{}",
        run.stderr()
    );
    let run = Pm::agent(&setup.state())
        .args(["trust-key", "--fingerprint", "abc"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
    // Another key whose fingerprint the operator confirmed, but that does not sign dist.
    let other = SigningKey::generate().unwrap();
    let other_file = setup.tmp.path().join("other.pem");
    std::fs::write(&other_file, other.public_key_pem().unwrap()).unwrap();
    let run = Pm::agent(&setup.state())
        .args([
            "trust-key",
            "--fingerprint",
            &other.fingerprint().unwrap(),
            "--key",
        ])
        .args([&other_file])
        .run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(run.stderr().contains("does not verify"), "{}", run.stderr());
    assert_eq!(agent_key(&setup.state()), old_key, "nothing changed");
    assert_eq!(history(&setup.state()), Value::Null);

    let trusted = Pm::agent(&setup.state())
        .args(["trust-key", "--fingerprint", &new_key])
        .json();
    assert_eq!(trusted["changed"], true, "{trusted}");
    assert_eq!(trusted["previous_key"], old_key.as_str());
    assert_eq!(trusted["new_key"], new_key.as_str());
    assert_eq!(agent_key(&setup.state()), new_key);
    assert_eq!(
        setup.agent_cmd(&["status"])["manifest_key"],
        new_key.as_str()
    );
    let history = history(&setup.state());
    assert_eq!(history[0]["how"], "trusted by the operator", "{history}");
    assert_eq!(history[0]["previous_key"], old_key.as_str());

    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["revision"], "r2", "{report}");
    assert_eq!(Pm::poll(home).run().code(), 0);
    let check = doctor_keys_check(home);
    assert_eq!(check["result"], "ok", "{check}");
}

#[test]
fn re_activating_an_agent_with_a_reusable_key_after_a_lost_key_gives_it_the_managers_new_key() {
    let mut setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(setup.home.path().join(file)).unwrap();
    }
    Pm::mirror(&setup.home)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    let new_key = manager_key(&setup.home);
    setup.publish(4);

    // Re-activation in bulk uses one reusable key for every host.
    setup.reactivate(&["--reusable"]);
    assert_eq!(agent_key(&setup.state()), new_key);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["revision"], "r2", "{report}");
    assert_eq!(Pm::poll(&setup.home).run().code(), 0);
    assert_eq!(doctor_keys_check(&setup.home)["result"], "ok");
}

#[test]
fn an_agent_whose_first_install_after_a_rotation_is_a_backup_generation_follows_the_chain_there() {
    let setup = AgentSetup::new();
    setup.publish(4);
    setup.agent_cmd(&["update"]);
    let old_key = agent_key(&setup.state());
    let rotated = Pm::mirror(&setup.home)
        .args(["key", "rotate", "--reason", "scheduled"])
        .json();
    let new_key = rotated["new_key"].as_str().unwrap().to_string();

    // The manager's backup 1 (r1, published before the rotation, signed anew by it).
    let run = Pm::agent(&setup.state())
        .args(["-v", "--json", "update", "--generation", "1"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(run.json()["revision"], "r1");
    assert!(
        run.stderr()
            .contains("followed the manager's manifest key rotation")
            && run.stderr().contains(&old_key)
            && run.stderr().contains(&new_key)
            && run.stderr().contains("scheduled"),
        "{}",
        run.stderr()
    );
    assert_eq!(agent_key(&setup.state()), new_key);
    assert_eq!(history(&setup.state())[0]["sequence"], 1);
}

/// Red team: an agent whose key file went missing could not update, with a bare "No such file"
/// and no hint, while pm-doctor's `manifest keys` said ok (the host was left out).
#[test]
fn an_agent_that_lost_its_key_file_is_named_by_pm_doctor_and_trust_key_gives_it_back() {
    let setup = AgentSetup::new();
    let home = &setup.home;
    setup.agent_cmd(&["update"]);
    let key_file = setup.state().join(pm::agent::MANIFEST_KEY_FILE);
    std::fs::remove_file(&key_file).unwrap();
    assert_eq!(Pm::poll(home).run().code(), 0);
    let check = doctor_keys_check(home);
    assert_eq!(check["result"], "warn", "{check}");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("1 hosts report no manifest key"),
        "{check}"
    );
    let update = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(update.code(), 1);
    assert!(
        update.stderr().contains("is missing") && update.stderr().contains("pm-agent trust-key"),
        "{}",
        update.stderr()
    );
    // A key file as people keep them: a comment, and another key after it.
    let canonical = std::fs::read(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap();
    let other = pm::pki::SigningKey::generate()
        .unwrap()
        .public_key_pem()
        .unwrap();
    let public = home.path().join("given.pem");
    std::fs::write(
        &public,
        [b"# the manager's key\n".as_slice(), &canonical, &other].concat(),
    )
    .unwrap();
    let fingerprint = manager_key(home);
    let trusted = Pm::agent(&setup.state())
        .args(["trust-key", "--fingerprint", &fingerprint, "--key"])
        .arg_path(&public)
        .run();
    assert_eq!(trusted.code(), 0, "{}", trusted.stderr());
    assert_eq!(agent_key(&setup.state()), fingerprint);
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        canonical,
        "the key alone is stored"
    );
    setup.agent_cmd(&["update"]);
    assert_eq!(Pm::poll(home).run().code(), 0);
    assert_eq!(doctor_keys_check(home)["result"], "ok");
}
