//! Who owns the home (issue 16): a `sudo pm-mirror sync` by hand on the service user's home,
//! entries another user left there, and a garbage collection that fails after a switch. The
//! service user is `nobody` (uid 65534) here; the tests run as root.

use std::path::Path;
use std::process::Command;

use crate::support::{Home, Lab, Pm, Run, bin, manifest, sql};

const NOBODY: &str = "65534";

/// `pm-mirror --home HOME ARGS` as nobody, the way `User=pm` runs the units.
fn as_nobody(program: &str, home: &Home, args: &[&str]) -> Run {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(bin(program))
        .arg("--home")
        .arg(home.path())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PM_HOME");
    Pm::wrap(command).run()
}

fn chown(owner: &str, path: &Path) {
    let status = Command::new("chown")
        .args(["-R", &format!("{owner}:{owner}")])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn state_json(home: &Home) -> String {
    std::fs::read_to_string(home.repo("view/state.json")).unwrap()
}

/// A home owned by nobody, synced at test version 3 and published by nobody.
fn nobodys_home(lab: &Lab) -> Home {
    let home = Home::new();
    home.clamav_config(lab, "");
    chown(NOBODY, home.path());
    for step in [["--json", "sync"], ["--json", "publish"]] {
        let run = as_nobody("pm-mirror", &home, &step);
        assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    }
    home
}

#[test]
fn sudo_pm_mirror_sync_on_the_service_users_home_is_refused_and_changes_nothing() {
    let lab = Lab::start(3);
    let home = nobodys_home(&lab);
    lab.upstream.set_version(5).unwrap();
    let before = state_json(&home);
    for args in [&["sync"][..], &["publish"], &["gc"], &["sync", "--dry-run"]] {
        let run = Pm::mirror(&home).args(args).run();
        assert_eq!(run.code(), 2, "{args:?}: {}{}", run.stdout(), run.stderr());
        let stderr = run.stderr();
        assert!(
            stderr.contains("error: refusing to run as root on")
                && stderr.contains("belongs to nobody (uid 65534)"),
            "{stderr}"
        );
        assert!(
            stderr.contains("hint: run it as the owner: `sudo -u nobody pm-mirror"),
            "{stderr}"
        );
    }
    assert_eq!(state_json(&home), before);
    let foreign = Command::new("find")
        .arg(home.path())
        .args(["!", "-user", NOBODY])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&foreign.stdout), "", "root wrote");
    // Reading is fine as root.
    assert_eq!(Pm::mirror(&home).args(["status"]).run().code(), 0);
}

#[test]
fn entries_root_left_in_the_home_stop_sync_and_publish_before_anything_changes_with_a_chown_hint() {
    let lab = Lab::start(3);
    let home = nobodys_home(&lab);
    // What `sudo pm-mirror sync` left with an earlier pm: a revision and the view it switched
    // to, owned by root.
    lab.upstream.set_version(5).unwrap();
    let run = as_nobody("pm-mirror", &home, &["--json", "sync"]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let latest = manifest(&home, "latest").revision;
    let view = std::fs::read_link(home.repo("view")).unwrap();
    chown("0", &home.repo(&format!("revisions/{latest}")));
    chown("0", &home.repo("").join(&view));
    let before = state_json(&home);
    let syncs_before = sql(&home, "SELECT count(*) FROM mirror_syncs");

    lab.upstream.set_version(6).unwrap();
    for args in [&["sync"][..], &["publish"]] {
        let run = as_nobody("pm-mirror", &home, args);
        assert_eq!(run.code(), 1, "{args:?}: {}{}", run.stdout(), run.stderr());
        let stderr = run.stderr();
        assert!(
            stderr.contains("/repo/revisions/r")
                && stderr.contains("` (owned by root (uid 0))")
                && stderr.contains("nothing was changed"),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "hint: give them back as root: `chown -R nobody: {}`",
                home.path().display()
            )),
            "{stderr}"
        );
        assert!(!stderr.contains("Permission denied"), "{stderr}");
        assert_eq!(state_json(&home), before, "{args:?} switched the view");
    }
    assert_eq!(
        sql(&home, "SELECT count(*) FROM mirror_syncs"),
        syncs_before
    );

    // pm-doctor fails on them, as root or as the owner.
    for doctor in [
        as_nobody("pm-doctor", &home, &["--json"]),
        Pm::new("pm-doctor")
            .args(["--home", home.path().to_str().unwrap(), "--json"])
            .run(),
    ] {
        assert_eq!(doctor.code(), 1, "{}", doctor.stdout());
        let report = doctor.json();
        let check = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "ownership")
            .unwrap_or_else(|| panic!("no ownership check: {report}"));
        assert_eq!(check["result"], "fail", "{check}");
        assert!(
            check["hint"]
                .as_str()
                .unwrap()
                .starts_with(&format!("chown -R nobody: {}", home.path().display())),
            "{check}"
        );
    }

    // The hint repairs it: the next runs go through, each with its record.
    chown(NOBODY, home.path());
    let sync = as_nobody("pm-mirror", &home, &["--json", "sync"]);
    assert_eq!(sync.code(), 0, "{}", sync.stderr());
    let revision = sync.json()["revision"].as_str().unwrap().to_string();
    let publish = as_nobody("pm-mirror", &home, &["--json", "publish"]);
    assert_eq!(publish.code(), 0, "{}", publish.stderr());
    assert_eq!(
        sql(
            &home,
            "SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1"
        ),
        [revision]
    );
    let doctor = as_nobody("pm-doctor", &home, &["--json"]);
    assert_eq!(doctor.code(), 0, "{}", doctor.stdout());
}

