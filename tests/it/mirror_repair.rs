//! Damaged files and the repository's own health (issue 17): one changed byte in a file
//! hard-linked into every generation, found by pm-doctor, repaired by `pm-mirror repair` (or by
//! the next sync) from another revision or upstream; what no source has is named with exit 1;
//! revision files are read-only to their owner.

use crate::doctor::{check, doctor, json};
use crate::mirror_airgap::Sites;
use crate::support::{AgentSetup, Home, Lab, Pm, Run, bin, sql};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const CDIFF: &str = "clamav/test-2.cdiff";

/// Changes one byte of `path` as root would (root writes through the 0444 mode), which also
/// changes every revision that shares its inode. Returns the original bytes.
fn damage_one_byte(path: &Path) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    std::fs::write(path, &damaged).unwrap();
    original
}

/// A home that synced and published each ClamAV test version of `versions` in turn (the lab
/// starts at the first). `[3, 4]`: latest and dist are r2, backup/1 r1, `test-2.cdiff` one
/// inode in both.
fn published(lab: &Lab, versions: &[u32]) -> Home {
    let home = Home::new();
    home.clamav_config(lab, "");
    for &version in versions {
        lab.upstream.set_version(version).unwrap();
        Pm::mirror(&home).args(["sync"]).json();
        Pm::mirror(&home).args(["publish"]).json();
    }
    home
}

/// Everything under `repo/` except views (path, inode, size, mode, content hash), to show a
/// command changed nothing, or only what it says.
fn snapshot(home: &Home) -> Vec<(PathBuf, u64, u64, u32, String)> {
    let mut entries: Vec<_> = entries_under(&home.repo(""))
        .into_iter()
        .filter(|(path, _)| !path.ends_with(".lock"))
        .map(|(path, meta)| {
            let sha256 = match meta.is_file() {
                true => pm::mirror::hash_file(&path).unwrap().1,
                false => String::new(),
            };
            (path, meta.ino(), meta.len(), meta.mode(), sha256)
        })
        .collect();
    entries.sort();
    entries
}

