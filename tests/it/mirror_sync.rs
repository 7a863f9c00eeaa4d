//! `pm-mirror sync` against the lab upstream: versions, cdiffs, conditional requests, verification
//! failures, cool-downs, retries, proxies and configuration errors.

use std::time::Duration;

use pm::lab::{FaultKind, LabProxy};

use crate::support::{
    Home, Lab, Pm, Server, component_version, freshclam_updates_test_1_to_6, manifest, sql,
    synced_at_3_with_6_upstream, testdb, write_feed,
};

fn cdiffs_in(home: &Home, generation: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.repo(generation).join("clamav"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cdiff"))
        .collect();
    names.sort();
    names
}

#[test]
fn sync_at_version_3_then_6_holds_test_cvd_6_and_the_cdiffs() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");

    let first = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(first["changed"], true);
    assert_eq!(first["products"][0]["components"][0]["version"], "3");
    // A first sync already fetches the cdiffs upstream offers, so clients behind update
    // incrementally.
    assert_eq!(cdiffs_in(&home, "latest"), ["test-2.cdiff", "test-3.cdiff"]);

    lab.upstream.set_version(6).unwrap();
    let second = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(second["changed"], true);
    assert_eq!(second["previous_revision"], "r1");
    assert_eq!(second["revision"], "r2");
    let product = &second["products"][0];
    assert_eq!(product["components"][0]["previous_version"], "3");
    assert_eq!(product["components"][0]["version"], "6");
    assert!(product["bytes_downloaded"].as_u64().unwrap() > 9952);

    let cvd = std::fs::read(home.repo("latest/clamav/test.cvd")).unwrap();
    assert_eq!(cvd, std::fs::read(testdb().join("test-6.cvd")).unwrap());
    assert_eq!(
        cdiffs_in(&home, "latest"),
        [
            "test-2.cdiff",
            "test-3.cdiff",
            "test-4.cdiff",
            "test-5.cdiff",
            "test-6.cdiff"
        ]
    );
    let cvd_sign = std::fs::read(home.repo("latest/clamav/test-6.cvd.sign")).unwrap();
    assert_eq!(
        cvd_sign,
        std::fs::read(testdb().join("test-6.cvd.sign")).unwrap()
    );
    assert!(
        !home.repo("latest/clamav/test-3.cvd.sign").exists(),
        "only the current CVD's signature"
    );
    for n in 2..=6 {
        let sign = home.repo(&format!("latest/clamav/test-{n}.cdiff.sign"));
        assert_eq!(
            std::fs::read(sign).unwrap(),
            std::fs::read(testdb().join(format!("test-{n}.cdiff.sign"))).unwrap()
        );
    }
    let latest = manifest(&home, "latest");
    assert_eq!(component_version(&latest, "clamav", "test"), "6");
    // The manifest lists exactly the files on disk, with their real hashes.
    for file in &latest.files {
        let (size, sha256) = pm::mirror::hash_file(&home.repo("latest").join(&file.path)).unwrap();
        assert_eq!(
            (size, sha256.as_str()),
            (file.size, file.sha256.as_str()),
            "{}",
            file.path
        );
    }
}

#[test]
fn a_second_sync_without_upstream_change_downloads_no_body_bytes() {
    let lab = Lab::start(6);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "a", 4);
    lab.upstream.set_feed(feed.path(), "2026.1").unwrap();
    let home = Home::new();
    home.clamav_config(
        &lab,
        &format!(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
            lab.url("/vendor/index.json")
        ),
    );
    Pm::mirror(&home).args(["sync"]).json();
    lab.upstream.clear_requests();

    let again = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(again["changed"], false);
    assert_eq!(again["bytes_downloaded"], 0);
    let requests = lab.upstream.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(
            (request.status, request.body_bytes),
            (304, 0),
            "{request:?}"
        );
    }
}

#[test]
fn cdiff_keep_limits_the_cdiffs_kept() {
    let lab = Lab::start(6);
    let home = Home::new();
    home.clamav_config(&lab, "cdiff_keep = 2");
    Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(cdiffs_in(&home, "latest"), ["test-5.cdiff", "test-6.cdiff"]);
}