#[test]
fn a_garbage_collection_that_fails_after_the_switch_keeps_the_switch_and_its_record() {
    let lab = Lab::start(3);
    // On the build's disk: `chattr +i` needs a file system that has the flag (a tmpfs /tmp has
    // not).
    let home = Home {
        dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
    };
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    // r1 becomes garbage when latest moves on; an immutable file in it cannot be removed,
    // even by root.
    let pinned = home.repo("revisions/r1/clamav/test.cvd");
    let chattr = |flag: &str| {
        let status = Command::new("chattr").arg(flag).arg(&pinned).status();
        assert!(
            status.unwrap().success(),
            "chattr {flag} failed: this test needs a file system with the immutable flag (ext4, \
             xfs, btrfs) under {}",
            env!("CARGO_TARGET_TMPDIR")
        );
    };
    chattr("+i");
    lab.upstream.set_version(5).unwrap();
    let run = Pm::mirror(&home).args(["--json", "sync"]).run();
    chattr("-i");
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    assert_eq!(run.json()["revision"], "r2");
    assert!(
        run.stderr().contains("`pm-mirror gc` will try again"),
        "{}",
        run.stderr()
    );
    assert_eq!(manifest(&home, "latest").revision, "r2");
    assert_eq!(
        sql(
            &home,
            "SELECT revision FROM mirror_syncs ORDER BY id DESC LIMIT 1"
        ),
        ["r2"]
    );
    // gc --dry-run names what is left and removes nothing; gc removes it.
    let dry = Pm::mirror(&home).args(["--dry-run", "gc"]).run();
    assert_eq!(dry.code(), 0, "{}", dry.stderr());
    assert!(
        dry.stdout()
            .starts_with("would remove 1 unreferenced entries")
            && dry.stdout().contains("revisions/r1"),
        "{}",
        dry.stdout()
    );
    assert!(home.repo("revisions/r1").exists());
    let gc = Pm::mirror(&home).args(["gc"]).json();
    assert_eq!(gc["changed"], true);
    assert!(!home.repo("revisions/r1").exists());
}

/// The other manager tools write the same home (the inventory, keys, the CA): run as root on the
/// service user's home, each one that writes is refused before it changes anything, with the
/// same hint, and root's readers still read.
#[test]
fn sudo_pm_activate_poll_push_and_rollback_on_the_service_users_home_are_refused() {
    let lab = Lab::start(3);
    let home = nobodys_home(&lab);
    let first_key = home.path().join("first.key");
    let run = as_nobody(
        "pm-activate",
        &home,
        &["key", "new", "--out", first_key.to_str().unwrap()],
    );
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    let second_key = home.path().join("second.key");
    let writers: [(&str, &[&str]); 6] = [
        (
            "pm-activate",
            &["key", "new", "--out", second_key.to_str().unwrap()],
        ),
        (
            "pm-activate",
            &["profile", "new", "p", "--set", "max_filesize=1M"],
        ),
        ("pm-poll", &[]),
        ("pm-poll", &["--prune"]),
        ("pm-push", &["update"]),
        ("pm-rollback", &["--generation", "1"]),
    ];
    for (program, args) in writers {
        let run = Pm::new(program)
            .args(["--home", home.path().to_str().unwrap()])
            .args(args)
            .run();
        assert_eq!(
            run.code(),
            2,
            "{program} {args:?}: {}{}",
            run.stdout(),
            run.stderr()
        );
        let stderr = run.stderr();
        assert!(
            stderr.contains("error: refusing to run as root on")
                && stderr.contains(&format!(
                    "hint: run it as the owner: `sudo -u nobody {program}"
                )),
            "{program} {args:?}: {stderr}"
        );
    }
    let foreign = Command::new("find")
        .arg(home.path())
        .args(["!", "-user", NOBODY])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&foreign.stdout), "", "root wrote");
    for (program, args) in [
        ("pm-activate", &["key", "list"][..]),
        ("pm-push", &["holds"]),
        ("pm-query", &["SELECT count(*) FROM hosts"]),
    ] {
        let run = Pm::new(program)
            .args(["--home", home.path().to_str().unwrap()])
            .args(args)
            .run();
        assert_eq!(
            run.code(),
            0,
            "{program} {args:?}: {}{}",
            run.stdout(),
            run.stderr()
        );
    }
}
