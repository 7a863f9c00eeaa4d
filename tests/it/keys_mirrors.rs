//! Mirrors that follow a manager's key rotation (docs/keys.md, "Importing and child mirrors"):
//! an export never makes a bundle nobody can import, bundles carry the key chain and closed
//! sites follow it, child mirrors follow their parent's `/keys.json`; a chain the trusted key
//! did not sign is refused everywhere and changes nothing.

use std::path::{Path, PathBuf};

use pm::pki::SigningKey;
use pm::pki::rotation::{KeyChain, SignedRotation};

use crate::agent_install::names as entries;
use crate::mirror_airgap::{Sites, file_members, member, raw_tar, snapshot};
use crate::support::{Home, Lab, Pm, Server, manifest};

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
            // The dry run's own check, or the key check every signing command makes first.
            (stderr.contains("latest (r1) is not signed by the key that would sign the bundle")
                || stderr.contains("did not sign this repository's r1"))
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
    let dry = Pm::mirror(&sites.offline)
        .args(["--dry-run", "import"])
        .arg_path(&sites.bundle_path("after-one.tar"))
        .run();
    assert!(
        dry.stdout().contains(&format!(
            "would follow the exporter's key rotation 1 to {second}"
        )),
        "{}",
        dry.stdout()
    );
    assert_eq!(trust_store(&sites.offline), (vec![first.clone()], vec![]));
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

/// A chain in which `mallory` names the `trusted` key as the one she rotates away from, to her
/// own, but signs the statement with her own key.
fn forged_chain(trusted: &str, mallory: &SigningKey) -> KeyChain {
    let mut forged = SignedRotation::sign(mallory, mallory, 1, "forged").unwrap();
    let mut rotation = forged.rotation().unwrap();
    rotation.previous_key = trusted.to_string();
    forged.statement = serde_json::to_string_pretty(&rotation).unwrap();
    forged.previous_signature =
        pm::manifest::hex(&mallory.sign(forged.statement.as_bytes()).unwrap());
    forged.next_signature = forged.previous_signature.clone();
    KeyChain {
        format: 1,
        rotations: vec![forged],
    }
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
    let forged_chain = forged_chain(&trusted, &mallory);
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

/// A `pm` product `site` of `child` chained to `base`, trusting the key file `key`.
fn child_config(child: &Home, base: &str, key: &Path) {
    child.config(&format!(
        "[[products]]\nname = \"site\"\nkind = \"pm\"\nurl = \"{base}\"\ntrusted_key = \"{}\"\n\
         [http]\ntimeout = \"3s\"\nretries = 2\nbackoff = \"50ms\"\n",
        key.display()
    ));
}

/// A parent that synced the lab at 3 and published it, served on 127.0.19.`host`, and a child
/// that synced and published from it, trusting the parent's key as `parent.pub.pem` in its home.
fn parent_and_child(host: u8) -> (Lab, Home, Server, Home, PathBuf) {
    let lab = Lab::start(3);
    let parent = Home::new();
    parent.clamav_config(&lab, "");
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();
    let server = Server::spawn(Pm::mirror(&parent).args([
        "serve",
        "--listen",
        &format!("127.0.19.{host}:0"),
    ]));
    let child = Home::new();
    let trusted_key = child.path().join("parent.pub.pem");
    std::fs::copy(
        parent.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE),
        &trusted_key,
    )
    .unwrap();
    child_config(&child, &server.base, &trusted_key);
    Pm::mirror(&child).args(["sync"]).json();
    Pm::mirror(&child).args(["publish"]).json();
    (lab, parent, server, child, trusted_key)
}

/// Replaces a file of the parent's repository by hand (revision files are read-only).
fn overwrite(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::fs::canonicalize(path.parent().unwrap()).unwrap();
    let path = dir.join(path.file_name().unwrap());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let aside = dir.join(".overwrite");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, &path).unwrap();
}

/// The parent's dist manifest signed anew with `key`, by hand.
fn re_sign_parent_dist(parent: &Home, key: &SigningKey) {
    let manifest = std::fs::read(parent.repo("dist/manifest.json")).unwrap();
    overwrite(
        &parent.repo("dist/manifest.sig"),
        &key.sign(&manifest).unwrap(),
    );
}

fn child_fails(child: &Home) -> crate::support::Run {
    let before = manifest(child, "latest");
    let run = Pm::mirror(child).args(["sync"]).run();
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    assert_eq!(manifest(child, "latest"), before, "latest must not change");
    run
}

