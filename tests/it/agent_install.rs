//! `pm-agent update | rollback` and `POST /v1/update | /v1/rollback`: a real agent activated by
//! the real `pm-activate`, installing from a real `pm-mirror serve` the lab's ClamAV test
//! databases, checked with the real `clamscan` and `sigtool`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{AgentSetup as Setup, EICAR, Pm};

fn tool(program: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("`{program}` cannot run ({err}): apt-get install clamav"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// `sigtool -i` of the test database in DB (`test.cld` when the agent built it from cdiffs,
/// else `test.cvd`; an agent never leaves both): the version it shows.
pub(crate) fn sigtool_version(db: &Path) -> String {
    let cld = db.join("test.cld");
    let database = if cld.exists() {
        cld
    } else {
        db.join("test.cvd")
    };
    let (code, text) = tool("sigtool", &["-i", database.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap_or_else(|| panic!("no Version in {text}"))
        .trim()
        .to_string()
}

/// `clamscan -d DB FILE`: exit code (0 clean, 1 found, 2 error) and output.
pub(crate) fn clamscan(db: &Path, file: &Path) -> (i32, String) {
    tool(
        "clamscan",
        &[
            "--no-summary",
            "-d",
            db.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    )
}

pub(crate) fn eicar(dir: &Path) -> PathBuf {
    let path = dir.join("eicar.com");
    std::fs::write(&path, EICAR).unwrap();
    path
}

pub(crate) fn names(db: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn update_installs_dist_only_downloads_changes_and_rolls_back_to_a_backup() {
    let setup = Setup::new();
    let db = setup.db();
    let eicar = eicar(setup.tmp.path());

    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["action"], "update");
    assert_eq!(report["downloaded"], serde_json::json!(["test.cvd"]));
    assert_eq!(report["files"][0]["name"], "test.cvd");
    assert_eq!(report["files"][0]["to_version"], "3");
    assert_eq!(report["previous_revision"], Value::Null);
    let first_revision = report["revision"].as_str().unwrap().to_string();
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(names(&db), ["test.cvd"]);

    // The manager publishes 6: like freshclam, the agent fetches only the cdiffs 4, 5 and 6,
    // builds test.cld from its copy of 3, and clamscan finds EICAR with it.
    setup.publish(6);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(
        report["downloaded"],
        serde_json::json!(["test-4.cdiff", "test-5.cdiff", "test-6.cdiff"])
    );
    let cdiff_bytes: u64 = (4..=6)
        .map(|v| {
            let cdiff = crate::support::testdb().join(format!("test-{v}.cdiff"));
            std::fs::metadata(cdiff).unwrap().len()
        })
        .sum();
    assert_eq!(report["downloaded_bytes"], cdiff_bytes, "{report}");
    assert_eq!(names(&db), ["test.cld"]);
    assert_eq!(report["previous_revision"], first_revision.as_str());
    assert_eq!(report["files"][0]["name"], "test.cld");
    assert_eq!(report["files"][0]["from_version"], "3");
    assert_eq!(report["files"][0]["to_version"], "6");
    let second_revision = report["revision"].as_str().unwrap().to_string();
    assert_ne!(second_revision, first_revision);
    assert_eq!(sigtool_version(&db), "6");
    let (code, text) = clamscan(&db, &eicar);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Eicar-Test-Signature FOUND"), "{text}");

    // End to end as the issue asks: the manager has the agent scan a directory holding the
    // EICAR test file and a clean file with the database it just installed.
    let scan_dir = setup.tmp.path().join("scan-me");
    std::fs::create_dir(&scan_dir).unwrap();
    std::fs::write(scan_dir.join("eicar.com"), EICAR).unwrap();
    std::fs::write(scan_dir.join("clean.txt"), "nothing to see").unwrap();
    let (status, scan) = setup.post(
        pm::proto::SCAN_PATH,
        serde_json::json!({ "paths": [scan_dir] }),
    );
    assert_eq!(status, 200, "{scan}");
    assert_eq!(scan["result"], "infected", "{scan}");
    assert_eq!(scan["files_scanned"], 2, "{scan}");
    let finding = &scan["findings"][0];
    assert_eq!(
        finding["path"],
        scan_dir.join("eicar.com").to_str().unwrap()
    );
    assert_eq!(finding["signature"], "Eicar-Test-Signature");

    // The same revision again changes nothing and downloads nothing.
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], false, "{report}");
    assert_eq!(report["downloaded"], serde_json::json!([]));
    assert_eq!(report["files"], serde_json::json!([]));
    assert_eq!(report["revision"], second_revision.as_str());
    let text = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(text.code(), 0, "{}", text.stderr());
    assert!(
        text.stdout()
            .contains("is installed already; nothing changed"),
        "{}",
        text.stdout()
    );

    // A newer test.cld (what freshclam writes after cdiffs) would shadow an older test.cvd:
    // the rollback removes it, and sigtool shows version 3 again.
    std::fs::copy(
        crate::support::testdb().join("test-6.cvd"),
        db.join("test.cld"),
    )
    .unwrap();
    let report = setup.agent_cmd(&["rollback", "--to", "backup:1"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["action"], "rollback");
    assert_eq!(report["revision"], first_revision.as_str());
    assert_eq!(report["previous_revision"], second_revision.as_str());
    assert_eq!(report["files"][0]["from_version"], "6");
    assert_eq!(report["files"][0]["to_version"], "3");
    assert_eq!(report["downloaded"], serde_json::json!([]));
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(names(&db), ["test.cvd"]);
    let (code, text) = clamscan(&db, &eicar);
    assert!(code == 0 || code == 1, "test-3 loads: {text}");

    // The set rolled back from became backup:1: rolling back to it returns to 6, from the
    // local copies (the served dist is not needed).
    let report = setup.agent_cmd(&["rollback", "--to", "backup:1"]);
    assert_eq!(report["revision"], second_revision.as_str());
    assert_eq!(sigtool_version(&db), "6");
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["installed_revision"], second_revision.as_str());
    assert_eq!(
        status["backups"],
        serde_json::json!([first_revision.as_str()])
    );
    let run = Pm::agent(&setup.state())
        .args(["rollback", "--to", "backup:3"])
        .run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(run.stderr().contains("no backup:3"), "{}", run.stderr());
    let run = Pm::agent(&setup.state())
        .args(["rollback", "--to", "r1"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());

    // Over the API, as the manager (mutual TLS). Rolled back by hand, the host is held: a
    // plain update is refused until the hold is released (issue 16).
    let (code, report) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({}));
    assert_eq!(code, 409, "{report}");
    assert_eq!(report["code"], "held", "{report}");
    let release = serde_json::json!({"hold": null});
    let (code, report) = setup.post(pm::proto::HOLD_PATH, release.clone());
    assert_eq!((code, &report["changed"]), (200, &serde_json::json!(true)));
    let (code, report) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({}));
    assert_eq!(code, 200, "{report}");
    let report: pm::proto::InstallReport = serde_json::from_value(report).unwrap();
    assert!(!report.changed);
    assert_eq!(report.revision.as_deref(), Some(second_revision.as_str()));
    let (code, report) = setup.post(
        pm::proto::ROLLBACK_PATH,
        serde_json::json!({"to": "backup:1"}),
    );
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["changed"], true);
    assert_eq!(report["revision"], first_revision.as_str());
    assert_eq!(sigtool_version(&db), "3");
    let (code, report) = setup.post(
        pm::proto::ROLLBACK_PATH,
        serde_json::json!({"to": "backup:9"}),
    );
    assert_eq!(code, 400, "{report}");
    setup.post(pm::proto::HOLD_PATH, release);
    let (code, report) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({}));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["changed"], true);
    // 6 is still in the local copies: nothing is downloaded again.
    assert_eq!(report["downloaded"], serde_json::json!([]));
    assert_eq!(sigtool_version(&db), "6");
    // Only the sets still referenced are kept locally: installed (6) and backup:1 (3).
    let copies = std::fs::read_dir(setup.state().join("files"))
        .unwrap()
        .count();
    assert_eq!(copies, 2);
}

