//! The manifest signing key: never replaced silently, rotated with a statement the old key signs
//! (served at `/keys.json`), and a home whose key was lost made whole again (docs/keys.md).

use std::path::Path;

use pm::pki::VerifyingKey;
use pm::pki::rotation::{KeyChain, follow};
use pm::repo::Repo;

use crate::mirror_publish::Feed;
use crate::support::{Home, Pm, Server, http_get};

/// A home with dist r3 and backups r2, r1.
fn published_three_times() -> Feed {
    let mut feed = Feed::new("");
    for _ in 0..3 {
        feed.new_revision();
        Pm::mirror(&feed.home).args(["publish"]).json();
    }
    feed
}

fn public_key(home: &Path) -> (String, VerifyingKey) {
    let pem = std::fs::read(home.join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap();
    pm::pki::parse_public_key(&pem, Path::new("pub.pem")).unwrap()
}

/// Whether `revision`'s manifest verifies with `key`.
fn signed_by(home: &Home, revision: &str, key: &VerifyingKey) -> bool {
    let dir = Repo::new(home.path()).revision_dir(revision);
    key.verify(
        &std::fs::read(dir.join("manifest.json")).unwrap(),
        &std::fs::read(dir.join("manifest.sig")).unwrap(),
    )
}

#[test]
fn a_lost_signing_key_is_never_replaced_silently_and_rotating_with_old_key_lost_makes_the_home_whole()
 {
    let mut feed = published_three_times();
    let home = &feed.home;
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(home.path().join(file)).unwrap();
    }
    let out = home.path().join("exported.pem");
    let export = Pm::mirror(home)
        .args(["key", "export-public", "--out"])
        .arg_path(&out)
        .run();
    assert_eq!(export.code(), 1, "{}", export.stderr());
    assert!(
        export.stderr().contains("has no manifest signing key")
            && export.stderr().contains("--old-key-lost"),
        "{}",
        export.stderr()
    );
    feed.new_revision_expecting_failure("is missing, but this home's repository holds revisions");
    let home = &feed.home;
    assert!(
        !home.path().join(pm::pki::SIGNING_KEY_FILE).exists(),
        "no key was created"
    );
    let again = Pm::mirror(home).args(["publish", "--again"]).run();
    assert_eq!(again.code(), 1, "{}", again.stderr());
    assert!(
        again.stderr().contains("key rotate --old-key-lost"),
        "{}",
        again.stderr()
    );
    let plain = Pm::mirror(home).args(["key", "rotate"]).run();
    assert_eq!(plain.code(), 1);
    assert!(
        plain.stderr().contains("no signing key to rotate"),
        "{}",
        plain.stderr()
    );

    let dry = Pm::mirror(home)
        .args(["--dry-run", "key", "rotate", "--old-key-lost"])
        .json();
    assert_eq!(dry["dry_run"], true);
    assert!(!home.path().join(pm::pki::SIGNING_KEY_FILE).exists());
    let rotated = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost", "--reason", "disk lost"])
        .json();
    assert_eq!(rotated["statement"], false, "{rotated}");
    assert_eq!(rotated["re_signed"], serde_json::json!(["r3", "r2", "r1"]));
    let (_, new_key) = public_key(home.path());
    for revision in ["r3", "r2", "r1"] {
        assert!(signed_by(home, revision, &new_key), "{revision}");
    }
    // The home verifies again: rollback to a backup, publish, export all work.
    Pm::mirror(home)
        .args(["rollback", "--generation", "1"])
        .json();
    Pm::mirror(home).args(["publish", "--again"]).json();
    let bundle = home.path().join("after.bundle");
    Pm::mirror(home)
        .args(["export", "--out"])
        .arg_path(&bundle)
        .json();
    let doctor = Pm::new("pm-doctor")
        .args(["--home"])
        .arg_path(home.path())
        .run();
    assert!(
        !doctor.stdout().contains("not signed by this manager's key"),
        "{}",
        doctor.stdout()
    );
}

