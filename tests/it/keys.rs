//! The manifest signing key: never replaced silently, rotated with a statement the old key signs
//! (served at `/keys.json`), and a home whose key was lost made whole again (docs/keys.md).

use std::path::Path;

use pm::pki::VerifyingKey;
use pm::pki::rotation::{KeyChain, follow};
use pm::repo::Repo;

use crate::doctor::{check, doctor, json};
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

/// pm-doctor's `signing key` check: its result and message.
fn doctor_on_key(home: &Home) -> (String, String) {
    let (_, report) = json(doctor(home));
    let check = check(&report, "signing key");
    (
        check["result"].as_str().unwrap().to_string(),
        format!("{} {}", check["message"], check["hint"]),
    )
}

/// Whether `revision`'s manifest verifies with `key`.
fn signed_by(home: &Home, revision: &str, key: &VerifyingKey) -> bool {
    pm::pki::revision_signed_by(&Repo::new(home.path()), revision, key)
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
    let (result, message) = doctor_on_key(home);
    assert_eq!(result, "fail", "{message}");
    assert!(message.contains("--old-key-lost"), "{message}");
    let export = Pm::mirror(home)
        .args(["key", "export-public", "--out"])
        .arg_path(&out)
        .run();
    assert_eq!(export.code(), 1, "{}", export.stderr());
    assert!(
        export
            .stderr()
            .contains("is missing, but this home's repository holds revisions")
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
    // Killed after the statement too, and the old key lost since: the statement suffices.
    let old = pm::pki::SigningKey::load(&home).unwrap().unwrap();
    let mut chain = KeyChain::load(&home).unwrap();
    chain
        .rotations
        .push(pm::pki::rotation::SignedRotation::sign(&old, &pending, 1, "interrupted").unwrap());
    chain.save(&home).unwrap();
    std::fs::remove_file(home.join(pm::pki::SIGNING_KEY_FILE)).unwrap();
    // Temporaries a kill left behind.
    let left = [
        home.join("pki/.manifest-signing.next.key.tmp-1-1"),
        Repo::new(&home)
            .revision_dir("r2")
            .join(".manifest.sig.tmp-1-1"),
    ];
    for path in &left {
        std::fs::write(path, b"half").unwrap();
    }
    let (result, message) = doctor_on_key(&feed.home);
    assert_eq!(result, "fail", "{message}");
    assert!(
        message.contains("a key rotation is unfinished"),
        "{message}"
    );
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
    let dry = Pm::mirror(&feed.home)
        .args(["--dry-run", "key", "rotate"])
        .json();
    assert_eq!(dry["sequence"], 1, "{dry}");
    let finished = Pm::mirror(&feed.home).args(["key", "rotate"]).json();
    assert_eq!(finished["new_key"], pending.fingerprint().unwrap().as_str());
    assert_eq!(finished["statement"], true, "{finished}");
    assert_eq!(finished["sequence"], 1, "{finished}");
    assert_eq!(KeyChain::load(&home).unwrap().rotations.len(), 1);
    for path in &left {
        assert!(!path.exists(), "{}", path.display());
    }
    assert!(!home.join(pm::pki::rotation::PENDING_KEY_FILE).exists());
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
}

/// Copies `pki/` aside, as a backup would.
fn backup_pki(home: &Home) -> tempfile::TempDir {
    let backup = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(home.path().join("pki"))
        .arg(backup.path())
        .status()
        .unwrap();
    assert!(status.success());
    backup
}

fn restore_pki(home: &Home, backup: &tempfile::TempDir) {
    std::fs::remove_dir_all(home.path().join("pki")).unwrap();
    let status = std::process::Command::new("cp")
        .args(["-a"])
        .arg(backup.path().join("pki"))
        .arg(home.path())
        .status()
        .unwrap();
    assert!(status.success());
}

fn staging_left(home: &Home) -> Vec<String> {
    std::fs::read_dir(home.path().join("repo/revisions"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

#[test]
fn a_pki_restored_from_before_a_rotation_signs_nothing_and_old_key_lost_recovers_without_forking_the_chain()
 {
    let mut feed = published_three_times();
    let backup = backup_pki(&feed.home);
    let first = Pm::mirror(&feed.home).args(["key", "rotate"]).json();
    restore_pki(&feed.home, &backup);
    feed.new_revision_expecting_failure("it was rotated away by rotation 1");
    let (result, message) = doctor_on_key(&feed.home);
    assert_eq!(result, "fail", "{message}");
    assert!(message.contains("rotated away by rotation 1"), "{message}");
    let home = &feed.home;
    assert!(staging_left(home).is_empty(), "{:?}", staging_left(home));
    let publish = Pm::mirror(home).args(["publish", "--again"]).run();
    assert_eq!(publish.code(), 1);
    assert!(
        publish.stderr().contains("rotated away by rotation 1")
            && publish
                .stderr()
                .contains("restore `pki/` from a newer backup"),
        "{}",
        publish.stderr()
    );
    let rotate = Pm::mirror(home).args(["key", "rotate"]).run();
    assert_eq!(rotate.code(), 1);
    assert!(
        rotate.stderr().contains("did not sign this repository"),
        "{}",
        rotate.stderr()
    );
    // The key that signed it is lost: set the restored one aside and sign anew.
    let recovered = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    assert_eq!(recovered["statement"], false, "{recovered}");
    assert_eq!(recovered["old_key"], first["new_key"], "{recovered}");
    assert_eq!(names_in_pki(home, "manifest-signing.key.set-aside-"), 1);
    // The chain kept the rotation followers already know, and did not fork.
    let chain = KeyChain::load(home.path()).unwrap();
    assert_eq!(chain.rotations.len(), 1);
    assert_eq!(
        chain.last().unwrap().next_key,
        first["new_key"].as_str().unwrap()
    );
    Pm::mirror(home).args(["publish", "--again"]).json();
    assert_eq!(doctor_on_key(home).0, "ok");
}

#[test]
fn a_key_replaced_by_hand_signs_nothing_and_nothing_is_downloaded_for_it() {
    let mut feed = published_three_times();
    pm::pki::SigningKey::generate()
        .unwrap()
        .write_private(&feed.home.path().join(pm::pki::SIGNING_KEY_FILE))
        .unwrap();
    feed.new_revision_expecting_failure("it is not the key this repository was signed with");
    assert!(staging_left(&feed.home).is_empty());
    let export = Pm::mirror(&feed.home)
        .args(["export", "--out"])
        .arg_path(&feed.home.path().join("b.tar"))
        .run();
    assert_eq!(export.code(), 1, "{}", export.stdout());
    assert!(!feed.home.path().join("b.tar").exists());
}

#[test]
fn rotating_with_the_old_key_lost_refuses_to_vouch_for_an_edited_manifest_or_a_damaged_file() {
    let feed = published_three_times();
    let home = &feed.home;
    std::fs::remove_file(home.path().join(pm::pki::SIGNING_KEY_FILE)).unwrap();
    let edit = |path: &Path, from: &[u8], to: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bytes = std::fs::read(path).unwrap();
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        let mut edited = bytes.clone();
        edited.splice(at..at + from.len(), to.iter().copied());
        std::fs::write(path, edited).unwrap();
        bytes
    };
    let manifest = Repo::new(home.path())
        .revision_dir("r2")
        .join("manifest.json");
    let original = edit(&manifest, b"\"serial\": 2", b"\"serial\": 9");
    let refused = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .run();
    assert_eq!(refused.code(), 1, "{}", refused.stdout());
    assert!(
        refused
            .stderr()
            .contains("r2: its manifest does not verify")
            && refused.stderr().contains("nothing was changed"),
        "{}",
        refused.stderr()
    );
    assert!(!home.path().join(pm::pki::SIGNING_KEY_FILE).exists());
    assert!(
        !home
            .path()
            .join(pm::pki::rotation::PENDING_KEY_FILE)
            .exists()
    );
    std::fs::write(&manifest, original).unwrap();
    // A file changed under a manifest that still verifies.
    let entry = pm::repo::Repo::new(home.path())
        .manifest("r3")
        .unwrap()
        .files[0]
        .clone();
    let file = Repo::new(home.path()).revision_dir("r3").join(&entry.path);
    let bytes = std::fs::read(&file).unwrap();
    edit(&file, &bytes[..1], b"#");
    let refused = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .run();
    assert_eq!(refused.code(), 1);
    assert!(
        refused.stderr().contains(&entry.path) && refused.stderr().contains("pm-mirror repair"),
        "{}",
        refused.stderr()
    );
    std::fs::write(&file, bytes).unwrap();
    Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
}

#[test]
fn a_damaged_key_file_says_what_to_do_and_old_key_lost_sets_it_aside() {
    let feed = published_three_times();
    let home = &feed.home;
    let key = home.path().join(pm::pki::SIGNING_KEY_FILE);
    std::fs::write(&key, b"").unwrap();
    let publish = Pm::mirror(home).args(["publish", "--again"]).run();
    assert_eq!(publish.code(), 1);
    assert!(
        publish.stderr().contains("hint: the key file is damaged"),
        "{}",
        publish.stderr()
    );
    Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    let damaged = std::fs::read_dir(home.path().join("pki"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("manifest-signing.key.damaged-")
        })
        .expect("the damaged file is kept aside");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(damaged.metadata().unwrap().permissions().mode() & 0o077, 0);
    Pm::mirror(home).args(["publish", "--again"]).json();
}

fn names_in_pki(home: &Home, prefix: &str) -> usize {
    std::fs::read_dir(home.path().join("pki"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .count()
}

/// Red team: an unusable `pki/manifest-signing.next.key` was a dead end: every command that
/// signs named the unfinished rotation, `key rotate` failed on the file, `--old-key-lost` too.
#[test]
fn an_unusable_new_key_of_an_unfinished_rotation_is_set_aside_or_replaced_as_lost() {
    let feed = published_three_times();
    let home = &feed.home;
    let pending = home.path().join(pm::pki::rotation::PENDING_KEY_FILE);
    // No statement names it yet: a plain rotation sets it aside and starts over.
    std::fs::write(&pending, b"").unwrap();
    let rotated = Pm::mirror(home).args(["key", "rotate"]).json();
    assert_eq!(rotated["statement"], true, "{rotated}");
    assert_eq!(names_in_pki(home, "manifest-signing.next.key.damaged-"), 1);
    Pm::mirror(home).args(["publish", "--again"]).json();

    // A statement already names it: followers may be on it, so only --old-key-lost goes on.
    let old = pm::pki::SigningKey::load(home.path()).unwrap().unwrap();
    let next = pm::pki::SigningKey::generate().unwrap();
    let mut chain = KeyChain::load(home.path()).unwrap();
    chain
        .rotations
        .push(pm::pki::rotation::SignedRotation::sign(&old, &next, 2, "killed").unwrap());
    chain.save(home.path()).unwrap();
    std::fs::write(&pending, b"garbage").unwrap();
    let refused = Pm::mirror(home).args(["key", "rotate"]).run();
    assert_eq!(refused.code(), 1, "{}", refused.stdout());
    assert!(
        refused.stderr().contains("rotation 2 already names it")
            && refused.stderr().contains("--old-key-lost"),
        "{}",
        refused.stderr()
    );
    let lost = Pm::mirror(home)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    assert_eq!(lost["statement"], false, "{lost}");
    assert_eq!(names_in_pki(home, "manifest-signing.key.set-aside-"), 1);
    assert!(!pending.exists());
    Pm::mirror(home).args(["publish", "--again"]).json();
}

/// Red team: a publish run under a clock a year ahead signed a dist statement valid for a year;
/// with the clock right again, publish left it in place (it was not "due"), so dist's freshness
/// guarantee was gone for a year and pm-doctor said ok.
#[test]
fn a_dist_statement_signed_by_a_clock_ahead_is_named_and_signed_anew_once_the_clock_is_right() {
    let feed = published_three_times();
    let home = &feed.home;
    let ahead = Pm::mirror(home)
        .args(["publish"])
        .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
        .env("FAKETIME", "+365d")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .json();
    assert_eq!(ahead["re_signed"], true, "{ahead}");
    let statement = |home: &Home| {
        let signed = Repo::new(home.path()).dist_statement().unwrap().unwrap();
        serde_json::from_slice::<pm::dist_statement::DistStatement>(&signed.document).unwrap()
    };
    assert!(statement(home).signed_at > chrono::Utc::now() + chrono::Duration::days(300));
    let doctor = Pm::new("pm-doctor")
        .args(["--json", "--home"])
        .arg_path(home.path())
        .run();
    assert!(
        doctor.stdout().contains("by a clock ahead of this one"),
        "{}",
        doctor.stdout()
    );
    let fixed = Pm::mirror(home).args(["publish"]).json();
    assert_eq!(fixed["re_signed"], true, "{fixed}");
    assert!(statement(home).signed_at <= chrono::Utc::now());
}

/// Red team: after a publish failed on a wrong key, the key put back and a publish with nothing
/// to do succeeding, `status` still said the last publish failed.
#[test]
fn status_stops_naming_a_failed_publish_once_a_publish_with_nothing_to_do_succeeds() {
    let feed = published_three_times();
    let home = &feed.home;
    let key = home.path().join(pm::pki::SIGNING_KEY_FILE);
    let kept = std::fs::read(&key).unwrap();
    pm::pki::SigningKey::generate()
        .unwrap()
        .write_private(&key)
        .unwrap();
    assert_eq!(Pm::mirror(home).args(["publish"]).run().code(), 1);
    let last = &Pm::mirror(home).args(["status"]).json()["last_publish"];
    assert_eq!(last["result"], "failed", "{last}");
    std::fs::write(&key, kept).unwrap();
    Pm::mirror(home).args(["publish"]).json();
    let last = &Pm::mirror(home).args(["status"]).json()["last_publish"];
    assert_eq!(last["result"], "up_to_date", "{last}");
    assert!(last["error"].is_null(), "{last}");
    let text = Pm::mirror(home).args(["status"]).run().stdout();
    assert!(text.contains("dist is up to date (r3)"), "{text}");
}

/// Red team: `status` said nothing of an expired dist statement while agents refused dist.
#[test]
fn status_names_an_expired_dist_statement() {
    let feed = published_three_times();
    let home = &feed.home;
    let later = Pm::mirror(home)
        .args(["status"])
        .env("LD_PRELOAD", crate::agent_day2::LIBFAKETIME)
        .env("FAKETIME", "+10d")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .run();
    assert!(
        later.stdout().contains("dist statement EXPIRED at"),
        "{}",
        later.stdout()
    );
    let now = Pm::mirror(home).args(["status"]).json();
    assert!(now["dist_valid_until"].is_string(), "{now}");
}