/// Every entry below `dir` but directories (files, symlinks), with its own metadata.
fn entries_under(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut entries = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                entries.push((path, meta));
            }
        }
    }
    entries
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn one_changed_byte_in_a_linked_cdiff_is_named_in_every_generation_and_repaired_from_upstream() {
    let setup = AgentSetup::new();
    setup.publish(4);
    setup.publish(5);
    setup.lab.upstream.set_version(6).unwrap();
    let home = &setup.home;
    Pm::mirror(home).args(["sync"]).json();
    let cdiff = home.repo(&format!("latest/{CDIFF}"));
    assert_eq!(
        std::fs::metadata(&cdiff).unwrap().nlink(),
        4,
        "r1..r4 share it"
    );
    let original = damage_one_byte(&cdiff);

    let (code, report) = json(doctor(home));
    assert_eq!(code, 1, "{report}");
    let files = check(&report, "files");
    assert_eq!(files["result"], "fail", "{report}");
    let message = files["message"].as_str().unwrap();
    for generation in ["latest (r4)", "dist (r3)", "backup/1 (r2)", "backup/2 (r1)"] {
        assert!(
            message.contains(generation) && message.contains(CDIFF),
            "{generation}: {message}"
        );
    }
    assert!(files["hint"].as_str().unwrap().contains("pm-mirror repair"));
    for name in ["latest", "dist", "backups"] {
        assert_eq!(check(&report, name)["result"], "fail", "{name}: {report}");
    }
    let again = Pm::mirror(home).args(["publish", "--again"]).run();
    assert_eq!(again.code(), 1, "{}", again.stderr());
    assert!(
        again.stderr().contains("pm-mirror repair") && !again.stderr().contains("pm-mirror sync"),
        "{}",
        again.stderr()
    );

    let before = snapshot(home);
    let dry = Pm::mirror(home).args(["--dry-run", "repair"]).json();
    assert_eq!(dry["changed"], true, "{dry}");
    assert_eq!(dry["files"][0]["result"], "would_repair", "{dry}");
    assert_eq!(
        dry["files"][0]["source"],
        setup.lab.url("/clamav/test-2.cdiff")
    );
    assert_eq!(snapshot(home), before, "a dry run changes nothing");

    let serial = std::fs::read(home.repo("serial")).unwrap();
    let state = std::fs::read(home.repo("view/state.json")).unwrap();
    let report = Pm::mirror(home).args(["repair"]).json();
    assert_eq!(report["changed"], true, "{report}");
    let repaired = &report["files"][0];
    assert_eq!(repaired["path"], CDIFF);
    assert_eq!(repaired["result"], "repaired");
    assert_eq!(repaired["source"], setup.lab.url("/clamav/test-2.cdiff"));
    assert_eq!(
        repaired["generations"],
        serde_json::json!(["latest", "dist", "backup/1", "backup/2"])
    );
    assert_eq!(report["files"].as_array().unwrap().len(), 1, "{report}");
    for generation in ["latest", "dist", "backup/1", "backup/2"] {
        let path = home.repo(&format!("{generation}/{CDIFF}"));
        assert_eq!(std::fs::read(&path).unwrap(), original, "{generation}");
        assert_eq!(
            inode(&path),
            inode(&cdiff),
            "{generation} shares the repaired inode"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o444);
    }
    // Nothing else changed: no new revision, no view switch, serial and signatures as they were.
    let after = snapshot(home);
    let changed: Vec<&PathBuf> = after
        .iter()
        .filter(|entry| !before.contains(entry))
        .map(|entry| &entry.0)
        .collect();
    assert!(
        changed.iter().all(|path| path.ends_with(CDIFF)),
        "only the repaired file changed: {changed:?}"
    );
    assert_eq!(after.len(), before.len(), "no file added or left aside");
    assert_eq!(std::fs::read(home.repo("serial")).unwrap(), serial);
    assert_eq!(std::fs::read(home.repo("view/state.json")).unwrap(), state);

    let (code, report) = json(doctor(home));
    assert_eq!(code, 0, "{report}");
    assert_eq!(check(&report, "files")["result"], "ok");
    let nothing = Pm::mirror(home).args(["repair"]).json();
    assert_eq!(nothing["changed"], false, "{nothing}");
    assert_eq!(
        sql(
            home,
            "SELECT status, summary FROM jobs WHERE kind = 'repair'"
        ),
        [format!("ok,repaired 1 file(s): {CDIFF}")],
        "one job for the repair, none for the run that found nothing"
    );

    Pm::mirror(home).args(["publish"]).json();
    let update = setup.agent_cmd(&["update"]);
    assert_eq!(update["revision"], "r4", "{update}");
    let rollback = Pm::mirror(home)
        .args(["rollback", "--generation", "1"])
        .run();
    assert_eq!(rollback.code(), 0, "{}", rollback.stderr());
}

#[test]
fn a_sync_with_upstream_unchanged_repairs_a_damaged_latest_instead_of_saying_unchanged() {
    let lab = Lab::start(3);
    let home = published(&lab, &[3, 4]);
    let cdiff = home.repo(&format!("latest/{CDIFF}"));
    let original = damage_one_byte(&cdiff);
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["changed"], false, "upstream did not move: {report}");
    assert_eq!(report["bytes_downloaded"], original.len(), "{report}");
    let repaired = &report["repaired"][0];
    assert_eq!(repaired["path"], CDIFF, "{report}");
    assert_eq!(repaired["result"], "repaired");
    assert_eq!(
        repaired["generations"],
        serde_json::json!(["latest", "dist", "backup/1"])
    );
    for generation in ["latest", "backup/1"] {
        let path = home.repo(&format!("{generation}/{CDIFF}"));
        assert_eq!(std::fs::read(path).unwrap(), original, "{generation}");
    }
    assert_eq!(
        sql(
            &home,
            "SELECT summary FROM jobs WHERE kind = 'sync' ORDER BY id DESC LIMIT 1"
        ),
        [format!("no change; repaired {CDIFF}")]
    );
    let text = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(text.code(), 0, "{}", text.stderr());
    assert!(!text.stdout().contains("repaired"), "{}", text.stdout());
}