/// Syncs at version 3, then tries version 6 with `fault` on `suffix`: the sync must fail and
/// leave latest exactly as it was. Returns stderr and stdout of the failed run.
fn rejected_sync_keeps_latest(fault: FaultKind, suffix: &str) -> (String, String) {
    let (lab, home, before) = synced_at_3_with_6_upstream();
    lab.fault(fault, suffix, None);
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(
        run.code(),
        1,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout(),
        run.stderr()
    );
    assert_eq!(manifest(&home, "latest"), before, "latest must not change");
    let cvd = std::fs::read(home.repo("latest/clamav/test.cvd")).unwrap();
    assert_eq!(cvd, std::fs::read(testdb().join("test-3.cvd")).unwrap());
    let staging: Vec<_> = std::fs::read_dir(home.repo("revisions"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".staging"))
        .collect();
    assert!(staging.is_empty(), "staging left behind: {staging:?}");

    // Once upstream is healthy again the same sync goes through.
    lab.upstream.clear_faults();
    let healed = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(healed["changed"], true);
    assert_eq!(
        component_version(&manifest(&home, "latest"), "clamav", "test"),
        "6"
    );
    (run.stderr(), run.stdout())
}

#[test]
fn a_corrupted_cvd_is_rejected_and_latest_stays_as_it_was() {
    let (_, stdout) = rejected_sync_keeps_latest(FaultKind::CorruptByte, "test.cvd");
    assert!(stdout.contains("md5 mismatch"), "{stdout}");
}

#[test]
fn a_truncated_cvd_is_rejected_and_latest_stays_as_it_was() {
    let (_, stdout) = rejected_sync_keeps_latest(FaultKind::Truncate, "test.cvd");
    assert!(stdout.contains("test.cvd"), "{stdout}");
}

#[test]
fn a_cvd_with_a_bad_signature_is_rejected_and_latest_stays_as_it_was() {
    let (_, stdout) = rejected_sync_keeps_latest(FaultKind::BadSignature, "test.cvd");
    assert!(stdout.contains("digital signature"), "{stdout}");
}

/// Issue 16: a cdiff damaged upstream kept the mirror behind. Like freshclam, the mirror falls
/// back to the whole CVD (verified), leaves the damaged cdiff out and says so.
#[test]
fn a_cdiff_damaged_upstream_is_left_out_and_latest_moves_on_with_the_verified_cvd() {
    let lab = Lab::start(5);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    lab.upstream.set_version(6).unwrap();
    lab.fault(FaultKind::CorruptByte, "test-6.cdiff", None);

    let sync = Pm::mirror(&home).args(["--json", "sync"]).run();
    assert_eq!(sync.code(), 0, "{}{}", sync.stdout(), sync.stderr());
    let report = sync.json();
    assert_eq!(report["changed"], true);
    let product = &report["products"][0];
    assert_eq!(product["result"], "updated");
    assert_eq!(product["components"][0]["version"], "6");
    let warning = product["warnings"][0].as_str().unwrap().to_string();
    assert!(
        warning.contains("/clamav/test-6.cdiff` is damaged upstream")
            && warning.contains("clients at test 5 or older download the whole `test.cvd`"),
        "{warning}"
    );
    let cvd = std::fs::read(home.repo("latest/clamav/test.cvd")).unwrap();
    assert_eq!(cvd, std::fs::read(testdb().join("test-6.cvd")).unwrap());
    // Older cdiffs lead only to the missing one: they go too, with the signature files.
    assert_eq!(cdiffs_in(&home, "latest"), Vec::<String>::new());
    assert!(!home.repo("latest/clamav/test-6.cdiff.sign").exists());

    // Where an operator looks: mirror_syncs and status, until latest's content changes.
    let recorded = sql(
        &home,
        "SELECT warnings FROM mirror_syncs ORDER BY id DESC LIMIT 1",
    );
    assert!(recorded.join("\n").contains("test-6.cdiff"), "{recorded:?}");
    lab.upstream.clear_faults();
    Pm::mirror(&home).args(["sync"]).json();
    let status = Pm::mirror(&home).args(["status"]).json();
    assert_eq!(status["products"][0]["warnings"][0], warning.as_str());
    let text = Pm::mirror(&home).args(["status"]).run().stdout();
    assert!(text.contains("clamav: warning: `http://"), "{text}");

    // A stock freshclam behind it falls back to the whole CVD too.
    Pm::mirror(&home).args(["publish"]).json();
    let server = Server::start(&home);
    freshclam_updates_test_1_to_6(&server.base, "DatabaseMirror", "test.cvd");
}

