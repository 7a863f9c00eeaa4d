//! `pm-mirror publish`: generation rotation, idempotence, and crash safety under `kill -9`.

use std::path::Path;
use std::time::{Duration, Instant};

use pm::repo::{Generations, Repo};

use crate::support::{Home, Lab, Pm, write_feed};

/// A home mirroring a `files` feed that changes on demand, so every sync makes a new revision.
struct Feed {
    lab: Lab,
    dir: tempfile::TempDir,
    home: Home,
    version: u32,
}

impl Feed {
    fn new(extra_config: &str) -> Feed {
        let lab = Lab::start(6);
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new();
        home.config(&format!(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"{}\"\n{extra_config}",
            lab.url("/vendor/index.json")
        ));
        Feed {
            lab,
            dir,
            home,
            version: 0,
        }
    }

    /// Changes the feed and syncs: latest becomes a new revision.
    fn new_revision(&mut self) -> String {
        self.version += 1;
        write_feed(self.dir.path(), &format!("v{}", self.version), 3);
        self.lab
            .upstream
            .set_feed(self.dir.path(), &self.version.to_string())
            .unwrap();
        let report = Pm::mirror(&self.home).args(["sync"]).json();
        assert_eq!(report["changed"], true);
        report["revision"].as_str().unwrap().to_string()
    }

    fn generations(&self) -> Generations {
        Repo::new(self.home.path()).generations().unwrap()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn publish_rotates_three_backups_then_archives_five_times_in_a_row() {
    let mut feed = Feed::new("[retention]\narchives = 2\n");
    let expected: [(&str, &[&str], &[&str]); 7] = [
        ("r1", &[], &[]),
        ("r2", &["r1"], &[]),
        ("r3", &["r2", "r1"], &[]),
        ("r4", &["r3", "r2", "r1"], &[]),
        ("r5", &["r4", "r3", "r2"], &["r1"]),
        ("r6", &["r5", "r4", "r3"], &["r2", "r1"]),
        ("r7", &["r6", "r5", "r4"], &["r3", "r2"]),
    ];
    for (dist, backups, archives) in expected {
        let revision = feed.new_revision();
        assert_eq!(revision, dist);
        let report = Pm::mirror(&feed.home).args(["publish"]).json();
        assert_eq!(report["changed"], true);
        assert_eq!(report["dist"], dist);
        assert_eq!(report["backups"], serde_json::json!(backups));
        assert_eq!(report["archives"], serde_json::json!(archives));
        let generations = feed.generations();
        assert_eq!(generations.dist.as_deref(), Some(dist));
        assert_eq!(generations.backups, names(backups));
        assert_eq!(generations.archives, names(archives));
        // The fixed paths show the same thing as the state.
        assert_consistent(feed.home.path());
    }
    // r1 expired from the archive: its compressed file is gone; r2 and r3 remain.
    let archive = feed.home.repo("archive");
    let mut files: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["r2.tar.gz", "r3.tar.gz"]);
    let listing = std::process::Command::new("tar")
        .arg("tzf")
        .arg(archive.join("r3.tar.gz"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout).contains("r3/manifest.json"));
    assert!(!feed.home.repo("revisions/r1").exists() && !feed.home.repo("revisions/r3").exists());

    // Every publish is in the inventory.
    let inventory =
        pm::inventory::Inventory::open_read_only(feed.home.path(), Duration::from_secs(5))
            .unwrap()
            .unwrap();
    let history = inventory
        .query_strings("SELECT revision FROM dist_history ORDER BY id")
        .unwrap();
    assert_eq!(history, ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]);
}

#[test]
fn publish_is_up_to_date_when_dist_already_equals_latest() {
    let mut feed = Feed::new("");
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
    let again = Pm::mirror(&feed.home).args(["publish"]).json();
    assert_eq!(again["changed"], false);
    assert!(again["reason"].as_str().unwrap().contains("up to date"));
    let text = Pm::mirror(&feed.home).args(["publish"]).run();
    assert_eq!(text.code(), 0);
    assert!(text.stdout().starts_with("up to date"), "{}", text.stdout());
    assert_eq!(feed.generations().backups, Vec::<String>::new());
}