#[test]
fn a_copy_that_is_not_linked_is_restored_from_a_good_copy_in_another_revision_without_a_request() {
    let lab = Lab::start(3);
    let home = published(&lab, &[3, 4]);
    // Replaced by a damaged file of its own (a restore by hand, an editor's save): the other
    // revision keeps the good copy.
    let cdiff = home.repo(&format!("latest/{CDIFF}"));
    let mut damaged = std::fs::read(&cdiff).unwrap();
    damaged.truncate(damaged.len() - 1);
    std::fs::remove_file(&cdiff).unwrap();
    std::fs::write(&cdiff, &damaged).unwrap();
    lab.upstream.clear_requests();
    let dry = Pm::mirror(&home).args(["--dry-run", "repair"]).run();
    assert_eq!(dry.code(), 0, "{}", dry.stderr());
    assert!(
        dry.stdout().contains(&format!(
            "would repair `{CDIFF}` in latest, dist from backup/1 (r1)"
        )),
        "{}",
        dry.stdout()
    );
    let report = Pm::mirror(&home).args(["repair"]).json();
    assert_eq!(report["files"][0]["source"], "backup/1 (r1)", "{report}");
    assert_eq!(
        inode(&cdiff),
        inode(&home.repo(&format!("backup/1/{CDIFF}")))
    );
    assert!(lab.clamav_requests().is_empty(), "no request upstream");
}

#[test]
fn a_file_damaged_in_every_live_revision_comes_back_from_an_archive_without_a_request() {
    let lab = Lab::start(2);
    // Five publishes: r1 (version 2) goes to `repo/archives/r1.tar.gz`; test-2.cdiff is one
    // inode in r2..r5 and a member of the archive.
    let home = published(&lab, &[2, 3, 4, 5, 6]);
    assert!(home.repo("archives/r1.tar.gz").is_file());
    let cdiff = home.repo(&format!("latest/{CDIFF}"));
    let original = damage_one_byte(&cdiff);
    lab.upstream.clear_requests();
    let report = Pm::mirror(&home).args(["repair"]).json();
    let file = &report["files"][0];
    assert_eq!(file["source"], "archive r1", "{report}");
    assert_eq!(
        file["generations"],
        serde_json::json!(["latest", "dist", "backup/1", "backup/2", "backup/3"])
    );
    assert_eq!(std::fs::read(&cdiff).unwrap(), original);
    assert!(lab.clamav_requests().is_empty(), "no request upstream");
    let (code, report) = json(doctor(&home));
    assert_eq!(code, 0, "{report}");
}