#[test]
fn a_corrupted_sign_file_is_rejected_and_latest_stays_as_it_was() {
    let (_, stdout) = rejected_sync_keeps_latest(FaultKind::CorruptByte, "test-6.cvd.sign");
    assert!(stdout.contains("test-6.cvd.sign"), "{stdout}");
}

#[test]
fn http_429_starts_a_cooldown_that_the_next_run_honours() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    lab.upstream.set_version(6).unwrap();
    lab.fault(
        FaultKind::TooManyRequests {
            retry_after: Some(3600),
        },
        "test.cvd",
        None,
    );

    let hit = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(hit.code(), 3, "{}", hit.stderr());
    let product = &hit.json()["products"][0];
    assert_eq!(product["result"], "cooldown");
    let until =
        chrono::DateTime::parse_from_rfc3339(product["cooldown_until"].as_str().unwrap()).unwrap();
    let remaining = until
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!(
        (3500..=3600).contains(&remaining),
        "Retry-After honoured: {remaining}s"
    );

    // The next run does not contact upstream at all, says so, and keeps latest.
    lab.upstream.clear_faults();
    lab.upstream.clear_requests();
    let next = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(next.code(), 3);
    assert!(
        lab.clamav_requests().is_empty(),
        "{:?}",
        lab.clamav_requests()
    );
    assert!(
        next.stdout().contains("cooldown until"),
        "{}",
        next.stdout()
    );
    assert_eq!(
        component_version(&manifest(&home, "latest"), "clamav", "test"),
        "3"
    );

    let status = Pm::mirror(&home).args(["status"]).json();
    assert_eq!(
        status["products"][0]["cooldown_until"],
        product["cooldown_until"]
    );
    assert!(
        status["products"][0]["cooldown_reason"]
            .as_str()
            .unwrap()
            .contains("429")
    );
}

#[test]
fn http_403_without_retry_after_cools_down_for_a_day() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    lab.fault(FaultKind::Forbidden, "test.cvd", None);
    let run = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(run.code(), 3);
    let until = run.json()["products"][0]["cooldown_until"]
        .as_str()
        .unwrap()
        .to_string();
    let until = chrono::DateTime::parse_from_rfc3339(&until).unwrap();
    let hours = until
        .signed_duration_since(chrono::Utc::now())
        .num_minutes() as f64
        / 60.0;
    assert!((23.9..=24.0).contains(&hours), "{hours}");
    // Nothing verified yet: no (empty) latest is made.
    assert!(!home.repo("latest").exists());
    assert_eq!(run.json()["incomplete"], serde_json::json!(["clamav"]));
}

#[test]
fn server_errors_are_retried_with_backoff_and_then_succeed() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    lab.fault(FaultKind::ServerError, "test.cvd", Some(2));
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["changed"], true);
    let probes: Vec<u16> = lab
        .clamav_requests()
        .iter()
        .filter(|r| r.path == "/clamav/test.cvd")
        .map(|r| r.status)
        .collect();
    assert_eq!(&probes[..3], &[500, 500, 206], "{probes:?}");
}

#[test]
fn a_slow_upstream_times_out_and_the_retry_succeeds() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    lab.fault(FaultKind::Slow { millis: 5000 }, "test.cvd", Some(1));
    let started = std::time::Instant::now();
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["changed"], true);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 3 s timeout cut the slow answer"
    );
}

#[test]
fn an_unreachable_upstream_fails_clearly_and_status_says_unknown() {
    let home = Home::new();
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    home.config(&format!(
        "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"http://127.0.0.1:{port}/clamav\"\n\
         databases = [\"test\"]\n[http]\nretries = 1\nbackoff = \"10ms\"\n"
    ));
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 1);
    assert!(
        run.stdout().contains("could not be fetched"),
        "{}",
        run.stdout()
    );
    let status = Pm::mirror(&home).args(["status"]).json();
    assert_eq!(
        status["products"][0]["components"][0]["upstream"],
        "unknown"
    );
}

#[test]
fn a_fallback_url_is_used_when_the_first_upstream_fails() {
    let lab = Lab::start(3);
    let home = Home::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    home.config(&format!(
        "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"http://127.0.0.1:{port}/clamav\"\n\
         fallback_urls = [\"{}\"]\ndatabases = [\"test\"]\n[http]\nretries = 0\n",
        lab.url("/clamav")
    ));
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["products"][0]["components"][0]["version"], "3");
}