#[test]
fn a_child_mirror_follows_its_parents_key_rotation_records_it_and_no_longer_accepts_the_old_key() {
    let (lab, parent, _server, child, trusted_key) = parent_and_child(1);
    let operator_file = std::fs::read(&trusted_key).unwrap();
    let first = fingerprint(&parent);
    let old_key = pm::pki::SigningKey::load(parent.path()).unwrap().unwrap();
    Pm::mirror(&parent)
        .args(["key", "rotate", "--reason", "yearly"])
        .json();
    let second = fingerprint(&parent);
    lab.upstream.set_version(5).unwrap();
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();

    let report = Pm::mirror(&child).args(["sync"]).json();
    let product = &report["products"][0];
    assert_eq!(product["result"], "updated", "{report}");
    assert!(
        product["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| *w == format!("followed the parent's key rotation 1 to {second}")),
        "{report}"
    );
    assert_eq!(
        std::fs::read(&trusted_key).unwrap(),
        operator_file,
        "the operator's file is theirs"
    );
    assert_eq!(
        std::fs::read(child.path().join("trust/followed/site.pem")).unwrap(),
        std::fs::read(parent.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE)).unwrap()
    );
    let status = Pm::mirror(&child).args(["status"]).json();
    let key = &status["products"][0]["trusted_key"];
    assert_eq!(key["fingerprint"], second.as_str(), "{status}");
    assert_eq!(key["trusted_key_fingerprint"], first.as_str());
    assert_eq!(key["rotations_followed"], serde_json::json!([1]));
    let text = Pm::mirror(&child).args(["status"]).run().stdout();
    assert!(
        text.contains(&format!("site: trusts the parent's key {second}")),
        "{text}"
    );

    // The child publishes what it followed to, and its own dist is whole: every file of the
    // parent's dist, signed with the child's own key.
    Pm::mirror(&child).args(["publish"]).json();
    let child_key = pm::pki::SigningKey::load(child.path())
        .unwrap()
        .unwrap()
        .verifying_key()
        .unwrap();
    let dist = pm::mirror::verify_revision_dir(&child.repo("dist"), "dist", &child_key).unwrap();
    let files = |m: &pm::manifest::Manifest| -> Vec<(String, String)> {
        m.files
            .iter()
            .map(|f| (f.path.clone(), f.sha256.clone()))
            .collect()
    };
    assert_eq!(files(&dist), files(&manifest(&parent, "dist")));

    // From now on the child starts from the key it followed: a manifest the old key signed is
    // refused (the chain leads from it, but the child is past it).
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();
    re_sign_parent_dist(&parent, &old_key);
    let refused = child_fails(&child);
    assert!(
        refused.stdout().contains("manifest.sig` does not match"),
        "{}",
        refused.stdout()
    );
    assert_eq!(
        Pm::mirror(&child).args(["status"]).json()["products"][0]["trusted_key"]["fingerprint"],
        second.as_str()
    );
}

#[test]
fn a_forged_key_chain_on_the_parent_is_refused_and_the_child_changes_nothing() {
    let (lab, parent, _server, child, _) = parent_and_child(2);
    let trusted = fingerprint(&parent);
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();
    // Whoever answers for the parent signs its manifest with their own key and serves a chain
    // that names the parent's key as the one rotated away from.
    let mallory = SigningKey::generate().unwrap();
    let chain = forged_chain(&trusted, &mallory);
    overwrite(&parent.repo("view/keys.json"), &chain.to_bytes());
    re_sign_parent_dist(&parent, &mallory);

    let run = child_fails(&child);
    let out = run.stdout();
    assert!(
        out.contains("the parent's key chain")
            && out.contains("is not signed by")
            && out.contains("forged"),
        "{out}"
    );
    assert!(
        !child.path().join("trust").exists(),
        "nothing recorded, nothing trusted"
    );
}

#[test]
fn a_child_whose_parent_lost_its_key_is_told_to_replace_trusted_key_and_what_to_remove() {
    let (lab, parent, _server, child, trusted_key) = parent_and_child(3);
    for file in [pm::pki::SIGNING_KEY_FILE, pm::pki::SIGNING_PUBLIC_KEY_FILE] {
        std::fs::remove_file(parent.path().join(file)).unwrap();
    }
    Pm::mirror(&parent)
        .args(["key", "rotate", "--old-key-lost"])
        .json();
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&parent).args(["sync"]).json();
    Pm::mirror(&parent).args(["publish"]).json();

    let run = child_fails(&child);
    let stderr = run.stderr();
    assert!(
        stderr.contains("hint:")
            && stderr.contains("replace the `trusted_key` file of `site`")
            && stderr.contains("pm-mirror key export-public")
            && stderr.contains("trust/followed/site.json"),
        "{stderr}"
    );
    // The hint's way: the parent's new public key in place of the operator's file.
    Pm::mirror(&parent)
        .args(["key", "export-public", "--out"])
        .arg_path(&trusted_key)
        .json();
    let ok = Pm::mirror(&child).args(["sync"]).json();
    assert_eq!(ok["products"][0]["result"], "updated", "{ok}");
}

/// Red team: `trust add` of a key the exporter rotated away from (retired here) trusted it
/// again without a word, and bundles it signed were accepted again.
#[test]
fn trusting_a_retired_key_again_takes_again_and_clears_its_retired_record() {
    let sites = Sites::new(3);
    let first = fingerprint(&sites.online);
    let old_pem = sites.work.path().join("old.pem");
    Pm::mirror(&sites.online)
        .args(["key", "export-public", "--out"])
        .arg_path(&old_pem)
        .json();
    sites.export("before.tar", None);
    assert_eq!(sites.import("before.tar").code(), 0);
    Pm::mirror(&sites.online).args(["key", "rotate"]).json();
    sites.lab.upstream.set_version(5).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("after.tar", None);
    assert_eq!(sites.import("after.tar").code(), 0);
    let refused = Pm::mirror(&sites.offline)
        .args(["trust", "add"])
        .arg_path(&old_pem)
        .run();
    assert_eq!(refused.code(), 2, "{}", refused.stdout());
    assert!(
        refused
            .stderr()
            .contains("was retired from this trust store")
            && refused.stderr().contains("--again"),
        "{}",
        refused.stderr()
    );
    assert_eq!(trust_store(&sites.offline).1, vec![first.clone()]);
    let again = Pm::mirror(&sites.offline)
        .args(["trust", "add", "--again"])
        .arg_path(&old_pem)
        .json();
    assert_eq!(again["changed"], true, "{again}");
    let (trusted, retired) = trust_store(&sites.offline);
    assert!(
        trusted.contains(&first) && retired.is_empty(),
        "{trusted:?} {retired:?}"
    );
}
