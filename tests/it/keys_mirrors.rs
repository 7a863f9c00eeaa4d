//! Mirrors that follow a manager's key rotation (docs/keys.md, "Importing and child mirrors"):
//! an export never makes a bundle nobody can import, bundles carry the key chain and closed
//! sites follow it, child mirrors follow their parent's `/keys.json`; a chain the trusted key
//! did not sign is refused everywhere and changes nothing.

use std::path::Path;

use pm::pki::SigningKey;
use pm::pki::rotation::{KeyChain, SignedRotation};

use crate::agent_install::names as entries;
use crate::mirror_airgap::{Sites, file_members, member, raw_tar, snapshot};
use crate::support::{Home, Pm, manifest};

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
    sites.trust_online_key();
    let imported = sites.import("after-hand.tar");
    assert_eq!(imported.code(), 0, "{}", imported.stderr());
}

/// The `trust/` of a closed site: which keys it trusts, which it retired.
fn trust_store(home: &Home) -> (Vec<String>, Vec<String>) {
    let list = Pm::mirror(home).args(["trust", "list"]).json();
    let fingerprints = |keys: &serde_json::Value| -> Vec<String> {
        keys.as_array()
            .map(|keys| {
                keys.iter()
                    .map(|k| k["fingerprint"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    (fingerprints(&list["keys"]), fingerprints(&list["retired"]))
}

fn fingerprint(home: &Home) -> String {
    let pem = std::fs::read(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap();
    pm::pki::parse_public_key(&pem, Path::new("pub.pem"))
        .unwrap()
        .0
}

fn import(home: &Home, bundle: &Path) -> crate::support::Run {
    Pm::mirror(home)
        .args(["import", "--json"])
        .arg_path(bundle)
        .run()
}

#[test]
fn a_closed_site_that_trusted_the_old_key_follows_the_chain_a_bundle_carries_after_one_and_two_rotations()
 {
    let sites = Sites::new(3);
    let first = fingerprint(&sites.online);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    let late = sites.another_closed_site();

    Pm::mirror(&sites.online)
        .args(["key", "rotate", "--reason", "yearly"])
        .json();
    let second = fingerprint(&sites.online);
    sites.lab.upstream.set_version(5).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("after-one.tar", None);
    let run = sites.import("after-one.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let report = run.json();
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["signer"], second.as_str());
    assert_eq!(
        report["followed"],
        serde_json::json!([{"from": first, "to": second, "rotations": [1]}]),
        "{report}"
    );
    // It trusts the new key only; the old one is kept on record, no longer trusted.
    assert_eq!(
        trust_store(&sites.offline),
        (vec![second.clone()], vec![first.clone()])
    );
    let text = Pm::mirror(&sites.offline)
        .args(["trust", "list"])
        .run()
        .stdout();
    assert!(
        text.contains("retired") && text.contains(&first) && text.contains("rotation 1"),
        "{text}"
    );

    // A second rotation: the site on the second key takes one step, a site still on the first
    // key takes both, from the same bundle.
    Pm::mirror(&sites.online).args(["key", "rotate"]).json();
    let third = fingerprint(&sites.online);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("after-two.tar", None);
    let run = sites.import("after-two.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        run.json()["followed"][0]["rotations"],
        serde_json::json!([2])
    );
    assert_eq!(trust_store(&sites.offline).0, vec![third.clone()]);
    let run = import(&late, &sites.bundle_path("after-two.tar"));
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(
        run.json()["followed"],
        serde_json::json!([{"from": first, "to": third, "rotations": [1, 2]}])
    );
    assert_eq!(
        trust_store(&late),
        (vec![third.clone()], vec![first.clone()])
    );
    assert_eq!(
        manifest(&late, "latest").content_sha256,
        manifest(&sites.online, "latest").content_sha256
    );

    // A bundle signed by a key the site rotated away from is refused, and says why.
    let run = import(&late, &sites.bundle_path("r1.tar"));
    assert_eq!(run.code(), 1);
    assert!(run.stderr().contains("retired"), "{}", run.stderr());
}

/// A bundle signed by `signer` whose `keys.json` member is `chain`, carrying `online`'s latest.
fn bundle_with_chain(online: &Home, signer: &SigningKey, chain: &[u8]) -> Vec<u8> {
    let dir = online.repo("latest");
    let manifest_bytes = std::fs::read(dir.join("manifest.json")).unwrap();
    let manifest: pm::manifest::Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    let header = serde_json::json!({
        "format": 1,
        "created_at": chrono::Utc::now(),
        "exporter": signer.fingerprint().unwrap(),
        "revision": manifest.revision,
        "content_sha256": manifest.content_sha256,
        "manifest_sha256": pm::manifest::hex(&openssl::sha::sha256(&manifest_bytes)),
        "base": null,
        "included": manifest.files.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
        "keys_sha256": pm::manifest::hex(&openssl::sha::sha256(chain)),
    });
    let header_bytes = serde_json::to_vec(&header).unwrap();
    let mut members = vec![
        member("bundle.json", &header_bytes),
        member("bundle.sig", &signer.sign(&header_bytes).unwrap()),
        member("manifest.json", &manifest_bytes),
        member("manifest.sig", &signer.sign(&manifest_bytes).unwrap()),
        member("keys.json", chain),
    ];
    members.extend(file_members(online, &manifest));
    raw_tar(&members)
}

#[test]
fn a_bundle_with_a_forged_or_foreign_key_chain_is_refused_and_the_closed_site_stays_byte_for_byte_the_same()
 {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    let trusted = fingerprint(&sites.online);
    let [mallory, stranger] = [(); 2].map(|_| SigningKey::generate().unwrap());
    // Mallory names the trusted key as the one she rotates away from, but signs with her own.
    let mut forged = SignedRotation::sign(&mallory, &mallory, 1, "forged").unwrap();
    let mut rotation = forged.rotation().unwrap();
    rotation.previous_key = trusted.clone();
    forged.statement = serde_json::to_string_pretty(&rotation).unwrap();
    forged.previous_signature =
        pm::manifest::hex(&mallory.sign(forged.statement.as_bytes()).unwrap());
    forged.next_signature = forged.previous_signature.clone();
    let forged_chain = KeyChain {
        format: 1,
        rotations: vec![forged],
    };
    // A genuine chain, but of a key this site never trusted.
    let foreign_chain = KeyChain {
        format: 1,
        rotations: vec![SignedRotation::sign(&stranger, &mallory, 1, "yearly").unwrap()],
    };
    let cases = [
        ("forged", forged_chain.to_bytes(), "is not signed by"),
        ("foreign", foreign_chain.to_bytes(), "does not trust"),
        (
            "garbage",
            b"{\"format\": 1, \"rotations\": 7}".to_vec(),
            "key chain",
        ),
    ];
    let before = snapshot(sites.offline.path());
    for (name, chain, expected) in cases {
        let path = sites.bundle_path(&format!("{name}.tar"));
        std::fs::write(&path, bundle_with_chain(&sites.online, &mallory, &chain)).unwrap();
        let run = import(&sites.offline, &path);
        assert_eq!(run.code(), 1, "{name}: {}", run.stderr());
        assert!(run.stderr().contains(expected), "{name}: {}", run.stderr());
        assert!(run.stderr().contains("hint:"), "{name}: {}", run.stderr());
        assert_eq!(
            snapshot(sites.offline.path()),
            before,
            "{name} changed the closed site"
        );
    }
    assert_eq!(trust_store(&sites.offline).0, vec![trusted]);
}

#[test]
fn a_bundle_from_a_manager_whose_key_was_lost_is_refused_with_the_hint_to_trust_the_new_key() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(sites.online.path().join(file)).unwrap();
    }
    Pm::mirror(&sites.online)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    let new_key = fingerprint(&sites.online);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("lost.tar", None);
    let before = snapshot(sites.offline.path());
    let run = sites.import("lost.tar");
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let stderr = run.stderr();
    assert!(
        stderr.contains(&format!("does not trust (it claims exporter {new_key})"))
            && stderr.contains("hint:")
            && stderr.contains("key export-public")
            && stderr.contains("pm-mirror trust add"),
        "{stderr}"
    );
    assert_eq!(snapshot(sites.offline.path()), before);
    // The hint's way: the new public key carried across and trusted by hand.
    sites.trust_online_key();
    assert_eq!(sites.import("lost.tar").code(), 0);
}