#[test]
fn files_products_download_only_changed_files_and_verify_them() {
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 4);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let home = Home::new();
    home.config(&format!(
        "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
        lab.url("/vendor/index.json")
    ));
    let first = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(first["products"][0]["files_downloaded"], 4);

    std::fs::write(feed.path().join("file0.dat"), "changed").unwrap();
    lab.upstream.set_feed(feed.path(), "2").unwrap();
    let second = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(second["changed"], true);
    assert_eq!(second["products"][0]["files_downloaded"], 1);
    assert_eq!(
        std::fs::read(home.repo("latest/vendor/file0.dat")).unwrap(),
        b"changed"
    );
    assert!(home.repo("latest/vendor/sub/file1.dat").is_file());

    // A file that no longer matches its index entry is refused, and latest keeps version 2.
    std::fs::write(feed.path().join("sub/file1.dat"), "tampered after indexing").unwrap();
    std::fs::write(feed.path().join("file2.dat"), "new").unwrap();
    lab.upstream.set_feed(feed.path(), "3").unwrap();
    std::fs::write(feed.path().join("file2.dat"), "not what the index says").unwrap();
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 1);
    assert!(run.stdout().contains("the index says"), "{}", run.stdout());
    assert_eq!(
        manifest(&home, "latest")
            .product("vendor")
            .unwrap()
            .version
            .as_deref(),
        Some("2")
    );
}

#[test]
fn sync_goes_through_an_authenticating_proxy_from_pm_toml() {
    let lab = Lab::start(3);
    let proxy = LabProxy::new(Some(("mirror", "s3cret"))).unwrap();
    let proxy_addr = lab.runtime.block_on(proxy.spawn("127.0.0.1:0")).unwrap();
    let home = Home::new();
    let password = home.path().join("proxy.pass");
    std::fs::write(&password, "s3cret\n").unwrap();
    home.clamav_config(
        &lab,
        &format!("[proxy]\nurl = \"http://{proxy_addr}\"\nusername = \"mirror\"\npassword_file = \"{}\"\n", password.display()),
    );
    set_mode(&password, 0o644);
    let loose = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(loose.code(), 1);
    assert!(loose.stderr().contains("chmod 600"), "{}", loose.stderr());
    set_mode(&password, 0o600);
    let run = Pm::mirror(&home)
        .args(["sync", "-vv"])
        .env("RUST_LOG", "trace")
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(proxy.forwarded() >= 2, "forwarded {}", proxy.forwarded());
    assert!(
        !run.stderr().contains("s3cret"),
        "the proxy password is never logged"
    );

    std::fs::write(&password, "wrong\n").unwrap();
    set_mode(&password, 0o600);
    lab.upstream.set_version(4).unwrap();
    let refused = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(refused.code(), 1);
    assert!(refused.stdout().contains("407"), "{}", refused.stdout());
    assert!(proxy.refused() >= 1);
}

#[test]
fn sync_honours_the_http_proxy_environment_variable() {
    let lab = Lab::start(3);
    let proxy = LabProxy::new(None).unwrap();
    let proxy_addr = lab.runtime.block_on(proxy.spawn("127.0.0.1:0")).unwrap();
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home)
        .env("HTTP_PROXY", &format!("http://{proxy_addr}"))
        .args(["sync"])
        .json();
    assert!(proxy.forwarded() >= 2);
}

#[test]
fn dry_run_reports_what_would_change_and_changes_nothing() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    // `changed`: a sync would make a revision (what Ansible's check mode reports).
    let report = Pm::mirror(&home).args(["sync", "--dry-run"]).json();
    assert_eq!(report["changed"], true);
    assert_eq!(report["products"][0]["result"], "would_update");
    assert!(!home.path().join("inventory.duckdb").exists());
    assert!(!home.repo("latest").exists());

    Pm::mirror(&home).args(["sync"]).json();
    let report = Pm::mirror(&home).args(["sync", "--dry-run"]).json();
    assert_eq!(report["changed"], false, "{report}");
    assert_eq!(report["products"][0]["result"], "unchanged");
}

#[test]
fn a_first_sync_prints_no_errors_or_warnings() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 0);
    let stderr = run.stderr().to_lowercase();
    assert!(
        !stderr.contains("error") && !stderr.contains("warn"),
        "{stderr}"
    );
    assert!(
        run.stdout().contains("latest is now r1"),
        "{}",
        run.stdout()
    );
}