#[test]
fn publish_dry_run_shows_the_rotation_and_changes_nothing() {
    let mut feed = Feed::new("");
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
    feed.new_revision();
    let before = feed.generations();
    let report = Pm::mirror(&feed.home).args(["publish", "--dry-run"]).json();
    assert_eq!(
        (report["changed"].clone(), report["dist"].clone()),
        (false.into(), "r2".into())
    );
    assert_eq!(feed.generations(), before);
}

#[test]
fn publish_without_latest_fails_with_a_hint() {
    let feed = Feed::new("");
    let run = Pm::mirror(&feed.home).args(["publish"]).run();
    assert_eq!(run.code(), 1);
    assert!(
        run.stderr().contains("nothing to publish")
            && run.stderr().contains("hint: run `pm-mirror sync`"),
        "{}",
        run.stderr()
    );
}

/// Checks the repository invariants: the state parses, every generation's link resolves to the
/// revision the state names, every file matches its manifest, archives exist.
fn assert_consistent(home: &Path) {
    let repo = Repo::new(home);
    let generations = repo.generations().expect("the view state parses");
    let mut pairs: Vec<(String, &String)> = Vec::new();
    if let Some(latest) = &generations.latest {
        pairs.push(("latest".into(), latest));
    }
    if let Some(dist) = &generations.dist {
        pairs.push(("dist".into(), dist));
    }
    for (i, backup) in generations.backups.iter().enumerate() {
        pairs.push((format!("backup/{}", i + 1), backup));
    }
    for (generation, revision) in pairs {
        let dir = home.join("repo").join(&generation);
        let manifest: pm::manifest::Manifest =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect(&generation))
                .unwrap();
        assert_eq!(&manifest.revision, revision, "{generation}");
        for file in &manifest.files {
            let (size, sha256) = pm::mirror::hash_file(&dir.join(&file.path)).unwrap();
            assert_eq!(
                (size, sha256),
                (file.size, file.sha256.clone()),
                "{generation}/{}",
                file.path
            );
        }
    }
    for generation in generations.backups.len() + 1..=3 {
        assert!(!home.join(format!("repo/backup/{generation}")).exists());
    }
    for archive in &generations.archives {
        assert!(
            home.join(format!("repo/archive/{archive}.tar.gz"))
                .is_file(),
            "{archive}"
        );
    }
}

#[test]
fn kill_9_during_publish_leaves_either_the_old_or_the_new_generations() {
    let mut feed = Feed::new("[retention]\narchives = 2\n");
    feed.new_revision();
    // Time one full publish to spread the kills over its whole length.
    let started = Instant::now();
    Pm::mirror(&feed.home).args(["publish"]).json();
    let publish_time = started.elapsed();
    let rounds = 24u32;
    let mut killed_midway = 0;
    let (mut kept_old, mut got_new) = (0, 0);
    for round in 0..rounds {
        let latest = feed.new_revision();
        let before = feed.generations();
        let mut child = Pm::mirror(&feed.home)
            .args(["publish", "-q"])
            .command()
            .spawn()
            .unwrap();
        std::thread::sleep(publish_time * round / rounds);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if !status.success() {
            killed_midway += 1;
        }
        let after = feed.generations();
        let old_or_new = after == before
            || (after.dist.as_deref() == Some(latest.as_str())
                && after == before.publish(2).unwrap().after);
        assert!(
            old_or_new,
            "round {round}: a mix of states\nbefore {before:?}\nafter {after:?}"
        );
        if after == before {
            kept_old += 1;
        } else {
            got_new += 1;
        }
        assert_consistent(feed.home.path());
        // Whatever happened, the next publish completes and rotates correctly.
        let report = Pm::mirror(&feed.home).args(["publish"]).json();
        assert_eq!(report["dist"], latest.as_str());
        assert_consistent(feed.home.path());
    }
    eprintln!(
        "{killed_midway} of {rounds} publishes killed: {kept_old} kept the old state, {got_new} the new"
    );
    assert!(killed_midway > 0, "no kill landed while publish ran");
    // Leftovers of killed runs (staging views, unreferenced revisions) are collected.
    let gc = Pm::mirror(&feed.home).args(["gc"]).json();
    let _ = gc;
    let views = std::fs::read_dir(feed.home.repo("views")).unwrap().count();
    assert_eq!(views, 1, "only the current view remains");
}