#[test]
fn a_manifest_not_signed_by_the_activating_manager_is_refused() {
    let setup = Setup::new();
    let db = setup.db();
    setup.agent_cmd(&["update"]);
    assert_eq!(sigtool_version(&db), "3");
    setup.publish(6);

    // The agent's stored manifest key is another manager's: the dist is refused, nothing moves.
    let key_path = setup.state().join("manager/manifest-signing.pub.pem");
    let genuine = std::fs::read(&key_path).unwrap();
    let other = openssl::pkey::PKey::generate_ed25519().unwrap();
    std::fs::write(&key_path, other.public_key_to_pem().unwrap()).unwrap();
    let run = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(run.code(), 1, "{}\n{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains("signature does not verify"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint:"), "{}", run.stderr());
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(names(&db), ["test.cvd"]);

    // The genuine key again: 6 is installed.
    std::fs::write(&key_path, genuine).unwrap();
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true);
    assert_eq!(sigtool_version(&db), "6");
}

#[test]
fn update_with_a_generation_installs_the_managers_backup_and_reports_a_rollback() {
    let setup = Setup::new();
    let db = setup.db();
    // dist is 6 and the manager's backup/1 is the revision with 3.
    setup.publish(6);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(sigtool_version(&db), "6");
    let dist_revision = report["revision"].as_str().unwrap().to_string();

    let (code, report) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({"generation": 1}));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["action"], "rollback", "{report}");
    assert_eq!(report["changed"], true);
    assert_eq!(report["previous_revision"], dist_revision.as_str());
    assert_ne!(report["revision"], dist_revision.as_str());
    // This agent never had 3: it came from the manager's backup/1, verified like dist.
    assert_eq!(report["downloaded"], serde_json::json!(["test.cvd"]));
    assert_eq!(report["files"][0]["from_version"], "6");
    assert_eq!(report["files"][0]["to_version"], "3");
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(names(&db), ["test.cvd"]);
    let backup_revision = report["revision"].as_str().unwrap().to_string();
    // The set it replaced is the local backup:1, like any install.
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["installed_revision"], backup_revision.as_str());
    assert_eq!(
        status["backups"],
        serde_json::json!([dist_revision.as_str()])
    );

    // Installing what is installed changes nothing.
    let (code, report) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({"generation": 1}));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["changed"], false, "{report}");
    assert_eq!(report["downloaded"], serde_json::json!([]));

    // Bad requests are refused before anything happens.
    for (body, says) in [
        (
            serde_json::json!({"generation": 0}),
            "generation 0 is not a backup",
        ),
        (
            serde_json::json!({"generation": 4}),
            "generation 4 is not a backup",
        ),
        (serde_json::json!({"generation": "x"}), "not valid"),
        (
            serde_json::json!({"revision": "r1"}),
            "unknown field `revision`",
        ),
    ] {
        let (code, answer) = setup.post(pm::proto::UPDATE_PATH, body.clone());
        assert_eq!(code, 400, "{body}: {answer}");
        assert!(answer.to_string().contains(says), "{body}: {answer}");
    }
    // A generation the manager does not have (backup/2) fails with a hint, nothing moves.
    let (code, answer) = setup.post(pm::proto::UPDATE_PATH, serde_json::json!({"generation": 2}));
    assert_eq!(code, 500, "{answer}");
    assert!(
        answer.to_string().contains("backup/2/manifest.json")
            && answer.to_string().contains("no such backup generation"),
        "{answer}"
    );
    assert_eq!(sigtool_version(&db), "3");

    // Back to dist with `null` (no body), then the same rollback from the command line.
    let (code, report) = setup.post(pm::proto::UPDATE_PATH, Value::Null);
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["action"], "update");
    assert_eq!(report["revision"], dist_revision.as_str());
    assert_eq!(sigtool_version(&db), "6");
    let report = setup.agent_cmd(&["update", "--generation", "1"]);
    assert_eq!(report["action"], "rollback", "{report}");
    assert_eq!(report["revision"], backup_revision.as_str());
    assert_eq!(report["downloaded"], serde_json::json!([]));
    assert_eq!(sigtool_version(&db), "3");
    let run = Pm::agent(&setup.state())
        .args(["update", "--generation", "4"])
        .run();
    assert_eq!(run.code(), 2, "{}", run.stderr());
}