#[test]
fn config_errors_name_the_file_and_key_and_exit_2() {
    let home = Home::new();
    let missing = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(missing.code(), 2);
    assert!(missing.stderr().contains("pm.toml"), "{}", missing.stderr());
    assert!(missing.stderr().contains("hint:"), "{}", missing.stderr());

    home.config("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"ftp://x\"\n");
    let bad = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(bad.code(), 2);
    let stderr = bad.stderr();
    assert!(
        stderr.contains("pm.toml") && stderr.contains("products[0].url"),
        "{stderr}"
    );

    let usage = Pm::mirror(&home)
        .args(["sync", "--lock-timeout", "soon"])
        .run();
    assert_eq!(usage.code(), 2);
}

#[test]
fn kill_9_during_a_sync_leaves_latest_and_the_next_sync_cleans_up() {
    let (lab, home, before) = synced_at_3_with_6_upstream();
    // The first cdiff download hangs long enough to be killed in the middle of the sync, after
    // the new CVD is already staged.
    lab.fault(FaultKind::Slow { millis: 5000 }, "test-6.cdiff", Some(1));
    let mut child = Pm::mirror(&home)
        .args(["sync", "-q"])
        .command()
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !lab
        .upstream
        .requests()
        .iter()
        .any(|r| r.path.ends_with("test-6.cdiff"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sync never reached the cdiffs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(manifest(&home, "latest"), before);
    let staging = |home: &Home| {
        std::fs::read_dir(home.repo("revisions"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".staging")
            })
            .count()
    };
    assert_eq!(
        staging(&home),
        1,
        "the killed sync left its staging directory"
    );

    lab.upstream.clear_faults();
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["revision"], "r2");
    assert_eq!(staging(&home), 0);
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_failed_sync_keeps_the_old_validators_so_the_next_sync_still_sees_the_new_upstream() {
    // Regression (review finding): validators of discarded content made the next sync a 304.
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "a", 2);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let home = Home::new();
    home.clamav_config(
        &lab,
        &format!(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
            lab.url("/vendor/index.json")
        ),
    );
    Pm::mirror(&home).args(["sync"]).json();
    lab.upstream.set_version(6).unwrap();
    lab.fault(FaultKind::ServerError, "index.json", None);
    assert_eq!(Pm::mirror(&home).args(["sync"]).run().code(), 1);
    lab.upstream.clear_faults();
    let report = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(report["changed"], true);
    assert_eq!(
        component_version(&manifest(&home, "latest"), "clamav", "test"),
        "6"
    );
}

#[test]
fn a_download_older_than_the_announced_version_never_moves_latest_backwards() {
    let (lab, home, before) = synced_at_3_with_6_upstream();
    // Header reads see 6, the full download gets 2 (a CDN edge behind the others).
    lab.fault(FaultKind::StaleBody { version: 2 }, "test.cvd", None);
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 1, "{}", run.stdout());
    assert!(
        run.stdout().contains("not newer than latest"),
        "{}",
        run.stdout()
    );
    assert_eq!(manifest(&home, "latest"), before);
}

#[test]
fn an_absurd_retry_after_is_capped_at_a_week() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    let retry_after = Some(9_000_000_000_000);
    lab.fault(FaultKind::TooManyRequests { retry_after }, "test.cvd", None);
    let run = Pm::mirror(&home).args(["sync", "--json"]).run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    let until = run.json()["products"][0]["cooldown_until"]
        .as_str()
        .unwrap()
        .to_string();
    let until = chrono::DateTime::parse_from_rfc3339(&until).unwrap();
    let days = until.signed_duration_since(chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((6.9..=7.0).contains(&days), "{days}");
}

#[test]
fn a_file_longer_than_its_index_says_is_refused_as_it_arrives() {
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 2);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let size = std::fs::metadata(feed.path().join("file0.dat"))
        .unwrap()
        .len();
    // A hostile or broken upstream sends far more than the index promised.
    lab.fault(
        FaultKind::Replace {
            body: vec![b'x'; 16 << 20],
        },
        "file0.dat",
        None,
    );
    let home = Home::new();
    home.config(&format!(
        "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n",
        lab.url("/vendor/index.json")
    ));
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    let said = format!("{}{}", run.stdout(), run.stderr());
    assert!(
        said.contains(&format!("larger than the limit of {size} bytes")),
        "{said}"
    );
    assert!(!home.repo("latest").exists());
}
