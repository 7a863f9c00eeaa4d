//! Faults the suite must survive without losing anything: a full disk (a small tmpfs, root
//! only) during sync, publish and an agent's install, with a clear error, the old state intact
//! and the next run, with room again, completing; and `kill -9` at random points of sync,
//! publish, import, pm-push, pm-rollback and pm-poll (the agent's own install: agent_install.rs),
//! after which everything is consistent and the next run completes. `PM_FAULT_RUNS` sets the
//! kills per operation, `PM_FAULT_SEED` replays a run's kill points.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent_install::{clamscan, eicar, names, sigtool_version};
use crate::push::Fleet;
use crate::rng::Rng;
use crate::support::{AgentSetup, Home, Lab, Pm, manifest, write_feed};

/// A tmpfs of a fixed size mounted on a temporary directory, or on a given one; unmounted on
/// drop.
pub(crate) struct SmallDisk {
    path: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl SmallDisk {
    pub(crate) fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = SmallDisk::mount_at(dir.path(), size);
        disk._dir = Some(dir);
        disk
    }

    /// Mounts it on `path` (created if missing), hiding what was there until the drop.
    pub(crate) fn mount_at(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        mount(
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "pm-small-disk",
            ],
            path,
        );
        SmallDisk {
            path: path.to_path_buf(),
            _dir: None,
        }
    }

    pub(crate) fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], &self.path);
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Fills what is left of it with one file (returned, to remove it again).
    pub(crate) fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(28) => break, // ENOSPC
                Err(err) => panic!("filling {}: {err}", path.display()),
            }
        }
        // The last pages: a byte at a time.
        while let Ok(1) = file.write(&[0]) {}
        path
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
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
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

