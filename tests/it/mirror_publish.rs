//! `pm-mirror publish`: generation rotation, idempotence, and crash safety under `kill -9`.

use std::path::Path;
use std::time::{Duration, Instant};

use pm::repo::{Generations, Repo};

use crate::support::{Home, Lab, Pm, write_feed};

/// A home mirroring a `files` feed that changes on demand, so every sync makes a new revision.
pub(crate) struct Feed {
    lab: Lab,
    dir: tempfile::TempDir,
    pub(crate) home: Home,
    version: u32,
}

impl Feed {
    pub(crate) fn new(extra_config: &str) -> Feed {
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

    /// Changes the feed upstream.
    fn change_feed(&mut self) {
        self.version += 1;
        write_feed(self.dir.path(), &format!("v{}", self.version), 3);
        self.lab
            .upstream
            .set_feed(self.dir.path(), &self.version.to_string())
            .unwrap();
    }

    /// Changes the feed and syncs: latest becomes a new revision.
    pub(crate) fn new_revision(&mut self) -> String {
        self.change_feed();
        let report = Pm::mirror(&self.home).args(["sync"]).json();
        assert_eq!(report["changed"], true);
        report["revision"].as_str().unwrap().to_string()
    }

    /// Changes the feed and syncs, expecting the sync to fail with `message` on stderr.
    pub(crate) fn new_revision_expecting_failure(&mut self, message: &str) {
        self.change_feed();
        let run = Pm::mirror(&self.home).args(["sync"]).run();
        assert_ne!(run.code(), 0, "{}", run.stdout());
        assert!(run.stderr().contains(message), "{}", run.stderr());
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
    // `changed` says it would change (Ansible's check mode), `dry_run` that it did not.
    let report = Pm::mirror(&feed.home).args(["publish", "--dry-run"]).json();
    assert_eq!(
        (
            report["changed"].clone(),
            report["dry_run"].clone(),
            report["dist"].clone()
        ),
        (true.into(), true.into(), "r2".into())
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

/// What the `kill -9` rounds of a test saw.
#[derive(Debug, Default)]
struct Kills {
    killed_midway: u32,
    kept_old: u32,
    got_new: u32,
}

impl Kills {
    /// Runs `pm-mirror ARGS -q`, sends it SIGKILL after `delay`, and checks that the generations
    /// are `before` or `new` (when a revision was rolled back aside), never a mix, and that the
    /// repository is consistent.
    fn round(
        &mut self,
        feed: &Feed,
        args: &[&str],
        delay: Duration,
        before: &Generations,
        new: &Generations,
    ) {
        let mut child = Pm::mirror(&feed.home)
            .args(args)
            .args(["-q"])
            .command()
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        if !child.wait().unwrap().success() {
            self.killed_midway += 1;
        }
        let after = feed.generations();
        let without_times = |g: &Generations| Generations {
            rolled_back_at: Default::default(),
            ..g.clone()
        };
        if after == *before {
            self.kept_old += 1;
        } else {
            assert_eq!(
                without_times(&after),
                without_times(new),
                "a mix of states; before {before:?}"
            );
            self.got_new += 1;
        }
        assert_consistent(feed.home.path());
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
    let mut kills = Kills::default();
    for round in 0..rounds {
        let latest = feed.new_revision();
        let before = feed.generations();
        let new = before.publish(2).unwrap().after;
        kills.round(
            &feed,
            &["publish"],
            publish_time * round / rounds,
            &before,
            &new,
        );
        // Whatever happened, the next publish completes and rotates correctly.
        let report = Pm::mirror(&feed.home).args(["publish"]).json();
        assert_eq!(report["dist"], latest.as_str());
        assert_consistent(feed.home.path());
    }
    eprintln!("publishes: {kills:?}");
    assert!(kills.killed_midway > 0, "no kill landed while publish ran");
    // Leftovers of killed runs (staging views, unreferenced revisions) are collected.
    let gc = Pm::mirror(&feed.home).args(["gc"]).json();
    let _ = gc;
    let views = std::fs::read_dir(feed.home.repo("views")).unwrap().count();
    assert_eq!(views, 1, "only the current view remains");
}

/// GET `path` from a running `pm-mirror serve` as JSON.
fn served_json(server: &crate::support::Server, path: &str) -> serde_json::Value {
    let url = format!("{}{path}", server.base);
    crate::support::runtime().block_on(async {
        let response = reqwest::get(&url).await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    })
}

#[test]
fn rollback_moves_dist_to_a_backup_and_publish_refuses_the_rolled_back_revision_until_again() {
    let mut feed = Feed::new("");
    for _ in 0..3 {
        feed.new_revision();
        Pm::mirror(&feed.home).args(["publish"]).json();
    }
    let server = crate::support::Server::start(&feed.home);
    assert_eq!(served_json(&server, "/manifest.json")["revision"], "r3");

    // A dry run says what would happen and changes nothing.
    let before = feed.generations();
    let dry = Pm::mirror(&feed.home)
        .args(["rollback", "--generation", "1", "--dry-run"])
        .json();
    assert_eq!(
        (dry["changed"].clone(), dry["to"].clone()),
        (true.into(), "r2".into())
    );
    assert_eq!(feed.generations(), before);

    let report = Pm::mirror(&feed.home)
        .args(["rollback", "--generation", "1"])
        .json();
    assert_eq!(report["changed"], true);
    assert_eq!(report["from"], "r3");
    assert_eq!(report["to"], "r2");
    assert_eq!(report["backups"], serde_json::json!(["r1"]));
    assert_eq!(report["rolled_back"], serde_json::json!(["r3"]));
    let generations = feed.generations();
    assert_eq!(generations.latest.as_deref(), Some("r3"));
    assert_eq!(generations.dist.as_deref(), Some("r2"));
    assert_eq!(generations.backups, names(&["r1"]));
    assert_eq!(generations.rolled_back, names(&["r3"]));
    assert_consistent(feed.home.path());
    // latest is still on disk: garbage collection never takes it.
    assert!(feed.home.repo("revisions/r3/manifest.json").is_file());

    // The running server serves r2 as dist now, and backup/1 is r1.
    assert_eq!(served_json(&server, "/manifest.json")["revision"], "r2");
    assert_eq!(
        served_json(&server, "/backup/1/manifest.json")["revision"],
        "r1"
    );

    let rows = crate::support::sql(
        &feed.home,
        "SELECT action || ' ' || revision || ' ' || previous_revision || ' ' || backups \
         FROM dist_history ORDER BY id DESC LIMIT 1",
    );
    assert_eq!(rows, ["rollback r2 r3 r1"]);
    let jobs = crate::support::sql(
        &feed.home,
        "SELECT kind || ' ' || status FROM jobs ORDER BY id DESC LIMIT 1",
    );
    assert_eq!(jobs, ["rollback ok"]);

    // Publish refuses the rolled-back latest, with a hint, and changes nothing.
    let refused = Pm::mirror(&feed.home).args(["publish"]).run();
    assert_eq!(refused.code(), 2, "{}", refused.stderr());
    assert!(
        refused
            .stderr()
            .contains("error: latest `r3` was rolled back")
            && refused.stderr().contains("hint: it was rolled back on 20")
            && refused
                .stderr()
                .contains("run `pm-mirror publish --again` to publish it anyway"),
        "{}",
        refused.stderr()
    );
    assert_eq!(feed.generations(), generations);

    // --again publishes it and forgets that it was rolled back.
    let again = Pm::mirror(&feed.home).args(["publish", "--again"]).json();
    assert_eq!(again["dist"], "r3");
    assert_eq!(again["backups"], serde_json::json!(["r2", "r1"]));
    assert!(feed.generations().rolled_back.is_empty());
    assert_eq!(served_json(&server, "/manifest.json")["revision"], "r3");
}

/// Issue 16 (found by the Ansible test's upstream-down step): after a rollback latest stays
/// the rolled-back revision until upstream moves on, every publish refused it, and none
/// re-signed dist, which agents refuse once `dist_valid_for` passed.
#[test]
fn a_publish_that_refuses_a_rolled_back_latest_still_re_signs_dist() {
    let mut feed = Feed::new("[serve]\ndist_valid_for = \"7s\"\n");
    for _ in 0..2 {
        feed.new_revision();
        Pm::mirror(&feed.home).args(["publish"]).json();
    }
    Pm::mirror(&feed.home)
        .args(["rollback", "--generation", "1"])
        .json();
    let before = feed.generations();
    // A seventh of the validity passes: the statement is due to be re-signed.
    std::thread::sleep(Duration::from_millis(1100));

    let refused = Pm::mirror(&feed.home).args(["publish"]).run();
    assert_eq!(refused.code(), 2, "{}", refused.stderr());
    assert!(
        refused
            .stderr()
            .contains("error: latest `r2` was rolled back"),
        "{}",
        refused.stderr()
    );
    let after = feed.generations();
    assert_eq!(after.dist.as_deref(), Some("r1"));
    assert_eq!(
        after.dist_serial,
        before.dist_serial + 1,
        "dist was not re-signed"
    );
    let statement: serde_json::Value =
        serde_json::from_slice(&std::fs::read(feed.home.repo("view/dist.json")).unwrap()).unwrap();
    assert_eq!(statement["revision"], "r1");
    assert_eq!(statement["dist_serial"], after.dist_serial);
}

#[test]
fn after_a_rollback_a_newer_revision_publishes_normally() {
    let mut feed = Feed::new("");
    for _ in 0..3 {
        feed.new_revision();
        Pm::mirror(&feed.home).args(["publish"]).json();
    }
    let report = Pm::mirror(&feed.home)
        .args(["rollback", "--generation", "2"])
        .json();
    assert_eq!(report["to"], "r1");
    assert_eq!(report["rolled_back"], serde_json::json!(["r3", "r2"]));
    // r2 is referenced by nothing any more: collected.
    assert!(!feed.home.repo("revisions/r2").exists());
    assert_consistent(feed.home.path());

    feed.new_revision();
    let published = Pm::mirror(&feed.home).args(["publish"]).json();
    assert_eq!(published["dist"], "r4");
    assert_eq!(published["backups"], serde_json::json!(["r1"]));
    // Still remembered, so an import or a mistake cannot bring them back silently.
    assert_eq!(feed.generations().rolled_back, names(&["r3", "r2"]));
}

#[test]
fn rollback_to_a_missing_generation_is_a_usage_error_that_changes_nothing() {
    let mut feed = Feed::new("");
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
    feed.new_revision();
    Pm::mirror(&feed.home).args(["publish"]).json();
    let before = feed.generations();
    let run = Pm::mirror(&feed.home)
        .args(["rollback", "--generation", "2"])
        .run();
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr()
            .contains("error: there is no backup/2 to roll back to: dist is r2 and there is only 1 backup (r1)")
            && run.stderr().contains("hint: `pm-mirror status`"),
        "{}",
        run.stderr()
    );
    for bad in ["0", "4", "x"] {
        let run = Pm::mirror(&feed.home)
            .args(["rollback", "--generation", bad])
            .run();
        assert_eq!(run.code(), 2, "{bad}: {}", run.stderr());
    }
    assert_eq!(feed.generations(), before);
}

#[test]
fn kill_9_during_rollback_leaves_either_the_old_or_the_new_generations() {
    let mut feed = Feed::new("");
    let rounds = 8u32;
    let mut rollback_time = None;
    let mut kills = Kills::default();
    for round in 0..rounds {
        // dist and one backup to roll back to.
        for _ in 0..2 {
            feed.new_revision();
            Pm::mirror(&feed.home).args(["publish"]).json();
        }
        let before = feed.generations();
        let Some(time) = rollback_time else {
            let started = Instant::now();
            Pm::mirror(&feed.home)
                .args(["rollback", "--generation", "1"])
                .json();
            rollback_time = Some(started.elapsed());
            continue;
        };
        let rollback = before.rollback(1).unwrap();
        let mut new = rollback.after;
        // pm-mirror also keeps what the rolled-back revisions carried, product by product.
        let repo = Repo::new(feed.home.path());
        for revision in &rollback.rolled_back {
            let products = repo.manifest(revision).unwrap().product_components();
            new.rolled_back_products.insert(revision.clone(), products);
        }
        kills.round(
            &feed,
            &["rollback", "--generation", "1"],
            time * round / rounds,
            &before,
            &new,
        );
    }
    eprintln!("rollbacks: {kills:?}");
}

/// A home with ClamAV and a `files` feed, ClamAV published at test 4 then 5, then dist rolled
/// back (test 5's revision is rolled back), then only the feed changes and syncs: latest carries
/// the rolled-back ClamAV. The lab, the feed's directory, the home and the revision rolled back
/// to.
fn rolled_back_clamav_with_a_new_feed() -> (Lab, tempfile::TempDir, Home, String) {
    let lab = Lab::start(4);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 2);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let home = Home::new();
    home.clamav_and_feed_config(&lab);
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    lab.upstream.set_version(5).unwrap();
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let rolled_back_to = Repo::new(home.path()).generations().unwrap().backups[0].clone();
    let run = Pm::mirror(&home)
        .args(["rollback", "--generation", "1"])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    write_feed(feed.path(), "v2", 2);
    lab.upstream.set_feed(feed.path(), "2").unwrap();
    Pm::mirror(&home).args(["sync"]).json();
    (lab, feed, home, rolled_back_to)
}

/// Red team C, item 4: after a rollback, a change to another product does not bring back the
/// rolled-back ClamAV content; ClamAV moving on lifts the guard.
#[test]
fn a_change_to_another_product_does_not_bring_back_a_rolled_back_product() {
    let (lab, _feed, home, rolled_back_to) = rolled_back_clamav_with_a_new_feed();
    let generations = || Repo::new(home.path()).generations().unwrap();
    let refused = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(
        refused.code(),
        2,
        "{}{}",
        refused.stdout(),
        refused.stderr()
    );
    assert!(
        refused.stderr().contains("`clamav`")
            && refused.stderr().contains("hint:")
            && refused.stderr().contains("--again"),
        "{}",
        refused.stderr()
    );
    assert_eq!(generations().dist.as_ref(), Some(&rolled_back_to));

    // ClamAV moves on: the guard lifts, the vendor change goes out with it.
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&home).args(["sync"]).json();
    let published = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(published.code(), 0, "{}", published.stderr());
    assert_eq!(generations().dist, generations().latest);
}

/// `--again` publishes a latest carrying a rolled-back product, whole.
#[test]
fn publish_again_brings_back_a_rolled_back_product_with_another_products_change() {
    let (_lab, _feed, home, _) = rolled_back_clamav_with_a_new_feed();
    let again = Pm::mirror(&home).args(["publish", "--again"]).run();
    assert_eq!(again.code(), 0, "{}", again.stderr());
    let generations = Repo::new(home.path()).generations().unwrap();
    assert_eq!(generations.dist, generations.latest);
}

/// Issue 17: a product renamed in `pm.toml` took its files out of dist at the next publish
/// without a word, even in `publish --dry-run`. Sync (and its dry run) names what leaves
/// latest; publish (and its dry run) refuses to take it out of dist, keeping dist as it was and
/// signed, until `--allow-removal`, which reports what left.
#[test]
fn a_product_renamed_in_pm_toml_leaves_dist_only_with_allow_removal_and_every_step_names_its_files()
{
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 12);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let home = Home::new();
    home.clamav_and_feed_config(&lab);
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let dist_before = crate::support::manifest(&home, "dist");
    let vendor_files: Vec<String> = dist_before
        .files
        .iter()
        .filter(|f| f.product == "vendor")
        .map(|f| f.path.clone())
        .collect();
    assert_eq!(vendor_files.len(), 12);
    // Reports name the first ten and count the rest.
    let shown = &vendor_files[..10];
    // A typo: `vendor` becomes `vendr`.
    home.clamav_config(
        &lab,
        &format!(
            "[[products]]\nname = \"vendr\"\nkind = \"files\"\nindex_url = \"{}\"\n",
            lab.url("/vendor/index.json")
        ),
    );
    let expected_removed = serde_json::json!([{
        "name": "vendor",
        "files": vendor_files.len(),
        "bytes": dist_before.files.iter().filter(|f| f.product == "vendor").map(|f| f.size).sum::<u64>(),
        "paths": shown,
    }]);
    let dry_sync = Pm::mirror(&home)
        .args(["--dry-run", "--json", "sync"])
        .run();
    assert_eq!(dry_sync.code(), 0, "{}", dry_sync.stderr());
    assert_eq!(dry_sync.json()["changed"], true);
    assert_eq!(dry_sync.json()["removed"], expected_removed);
    assert!(
        dry_sync.stderr().contains(
            "warning: this sync would leave out of latest what pm.toml no longer lists: `vendor` ("
        ),
        "{}",
        dry_sync.stderr()
    );
    let sync = Pm::mirror(&home).args(["--json", "sync"]).run();
    assert_eq!(sync.code(), 0, "{}", sync.stderr());
    assert_eq!(sync.json()["removed"], expected_removed);
    assert!(
        sync.stderr().contains(&format!(
            "warning: this sync left out of latest what pm.toml no longer lists: `vendor` ({} files: {}",
            vendor_files.len(),
            vendor_files[0]
        )),
        "{}",
        sync.stderr()
    );

    for args in [&["--dry-run", "publish"][..], &["publish"]] {
        let refused = Pm::mirror(&home).args(args).args(["--json"]).run();
        assert_eq!(refused.code(), 2, "{args:?}: {}", refused.stdout());
        let error = refused.json();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("publishing it would take out of dist: `vendor` (")
                && shown.iter().all(|path| message.contains(path.as_str()))
                && message.contains(&format!("{} and 2 more)", shown[9])),
            "{message}"
        );
        assert!(
            error["hint"]
                .as_str()
                .unwrap()
                .contains("put it back in pm.toml under its old name"),
            "{error}"
        );
        assert_eq!(
            crate::support::manifest(&home, "dist"),
            dist_before,
            "{args:?}"
        );
    }

    let dry = Pm::mirror(&home)
        .args(["--dry-run", "--json", "publish", "--allow-removal"])
        .run();
    assert_eq!(dry.code(), 0, "{}", dry.stderr());
    assert_eq!(dry.json()["removed"], expected_removed);
    assert_eq!(crate::support::manifest(&home, "dist"), dist_before);
    let published = Pm::mirror(&home)
        .args(["--json", "publish", "--allow-removal"])
        .run();
    assert_eq!(published.code(), 0, "{}", published.stderr());
    assert_eq!(published.json()["changed"], true);
    assert_eq!(published.json()["removed"], expected_removed);
    assert!(
        published
            .stderr()
            .contains("warning: this publish left out of dist with --allow-removal: `vendor` (")
    );
    let dist_after = crate::support::manifest(&home, "dist");
    assert!(dist_after.product("vendor").is_none());
    assert!(dist_after.product("vendr").is_some());
    assert!(!home.repo("dist/vendor").exists());
    // Nothing is left to remove: the next publish is up to date.
    let again = Pm::mirror(&home).args(["--json", "publish"]).json();
    assert_eq!(again["changed"], false);
}
