//! Mirrors that follow a manager's key rotation (docs/keys.md, "Importing and child mirrors"):
//! an export never makes a bundle nobody can import, bundles carry the key chain and closed
//! sites follow it, child mirrors follow their parent's `/keys.json`; a chain the trusted key
//! did not sign is refused everywhere and changes nothing.

use crate::agent_install::names as entries;
use crate::mirror_airgap::Sites;
use crate::support::Pm;

/// Issue 17: after the signing key was replaced by hand, `export` signed the bundle with the new
/// key but carried latest's `manifest.sig` made by the old one, and every importer refused it
/// only after the media was carried across.
#[test]
fn an_export_after_the_key_was_replaced_by_hand_is_refused_and_writes_no_bundle() {
    let sites = Sites::new(3);
    let home = sites.online.path();
    // What an operator did by hand: a fresh key where the lost one was.
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(home.join(file)).unwrap();
    }
    pm::pki::SigningKey::generate()
        .unwrap()
        .install(home)
        .unwrap();
    let before = entries(sites.work.path());
    let out = sites.bundle_path("after-hand.tar");
    for dry_run in [true, false] {
        let mut export = Pm::mirror(&sites.online);
        if dry_run {
            export = export.args(["--dry-run"]);
        }
        let run = export.args(["export", "--out"]).arg_path(&out).run();
        assert_eq!(run.code(), 1, "dry run {dry_run}: {}", run.stderr());
        let stderr = run.stderr();
        assert!(
            stderr
                .contains("error: latest (r1) is not signed by the key that would sign the bundle")
                && stderr.contains("hint:")
                && stderr.contains("pm-mirror key rotate")
                && stderr.contains("--old-key-lost"),
            "{stderr}"
        );
        assert_eq!(entries(sites.work.path()), before, "no file was written");
    }

    // The hint's way out: the replacement goes, the home is signed anew, the bundle imports.
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(home.join(file)).unwrap();
    }
    Pm::mirror(&sites.online)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    sites.export("after-hand.tar", None);
    let key = sites.bundle_path("new.pem");
    Pm::mirror(&sites.online)
        .args(["key", "export-public", "--out"])
        .arg_path(&key)
        .json();
    Pm::mirror(&sites.offline)
        .args(["trust", "add"])
        .arg_path(&key)
        .json();
    let imported = sites.import("after-hand.tar");
    assert_eq!(imported.code(), 0, "{}", imported.stderr());
}