#[test]
fn a_rotation_re_signs_every_generation_and_serves_a_statement_the_old_key_signed() {
    let feed = published_three_times();
    let home = &feed.home;
    let (old_fingerprint, old_key) = public_key(home.path());
    let statement_before = Repo::new(home.path()).generations().unwrap().dist_serial;

    let rotated = Pm::mirror(home)
        .args(["key", "rotate", "--reason", "yearly"])
        .json();
    assert_eq!(rotated["statement"], true, "{rotated}");
    assert_eq!(rotated["sequence"], 1);
    assert_eq!(rotated["old_key"], old_fingerprint.as_str());
    assert_eq!(rotated["re_signed"], serde_json::json!(["r3", "r2", "r1"]));
    let (new_fingerprint, new_key) = public_key(home.path());
    assert_ne!(new_fingerprint, old_fingerprint);
    assert_eq!(rotated["new_key"], new_fingerprint.as_str());
    for revision in ["r3", "r2", "r1"] {
        assert!(signed_by(home, revision, &new_key), "{revision}");
        assert!(!signed_by(home, revision, &old_key), "{revision}");
    }
    assert!(
        home.path()
            .join("pki/retired")
            .join(format!(
                "{}.pub.pem",
                old_fingerprint.trim_start_matches("sha256:")
            ))
            .exists()
    );
    let generations = Repo::new(home.path()).generations().unwrap();
    assert_eq!(generations.dist_serial, statement_before + 1);

    // Served: the chain leads from the old key to the new one; dist.json verifies with it.
    let server = Server::start(home);
    let (code, chain) = http_get(&server.base, "/keys.json");
    assert_eq!(code, 200);
    let chain = KeyChain::parse(chain.as_bytes()).unwrap();
    let reached = follow(&chain, &old_fingerprint, old_key).unwrap();
    assert_eq!(reached.fingerprint, new_fingerprint);
    assert_eq!(reached.steps[0].reason, "yearly");
    drop(server);

    // Rollback to a backup signed before the rotation, export, and a second rotation.
    Pm::mirror(home)
        .args(["rollback", "--generation", "1"])
        .json();
    let second = Pm::mirror(home).args(["key", "rotate"]).json();
    assert_eq!(second["sequence"], 2);
    let (newest, newest_key) = public_key(home.path());
    let chain = KeyChain::load(home.path()).unwrap();
    let (_, first_key) = pm::pki::parse_public_key(
        &std::fs::read(home.path().join("pki/retired").join(format!(
            "{}.pub.pem",
            old_fingerprint.trim_start_matches("sha256:")
        )))
        .unwrap(),
        Path::new("old.pem"),
    )
    .unwrap();
    assert_eq!(
        follow(&chain, &old_fingerprint, first_key)
            .unwrap()
            .fingerprint,
        newest
    );
    for revision in ["r2", "r1"] {
        assert!(signed_by(home, revision, &newest_key), "{revision}");
    }
    let closed = Home::new();
    closed.config("");
    let public = closed.path().join("new.pem");
    Pm::mirror(home)
        .args(["key", "export-public", "--out"])
        .arg_path(&public)
        .json();
    Pm::mirror(&closed)
        .args(["trust", "add"])
        .arg_path(&public)
        .json();
    let bundle = closed.path().join("r.bundle");
    Pm::mirror(home)
        .args(["export", "--out"])
        .arg_path(&bundle)
        .json();
    let imported = Pm::mirror(&closed)
        .args(["import"])
        .arg_path(&bundle)
        .json();
    assert_eq!(imported["changed"], true, "{imported}");
}

#[test]
fn an_interrupted_rotation_stops_every_signer_until_it_is_run_again_and_finished() {
    let mut feed = published_three_times();
    let home = feed.home.path().to_owned();
    // A rotation killed after writing its new key aside.
    let pending = pm::pki::SigningKey::generate().unwrap();
    pending
        .write_private(&home.join(pm::pki::rotation::PENDING_KEY_FILE))
        .unwrap();
    let publish = Pm::mirror(&feed.home).args(["publish", "--again"]).run();
    assert_eq!(publish.code(), 1);
    assert!(
        publish.stderr().contains("a key rotation is unfinished")
            && publish
                .stderr()
                .contains("run `pm-mirror key rotate` again"),
        "{}",
        publish.stderr()
    );
    feed.new_revision_expecting_failure("a key rotation is unfinished");
    let finished = Pm::mirror(&feed.home).args(["key", "rotate"]).json();
    assert_eq!(finished["new_key"], pending.fingerprint().unwrap().as_str());
    assert!(!home.join(pm::pki::rotation::PENDING_KEY_FILE).exists());
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
}