/// How many times each operation is killed: `ci` in the default run, `PM_FAULT_RUNS` for the
/// long suite (e.g. 200).
pub(crate) fn fault_runs(ci: usize) -> usize {
    std::env::var("PM_FAULT_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(ci)
}

/// The shared seeded generator ([`crate::rng::Rng`]): the kill times vary per run, and a failing
/// seed can be replayed with `PM_FAULT_SEED`.
pub(crate) fn fault_rng() -> Rng {
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
    Rng::new(seed)
}

/// A random instant within `window`.
pub(crate) fn kill_point(rng: &mut Rng, window: Duration) -> Duration {
    Duration::from_micros(rng.below(window.as_micros() as usize) as u64)
}

/// Runs `pm` and kills it with SIGKILL after `delay`, unless it finished first; true if killed.
fn kill_after(pm: Pm, delay: Duration) -> bool {
    let mut child = pm
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + delay;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wall time of a run of `pm` (the window the kills are spread over).
fn timed(pm: Pm) -> Duration {
    let started = Instant::now();
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
    let mut rng = fault_rng();
    let mut changing = ChangingFeed::new();
    // The window: how long an undisturbed sync takes, measured once on a scratch home (every
    // run's change has the same size).
    changing.next();
    let sync_window = {
        let probe = Home::new();
        std::fs::copy(
            changing.home.path().join("pm.toml"),
            probe.path().join("pm.toml"),
        )
        .unwrap();
        timed(Pm::mirror(&probe).args(["sync"]))
    };
    let mut killed = 0;
    for run in 0..fault_runs(8) {
        if run > 0 {
            changing.next();
        }
        let delay = kill_point(&mut rng, sync_window);
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

        let delay = kill_point(&mut rng, Duration::from_millis(300));
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
        fault_runs(8)
    );
    assert!(
        killed > 0,
        "no run was killed mid-way: the kill window is wrong"
    );
}

#[test]
fn an_import_killed_at_random_points_leaves_latest_intact_and_the_next_import_completes() {
    let mut rng = fault_rng();
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
    for run in 0..fault_runs(8) {
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
        let delay = kill_point(&mut rng, Duration::from_millis(400));
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
    eprintln!("import: {} runs, {killed} killed mid-way", fault_runs(8));
    assert!(
        killed > 0,
        "no import was killed mid-way: the kill window is wrong"
    );
}

#[test]
fn an_agent_install_killed_at_random_points_leaves_a_database_clamscan_loads_and_the_next_install_completes()
 {
    let setup = AgentSetup::new();
    let db = setup.db();
    let eicar = eicar(setup.tmp.path());
    let first = setup.agent_cmd(&["update"])["revision"]
        .as_str()
        .unwrap()
        .to_string();
    setup.publish(6);
    let second = setup.agent_cmd(&["update"])["revision"]
        .as_str()
        .unwrap()
        .to_string();
    // The window: the longer of the two installs the loop alternates, from local copies.
    let rollback_time = timed(Pm::agent(&setup.state()).args(["rollback", "--to", "backup:1"]));
    let update_time = timed(Pm::agent(&setup.state()).args(["update"]));
    let install_time = rollback_time.max(update_time);
    let mut rng = fault_rng();
    let rounds = fault_runs(20);
    let mut killed = 0;
    for round in 0..rounds {
        // Alternate between rolling back to 3 (the local backup) and updating to 6.
        let (args, revision, version): (&[&str], &str, &str) = if sigtool_version(&db) == "6" {
            (&["rollback", "--to", "backup:1", "-q"], &first, "3")
        } else {
            (&["update", "-q"], &second, "6")
        };
        let delay = kill_point(&mut rng, install_time);
        let mut child = Pm::agent(&setup.state())
            .args(args)
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        if !child.wait().unwrap().success() {
            killed += 1;
        }
        let context = format!("round {round}: `{}` killed after {delay:?}", args.join(" "));
        let found = sigtool_version(&db);
        assert!(found == "3" || found == "6", "{context}: {found}");
        let (code, text) = clamscan(&db, &eicar);
        assert!(
            code == 0 || code == 1,
            "{context}: clamscan cannot load the database: {text}"
        );
        // The agent's own record still reads; the same command again (unless the killed one
        // finished: a second rollback to backup:1 would swap back) completes, leaving only
        // the target set in the database directory.
        let status = setup.agent_cmd(&["status"]);
        if status["installed_revision"] != revision {
            let again = Pm::agent(&setup.state()).args(args).run();
            assert_eq!(again.code(), 0, "{context}: {}", again.stderr());
        }
        let status = setup.agent_cmd(&["status"]);
        assert_eq!(status["installed_revision"], revision, "{context}");
        assert_eq!(sigtool_version(&db), version, "{context}");
        let expected = if version == "6" {
            "test.cld"
        } else {
            "test.cvd"
        };
        assert_eq!(names(&db), [expected], "{context}");
    }
    eprintln!("agent install: {rounds} runs in a {install_time:?} window, {killed} killed mid-way");
    assert!(
        killed > 0,
        "no install was killed mid-way: the kill window is wrong"
    );
}

/// `SELECT` through pm-query: the inventory opens and answers.
fn query(home: &Home, sql: &str, context: &str) -> Vec<serde_json::Value> {
    let run = Pm::new("pm-query")
        .args(["--home"])
        .args([home.path()])
        .args([sql, "--json"])
        .run();
    assert_eq!(run.code(), 0, "{context}: pm-query {sql}: {}", run.stderr());
    run.json()["rows"].as_array().unwrap().clone()
}

/// The lab agents of a fleet: state and database directories.
fn lab_agents(fleet: &Fleet, count: usize) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    (0..count)
        .map(|n| {
            (
                fleet.dir.join(format!("agent-{n:03}")),
                fleet.dir.join(format!("agent-{n:03}-db")),
            )
        })
        .collect()
}

/// What must hold on a fleet after any kill: the manager's home as [`assert_consistent`]; every
/// rollout left `running` is one whose process is gone, which `pm-push status` reports
/// `interrupted` (what `resume`, or the same pm-rollback again, continues); no job recorded
/// before is lost; and every agent's record reads and its database is one whole test version
/// clamscan loads.
fn assert_fleet_consistent(fleet: &Fleet, agents: usize, jobs_before: usize, context: &str) {
    let home = &fleet.setup.home;
    assert_consistent(home, context);
    let jobs = query(home, "SELECT count(*) AS n FROM jobs", context)[0]["n"]
        .as_u64()
        .unwrap() as usize;
    assert!(
        jobs >= jobs_before,
        "{context}: jobs lost: {jobs_before} -> {jobs}"
    );
    for row in query(
        home,
        "SELECT job_id FROM rollouts WHERE state = 'running'",
        context,
    ) {
        let job = row["job_id"].to_string();
        let (_, status) = fleet.push(&["status", &job]);
        assert_eq!(status["state"], "interrupted", "{context}: {status}");
    }
    let eicar = eicar(fleet.setup.tmp.path());
    for (state, db) in lab_agents(fleet, agents) {
        Pm::agent(&state).args(["status"]).json();
        let version = sigtool_version(&db);
        assert!(
            version == "3" || version == "6",
            "{context}: {}: {version}",
            db.display()
        );
        let (code, text) = clamscan(&db, &eicar);
        assert!(
            code == 0 || code == 1,
            "{context}: clamscan cannot load {}: {text}",
            db.display()
        );
    }
}

/// Every lab agent is on `revision` (test `version`), in the inventory and on disk.
fn assert_fleet_on(fleet: &Fleet, agents: usize, revision: &str, version: &str, context: &str) {
    let rows = query(
        &fleet.setup.home,
        "SELECT host, installed_revision FROM fleet_status WHERE host LIKE 'lab-%' ORDER BY host",
        context,
    );
    assert_eq!(rows.len(), agents, "{context}: {rows:?}");
    for row in rows {
        assert_eq!(row["installed_revision"], revision, "{context}: {row}");
    }
    for (_, db) in lab_agents(fleet, agents) {
        assert_eq!(sigtool_version(&db), version, "{context}: {}", db.display());
    }
}

fn jobs(home: &Home) -> usize {
    query(home, "SELECT count(*) AS n FROM jobs", "jobs")[0]["n"]
        .as_u64()
        .unwrap() as usize
}

#[test]
fn push_rollback_and_poll_killed_at_random_points_leave_a_consistent_fleet_and_the_next_run_completes()
 {
    const AGENTS: usize = 3;
    let mut rng = fault_rng();
    let fleet = Fleet::start(AGENTS);
    let home = &fleet.setup.home;
    fleet.setup.publish(6);
    let old = manifest(home, "backup/1").revision; // test 3
    let new = manifest(home, "dist").revision; // test 6
    // A wave per host, so the kills also land between the waves' transactions.
    let push: &[&str] = &["update", "--wave-size", "1"];
    let rollback: &[&str] = &["--generation", "1", "--wave-size", "1"];
    // The windows: each operation once, undisturbed, from the state the loop meets it in (after
    // a first round, which also downloads what the agents keep local copies of).
    Pm::push(home).args(push).json();
    assert_fleet_on(&fleet, AGENTS, &new, "6", "first push");
    Pm::rollback(home).args(rollback).json();
    Pm::mirror(home).args(["publish", "--again"]).json();
    let push_window = timed(Pm::push(home).args(push));
    let rollback_window = timed(Pm::rollback(home).args(rollback));
    let poll_window = timed(Pm::poll(home));
    Pm::mirror(home).args(["publish", "--again"]).json();
    eprintln!("windows: push {push_window:?}, rollback {rollback_window:?}, poll {poll_window:?}");

    let runs = fault_runs(3);
    let (mut pushes, mut rollbacks, mut polls, mut resumed, mut rotated) = (0, 0, 0, 0, 0);
    for run in 0..runs {
        // pm-push update of dist (test 6) from test 3: killed, then run again (or resumed).
        let delay = kill_point(&mut rng, push_window);
        let before = jobs(home);
        let last_rollout =
            query(home, "SELECT max(job_id) AS n FROM rollouts", "rollouts")[0]["n"].as_i64();
        pushes += kill_after(Pm::push(home).args(push).args(["--json"]), delay) as usize;
        let context = format!("pm-push killed after {delay:?} (run {run})");
        assert_fleet_consistent(&fleet, AGENTS, before, &context);
        let (_, newest) = fleet.push(&["status"]);
        // Resume the rollout this kill interrupted (an older one is refused: a later rollback
        // moved its hosts).
        let interrupted_now =
            newest["state"] == "interrupted" && newest["job_id"].as_i64() > last_rollout;
        let (code, report) = if interrupted_now && run % 2 == 1 {
            resumed += 1;
            fleet.push(&["resume", &newest["job_id"].to_string()])
        } else {
            fleet.push(push)
        };
        assert_eq!(code, 0, "{context}: the next run: {report}");
        assert_eq!(report["state"], "done", "{context}: {report}");
        assert_fleet_on(
            &fleet,
            AGENTS,
            &new,
            "6",
            &format!("{context}: after the next run {report}"),
        );

        // pm-rollback of the fleet to backup/1 (test 3), dist rotating back at the end.
        let delay = kill_point(&mut rng, rollback_window);
        let before = jobs(home);
        rollbacks += kill_after(Pm::rollback(home).args(rollback).args(["--json"]), delay) as usize;
        let context = format!("pm-rollback killed after {delay:?} (run {run})");
        assert_fleet_consistent(&fleet, AGENTS, before, &context);
        let dist = manifest(home, "dist").revision;
        if dist == old {
            // Killed after dist rotated back: the rollback had done everything (the same
            // command again would go one generation further back).
            rotated += 1;
        } else {
            assert_eq!(dist, new, "{context}");
            let run = Pm::rollback(home).args(rollback).args(["--json"]).run();
            assert_eq!(run.code(), 0, "{context}: the next run: {}", run.stderr());
            assert_eq!(run.json()["dist_rolled_back"], true, "{context}");
        }
        assert_eq!(manifest(home, "dist").revision, old, "{context}");
        assert_fleet_on(&fleet, AGENTS, &old, "3", &context);

        // pm-poll of the fleet.
        let delay = kill_point(&mut rng, poll_window);
        let before = jobs(home);
        polls += kill_after(Pm::poll(home).args(["--json"]), delay) as usize;
        let context = format!("pm-poll killed after {delay:?} (run {run})");
        assert_fleet_consistent(&fleet, AGENTS, before, &context);
        let report = Pm::poll(home).json();
        assert_eq!(report["summary"]["ok"], AGENTS, "{context}: {report}");
        assert_fleet_on(&fleet, AGENTS, &old, "3", &context);

        // dist back to test 6 for the next run.
        Pm::mirror(home).args(["publish", "--again"]).json();
    }
    eprintln!(
        "fleet of {AGENTS}: {runs} runs each; killed mid-way: pm-push {pushes} ({resumed} \
         resumed), pm-rollback {rollbacks} ({rotated} after dist rotated), pm-poll {polls}"
    );
    assert!(
        pushes + rollbacks + polls > 0,
        "nothing was killed mid-way: the kill windows are wrong"
    );
}

#[test]
fn a_full_disk_fails_the_publish_clearly_keeps_dist_and_the_next_publish_completes() {
    let disk = SmallDisk::mount("64m");
    let home = Home {
        dir: tempfile::tempdir_in(disk.path()).unwrap(),
    };
    let lab = Lab::start(3);
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    lab.upstream.set_version(6).unwrap();
    Pm::mirror(&home).args(["sync"]).json();
    let dist = manifest(&home, "dist");
    let latest = manifest(&home, "latest");

    let filler = disk.fill();
    let run = Pm::mirror(&home).args(["publish"]).run();
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains("No space left on device"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    assert_eq!(manifest(&home, "dist"), dist);
    assert_eq!(manifest(&home, "latest"), latest);

    // With room again: nothing was lost, and the next publish completes.
    std::fs::remove_file(filler).unwrap();
    assert_consistent(&home, "after the failed publish");
    assert_eq!(manifest(&home, "dist"), dist);
    let publish = Pm::mirror(&home).args(["publish"]).json();
    assert_eq!(publish["changed"], true, "{publish}");
    assert_eq!(manifest(&home, "dist").revision, latest.revision);
    assert_consistent(&home, "after the next publish");
}

#[test]
fn a_full_database_disk_fails_the_agents_install_clearly_keeps_the_old_database_and_the_next_install_completes()
 {
    let setup = AgentSetup::new();
    let db = setup.db();
    let disk = SmallDisk::mount_at(&db, "4m");
    let first = setup.agent_cmd(&["update"]);
    assert_eq!(sigtool_version(&db), "3");
    setup.publish(6);

    let filler = disk.fill();
    let run = Pm::agent(&setup.state()).args(["update"]).run();
    assert_eq!(run.code(), 1, "{}{}", run.stdout(), run.stderr());
    assert!(
        run.stderr().contains("No space left on device"),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("hint: "), "{}", run.stderr());
    std::fs::remove_file(&filler).unwrap();
    // The old database, whole and alone (nothing written aside is left), still loads.
    assert_eq!(sigtool_version(&db), "3");
    assert_eq!(names(&db), ["test.cvd"]);
    let eicar = eicar(setup.tmp.path());
    let (code, text) = clamscan(&db, &eicar);
    assert!(code == 0 || code == 1, "{text}");
    let status = setup.agent_cmd(&["status"]);
    assert_eq!(status["installed_revision"], first["revision"]);

    // With room again, the next install completes.
    let next = setup.agent_cmd(&["update"]);
    assert_eq!(next["changed"], true, "{next}");
    assert_eq!(sigtool_version(&db), "6");
}