#[test]
fn a_damaged_file_no_source_has_is_named_with_exit_1_and_nothing_else_changes() {
    let lab = Lab::start(3);
    let home = published(&lab, &[3]);
    // Upstream moves on: `test.cvd` is version 4 there now, version 3 nowhere else.
    lab.upstream.set_version(4).unwrap();
    let cvd = home.repo("latest/clamav/test.cvd");
    damage_one_byte(&cvd);
    let before = snapshot(&home);
    let run: Run = Pm::mirror(&home).args(["repair", "--json"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let report = run.json();
    let file = &report["files"][0];
    assert_eq!(file["path"], "clamav/test.cvd", "{report}");
    assert_eq!(file["result"], "unrepairable");
    // Version 4 is larger than the manifest's size: refused as it arrives.
    let tried = file["tried"][0].as_str().unwrap();
    assert!(tried.starts_with(&lab.url("/clamav/test.cvd")), "{report}");
    let stderr = run.stderr();
    assert!(
        stderr.contains("error: `clamav/test.cvd`")
            && stderr.contains("latest, dist")
            && stderr.contains("hint: restore the file from a backup of PM_HOME"),
        "{stderr}"
    );
    assert_eq!(snapshot(&home), before, "nothing changed");
    assert_eq!(
        sql(&home, "SELECT status FROM jobs WHERE kind = 'repair'"),
        ["failed"]
    );
    // The next sync brings version 4: the damaged version-3 file is left behind in the old
    // revision, never carried into the new one.
    let sync = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(sync["changed"], true, "{sync}");
    assert_eq!(sync["repaired"][0]["result"], "unrepairable", "{sync}");
    let (_, report) = json(doctor(&home));
    assert_eq!(check(&report, "latest")["result"], "ok", "{report}");
}

#[test]
fn a_manifest_changed_by_hand_is_named_as_unsigned_and_left_to_a_backup() {
    let lab = Lab::start(3);
    let home = published(&lab, &[3, 4]);
    let manifest = std::fs::canonicalize(home.repo("backup/1/manifest.json")).unwrap();
    let mut text = std::fs::read(&manifest).unwrap();
    text.push(b'\n');
    std::fs::write(&manifest, &text).unwrap();
    let (code, report) = json(doctor(&home));
    assert_eq!(code, 1, "{report}");
    let backups = check(&report, "backups");
    assert_eq!(
        backups["message"], "backup/1 (r1): its manifest is not signed by this manager's key",
        "{report}"
    );
    assert!(
        backups["hint"]
            .as_str()
            .unwrap()
            .contains("never signatures"),
        "{report}"
    );
    assert_eq!(check(&report, "latest")["result"], "ok", "{report}");
    let run = Pm::mirror(&home).args(["repair", "--json"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let report = run.json();
    assert_eq!(report["untrusted"][0]["revision"], "r1", "{report}");
    assert_eq!(report["files"], serde_json::json!([]));
    assert!(
        run.stderr()
            .contains("error: r1 (backup/1): its manifest is not signed")
            && run
                .stderr()
                .contains("hint: a repair restores files, never manifests"),
        "{}",
        run.stderr()
    );
    assert_eq!(std::fs::read(&manifest).unwrap(), text, "left as it is");
}

#[test]
fn an_incremental_import_onto_a_damaged_latest_is_refused_and_a_full_bundle_is_the_way_back() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("r2-since-r1.tar", Some("r1"));
    sites.export("r2-full.tar", None);
    // test-2.cdiff is not in the incremental bundle: the closed side links latest's copy.
    damage_one_byte(&sites.offline.repo(&format!("latest/{CDIFF}")));
    let before = snapshot(&sites.offline);
    let run = sites.import("r2-since-r1.tar");
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stderr()
            .contains(&format!("`{CDIFF}` of latest here was damaged on disk"))
            && run.stderr().contains("run `pm-mirror repair`"),
        "{}",
        run.stderr()
    );
    assert_eq!(snapshot(&sites.offline), before, "nothing changed");
    // A closed site has no upstream and no other copy: repair says what to do instead.
    let repair = Pm::mirror(&sites.offline).args(["repair"]).run();
    assert_eq!(repair.code(), 1, "{}", repair.stderr());
    assert!(
        repair.stderr().contains("import` of a full bundle"),
        "{}",
        repair.stderr()
    );
    let run = sites.import("r2-full.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let (_, report) = json(doctor(&sites.offline));
    assert_eq!(check(&report, "latest")["result"], "ok", "{report}");
}

/// `ARGS` as nobody (uid 65534), the way `User=pm` runs the units.
fn as_nobody(args: &[&str]) -> Run {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PM_HOME");
    Pm::wrap(command).run()
}

#[test]
fn a_revision_file_is_read_only_so_its_owner_cannot_write_it_by_accident() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(home.path())
        .status()
        .unwrap();
    assert!(status.success());
    let mirror = |args: &[&str]| {
        let home = home.path().to_str().unwrap();
        let mut all = vec![bin("pm-mirror"), "--home", home];
        all.extend_from_slice(args);
        as_nobody(&all)
    };
    for args in [["sync"], ["publish"]] {
        let run = mirror(&args);
        assert_eq!(run.code(), 0, "{}", run.stderr());
    }
    let files = entries_under(&home.repo("revisions/r1"));
    for (path, meta) in &files {
        assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{path:?}");
        assert_eq!(meta.uid(), 65534, "{path:?}");
    }
    assert!(files.len() >= 4);
    let cdiff = home.repo(&format!("latest/{CDIFF}"));
    let original = std::fs::read(&cdiff).unwrap();
    let write = as_nobody(&["sh", "-c", &format!("printf x >> '{}'", cdiff.display())]);
    assert_ne!(write.code(), 0, "the owner's write is refused");
    assert!(
        write.stderr().contains("Permission denied"),
        "{}",
        write.stderr()
    );
    assert_eq!(std::fs::read(&cdiff).unwrap(), original);
    // Root writes through it; the repair (as the owner) puts it back read-only, and a garbage
    // collection as the owner removes read-only files.
    damage_one_byte(&cdiff);
    let run = mirror(&["repair"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert_eq!(std::fs::read(&cdiff).unwrap(), original);
    let meta = std::fs::metadata(&cdiff).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o444, 65534));
    lab.upstream.set_version(4).unwrap();
    assert_eq!(mirror(&["sync"]).code(), 0);
    assert_eq!(mirror(&["publish"]).code(), 0);
    lab.upstream.set_version(5).unwrap();
    assert_eq!(mirror(&["sync"]).code(), 0);
    // r2 (the old latest) was published, so only a revision nothing references would go:
    // make one by hand as the owner, sealed like a revision.
    let stray = home.repo("revisions/r99");
    std::fs::create_dir_all(stray.join("clamav")).unwrap();
    std::fs::write(stray.join("clamav/x.cvd"), b"x").unwrap();
    std::fs::set_permissions(
        stray.join("clamav/x.cvd"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    let status = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&stray)
        .status()
        .unwrap();
    assert!(status.success());
    let gc = mirror(&["gc"]);
    assert_eq!(gc.code(), 0, "{}", gc.stderr());
    assert!(!stray.exists(), "{}", gc.stdout());
}

/// Red team: on a closed site a full bundle holding latest's content was "no change" and left
/// latest and dist damaged, though the docs name it as the way back.
#[test]
fn a_full_bundle_of_the_content_latest_holds_restores_what_is_damaged_on_a_closed_site() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    Pm::mirror(&sites.offline).args(["publish"]).json();
    damage_one_byte(&sites.offline.repo("latest/clamav/test.cvd"));
    assert_eq!(
        Pm::mirror(&sites.offline).args(["repair"]).run().code(),
        1,
        "no source on a closed site"
    );
    let run = sites.import("r1.tar");
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let report = run.json();
    assert_eq!(report["changed"], true, "{report}");
    assert!(
        report["repaired"][0]
            .as_str()
            .unwrap()
            .starts_with("clamav/test.cvd (latest (r1), dist (r1)"),
        "{report}"
    );
    let (_, doctor_report) = json(doctor(&sites.offline));
    assert_eq!(
        check(&doctor_report, "files")["result"],
        "ok",
        "{doctor_report}"
    );
    let again = sites.import("r1.tar").json();
    assert_eq!(again["changed"], false, "{again}");
}

/// Red team: with latest damaged and upstream answering 429, the failed sync was not recorded
/// (no cool-down, `status` said ok) and every later sync asked upstream again.
#[test]
fn a_sync_failing_on_a_damaged_latest_records_upstreams_cool_down_and_the_next_one_keeps_it() {
    let lab = Lab::start(6);
    let home = published(&lab, &[5, 6]);
    damage_one_byte(&home.repo("latest/clamav/test.cvd"));
    lab.fault(
        pm::lab::FaultKind::TooManyRequests {
            retry_after: Some(600),
        },
        "test.cvd",
        None,
    );
    let first = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(first.code(), 1, "{}", first.stdout());
    assert!(
        first.stderr().contains("latest is damaged"),
        "{}",
        first.stderr()
    );
    let status = Pm::mirror(&home).args(["status"]).json();
    let clamav = &status["products"][0];
    assert_eq!(clamav["state"], "deferred", "{status}");
    let asked = lab.clamav_requests().len();
    let second = Pm::mirror(&home).args(["sync"]).run();
    assert_ne!(second.code(), 0);
    assert_eq!(
        lab.clamav_requests().len(),
        asked,
        "no request to an upstream in its cool-down"
    );
}

/// Red team: a revision file made world-writable (0666) went unnoticed by pm-doctor and
/// `pm-mirror repair`: anyone could then rewrite what dist serves.
#[test]
fn a_revision_file_made_writable_is_named_by_pm_doctor_and_repair_makes_it_read_only_again() {
    let lab = Lab::start(5);
    let home = published(&lab, &[5]);
    let file = std::fs::canonicalize(home.repo("dist/clamav/test.cvd")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, report) = json(doctor(&home));
    let files = check(&report, "files");
    assert_eq!(files["result"], "warn", "{report}");
    assert!(
        files["message"].as_str().unwrap().contains("mode 666"),
        "{report}"
    );
    let repaired = Pm::mirror(&home).args(["repair"]).json();
    assert_eq!(repaired["changed"], true, "{repaired}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o444
    );
    let (_, report) = json(doctor(&home));
    assert_eq!(check(&report, "files")["result"], "ok", "{report}");
}
