//! Faults the suite must survive without losing anything: a full disk (a small tmpfs as
//! PM_HOME, root only) during sync, with a clear error, the old state intact and the next run,
//! with room again, completing.

use std::path::Path;
use std::process::Command;

use crate::support::{Home, Lab, Pm, manifest, write_feed};

/// A tmpfs of a fixed size mounted on a temporary directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "pm-small-disk",
            ],
            dir.path(),
        );
        SmallDisk { dir }
    }

    fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], self.dir.path());
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn mount(args: &[&str], target: &Path) {
    let status = Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mount {args:?} {} (these tests need root)",
        target.display()
    );
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn incompressible(path: &Path, bytes: usize) {
    use std::io::Read;
    let mut data = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn a_full_disk_fails_the_sync_clearly_keeps_latest_and_dist_and_the_next_sync_completes() {
    let disk = SmallDisk::mount("48m");
    let home = Home {
        dir: tempfile::tempdir_in(disk.path()).unwrap(),
    };
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    write_feed(feed.path(), "v1", 4);
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    home.clamav_and_feed_config(&lab);
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let latest = manifest(&home, "latest");
    let dist = manifest(&home, "dist");

    // A feed update larger than the disk's free space.
    incompressible(&feed.path().join("big.bin"), 64 << 20);
    lab.upstream.set_feed(feed.path(), "2").unwrap();
    lab.upstream.set_version(6).unwrap();
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 1, "{}", run.stderr());
    assert!(
        run.stderr().contains("No space left on device"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    assert_eq!(manifest(&home, "latest"), latest);
    assert_eq!(manifest(&home, "dist"), dist);
    let publish = Pm::mirror(&home).args(["publish"]).json();
    assert_eq!(publish["changed"], false, "{publish}");
    let doctor = Pm::new("pm-doctor")
        .args(["--json", "--home"])
        .args([home.path()])
        .run();
    assert_eq!(doctor.code(), 0, "{}{}", doctor.stdout(), doctor.stderr());

    // With room again, the next sync completes and takes everything.
    disk.resize("256m");
    let next = Pm::mirror(&home).args(["sync"]).json();
    assert_eq!(next["changed"], true, "{next}");
    assert!(home.repo("latest/vendor/big.bin").is_file());
    assert_eq!(
        crate::support::component_version(&manifest(&home, "latest"), "clamav", "test"),
        "6"
    );
    Pm::mirror(&home).args(["publish"]).json();
}

/// How many times each operation is killed: a few in the default run (CI), `PM_FAULT_RUNS` for
/// the long suite (e.g. 200).
fn fault_runs() -> usize {
    std::env::var("PM_FAULT_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8)
}

/// A small xorshift generator: the kill times vary per run, and a failing seed can be replayed
/// with `PM_FAULT_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("PM_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("fault seed {seed} (PM_FAULT_SEED={seed} replays it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs `pm` and kills it with SIGKILL after `delay`, unless it finished first; true if killed.
fn kill_after(pm: Pm, delay: std::time::Duration) -> bool {
    let mut child = pm
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + delay;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Wall time of a run of `pm` (the window the kills are spread over).
fn timed(pm: Pm) -> std::time::Duration {
    let started = std::time::Instant::now();
    let run = pm.run();
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    started.elapsed()
}

/// What must hold after any kill: latest and dist verify with the home's key (signature, every
/// file's size and sha256), pm-doctor finds nothing failed, status and the inventory answer.
pub(crate) fn assert_consistent(home: &Home, context: &str) {
    // No key yet (a closed home before its first import): then there is nothing to verify.
    let verifier = std::fs::read(home.path().join(pm::pki::SIGNING_PUBLIC_KEY_FILE))
        .ok()
        .map(|pem| pm::pki::VerifyingKey::from_pem(&pem).unwrap());
    for generation in ["latest", "dist"] {
        let dir = home.repo(generation);
        match (&verifier, dir.exists()) {
            (_, false) => {}
            (None, true) => panic!("{context}: {generation} exists but the signing key does not"),
            (Some(verifier), true) => {
                if let Err(err) = pm::mirror::verify_revision_dir(&dir, generation, verifier) {
                    panic!("{context}: {generation} does not verify: {err:#}");
                }
            }
        }
    }
    let doctor = Pm::new("pm-doctor")
        .args(["--json", "--home"])
        .args([home.path()])
        .run();
    assert_eq!(
        doctor.code(),
        0,
        "{context}: pm-doctor\n{}{}",
        doctor.stdout(),
        doctor.stderr()
    );
    let status = Pm::mirror(home).args(["status"]).run();
    assert_eq!(status.code(), 0, "{context}: {}", status.stderr());
    if home.path().join("inventory.duckdb").exists() {
        let jobs = Pm::new("pm-query")
            .args(["--home"])
            .args([home.path()])
            .args(["--json", "SELECT count(*) AS n FROM jobs"])
            .run();
        assert_eq!(jobs.code(), 0, "{context}: {}", jobs.stderr());
    }
}

/// A connected home fed by a lab whose `files` feed changes a 4 MB file per call of `next`.
struct ChangingFeed {
    lab: Lab,
    feed: tempfile::TempDir,
    home: Home,
    version: usize,
}

impl ChangingFeed {
    fn new() -> ChangingFeed {
        let lab = Lab::start(3);
        let feed = tempfile::tempdir().unwrap();
        write_feed(feed.path(), "v0", 4);
        let home = Home::new();
        home.clamav_and_feed_config(&lab);
        let mut changing = ChangingFeed {
            lab,
            feed,
            home,
            version: 0,
        };
        changing.next();
        Pm::mirror(&changing.home).args(["sync"]).json();
        Pm::mirror(&changing.home).args(["publish"]).json();
        changing
    }

    /// Upstream offers a new feed version.
    fn next(&mut self) {
        self.version += 1;
        incompressible(&self.feed.path().join("engine.bin"), 4 << 20);
        self.lab
            .upstream
            .set_feed(self.feed.path(), &self.version.to_string())
            .unwrap();
    }
}

#[test]
fn sync_and_publish_killed_at_random_points_leave_a_consistent_repository_and_the_next_run_completes()
 {
    let mut rng = Rng::new();
    let mut changing = ChangingFeed::new();
    let mut killed = 0;
    for run in 0..fault_runs() {
        changing.next();
        // The window: how long an undisturbed sync of this change takes, measured on a copy.
        let window = {
            let probe = Home {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::copy(
                changing.home.path().join("pm.toml"),
                probe.path().join("pm.toml"),
            )
            .unwrap();
            timed(Pm::mirror(&probe).args(["sync"]))
        };
        let delay = std::time::Duration::from_micros(rng.below(window.as_micros() as u64));
        killed += kill_after(Pm::mirror(&changing.home).args(["sync"]), delay) as usize;
        assert_consistent(
            &changing.home,
            &format!("sync killed after {delay:?} (run {run})"),
        );
        Pm::mirror(&changing.home).args(["sync"]).json();
        let latest = manifest(&changing.home, "latest");
        assert_eq!(
            crate::support::component_version(&latest, "vendor", "engine.bin"),
            changing.version.to_string(),
            "run {run}: the sync after the kill did not complete"
        );

        let window = std::time::Duration::from_millis(300);
        let delay = std::time::Duration::from_micros(rng.below(window.as_micros() as u64));
        killed += kill_after(Pm::mirror(&changing.home).args(["publish"]), delay) as usize;
        assert_consistent(
            &changing.home,
            &format!("publish killed after {delay:?} (run {run})"),
        );
        Pm::mirror(&changing.home).args(["publish"]).json();
        assert_eq!(
            manifest(&changing.home, "dist").content_sha256,
            latest.content_sha256,
            "run {run}: the publish after the kill did not complete"
        );
        assert_consistent(&changing.home, &format!("after run {run}"));
    }
    eprintln!(
        "sync/publish: {} runs, {killed} killed mid-way",
        fault_runs()
    );
    assert!(
        killed > 0,
        "no run was killed mid-way: the kill window is wrong"
    );
}

#[test]
fn an_import_killed_at_random_points_leaves_latest_intact_and_the_next_import_completes() {
    let mut rng = Rng::new();
    let mut changing = ChangingFeed::new();
    let closed = Home::new();
    closed.config("");
    let public = closed.path().join("exporter.pub.pem");
    Pm::mirror(&changing.home)
        .args(["key", "export-public", "--out"])
        .args([&public])
        .json();
    Pm::mirror(&closed)
        .args(["trust", "add"])
        .args([&public])
        .json();
    let bundles = tempfile::tempdir().unwrap();
    // The first run's kill may hit the creation of the closed home's inventory too.
    let mut killed = 0;
    for run in 0..fault_runs() {
        changing.next();
        Pm::mirror(&changing.home).args(["sync"]).json();
        let bundle = bundles.path().join(format!("run{run}.bundle"));
        Pm::mirror(&changing.home)
            .args(["export", "--out"])
            .args([&bundle])
            .json();
        let before = closed
            .repo("latest")
            .exists()
            .then(|| manifest(&closed, "latest"));
        let window = std::time::Duration::from_millis(400);
        let delay = std::time::Duration::from_micros(rng.below(window.as_micros() as u64));
        killed += kill_after(Pm::mirror(&closed).args(["import"]).args([&bundle]), delay) as usize;
        assert_consistent(
            &closed,
            &format!("import killed after {delay:?} (run {run})"),
        );
        let after_kill = closed
            .repo("latest")
            .exists()
            .then(|| manifest(&closed, "latest"));
        // Either all of the bundle is latest, or latest is what it was.
        let expected = manifest(&changing.home, "latest").content_sha256;
        match &after_kill {
            Some(m) if m.content_sha256 == expected => {}
            other => assert_eq!(
                other.as_ref().map(|m| &m.content_sha256),
                before.as_ref().map(|m| &m.content_sha256),
                "run {run}: a killed import left a mixed latest"
            ),
        }
        let import = Pm::mirror(&closed).args(["import"]).args([&bundle]).json();
        assert!(import["exit_code"].is_null(), "{import}");
        assert_eq!(
            manifest(&closed, "latest").content_sha256,
            expected,
            "run {run}"
        );
    }
    eprintln!("import: {} runs, {killed} killed mid-way", fault_runs());
    assert!(
        killed > 0,
        "no import was killed mid-way: the kill window is wrong"
    );
}