#[test]
fn a_feeds_signature_files_are_installed_beside_the_cvd_and_only_changed_files_are_fetched() {
    let setup = Setup::new();
    let db = setup.db();
    // A site's own hash database (`md5:size:name`, what `sigtool --md5` prints) detecting a
    // harmless sample, and a README the engine must not get.
    let sample = setup.tmp.path().join("sample.bin");
    std::fs::write(&sample, b"pm site sample: not malware, only listed").unwrap();
    let (code, md5_line) = tool("sigtool", &["--md5", sample.to_str().unwrap()]);
    assert_eq!(code, 0, "{md5_line}");
    let line = md5_line.trim().replace("sample.bin", "Pm.Site.Sample");
    let feed = setup.tmp.path().join("feed");
    std::fs::create_dir_all(feed.join("sigs")).unwrap();
    std::fs::write(feed.join("sigs/site.hdb"), format!("{line}\n")).unwrap();
    std::fs::write(feed.join("README.txt"), "not a database").unwrap();
    setup.lab.upstream.set_feed(&feed, "1").unwrap();
    setup.home.clamav_config(
        &setup.lab,
        &format!(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
            setup.lab.url("/vendor/index.json")
        ),
    );
    setup.publish(3);

    let report = setup.agent_cmd(&["update"]);
    assert_eq!(
        report["downloaded"],
        serde_json::json!(["site.hdb", "test.cvd"]),
        "{report}"
    );
    let expected_bytes = std::fs::metadata(feed.join("sigs/site.hdb")).unwrap().len()
        + std::fs::metadata(crate::support::testdb().join("test-3.cvd"))
            .unwrap()
            .len();
    assert_eq!(report["downloaded_bytes"], expected_bytes, "{report}");
    assert_eq!(names(&db), ["site.hdb", "test.cvd"]);
    let (code, text) = clamscan(&db, &sample);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("Pm.Site.Sample"), "{text}");

    // Only the ClamAV feed moves: only its cdiff is fetched, the feed file stays.
    setup.publish(4);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(
        report["downloaded"],
        serde_json::json!(["test-4.cdiff"]),
        "{report}"
    );
    assert_eq!(sigtool_version(&db), "4");
    assert_eq!(names(&db), ["site.hdb", "test.cld"]);

    // The feed drops the file: the engine's copy goes with it, and a rollback brings it back.
    std::fs::remove_file(feed.join("sigs/site.hdb")).unwrap();
    setup.lab.upstream.set_feed(&feed, "2").unwrap();
    setup.publish(4);
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["downloaded"], serde_json::json!([]), "{report}");
    assert_eq!(names(&db), ["test.cld"]);
    let (code, text) = clamscan(&db, &sample);
    assert_eq!(code, 0, "{text}");
    setup.agent_cmd(&["rollback", "--to", "backup:1"]);
    assert_eq!(names(&db), ["site.hdb", "test.cld"]);
}

#[test]
fn a_cdiff_that_does_not_match_the_signed_manifest_makes_the_agent_download_the_whole_cvd() {
    let setup = Setup::new();
    let db = setup.db();
    setup.agent_cmd(&["update"]);
    setup.publish(4);
    // Someone alters the served cdiff (same size, one byte flipped): its sha256 no longer
    // matches the signed manifest, so it is refused and test.cvd is fetched instead.
    let cdiff = setup.home.repo("dist/clamav/test-4.cdiff");
    let mut bytes = std::fs::read(&cdiff).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::remove_file(&cdiff).unwrap();
    std::fs::write(&cdiff, &bytes).unwrap();
    let report = setup.agent_cmd(&["update"]);
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(
        report["downloaded"],
        serde_json::json!(["test.cvd"]),
        "{report}"
    );
    assert_eq!(sigtool_version(&db), "4");
    assert_eq!(names(&db), ["test.cvd"]);
    assert!(!setup.state().join("patch.tmp").exists());
}
