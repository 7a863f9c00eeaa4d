//! The bad-input table (issue 9): malformed configs, targets files, CLI arguments, bundles, CVD
//! headers and cdiffs from upstream, signed manifests an agent fetches and JSON answers from
//! agents. Each case is one line of a table: what is fed in, the exit code it must get and a
//! fragment its error must carry. Every case must also leave the state as it was: every file of
//! the manager home (path, kind, size, mode, sha256; lock files and the DuckDB file itself
//! aside) and every inventory table's rows, or the agent's state and database directories.
//! `cargo test --test it bad_input -- --nocapture` prints the count per category.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pm::lab::FaultKind;
use pm::lab_fleet::{FleetSpec, SimFleet};

use crate::mirror_airgap::{Member, Sites, file_members, member, raw_tar, signed_preamble};
use crate::support::{AgentSetup, Home, Lab, Pm, bin, free_port, testdb};

/// One malformed input: its name, the input, the exit code it gets and what its error says.
struct Case<I: 'static> {
    name: &'static str,
    input: I,
    code: i32,
    says: &'static str,
}

const fn case<I>(name: &'static str, input: I, code: i32, says: &'static str) -> Case<I> {
    Case {
        name,
        input,
        code,
        says,
    }
}

/// What one run printed and how it ended (-1: killed after the time limit).
pub(crate) struct Outcome {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `command` with stdin closed; a run that outlives `limit` is killed (a hang is a defect
/// too, and must not hang the suite).
pub(crate) fn run_limited(mut command: Command, limit: Duration) -> Outcome {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -1;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn pm_command(pm: Pm) -> Command {
    pm.command()
}

/// Every file under `dir` as `path -> kind size mode sha256`, minus what `skip` names.
fn files(dir: &Path, skip: &dyn Fn(&str) -> bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let relative = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if skip(&relative) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            let line = if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path);
                format!("dir {mode:o}")
            } else {
                let sha = pm::manifest::hex(&openssl::sha::sha256(&std::fs::read(&path).unwrap()));
                format!("file {} {mode:o} {sha}", meta.len())
            };
            out.insert(relative, line);
        }
    }
    out
}

/// Every table of the inventory as `name -> rows:md5 of its rows`, minus `skip_tables`.
fn tables(home: &Path, skip_tables: &[&str]) -> BTreeMap<String, String> {
    let Some(inventory) =
        pm::inventory::Inventory::open_read_only(home, Duration::from_secs(30)).unwrap()
    else {
        return BTreeMap::new();
    };
    let names = inventory
        .query_strings(
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = 'main' AND table_type = 'BASE TABLE' ORDER BY 1",
        )
        .unwrap();
    names
        .into_iter()
        .filter(|name| !skip_tables.contains(&name.as_str()))
        .map(|name| {
            let digest = inventory
                .query_strings(&format!(
                    "SELECT count(*)::VARCHAR || ':' || coalesce(md5(string_agg(t::VARCHAR, '|' \
                     ORDER BY t::VARCHAR)), '') FROM main.\"{name}\" t"
                ))
                .unwrap()
                .remove(0);
            (name, digest)
        })
        .collect()
}

/// Files never compared: locks, and the DuckDB file itself (a read-write open may rewrite
/// its bytes without changing a row; the rows are compared instead).
fn volatile(relative: &str) -> bool {
    relative.ends_with(".lock")
        || relative == "inventory.duckdb"
        || relative == "inventory.duckdb.wal"
}

/// The state a case must leave as it was.
#[derive(PartialEq)]
struct Snapshot(BTreeMap<String, String>);

/// A manager home: its files (minus volatile ones and `also_skip`) and inventory rows (minus
/// the tables `skip_tables`, where the tool records the attempt by design).
fn home_snapshot(home: &Path, also_skip: &[&str], skip_tables: &[&str]) -> Snapshot {
    let mut all = BTreeMap::new();
    let skip = |r: &str| volatile(r) || also_skip.contains(&r);
    for (path, line) in files(home, &skip) {
        all.insert(format!("home/{path}"), line);
    }
    for (name, digest) in tables(home, skip_tables) {
        all.insert(format!("table {name}"), digest);
    }
    Snapshot(all)
}

/// What differs between two snapshots, briefly.
fn changes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (key, line) in &before.0 {
        match after.0.get(key) {
            None => out.push(format!("{key} removed")),
            Some(other) if other != line => out.push(format!("{key} changed")),
            _ => {}
        }
    }
    for key in after.0.keys() {
        if !before.0.contains_key(key) {
            out.push(format!("{key} added"));
        }
    }
    out
}

/// Counts the cases of one category and keeps every failure, so one run shows them all.
struct Tally {
    category: &'static str,
    tried: usize,
    failures: Vec<String>,
}

impl Tally {
    fn new(category: &'static str) -> Tally {
        Tally {
            category,
            tried: 0,
            failures: Vec::new(),
        }
    }

    /// Checks one run: exit code, `error:` with the fragment, a hint when `hint`, no panic, and
    /// nothing changed.
    fn check<I>(&mut self, case: &Case<I>, got: &Outcome, hint: bool, changed: Vec<String>) {
        self.tried += 1;
        let mut wrong = Vec::new();
        let text = format!("{}\n{}", got.stderr, got.stdout);
        if got.code != case.code {
            wrong.push(format!("exit {} (want {})", got.code, case.code));
        }
        if !got.stderr.contains("error:") {
            wrong.push("no `error:` on stderr".into());
        }
        if !text.contains(case.says) {
            wrong.push(format!("does not say `{}`", case.says));
        }
        if hint && !got.stderr.contains("hint:") && !got.stderr.contains("--help") {
            wrong.push("no `hint:`".into());
        }
        if text.contains("panicked") || text.contains("RUST_BACKTRACE") {
            wrong.push("panicked".into());
        }
        if !changed.is_empty() {
            wrong.push(format!("changed {}", changed.join(", ")));
        }
        if !wrong.is_empty() {
            self.failures.push(format!(
                "{} / {}: {}\n    stderr: {}\n    stdout: {}",
                self.category,
                case.name,
                wrong.join("; "),
                got.stderr.trim().replace('\n', "\n            "),
                got.stdout.trim().chars().take(600).collect::<String>()
            ));
        }
    }

    /// Prints `bad input: CATEGORY: N tried, M passed` and fails with every failure.
    fn finish(self) {
        let passed = self.tried - self.failures.len();
        println!(
            "bad input: {}: {} tried, {} passed",
            self.category, self.tried, passed
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} {} cases failed:\n{}",
            self.failures.len(),
            self.tried,
            self.category,
            self.failures.join("\n")
        );
    }
}

const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// pm.toml

/// A `pm.toml` as the case gives it.
enum Config {
    /// Text; `{url}` becomes the lab's ClamAV URL.
    Text(&'static str),
    Bytes(&'static [u8]),
    /// A directory where the file should be.
    Directory,
    /// A link to nothing.
    Dangling,
    /// No pm.toml at all.
    Missing,
}

use Config::{Bytes, Dangling, Directory, Missing, Text};

/// Every case runs `pm-mirror sync` on a home that synced and published once.
static CONFIGS: &[Case<Config>] = &[
    case("not TOML", Text("this is = = not toml"), 2, "pm.toml"),
    case("missing", Missing, 2, "pm.toml"),
    case("a directory", Directory, 2, "pm.toml"),
    case("a dangling link", Dangling, 2, "pm.toml"),
    case(
        "not UTF-8",
        Bytes(b"[[products]]\nname = \"\xff\xfe\"\n"),
        2,
        "pm.toml",
    ),
    case(
        "unknown top-level key",
        Text(
            "colour = \"blue\"\n[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n",
        ),
        2,
        "colour",
    ),
    case(
        "unknown product key",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurll = \"{url}\"\n"),
        2,
        "urll",
    ),
    case(
        "unknown section",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[mirror]\nx = 1\n",
        ),
        2,
        "mirror",
    ),
    case(
        "products as a table",
        Text("[products]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n"),
        2,
        "TOML parse error at line",
    ),
    case(
        "unknown kind",
        Text("[[products]]\nname = \"clamav\"\nkind = \"avast\"\nurl = \"{url}\"\n"),
        2,
        "avast",
    ),
    case(
        "no kind",
        Text("[[products]]\nname = \"clamav\"\nurl = \"{url}\"\n"),
        2,
        "kind",
    ),
    case(
        "no name",
        Text("[[products]]\nkind = \"clamav\"\nurl = \"{url}\"\n"),
        2,
        "name",
    ),
    case(
        "empty name",
        Text("[[products]]\nname = \"\"\nkind = \"clamav\"\nurl = \"{url}\"\n"),
        2,
        "products[0].name",
    ),
    case(
        "name with a slash",
        Text("[[products]]\nname = \"../up\"\nkind = \"clamav\"\nurl = \"{url}\"\n"),
        2,
        "products[0].name",
    ),
    case(
        "duplicate names",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n",
        ),
        2,
        "clamav",
    ),
    case(
        "clamav without url",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\n"),
        2,
        "url",
    ),
    case(
        "ftp url",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"ftp://x\"\n"),
        2,
        "products[0].url",
    ),
    case(
        "url not a URL",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"not a url\"\n"),
        2,
        "products[0].url",
    ),
    case(
        "empty url",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"\"\n"),
        2,
        "products[0].url",
    ),
    case(
        "url of the wrong type",
        Text("[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = 8080\n"),
        2,
        "TOML parse error at line",
    ),
    case(
        "ftp fallback url",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\nfallback_urls = [\"ftp://x\"]\n",
        ),
        2,
        "fallback_urls",
    ),
    case(
        "databases a string",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ndatabases = \"test\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "no databases",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ndatabases = []\n",
        ),
        2,
        "databases",
    ),
    case(
        "database name with a path",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ndatabases = [\"../test\"]\n",
        ),
        2,
        "databases",
    ),
    case(
        "cdiff_keep a string",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ncdiff_keep = \"thirty\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "cdiff_keep negative",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ncdiff_keep = -1\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "integer too large for TOML",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\ncdiff_keep = 99999999999999999999\n",
        ),
        2,
        "pm.toml",
    ),
    case(
        "files without index_url",
        Text("[[products]]\nname = \"vendor\"\nkind = \"files\"\n"),
        2,
        "index_url",
    ),
    case(
        "files index_url ftp",
        Text(
            "[[products]]\nname = \"vendor\"\nkind = \"files\"\nindex_url = \"ftp://x/index.json\"\n",
        ),
        2,
        "index_url",
    ),
    case(
        "pm without trusted_key",
        Text("[[products]]\nname = \"hq\"\nkind = \"pm\"\nurl = \"{url}\"\n"),
        2,
        "trusted_key",
    ),
    case(
        "agent without dir",
        Text("[[products]]\nname = \"agent\"\nkind = \"agent\"\n"),
        2,
        "dir",
    ),
    case(
        "http timeout zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\ntimeout = \"0s\"\n",
        ),
        2,
        "http.timeout",
    ),
    case(
        "http connect_timeout zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\nconnect_timeout = \"0s\"\n",
        ),
        2,
        "http.connect_timeout",
    ),
    case(
        "serve dist_valid_for zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[serve]\ndist_valid_for = \"0s\"\n",
        ),
        2,
        "serve.dist_valid_for",
    ),
    case(
        "http timeout negative",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\ntimeout = \"-5s\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "http timeout not a duration",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\ntimeout = \"soon\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "http timeout an integer",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\ntimeout = 10\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "http retries too many",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\nretries = 1000\n",
        ),
        2,
        "retries",
    ),
    case(
        "http backoff unknown unit",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[http]\nbackoff = \"2 weeks\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "poll concurrency zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[poll]\nconcurrency = 0\n",
        ),
        2,
        "concurrency",
    ),
    case(
        "poll timeout zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[poll]\ntimeout = \"0s\"\n",
        ),
        2,
        "timeout",
    ),
    case(
        "poll deadline zero",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[poll]\ndeadline = \"0s\"\n",
        ),
        2,
        "deadline",
    ),
    case(
        "poll inactive_after negative",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[poll]\ninactive_after = \"-1m\"\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "retention archives negative",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[retention]\narchives = -1\n",
        ),
        2,
        "TOML parse error at line",
    ),
    case(
        "proxy url not a URL",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[proxy]\nurl = \"not a url\"\n",
        ),
        2,
        "proxy",
    ),
    case(
        "serve url ftp",
        Text(
            "[[products]]\nname = \"clamav\"\nkind = \"clamav\"\nurl = \"{url}\"\n[serve]\nurl = \"ftp://x\"\n",
        ),
        2,
        "serve",
    ),
];

#[test]
fn every_bad_pm_toml_exits_2_naming_the_key_and_changes_nothing() {
    let lab = Lab::start(3);
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    let good = std::fs::read(home.path().join("pm.toml")).unwrap();
    let pm_toml = home.path().join("pm.toml");
    let mut before = home_snapshot(home.path(), &["pm.toml"], &[]);
    let mut tally = Tally::new("config (pm.toml)");
    for case in CONFIGS {
        let _ = std::fs::remove_file(&pm_toml);
        match &case.input {
            Text(text) => {
                std::fs::write(&pm_toml, text.replace("{url}", &lab.url("/clamav"))).unwrap()
            }
            Bytes(bytes) => std::fs::write(&pm_toml, bytes).unwrap(),
            Directory => std::fs::create_dir(&pm_toml).unwrap(),
            Dangling => std::os::unix::fs::symlink("/nonexistent/pm.toml", &pm_toml).unwrap(),
            Missing => {}
        }
        let got = run_limited(pm_command(Pm::mirror(&home).args(["sync"])), LIMIT);
        let after = home_snapshot(home.path(), &["pm.toml"], &[]);
        tally.check(case, &got, true, changes(&before, &after));
        before = after;
        if pm_toml.is_dir() {
            std::fs::remove_dir(&pm_toml).unwrap();
        }
    }
    let _ = std::fs::remove_file(&pm_toml);
    std::fs::write(&pm_toml, good).unwrap();
    // The same home still syncs: the cases were refused, not the home broken.
    let run = Pm::mirror(&home).args(["sync"]).run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// CLI arguments and targets files, against one manager home with enrolled hosts

/// A manager home that synced, published twice (so backup/1 exists) and enrolled three
/// simulated hosts that do not listen (nothing may reach them anyway), plus an initialised
/// agent state, an activation key and a few input files in `tmp`.
struct Manager {
    _lab: Lab,
    home: Home,
    tmp: tempfile::TempDir,
}

impl Manager {
    fn new() -> Manager {
        let lab = Lab::start(3);
        let home = Home::new();
        home.clamav_config(&lab, "");
        Pm::mirror(&home).args(["sync"]).json();
        Pm::mirror(&home).args(["publish"]).json();
        lab.upstream.set_version(4).unwrap();
        Pm::mirror(&home).args(["sync"]).json();
        Pm::mirror(&home).args(["publish"]).json();
        let spec = FleetSpec {
            count: 3,
            first_address: Ipv4Addr::new(127, 211, 0, 1),
            port: free_port(),
            ..FleetSpec::default()
        };
        SimFleet::enrol(home.path(), &spec).unwrap();
        // The client certificate the tools make on first use exists before the snapshot.
        pm::pki::ca::ManagerCa::load_or_create(home.path())
            .unwrap()
            .client_identity(home.path())
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        Pm::activate(&home)
            .args(["key", "new", "--out"])
            .args([t.join("key")])
            .json();
        std::fs::write(t.join("license.lic"), "licensed to the lab\n").unwrap();
        // Private, as secrets must be: the cases test what is in them.
        crate::support::write_private(&t.join("garbage"), "this is not anything\n");
        crate::support::write_private(&t.join("empty"), "");
        std::fs::copy(t.join("key"), t.join("loose.key")).unwrap();
        std::fs::set_permissions(
            t.join("loose.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        std::fs::create_dir(t.join("dir")).unwrap();
        std::fs::write(t.join("bundle.tar"), b"not a tar file".repeat(100)).unwrap();
        Pm::agent(&t.join("agent"))
            .args(["init", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--engine", "clamav", "--database-dir"])
            .args([t.join("agent-db")])
            .json();
        Manager {
            _lab: lab,
            home,
            tmp,
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snapshot = home_snapshot(self.home.path(), &[], &[]);
        for (path, line) in files(self.tmp.path(), &volatile) {
            snapshot.0.insert(format!("tmp/{path}"), line);
        }
        snapshot
    }

    /// The command line of `tool ARGS`, with `{tmp}` in ARGS replaced; manager tools get
    /// `--home`, pm-agent `--state`.
    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let tmp = self.tmp.path().to_str().unwrap();
        let mut command = Command::new(bin(tool));
        command.env_remove("PM_HOME").env_remove("RUST_LOG");
        match tool {
            "pm-agent" => {
                command.arg("--state").arg(self.tmp.path().join("agent"));
            }
            "pm-lab" => {}
            _ => {
                command.arg("--home").arg(self.home.path());
            }
        }
        command.args(args.iter().map(|a| a.replace("{tmp}", tmp)));
        command
    }
}

/// `(tool, arguments)`; `{tmp}` is a scratch directory with `key`, `license.lic`, `garbage`,
/// `empty`, `dir/`, `bundle.tar` and an initialised agent state.
type Cli = (&'static str, &'static [&'static str]);

static CLI: &[Case<Cli>] = &[
    // Zero timeouts and counts would fail every host or spin: refused up front.
    case(
        "poll: timeout 0s",
        ("pm-poll", &["--timeout", "0s"]),
        2,
        "0s",
    ),
    case(
        "poll: deadline 0s",
        ("pm-poll", &["--deadline", "0s"]),
        2,
        "0s",
    ),
    case("poll: watch 0s", ("pm-poll", &["--watch", "0s"]), 2, "0s"),
    case(
        "push: update timeout 0s",
        ("pm-push", &["update", "--all", "--timeout", "0s"]),
        2,
        "0s",
    ),
    case(
        "rollback: wave size 0",
        ("pm-rollback", &["--generation", "1", "--wave-size", "0"]),
        2,
        "at least 1",
    ),
    case(
        "push: hold until a past date",
        ("pm-push", &["hold", "--until", "2020-01-01"]),
        2,
        "is past",
    ),
    case(
        "push: hold until no time",
        ("pm-push", &["hold", "--until", "soon"]),
        2,
        "soon",
    ),
    case(
        "push: hold with a blank reason",
        ("pm-push", &["hold", "--reason", " "]),
        2,
        "--reason",
    ),
    case(
        "rollback: concurrency 0",
        ("pm-rollback", &["--generation", "1", "--concurrency", "0"]),
        2,
        "at least 1",
    ),
    case(
        "activate: key ttl 0s",
        ("pm-activate", &["key", "new", "--ttl", "0s"]),
        2,
        "0s",
    ),
    case(
        "activate: profile new with neither --set nor --file",
        ("pm-activate", &["profile", "new", "p9"]),
        2,
        "--set",
    ),
    case(
        "activate: host with an ftp dist URL",
        (
            "pm-activate",
            &[
                "host",
                "127.0.0.1:9",
                "--key-file",
                "{tmp}/key",
                "--dist-url",
                "ftp://x",
            ],
        ),
        2,
        "http:// or https://",
    ),
    // pm-mirror
    case(
        "mirror: unknown flag",
        ("pm-mirror", &["sync", "--bogus"]),
        2,
        "--bogus",
    ),
    case(
        "mirror: unknown subcommand",
        ("pm-mirror", &["synchronise"]),
        2,
        "synchronise",
    ),
    case("mirror: no subcommand", ("pm-mirror", &[]), 2, "Usage"),
    case(
        "mirror: flag without its value",
        ("pm-mirror", &["sync", "--product"]),
        2,
        "--product",
    ),
    case(
        "mirror: unknown product",
        ("pm-mirror", &["sync", "--product", "nosuch"]),
        2,
        "nosuch",
    ),
    case(
        "mirror: lock timeout not a duration",
        ("pm-mirror", &["--lock-timeout", "soon", "status"]),
        2,
        "soon",
    ),
    case(
        "mirror: lock timeout negative",
        ("pm-mirror", &["--lock-timeout", "-1s", "status"]),
        2,
        "unexpected argument",
    ),
    case(
        "mirror: lock timeout out of range",
        ("pm-mirror", &["--lock-timeout", "1e300d", "status"]),
        2,
        "lock-timeout",
    ),
    case(
        "mirror: rollback generation 4",
        ("pm-mirror", &["rollback", "--generation", "4"]),
        2,
        "generation",
    ),
    case(
        "mirror: rollback generation 0",
        ("pm-mirror", &["rollback", "--generation", "0"]),
        2,
        "generation",
    ),
    case(
        "mirror: rollback generation not a number",
        ("pm-mirror", &["rollback", "--generation", "one"]),
        2,
        "one",
    ),
    case(
        "mirror: import without a file",
        ("pm-mirror", &["import"]),
        2,
        "FILE",
    ),
    case(
        "mirror: import a missing file",
        ("pm-mirror", &["import", "{tmp}/no-such.tar"]),
        2,
        "no-such.tar",
    ),
    case(
        "mirror: import a directory",
        ("pm-mirror", &["import", "{tmp}/dir"]),
        2,
        "it is a directory, not a regular file",
    ),
    case(
        "mirror: import a device",
        ("pm-mirror", &["import", "/dev/null"]),
        2,
        "it is a character device, not a regular file",
    ),
    case(
        "mirror: trust add a directory",
        ("pm-mirror", &["trust", "add", "{tmp}/dir"]),
        2,
        "it is a directory, not a regular file",
    ),
    case(
        "mirror: export over a directory",
        ("pm-mirror", &["export", "--out", "{tmp}/dir"]),
        2,
        "it is a directory, not a regular file",
    ),
    case(
        "mirror: key export-public over a device",
        ("pm-mirror", &["key", "export-public", "--out", "/dev/null"]),
        2,
        "it is a character device, not a regular file",
    ),
    case(
        "mirror: import max size with a bad unit",
        (
            "pm-mirror",
            &["import", "{tmp}/bundle.tar", "--max-size", "8Q"],
        ),
        2,
        "8Q",
    ),
    case(
        "mirror: import max size negative",
        (
            "pm-mirror",
            &["import", "{tmp}/bundle.tar", "--max-size", "-1G"],
        ),
        2,
        "unexpected argument",
    ),
    case(
        "mirror: export without --out",
        ("pm-mirror", &["export"]),
        2,
        "--out",
    ),
    case(
        "mirror: export since an unknown revision",
        (
            "pm-mirror",
            &["export", "--out", "{tmp}/x.tar", "--since", "r999"],
        ),
        2,
        "r999",
    ),
    case(
        "mirror: export into a missing directory",
        ("pm-mirror", &["export", "--out", "{tmp}/no/such/x.tar"]),
        1,
        "no/such",
    ),
    case(
        "mirror: trust add a missing file",
        ("pm-mirror", &["trust", "add", "{tmp}/no-such.pem"]),
        2,
        "no-such.pem",
    ),
    case(
        "mirror: trust add a file that is no key",
        ("pm-mirror", &["trust", "add", "{tmp}/garbage"]),
        2,
        "garbage",
    ),
    case(
        "mirror: trust remove an unknown fingerprint",
        ("pm-mirror", &["trust", "remove", "sha256:0000"]),
        2,
        "sha256:0000",
    ),
    case(
        "mirror: serve on a bad address",
        ("pm-mirror", &["serve", "--listen", "nonsense"]),
        2,
        "nonsense",
    ),
    case(
        "mirror: serve on a bad port",
        ("pm-mirror", &["serve", "--listen", "127.0.0.1:99999"]),
        2,
        "99999",
    ),
    case(
        "mirror: key export-public without --out",
        ("pm-mirror", &["key", "export-public"]),
        2,
        "--out",
    ),
    // pm-activate
    case(
        "activate: key with zero uses",
        ("pm-activate", &["key", "new", "--uses", "0"]),
        2,
        "uses",
    ),
    case(
        "activate: key uses and reusable",
        ("pm-activate", &["key", "new", "--uses", "2", "--reusable"]),
        2,
        "--reusable",
    ),
    case(
        "activate: key ttl over 24h",
        ("pm-activate", &["key", "new", "--ttl", "48h"]),
        2,
        "24h",
    ),
    case(
        "activate: key ttl zero",
        ("pm-activate", &["key", "new", "--ttl", "0s"]),
        2,
        "ttl",
    ),
    case(
        "activate: key ttl not a duration",
        ("pm-activate", &["key", "new", "--ttl", "tomorrow"]),
        2,
        "tomorrow",
    ),
    case(
        "activate: key out into a missing directory",
        ("pm-activate", &["key", "new", "--out", "{tmp}/no/such/key"]),
        1,
        "no/such",
    ),
    case(
        "activate: revoke an unknown key",
        ("pm-activate", &["key", "revoke", "nosuchid"]),
        2,
        "nosuchid",
    ),
    case(
        "activate: host without address or targets",
        ("pm-activate", &["host", "--key-file", "{tmp}/key"]),
        2,
        "ADDR",
    ),
    case(
        "activate: host with a missing key file",
        (
            "pm-activate",
            &["host", "127.0.0.1:9", "--key-file", "{tmp}/no-such.key"],
        ),
        2,
        "no-such.key",
    ),
    case(
        "activate: host with a key file others can read",
        (
            "pm-activate",
            &["host", "127.0.0.1:9", "--key-file", "{tmp}/loose.key"],
        ),
        2,
        "readable by other users",
    ),
    case(
        "activate: host with a key file of garbage",
        (
            "pm-activate",
            &["host", "127.0.0.1:9", "--key-file", "{tmp}/garbage"],
        ),
        2,
        "not a pm activation key",
    ),
    case(
        "activate: host with an empty key file",
        (
            "pm-activate",
            &["host", "127.0.0.1:9", "--key-file", "{tmp}/empty"],
        ),
        2,
        "not a pm activation key",
    ),
    case(
        "activate: host with a label without =",
        (
            "pm-activate",
            &[
                "host",
                "127.0.0.1:9",
                "--key-file",
                "{tmp}/key",
                "--label",
                "site",
            ],
        ),
        2,
        "site",
    ),
    case(
        "activate: host with an unknown profile",
        (
            "pm-activate",
            &[
                "host",
                "127.0.0.1:9",
                "--key-file",
                "{tmp}/key",
                "--profile",
                "nosuch",
            ],
        ),
        2,
        "nosuch",
    ),
    case(
        "activate: host with a name and targets",
        (
            "pm-activate",
            &[
                "host",
                "--targets",
                "{tmp}/empty",
                "--key-file",
                "{tmp}/key",
                "--name",
                "x",
            ],
        ),
        2,
        "--name",
    ),
    case(
        "activate: host with a bad timeout",
        (
            "pm-activate",
            &[
                "host",
                "127.0.0.1:9",
                "--key-file",
                "{tmp}/key",
                "--timeout",
                "x",
            ],
        ),
        2,
        "x",
    ),
    case(
        "activate: deactivate an unknown host",
        ("pm-activate", &["deactivate", "nosuch"]),
        2,
        "nosuch",
    ),
    case(
        "activate: profile with an unknown key",
        (
            "pm-activate",
            &["profile", "new", "p1", "--set", "colour=blue"],
        ),
        2,
        "colour",
    ),
    case(
        "activate: profile value out of range",
        (
            "pm-activate",
            &["profile", "new", "p1", "--set", "max_filesize_mb=0"],
        ),
        2,
        "max_filesize_mb",
    ),
    case(
        "activate: profile value not yes/no",
        (
            "pm-activate",
            &["profile", "new", "p1", "--set", "scan_archive=maybe"],
        ),
        2,
        "scan_archive",
    ),
    case(
        "activate: profile setting without =",
        (
            "pm-activate",
            &["profile", "new", "p1", "--set", "scan_archive"],
        ),
        2,
        "scan_archive",
    ),
    case(
        "activate: profile file missing",
        (
            "pm-activate",
            &["profile", "new", "p1", "--file", "{tmp}/no-such.conf"],
        ),
        2,
        "no-such.conf",
    ),
    case(
        "activate: delete the default profile",
        ("pm-activate", &["profile", "delete", "default"]),
        2,
        "default",
    ),
    case(
        "activate: show an unknown profile",
        ("pm-activate", &["profile", "show", "nosuch"]),
        2,
        "nosuch",
    ),
    case(
        "activate: license file missing",
        (
            "pm-activate",
            &[
                "license",
                "add",
                "{tmp}/no-such.lic",
                "--expires",
                "2030-01-01",
            ],
        ),
        2,
        "no-such.lic",
    ),
    case(
        "activate: license file empty",
        (
            "pm-activate",
            &["license", "add", "{tmp}/empty", "--expires", "2030-01-01"],
        ),
        2,
        "empty",
    ),
    case(
        "activate: license expiry not a date",
        (
            "pm-activate",
            &[
                "license",
                "add",
                "{tmp}/license.lic",
                "--expires",
                "2030-13-45",
            ],
        ),
        2,
        "2030-13-45",
    ),
    case(
        "activate: license expired",
        (
            "pm-activate",
            &[
                "license",
                "add",
                "{tmp}/license.lic",
                "--expires",
                "2001-01-01",
            ],
        ),
        2,
        "2001-01-01",
    ),
    case(
        "activate: license without expiry",
        ("pm-activate", &["license", "add", "{tmp}/license.lic"]),
        2,
        "--expires",
    ),
    // pm-poll
    case(
        "poll: concurrency zero",
        ("pm-poll", &["--concurrency", "0"]),
        2,
        "concurrency",
    ),
    case(
        "poll: concurrency negative",
        ("pm-poll", &["--concurrency", "-1"]),
        2,
        "-1",
    ),
    case(
        "poll: timeout not a duration",
        ("pm-poll", &["--timeout", "soon"]),
        2,
        "soon",
    ),
    case(
        "poll: count without watch",
        ("pm-poll", &["--count", "3"]),
        2,
        "--watch",
    ),
    case(
        "poll: prune and watch",
        ("pm-poll", &["--prune", "--watch"]),
        2,
        "--watch",
    ),
    case(
        "poll: older-than without prune",
        ("pm-poll", &["--older-than", "1d"]),
        2,
        "--prune",
    ),
    // pm-push
    case(
        "push: canary negative",
        ("pm-push", &["update", "--canary", "-1"]),
        2,
        "-1",
    ),
    case(
        "push: wave size zero",
        ("pm-push", &["update", "--wave-size", "0"]),
        2,
        "wave-size",
    ),
    case(
        "push: max failures over 100%",
        ("pm-push", &["update", "--max-failures", "150%"]),
        2,
        "150%",
    ),
    case(
        "push: max failures not a number",
        ("pm-push", &["update", "--max-failures", "many"]),
        2,
        "many",
    ),
    case(
        "push: concurrency zero",
        ("pm-push", &["update", "--concurrency", "0"]),
        2,
        "concurrency",
    ),
    case(
        "push: pause not a duration",
        ("pm-push", &["update", "--pause", "a while"]),
        2,
        "a while",
    ),
    case(
        "push: status of an unknown job",
        ("pm-push", &["status", "99999"]),
        2,
        "99999",
    ),
    case(
        "push: resume an unknown job",
        ("pm-push", &["resume", "99999"]),
        2,
        "99999",
    ),
    case(
        "push: resume a job that is not a number",
        ("pm-push", &["resume", "latest"]),
        2,
        "latest",
    ),
    case(
        "push: schedule with nothing",
        ("pm-push", &["schedule"]),
        2,
        "--update",
    ),
    case(
        "push: schedule a bad cron",
        ("pm-push", &["schedule", "--update", "61 * * * *"]),
        2,
        "61 * * * *",
    ),
    case(
        "push: schedule a cron of 3 fields",
        ("pm-push", &["schedule", "--update", "* * *"]),
        2,
        "* * *",
    ),
    case(
        "push: schedule a cron that never fires",
        ("pm-push", &["schedule", "--update", "0 0 30 2 *"]),
        2,
        "never fires",
    ),
    case(
        "push: schedule a scan without paths",
        ("pm-push", &["schedule", "--scan", "0 3 * * *"]),
        2,
        "--scan-path",
    ),
    case(
        "push: schedule a relative scan path",
        (
            "pm-push",
            &["schedule", "--scan", "0 3 * * *", "--scan-path", "srv"],
        ),
        2,
        "srv",
    ),
    case(
        "push: schedule clear and set",
        ("pm-push", &["schedule", "--clear", "--update", "0 * * * *"]),
        2,
        "--clear",
    ),
    case(
        "push: profile unknown",
        ("pm-push", &["profile", "nosuch"]),
        2,
        "nosuch",
    ),
    case(
        "push: license file missing",
        (
            "pm-push",
            &["license", "{tmp}/no-such.lic", "--expires", "2030-01-01"],
        ),
        2,
        "no-such.lic",
    ),
    case(
        "push: license expiry not a date",
        (
            "pm-push",
            &["license", "{tmp}/license.lic", "--expires", "someday"],
        ),
        2,
        "someday",
    ),
    case(
        "push: scan without paths",
        ("pm-push", &["scan"]),
        2,
        "--path",
    ),
    case(
        "push: scan a relative path",
        ("pm-push", &["scan", "--path", "srv"]),
        2,
        "srv",
    ),
    case(
        "push: upgrade-agent timeout not a duration",
        ("pm-push", &["upgrade-agent", "--timeout", "x"]),
        2,
        "x",
    ),
    case(
        "push: upgrade-agent without an agent product",
        ("pm-push", &["upgrade-agent"]),
        2,
        "agent",
    ),
    // pm-rollback
    case(
        "rollback: no generation",
        ("pm-rollback", &[]),
        2,
        "--generation",
    ),
    case(
        "rollback: generation 4",
        ("pm-rollback", &["--generation", "4"]),
        2,
        "generation",
    ),
    case(
        "rollback: generation 0",
        ("pm-rollback", &["--generation", "0"]),
        2,
        "generation",
    ),
    case(
        "rollback: generation of an empty backup",
        ("pm-rollback", &["--generation", "3"]),
        2,
        "backup",
    ),
    case(
        "rollback: generation and to",
        ("pm-rollback", &["--generation", "1", "--to", "backup:1"]),
        2,
        "--to",
    ),
    case(
        "rollback: to without a host",
        ("pm-rollback", &["--to", "backup:1"]),
        2,
        "--host",
    ),
    case(
        "rollback: to backup 9",
        ("pm-rollback", &["--host", "sim-00000", "--to", "backup:9"]),
        2,
        "backup:9",
    ),
    case(
        "rollback: to an unknown revision",
        ("pm-rollback", &["--host", "sim-00000", "--to", "r999"]),
        2,
        "r999",
    ),
    case(
        "rollback: max failures over 100%",
        (
            "pm-rollback",
            &["--generation", "1", "--max-failures", "200%"],
        ),
        2,
        "200%",
    ),
    // pm-query
    case("query: no statement", ("pm-query", &[]), 2, "SQL"),
    case("query: bad SQL", ("pm-query", &["SELEC 1"]), 2, "SELEC"),
    case(
        "query: unknown table",
        ("pm-query", &["SELECT * FROM no_such_view"]),
        2,
        "no_such_view",
    ),
    case(
        "query: delete",
        ("pm-query", &["DELETE FROM hosts"]),
        2,
        "read-only",
    ),
    case(
        "query: create",
        ("pm-query", &["CREATE TABLE x (a INTEGER)"]),
        2,
        "read-only",
    ),
    case(
        "query: copy to a file",
        ("pm-query", &["COPY hosts TO '/tmp/pm-bad-input.csv'"]),
        2,
        "read-only",
    ),
    case(
        "query: attach",
        ("pm-query", &["ATTACH '/tmp/pm-bad-input.db' AS x"]),
        2,
        "read-only",
    ),
    case(
        "query: two statements",
        ("pm-query", &["SELECT 1; DELETE FROM hosts"]),
        2,
        "statement",
    ),
    case(
        "query: unknown format",
        ("pm-query", &["--format", "xml", "SELECT 1"]),
        2,
        "xml",
    ),
    case(
        "query: negative max rows",
        ("pm-query", &["--max-rows", "-1", "SELECT 1"]),
        2,
        "-1",
    ),
    // pm-exporter (a run that is not refused would serve forever and be killed: exit -1)
    case(
        "exporter: listen on nonsense",
        ("pm-exporter", &["--listen", "nonsense"]),
        2,
        "nonsense",
    ),
    case(
        "exporter: allow a bad CIDR",
        (
            "pm-exporter",
            &["--listen", "127.0.0.1:0", "--allow", "10.0.0.0/99"],
        ),
        2,
        "10.0.0.0/99",
    ),
    case(
        "exporter: refresh zero",
        (
            "pm-exporter",
            &["--listen", "127.0.0.1:0", "--refresh", "0s"],
        ),
        2,
        "refresh",
    ),
    case(
        "exporter: certificate without key",
        (
            "pm-exporter",
            &["--listen", "127.0.0.1:0", "--tls-cert", "{tmp}/garbage"],
        ),
        2,
        "--tls-key",
    ),
    case(
        "exporter: missing certificate",
        (
            "pm-exporter",
            &[
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "{tmp}/no-such.pem",
                "--tls-key",
                "{tmp}/no-such.key",
            ],
        ),
        2,
        "no-such",
    ),
    case(
        "exporter: certificate of garbage",
        (
            "pm-exporter",
            &[
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "{tmp}/garbage",
                "--tls-key",
                "{tmp}/garbage",
            ],
        ),
        2,
        "garbage",
    ),
    // pm-doctor
    case(
        "doctor: unknown flag",
        ("pm-doctor", &["--bogus"]),
        2,
        "--bogus",
    ),
    case(
        "doctor: exporter not a URL",
        ("pm-doctor", &["--exporter", "not a url"]),
        2,
        "not a url",
    ),
    // pm-agent
    case(
        "agent: unknown subcommand",
        ("pm-agent", &["frobnicate"]),
        2,
        "frobnicate",
    ),
    case(
        "agent: rollback to backup 9",
        ("pm-agent", &["rollback", "--to", "backup:9"]),
        2,
        "backup:9",
    ),
    case(
        "agent: rollback to a name",
        ("pm-agent", &["rollback", "--to", "latest"]),
        2,
        "latest",
    ),
    case(
        "agent: update generation 4",
        ("pm-agent", &["update", "--generation", "4"]),
        2,
        "generation",
    ),
    case(
        "agent: init again",
        (
            "pm-agent",
            &[
                "init",
                "--listen",
                "127.0.0.1:7505",
                "--engine",
                "clamav",
                "--database-dir",
                "{tmp}/agent-db",
            ],
        ),
        1,
        "already initialised",
    ),
    case(
        "agent: init with a bad listen address",
        (
            "pm-agent",
            &[
                "init",
                "--listen",
                "nonsense",
                "--engine",
                "clamav",
                "--database-dir",
                "{tmp}/db2",
            ],
        ),
        2,
        "nonsense",
    ),
    case(
        "agent: init with an unknown engine",
        (
            "pm-agent",
            &[
                "init",
                "--listen",
                "127.0.0.1:7505",
                "--engine",
                "avast",
                "--database-dir",
                "{tmp}/db2",
            ],
        ),
        2,
        "avast",
    ),
    case("agent: scan nothing", ("pm-agent", &["scan"]), 2, "PATH"),
    case(
        "agent: reset with a missing key file",
        (
            "pm-agent",
            &["reset", "--activation-key-file", "{tmp}/no-such.key"],
        ),
        2,
        "no-such.key",
    ),
    case(
        "agent: trust-key with a fingerprint that is not one",
        ("pm-agent", &["trust-key", "--fingerprint", "abc"]),
        2,
        "is not a key fingerprint",
    ),
    case(
        "agent: trust-key with a missing key file",
        (
            "pm-agent",
            &[
                "trust-key",
                "--fingerprint",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "--key",
                "{tmp}/no-such.pem",
            ],
        ),
        2,
        "no-such.pem",
    ),
    case(
        "agent: trust-key with a file that is no key",
        (
            "pm-agent",
            &[
                "trust-key",
                "--fingerprint",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "--key",
                "{tmp}/garbage",
            ],
        ),
        2,
        "garbage",
    ),
    // pm-lab
    case(
        "lab: unknown fault",
        (
            "pm-lab",
            &["upstream", "--listen", "127.0.0.1:0", "--fault", "explode"],
        ),
        2,
        "explode",
    ),
    case(
        "lab: agents outside loopback",
        (
            "pm-lab",
            &[
                "agents",
                "--count",
                "1",
                "--dir",
                "{tmp}/lab",
                "--first-address",
                "10.0.0.1",
            ],
        ),
        2,
        "10.0.0.1",
    ),
    case(
        "lab: agents on port 0",
        (
            "pm-lab",
            &[
                "agents",
                "--count",
                "1",
                "--dir",
                "{tmp}/lab",
                "--port",
                "0",
            ],
        ),
        2,
        "port",
    ),
    case(
        "lab: zero agents",
        ("pm-lab", &["agents", "--count", "0", "--dir", "{tmp}/lab"]),
        2,
        "count",
    ),
];

/// `(tool and flags, targets file contents)`: `--targets FILE` is appended; `None` as the
/// contents means FILE does not exist, `Some("<dir>")` that it is a directory.
type TargetsInput = (&'static [&'static str], Option<&'static str>);

const PUSH: &[&str] = &["pm-push", "update"];
const ROLLBACK: &[&str] = &["pm-rollback", "--generation", "1"];
const POLL: &[&str] = &["pm-poll"];
const SCHEDULE: &[&str] = &["pm-push", "schedule", "--update", "0 * * * *"];
const ACTIVATE: &[&str] = &["pm-activate", "host", "--key-file", "{tmp}/key"];

static TARGETS: &[Case<TargetsInput>] = &[
    case(
        "push: missing file",
        (PUSH, None),
        2,
        "cannot read targets file",
    ),
    case(
        "push: a directory",
        (PUSH, Some("<dir>")),
        2,
        "cannot read targets file",
    ),
    case(
        "push: not UTF-8",
        (PUSH, Some("sim-000\n\u{FFFD}")),
        2,
        "valid UTF-8",
    ),
    case(
        "push: unknown host",
        (PUSH, Some("sim-000\nnobody\n")),
        2,
        "nobody",
    ),
    case(
        "push: wave not a number",
        (PUSH, Some("sim-000,first\n")),
        2,
        "first",
    ),
    case("push: wave negative", (PUSH, Some("sim-000,-1\n")), 2, "-1"),
    case(
        "push: wave fractional",
        (PUSH, Some("sim-000,1.5\n")),
        2,
        "1.5",
    ),
    case(
        "push: wave too large",
        (PUSH, Some("sim-000,99999999999\n")),
        2,
        "99999999999",
    ),
    case(
        "push: three columns",
        (PUSH, Some("sim-000,1,extra\n")),
        2,
        "extra",
    ),
    case(
        "push: header not first",
        (PUSH, Some("sim-000,1\nhost,wave\n")),
        2,
        "host",
    ),
    case(
        "push: some lines with waves, some without",
        (PUSH, Some("sim-000,1\nsim-001\n")),
        2,
        "has no wave",
    ),
    case(
        "push: a name with a space",
        (PUSH, Some("sim 000\n")),
        2,
        "sim 000",
    ),
    case(
        "push: SQL in a name",
        (PUSH, Some("x' OR '1'='1\n")),
        2,
        "x' OR '1'='1",
    ),
    case("push: wave 0", (PUSH, Some("sim-00000,0\n")), 2, "wave 0"),
    case(
        "push: a host in two waves",
        (PUSH, Some("sim-00000,1\nsim-00001,1\n127.211.0.1,2\n")),
        2,
        "both list `sim-00000`",
    ),
    case(
        "push: an empty host with a wave",
        (PUSH, Some(",1\n")),
        2,
        "host",
    ),
    case(
        "rollback: unknown host",
        (ROLLBACK, Some("nobody\n")),
        2,
        "nobody",
    ),
    case(
        "rollback: wave not a number",
        (ROLLBACK, Some("sim-000,x\n")),
        2,
        "x",
    ),
    case(
        "rollback: missing file",
        (ROLLBACK, None),
        2,
        "cannot read targets file",
    ),
    // Red team A, item 17: csv read a quote left open as the rest of the file.
    case(
        "push: a quote never closed",
        (PUSH, Some("\"sim-000\n")),
        2,
        "not closed",
    ),
    case(
        "activate: a quote never closed",
        (ACTIVATE, Some("sim-000\n\"sim-001")),
        2,
        "not closed",
    ),
    case("poll: unknown host", (POLL, Some("nobody\n")), 2, "nobody"),
    case(
        "poll: a directory",
        (POLL, Some("<dir>")),
        2,
        "cannot read targets file",
    ),
    case(
        "schedule: unknown host",
        (SCHEDULE, Some("nobody\n")),
        2,
        "nobody",
    ),
    case(
        "activate: missing file",
        (ACTIVATE, None),
        2,
        "cannot read targets file",
    ),
    case("activate: empty", (ACTIVATE, Some("")), 2, "lists no host"),
    case(
        "activate: only comments",
        (ACTIVATE, Some("# later\n")),
        2,
        "lists no host",
    ),
    case(
        "activate: a directory",
        (ACTIVATE, Some("<dir>")),
        2,
        "cannot read targets file",
    ),
];

/// Target flags other than `--targets`, with `pm-push update`.
static TARGET_FLAGS: &[Case<&[&str]>] = &[
    case("unknown --host", &["--host", "nobody"], 2, "nobody"),
    case(
        "--cidr prefix too long",
        &["--cidr", "10.0.0.0/99"],
        2,
        "10.0.0.0/99",
    ),
    case("--cidr not a network", &["--cidr", "lan"], 2, "lan"),
    case("--label without =", &["--label", "site"], 2, "site"),
    case(
        "--where bad SQL",
        &["--where", "reachable AND AND"],
        2,
        "where",
    ),
    case(
        "--where unknown column",
        &["--where", "no_such_column = 1"],
        2,
        "no_such_column",
    ),
    case(
        "--where a second statement",
        &["--where", "true; DELETE FROM hosts"],
        2,
        "where",
    ),
    case(
        "--where a subquery that writes",
        &[
            "--where",
            "host IN (SELECT host FROM hosts); DROP TABLE hosts; --",
        ],
        2,
        "where",
    ),
    case(
        "--all with --host",
        &["--all", "--host", "sim-000"],
        2,
        "--all",
    ),
];

#[test]
fn every_bad_argument_or_targets_file_exits_2_and_changes_nothing() {
    let manager = Manager::new();
    // Each case is compared with the state just before it, so one defect shows once.
    let mut before = manager.snapshot();
    let mut cli = Tally::new("CLI arguments");
    for case in CLI {
        let (tool, args) = case.input;
        let got = run_limited(manager.command(tool, args), Duration::from_secs(10));
        let after = manager.snapshot();
        cli.check(case, &got, false, changes(&before, &after));
        before = after;
    }

    let mut targets = Tally::new("targets files");
    let file = manager.tmp.path().join("targets.txt");
    for case in TARGETS {
        let (command, contents) = case.input;
        match contents {
            None => {}
            Some("<dir>") => std::fs::create_dir(&file).unwrap(),
            Some(text) => {
                // `\u{FFFD}` stands for bytes that are not UTF-8.
                let bytes = text.replace('\u{FFFD}', "\u{1}").into_bytes();
                let bytes: Vec<u8> = bytes
                    .into_iter()
                    .map(|b| if b == 1 { 0xff } else { b })
                    .collect();
                std::fs::write(&file, bytes).unwrap();
            }
        }
        let mut args: Vec<&str> = command[1..].to_vec();
        args.extend(["--targets", file.to_str().unwrap()]);
        let got = run_limited(manager.command(command[0], &args), LIMIT);
        if file.is_dir() {
            std::fs::remove_dir(&file).unwrap();
        } else {
            let _ = std::fs::remove_file(&file);
        }
        let after = manager.snapshot();
        targets.check(case, &got, false, changes(&before, &after));
        before = after;
    }
    for case in TARGET_FLAGS {
        let mut args = vec!["update"];
        args.extend(case.input);
        let got = run_limited(manager.command("pm-push", &args), LIMIT);
        let after = manager.snapshot();
        targets.check(case, &got, false, changes(&before, &after));
        before = after;
    }
    cli.finish();
    targets.finish();
}

// ---------------------------------------------------------------------------------------------
// Bundles for `pm-mirror import`

/// How a bundle is made from a good one.
#[derive(Clone, Copy)]
enum Bundle {
    /// The first N bytes of the good bundle.
    Cut(usize),
    /// The good bundle without its last N bytes.
    CutEnd(usize),
    /// The good bundle with one byte flipped at this offset from the start.
    Flip(usize),
    /// Raw bytes.
    Raw(&'static [u8]),
    /// A signed preamble and the files, with one member added.
    Extra(&'static str, u8, &'static str),
    /// ... with the member of this file replaced by a link, device or FIFO (type, target).
    Replace(&'static str, u8, &'static str),
    /// ... without this file.
    Without(&'static str),
    /// ... with this file's contents damaged (one byte flipped).
    Damaged(&'static str),
    /// ... without the member (bundle.json, bundle.sig, manifest.json, manifest.sig).
    NoMember(&'static str),
    /// ... with this preamble member's bytes replaced.
    MemberBytes(&'static str, &'static [u8]),
    /// ... signed by a key this mirror does not trust.
    Stranger,
    /// ... with bundle.json's field set to a JSON value and signed again.
    Header(&'static str, &'static str),
    /// The good bundle with `--max-size` this small.
    Oversized(&'static str),
}

static BUNDLES: &[Case<Bundle>] = &[
    case("empty file", Bundle::Raw(b""), 1, "rejected"),
    case(
        "not a tar",
        Bundle::Raw(b"this is not a tar file at all, just words words words"),
        1,
        "rejected",
    ),
    case(
        "a gzip of nothing",
        Bundle::Raw(
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ),
        1,
        "rejected",
    ),
    case(
        "only the end-of-archive blocks",
        Bundle::Raw(&[0u8; 1024]),
        1,
        "rejected",
    ),
    case("cut after 100 bytes", Bundle::Cut(100), 1, "rejected"),
    case(
        "cut after the first header",
        Bundle::Cut(512),
        1,
        "rejected",
    ),
    case("cut in half", Bundle::CutEnd(usize::MAX), 1, "truncated"),
    case(
        "last 4000 bytes missing",
        Bundle::CutEnd(4000),
        1,
        "rejected",
    ),
    case(
        "first header checksum broken",
        Bundle::Flip(10),
        1,
        "rejected",
    ),
    case("bundle.json damaged", Bundle::Flip(520), 1, "rejected"),
    case(
        "traversal name",
        Bundle::Extra("files/../../../../tmp/pm-escape", b'0', ""),
        1,
        "path traversal",
    ),
    case(
        "absolute name",
        Bundle::Extra("/tmp/pm-escape", b'0', ""),
        1,
        "absolute paths are not allowed",
    ),
    case(
        "a member outside files/",
        Bundle::Extra("etc/passwd", b'0', ""),
        1,
        "rejected",
    ),
    case(
        "unlisted file",
        Bundle::Extra("files/clamav/extra.ndb", b'0', ""),
        1,
        "not listed in the manifest",
    ),
    case(
        "a directory member",
        Bundle::Extra("files/clamav/sub/", b'5', ""),
        1,
        "rejected",
    ),
    case(
        "symlink",
        Bundle::Replace("clamav/test.cvd", b'2', "/etc/passwd"),
        1,
        "links are not allowed",
    ),
    case(
        "relative symlink",
        Bundle::Replace("clamav/test.cvd", b'2', "../../bundle.json"),
        1,
        "links are not allowed",
    ),
    case(
        "hard link",
        Bundle::Replace("clamav/test.cvd", b'1', "bundle.json"),
        1,
        "links are not allowed",
    ),
    case(
        "character device",
        Bundle::Replace("clamav/test.cvd", b'3', ""),
        1,
        "device files are not allowed",
    ),
    case(
        "block device",
        Bundle::Replace("clamav/test.cvd", b'4', ""),
        1,
        "device files are not allowed",
    ),
    case(
        "fifo",
        Bundle::Replace("clamav/test.cvd", b'6', ""),
        1,
        "device files are not allowed",
    ),
    case(
        "duplicate member",
        Bundle::Extra("files/clamav/test.cvd", b'0', "<same>"),
        1,
        "appears twice",
    ),
    case(
        "a listed file missing",
        Bundle::Without("clamav/test.cvd"),
        1,
        "truncated",
    ),
    case(
        "a file damaged",
        Bundle::Damaged("clamav/test.cvd"),
        1,
        "does not match the manifest",
    ),
    case(
        "no bundle.json",
        Bundle::NoMember("bundle.json"),
        1,
        "rejected",
    ),
    case(
        "no bundle.sig",
        Bundle::NoMember("bundle.sig"),
        1,
        "rejected",
    ),
    case(
        "no manifest.json",
        Bundle::NoMember("manifest.json"),
        1,
        "rejected",
    ),
    case(
        "no manifest.sig",
        Bundle::NoMember("manifest.sig"),
        1,
        "rejected",
    ),
    case(
        "bundle.sig garbage",
        Bundle::MemberBytes("bundle.sig", b"not a signature"),
        1,
        "rejected",
    ),
    case(
        "bundle.sig empty",
        Bundle::MemberBytes("bundle.sig", b""),
        1,
        "rejected",
    ),
    case(
        "bundle.json not JSON",
        Bundle::MemberBytes("bundle.json", b"{not json"),
        1,
        "rejected",
    ),
    case(
        "manifest.json other bytes",
        Bundle::MemberBytes("manifest.json", b"{}"),
        1,
        "rejected",
    ),
    case("untrusted signer", Bundle::Stranger, 1, "does not trust"),
    case(
        "header names another manifest",
        Bundle::Header(
            "manifest_sha256",
            "\"0000000000000000000000000000000000000000000000000000000000000000\"",
        ),
        1,
        "rejected",
    ),
    case(
        "header with an unknown format",
        Bundle::Header("format", "99"),
        1,
        "format",
    ),
    case(
        "header with a base this mirror lacks",
        Bundle::Header("base", "\"r99\""),
        1,
        "r99",
    ),
    case(
        "header lists a traversal path",
        Bundle::Header("included", "[\"../../etc/passwd\"]"),
        1,
        "rejected",
    ),
    case(
        "over --max-size",
        Bundle::Oversized("20K"),
        1,
        "larger than the limit",
    ),
];

/// Bytes of a bundle made by `recipe` from the good bundle and the online site.
fn make_bundle(sites: &Sites, good: &[u8], recipe: Bundle) -> Vec<u8> {
    let key = pm::pki::SigningKey::load_or_create(sites.online.path()).unwrap();
    let (mut members, latest) = signed_preamble(&sites.online, &key);
    let files = file_members(&sites.online, &latest);
    let path_of = |name: &str| format!("files/{name}").into_bytes();
    match recipe {
        Bundle::Cut(n) => good[..n.min(good.len())].to_vec(),
        Bundle::CutEnd(usize::MAX) => good[..good.len() / 2].to_vec(),
        Bundle::CutEnd(n) => good[..good.len() - n].to_vec(),
        Bundle::Flip(at) => {
            let mut bytes = good.to_vec();
            bytes[at] ^= 0x20;
            bytes
        }
        Bundle::Raw(bytes) => bytes.to_vec(),
        Bundle::Oversized(_) => good.to_vec(),
        Bundle::Extra(name, kind, data) => {
            members.extend(files);
            let data = if data == "<same>" {
                std::fs::read(sites.online.repo("latest/clamav/test.cvd")).unwrap()
            } else {
                b"x".to_vec()
            };
            let data = if kind == b'0' { data } else { Vec::new() };
            members.push(Member {
                name: name.as_bytes().to_vec(),
                kind,
                data,
                link: Vec::new(),
            });
            raw_tar(&members)
        }
        Bundle::Replace(name, kind, target) => {
            members.extend(files.into_iter().filter(|m| m.name != path_of(name)));
            members.push(Member {
                name: path_of(name),
                kind,
                data: Vec::new(),
                link: target.as_bytes().to_vec(),
            });
            raw_tar(&members)
        }
        Bundle::Without(name) => {
            members.extend(files.into_iter().filter(|m| m.name != path_of(name)));
            raw_tar(&members)
        }
        Bundle::Damaged(name) => {
            members.extend(files.into_iter().map(|mut m| {
                if m.name == path_of(name) {
                    let at = m.data.len() / 2;
                    m.data[at] ^= 1;
                }
                m
            }));
            raw_tar(&members)
        }
        Bundle::NoMember(which) => {
            members.retain(|m| m.name != which.as_bytes());
            members.extend(files);
            raw_tar(&members)
        }
        Bundle::MemberBytes(which, bytes) => {
            for m in &mut members {
                if m.name == which.as_bytes() {
                    m.data = bytes.to_vec();
                }
            }
            members.extend(files);
            raw_tar(&members)
        }
        Bundle::Stranger => {
            let stranger = tempfile::tempdir().unwrap();
            let stranger_key = pm::pki::SigningKey::load_or_create(stranger.path()).unwrap();
            let (mut members, _) = signed_preamble(&sites.online, &stranger_key);
            members.extend(files);
            raw_tar(&members)
        }
        Bundle::Header(field, value) => {
            let mut header: serde_json::Value = serde_json::from_slice(&members[0].data).unwrap();
            header[field] = serde_json::from_str(value).unwrap();
            let bytes = serde_json::to_vec(&header).unwrap();
            members[1] = member("bundle.sig", &key.sign(&bytes).unwrap());
            members[0] = member("bundle.json", &bytes);
            members.extend(files);
            raw_tar(&members)
        }
    }
}

#[test]
fn every_bad_bundle_exits_1_says_why_and_leaves_the_closed_mirror_as_it_was() {
    let sites = Sites::new(3);
    sites.export("r1.tar", None);
    assert_eq!(sites.import("r1.tar").code(), 0);
    sites.lab.upstream.set_version(6).unwrap();
    Pm::mirror(&sites.online).args(["sync"]).json();
    sites.export("r2.tar", None);
    let good = std::fs::read(sites.bundle_path("r2.tar")).unwrap();

    let mut before = home_snapshot(sites.offline.path(), &[], &[]);
    let mut tally = Tally::new("bundles (pm-mirror import)");
    for case in BUNDLES {
        let path = sites.bundle_path("case.tar");
        std::fs::write(&path, make_bundle(&sites, &good, case.input)).unwrap();
        let mut pm = Pm::mirror(&sites.offline).args(["import"]).args([&path]);
        if let Bundle::Oversized(limit) = case.input {
            pm = pm.args(["--max-size", limit]);
        }
        let got = run_limited(pm_command(pm), LIMIT);
        let after = home_snapshot(sites.offline.path(), &[], &[]);
        tally.check(case, &got, true, changes(&before, &after));
        before = after;
        assert!(
            !Path::new("/tmp/pm-escape").exists(),
            "{} wrote outside the staging directory",
            case.name
        );
    }
    // The good bundle still imports after all that.
    assert_eq!(sites.import("r2.tar").code(), 0);
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// What a lab upstream serves to `pm-mirror sync`: CVD headers, cdiffs, signatures, an index

/// `(path suffix served, how the bytes are made)`.
type Served = (&'static str, Upstream);

#[derive(Clone, Copy)]
enum Upstream {
    /// These bytes.
    Raw(&'static [u8]),
    /// test-6.cvd with its header replaced by this (padded to 512 bytes with spaces).
    Header(&'static str),
    /// test-6.cvd with header field N (0-based, `:`-separated) replaced.
    Field(usize, &'static str),
    /// test-6.cvd cut to N bytes.
    Cut(usize),
    /// test-6.cvd with the byte at N flipped.
    Flip(usize),
    /// The header of test-6.cvd on the body of test-5.cvd.
    MixedBodies,
    /// test-N.cdiff bytes (N) served in place of another cdiff.
    Cdiff(u32),
    /// test-6.cdiff with the byte at offset from the end flipped.
    CdiffFlipFromEnd(usize),
    /// test-6.cdiff cut to N bytes.
    CdiffCut(usize),
}

static UPSTREAM: &[Case<Served>] = &[
    case(
        "cvd: empty",
        ("/test.cvd", Upstream::Raw(b"")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: HTML error page",
        (
            "/test.cvd",
            Upstream::Raw(b"<html><body>Service unavailable</body></html>"),
        ),
        1,
        "test.cvd",
    ),
    case(
        "cvd: shorter than a header",
        ("/test.cvd", Upstream::Cut(100)),
        1,
        "test.cvd",
    ),
    case(
        "cvd: only the header",
        ("/test.cvd", Upstream::Cut(512)),
        1,
        "test.cvd",
    ),
    case(
        "cvd: cut in the body",
        ("/test.cvd", Upstream::Cut(3000)),
        1,
        "test.cvd",
    ),
    case(
        "cvd: wrong magic",
        ("/test.cvd", Upstream::Field(0, "ClamAV-XYZ")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: header of NULs",
        ("/test.cvd", Upstream::Header("\0\0\0\0\0\0\0\0")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: header of spaces",
        ("/test.cvd", Upstream::Header("")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: header with too few fields",
        (
            "/test.cvd",
            Upstream::Header("ClamAV-VDB:24 Jan 2026 10-00 +0000:6"),
        ),
        1,
        "test.cvd",
    ),
    case(
        "cvd: version not a number",
        ("/test.cvd", Upstream::Field(2, "six")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: version negative",
        ("/test.cvd", Upstream::Field(2, "-6")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: version beyond u32",
        ("/test.cvd", Upstream::Field(2, "99999999999999999999")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: version claims 7",
        ("/test.cvd", Upstream::Field(2, "7")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: signature count not a number",
        ("/test.cvd", Upstream::Field(3, "many")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: functionality level not a number",
        ("/test.cvd", Upstream::Field(4, "x")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: md5 of other bytes",
        (
            "/test.cvd",
            Upstream::Field(5, "00000000000000000000000000000000"),
        ),
        1,
        "test.cvd",
    ),
    case(
        "cvd: md5 not hex",
        ("/test.cvd", Upstream::Field(5, "zz")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: digital signature empty",
        ("/test.cvd", Upstream::Field(6, "")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: digital signature garbage",
        ("/test.cvd", Upstream::Field(6, "!!!!")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: build time garbage",
        ("/test.cvd", Upstream::Field(1, "yesterday")),
        1,
        "clamav",
    ),
    case(
        "cvd: build time field 8 garbage",
        ("/test.cvd", Upstream::Field(8, "x")),
        1,
        "test.cvd",
    ),
    case(
        "cvd: a byte of the body flipped",
        ("/test.cvd", Upstream::Flip(4000)),
        1,
        "test.cvd",
    ),
    case(
        "cvd: header of 6 on the body of 5",
        ("/test.cvd", Upstream::MixedBodies),
        1,
        "test.cvd",
    ),
    case(
        "cvd: body not gzip",
        ("/test.cvd", Upstream::Flip(512)),
        1,
        "test.cvd",
    ),
    case(
        "cvd.sign: garbage",
        ("/test-6.cvd.sign", Upstream::Raw(b"not a pkcs7 signature")),
        1,
        "test-6.cvd.sign",
    ),
    case(
        "cvd.sign: empty",
        ("/test-6.cvd.sign", Upstream::Raw(b"")),
        1,
        "test-6.cvd.sign",
    ),
];

/// A cdiff (or its detached signature) that does not verify never enters latest, and since issue
/// 16 it no longer holds the mirror back either: like freshclam, the sync moves on with the
/// verified CVD, leaves the cdiff out and warns.
static DAMAGED_CDIFFS: &[(&str, Served)] = &[
    ("cdiff: empty", ("/test-6.cdiff", Upstream::Raw(b""))),
    (
        "cdiff: garbage",
        (
            "/test-6.cdiff",
            Upstream::Raw(b"OPEN test.ndb\nADD x\nCLOSE\n"),
        ),
    ),
    (
        "cdiff: another version's cdiff",
        ("/test-6.cdiff", Upstream::Cdiff(5)),
    ),
    (
        "cdiff: signature damaged",
        ("/test-6.cdiff", Upstream::CdiffFlipFromEnd(10)),
    ),
    (
        "cdiff: signature cut off",
        ("/test-6.cdiff", Upstream::CdiffCut(200)),
    ),
    (
        "cdiff: gzip body damaged",
        ("/test-6.cdiff", Upstream::CdiffFlipFromEnd(400)),
    ),
    (
        "cdiff.sign: garbage",
        (
            "/test-6.cdiff.sign",
            Upstream::Raw(b"not a pkcs7 signature"),
        ),
    ),
];

#[test]
fn a_damaged_cdiff_is_left_out_and_latest_moves_on_with_the_verified_cvd() {
    let lab = Lab::start(5);
    let mut failures = Vec::new();
    for (name, (suffix, recipe)) in DAMAGED_CDIFFS {
        lab.upstream.clear_faults();
        lab.upstream.set_version(5).unwrap();
        let home = Home::new();
        home.clamav_config(&lab, "");
        Pm::mirror(&home).args(["sync"]).json();
        lab.upstream.set_version(6).unwrap();
        lab.fault(
            FaultKind::Replace {
                body: upstream_bytes(*recipe),
            },
            suffix,
            None,
        );
        let got = run_limited(
            pm_command(Pm::mirror(&home).args(["--json", "sync"])),
            LIMIT,
        );
        let latest = home.repo("latest/clamav");
        let mut wrong = Vec::new();
        if got.code != 0 {
            wrong.push(format!("exit {}", got.code));
        }
        if !got.stdout.contains("test-6.cdiff` is damaged upstream") {
            wrong.push("no warning naming test-6.cdiff".into());
        }
        if std::fs::read(latest.join("test.cvd")).ok() != Some(cvd(6)) {
            wrong.push("latest is not test.cvd 6".into());
        }
        if latest.join("test-6.cdiff").exists() || latest.join("test-6.cdiff.sign").exists() {
            wrong.push("the damaged cdiff is in latest".into());
        }
        if !wrong.is_empty() {
            failures.push(format!("{name}: {}\n    {}", wrong.join("; "), got.stdout));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn cvd(version: u32) -> Vec<u8> {
    std::fs::read(testdb().join(format!("test-{version}.cvd"))).unwrap()
}

fn upstream_bytes(recipe: Upstream) -> Vec<u8> {
    let six = cvd(6);
    let cdiff = |n: u32| std::fs::read(testdb().join(format!("test-{n}.cdiff"))).unwrap();
    match recipe {
        Upstream::Raw(bytes) => bytes.to_vec(),
        Upstream::Header(text) => {
            let mut header = format!("{text:<512}").into_bytes();
            header.truncate(512);
            header.extend_from_slice(&six[512..]);
            header
        }
        Upstream::Field(n, value) => {
            let header = String::from_utf8_lossy(&six[..512]).into_owned();
            let mut fields: Vec<String> = header.trim_end().split(':').map(String::from).collect();
            fields[n] = value.to_string();
            let mut bytes = format!("{:<512}", fields.join(":")).into_bytes();
            bytes.truncate(512);
            bytes.extend_from_slice(&six[512..]);
            bytes
        }
        Upstream::Cut(n) => six[..n].to_vec(),
        Upstream::Flip(at) => {
            let mut bytes = six;
            bytes[at] ^= 0x5a;
            bytes
        }
        Upstream::MixedBodies => {
            let mut bytes = six[..512].to_vec();
            bytes.extend_from_slice(&cvd(5)[512..]);
            bytes
        }
        Upstream::Cdiff(n) => cdiff(n),
        Upstream::CdiffFlipFromEnd(from_end) => {
            let mut bytes = cdiff(6);
            let at = bytes.len() - from_end;
            bytes[at] ^= 0x5a;
            bytes
        }
        Upstream::CdiffCut(n) => {
            let bytes = cdiff(6);
            bytes[..bytes.len() - n].to_vec()
        }
    }
}

/// A `files` index as upstream serves it: `{file}` becomes the entry of the feed's one file.
static INDEXES: &[Case<&str>] = &[
    case("index: not JSON", "<html>moved</html>", 1, "index"),
    case("index: empty", "", 1, "index"),
    case("index: an array", "[]", 1, "index"),
    case("index: no files", "{\"version\": \"2\"}", 1, "files"),
    case(
        "index: traversal path",
        "{\"version\": \"2\", \"files\": [{\"path\": \"../../etc/passwd\", \"size\": 1, \"sha256\": \"{sha}\", \"version\": \"2\"}]}",
        1,
        "../../etc/passwd",
    ),
    case(
        "index: absolute path",
        "{\"version\": \"2\", \"files\": [{\"path\": \"/etc/passwd\", \"size\": 1, \"sha256\": \"{sha}\", \"version\": \"2\"}]}",
        1,
        "/etc/passwd",
    ),
    case(
        "index: duplicate paths",
        "{\"version\": \"2\", \"files\": [{file}, {file}]}",
        1,
        "a.dat",
    ),
    case(
        "index: negative size",
        "{\"version\": \"2\", \"files\": [{\"path\": \"a.dat\", \"size\": -1, \"sha256\": \"{sha}\", \"version\": \"2\"}]}",
        1,
        "index",
    ),
    case(
        "index: sha256 not hex",
        "{\"version\": \"2\", \"files\": [{\"path\": \"a.dat\", \"size\": 5, \"sha256\": \"xyz\", \"version\": \"2\"}]}",
        1,
        "sha256",
    ),
    case(
        "index: wrong sha256",
        "{\"version\": \"2\", \"files\": [{\"path\": \"a.dat\", \"size\": 5, \"sha256\": \"0000000000000000000000000000000000000000000000000000000000000000\", \"version\": \"2\"}]}",
        1,
        "a.dat",
    ),
    case(
        "index: wrong size",
        "{\"version\": \"2\", \"files\": [{\"path\": \"a.dat\", \"size\": 4, \"sha256\": \"{sha}\", \"version\": \"2\"}]}",
        1,
        "a.dat",
    ),
    case(
        "index: a file upstream does not have",
        "{\"version\": \"2\", \"files\": [{\"path\": \"gone.dat\", \"size\": 5, \"sha256\": \"{sha}\", \"version\": \"2\"}]}",
        1,
        "gone.dat",
    ),
];

#[test]
fn every_bad_cvd_cdiff_or_index_from_upstream_fails_the_sync_and_leaves_latest_as_it_was() {
    let lab = Lab::start(3);
    let feed = tempfile::tempdir().unwrap();
    std::fs::write(feed.path().join("a.dat"), "hello").unwrap();
    lab.upstream.set_feed(feed.path(), "1").unwrap();
    let home = Home::new();
    home.clamav_config(&lab, "");
    Pm::mirror(&home).args(["sync"]).json();
    Pm::mirror(&home).args(["publish"]).json();
    lab.upstream.set_version(6).unwrap();
    // A failed sync records the attempt in mirror_syncs and jobs (the audit log) and what
    // upstream offered in mirror_products, by design; nothing else may move.
    let recorded = ["mirror_syncs", "mirror_products", "jobs"];
    let mut before = home_snapshot(home.path(), &[], &recorded);
    let mut tally = Tally::new("upstream CVDs, cdiffs and signatures");
    for case in UPSTREAM {
        let (suffix, recipe) = case.input;
        lab.upstream.clear_faults();
        lab.fault(
            FaultKind::Replace {
                body: upstream_bytes(recipe),
            },
            suffix,
            None,
        );
        let got = run_limited(pm_command(Pm::mirror(&home).args(["sync"])), LIMIT);
        let after = home_snapshot(home.path(), &[], &recorded);
        tally.check(case, &got, false, changes(&before, &after));
        before = after;
    }
    lab.upstream.clear_faults();

    // The same home with a `files` product: a second home, so the clamav cases keep theirs.
    let feed_home = Home::new();
    feed_home.clamav_and_feed_config(&lab);
    Pm::mirror(&feed_home).args(["sync"]).json();
    let mut before = home_snapshot(feed_home.path(), &[], &recorded);
    let sha = pm::manifest::hex(&openssl::sha::sha256(b"hello"));
    let entry =
        format!("{{\"path\": \"a.dat\", \"size\": 5, \"sha256\": \"{sha}\", \"version\": \"2\"}}");
    let mut indexes = Tally::new("upstream files indexes");
    for case in INDEXES {
        lab.upstream.clear_faults();
        let body = case.input.replace("{file}", &entry).replace("{sha}", &sha);
        lab.fault(
            FaultKind::Replace {
                body: body.into_bytes(),
            },
            "/vendor/index.json",
            None,
        );
        let got = run_limited(pm_command(Pm::mirror(&feed_home).args(["sync"])), LIMIT);
        let after = home_snapshot(feed_home.path(), &[], &recorded);
        indexes.check(case, &got, false, changes(&before, &after));
        before = after;
    }
    lab.upstream.clear_faults();
    // Upstream healthy again: the same homes sync.
    assert_eq!(Pm::mirror(&home).args(["sync"]).run().code(), 0);
    tally.finish();
    indexes.finish();
}

// ---------------------------------------------------------------------------------------------
// Signed manifests (and the files they list) an agent fetches from dist

#[derive(Clone, Copy)]
enum Dist {
    /// manifest.json replaced by these bytes (not signed again).
    Manifest(&'static [u8]),
    /// manifest.json cut to half.
    ManifestHalf,
    /// One byte of manifest.json changed (not signed again).
    ManifestFlip,
    /// manifest.sig replaced by these bytes.
    Sig(&'static [u8]),
    /// manifest.sig removed.
    NoSig,
    /// manifest.sig of another key.
    StrangerSig,
    /// manifest.sig of the previous revision's manifest.
    OldSig,
    /// The manifest with a JSON pointer set to a JSON value, signed with the manager's key.
    Signed(&'static str, &'static str),
    /// The file test.cvd served damaged (one byte flipped).
    FileFlip,
    /// The file test.cvd served cut in half.
    FileCut,
    /// test.cvd removed from dist.
    FileGone,
    /// test.cvd replaced by a CVD whose header is damaged, listed with its true size and
    /// sha256 in a manifest signed with the manager's key.
    SignedBadCvd,
}

static DISTS: &[Case<Dist>] = &[
    case("manifest empty", Dist::Manifest(b""), 1, "manifest"),
    case(
        "manifest not JSON",
        Dist::Manifest(b"<html>502 Bad Gateway</html>"),
        1,
        "manifest",
    ),
    case("manifest JSON null", Dist::Manifest(b"null"), 1, "manifest"),
    case("manifest cut in half", Dist::ManifestHalf, 1, "manifest"),
    case(
        "manifest one byte changed",
        Dist::ManifestFlip,
        1,
        "signature",
    ),
    case("signature missing", Dist::NoSig, 1, "manifest.sig"),
    case("signature empty", Dist::Sig(b""), 1, "signature"),
    case(
        "signature garbage",
        Dist::Sig(b"this is not an ed25519 signature at all, no"),
        1,
        "signature",
    ),
    case(
        "signature too long",
        Dist::Sig(&[7u8; 5000]),
        1,
        "larger than expected",
    ),
    case(
        "signature of another key",
        Dist::StrangerSig,
        1,
        "signature",
    ),
    case(
        "signature of the previous manifest",
        Dist::OldSig,
        1,
        "signature",
    ),
    case(
        "signed: traversal path",
        Dist::Signed("/files/0/path", "\"../../../../tmp/pm-escape\""),
        1,
        "unusable path",
    ),
    case(
        "signed: absolute path",
        Dist::Signed("/files/0/path", "\"/tmp/pm-escape\""),
        1,
        "unusable path",
    ),
    case(
        "signed: path with a NUL",
        Dist::Signed("/files/0/path", "\"clamav/te\\u0000st.cvd\""),
        1,
        "unusable path",
    ),
    case(
        "signed: empty path",
        Dist::Signed("/files/0/path", "\"\""),
        1,
        "unusable path",
    ),
    case(
        "signed: unknown format",
        Dist::Signed("/format", "2"),
        1,
        "manifest format 2",
    ),
    case(
        "signed: revision named like a path",
        Dist::Signed("/revision", "\"../../r9\""),
        1,
        "does not match serial",
    ),
    case(
        "signed: sha256 not hex",
        Dist::Signed("/files/0/sha256", "\"not hex\""),
        1,
        "unusable file",
    ),
    case(
        "signed: size too small",
        Dist::Signed("/files/0/size", "10"),
        1,
        "larger than the signed manifest says",
    ),
    case(
        "signed: size negative",
        Dist::Signed("/files/0/size", "-1"),
        1,
        "manifest",
    ),
    case(
        "signed: files not a list",
        Dist::Signed("/files", "{}"),
        1,
        "manifest",
    ),
    case("file damaged", Dist::FileFlip, 1, "sha256"),
    case("file cut in half", Dist::FileCut, 1, "test.cvd"),
    case("file missing", Dist::FileGone, 1, "test.cvd"),
    case(
        "signed manifest, damaged CVD",
        Dist::SignedBadCvd,
        1,
        "test.cvd",
    ),
];

#[test]
fn every_bad_manifest_or_file_from_dist_fails_the_agent_update_and_changes_nothing_on_the_agent() {
    let setup = AgentSetup::new();
    setup.agent_cmd(&["update"]);
    setup.publish(6);
    let home = setup.home.path();
    // The revision dist names: its files are what `pm-mirror serve` sends (read per request).
    let dist = std::fs::canonicalize(setup.home.repo("dist")).unwrap();
    let previous = std::fs::canonicalize(setup.home.repo("backup/1")).unwrap();
    let manifest_path = dist.join("manifest.json");
    let sig_path = dist.join("manifest.sig");
    let good_manifest = std::fs::read(&manifest_path).unwrap();
    let good_sig = std::fs::read(&sig_path).unwrap();
    let cvd_path = dist.join("clamav/test.cvd");
    let good_cvd = std::fs::read(&cvd_path).unwrap();
    let cdiffs: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(dist.join("clamav"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cdiff"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let key = pm::pki::SigningKey::load_or_create(home).unwrap();
    let sign_json = |value: &serde_json::Value| {
        let bytes = serde_json::to_vec_pretty(value).unwrap();
        let sig = key.sign(&bytes).unwrap();
        (bytes, sig)
    };
    let manifest: serde_json::Value = serde_json::from_slice(&good_manifest).unwrap();
    let cvd_index = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .position(|f| f["path"] == "clamav/test.cvd")
        .unwrap();

    let agent_state = || {
        let mut all = BTreeMap::new();
        // `updates/` keeps the last runs with their errors: the record of the attempt, numbered
        // in the agent's report stream (`reports.seq`).
        let skip = |r: &str| {
            volatile(r) || r == "updates" || r.starts_with("updates/") || r == "reports.seq"
        };
        for (path, line) in files(&setup.state(), &skip) {
            all.insert(format!("state/{path}"), line);
        }
        for (path, line) in files(&setup.db(), &volatile) {
            all.insert(format!("db/{path}"), line);
        }
        Snapshot(all)
    };
    let mut before = agent_state();
    let mut tally = Tally::new("dist manifests and files (pm-agent update)");
    for case in DISTS {
        let (mut manifest_bytes, mut sig_bytes) = (good_manifest.clone(), good_sig.clone());
        let mut cvd_bytes = Some(good_cvd.clone());
        match case.input {
            Dist::Manifest(bytes) => manifest_bytes = bytes.to_vec(),
            Dist::ManifestHalf => manifest_bytes.truncate(good_manifest.len() / 2),
            Dist::ManifestFlip => {
                let at = manifest_bytes
                    .windows(4)
                    .position(|w| w == b"\"r2\"")
                    .unwrap();
                manifest_bytes[at + 2] = b'9';
            }
            Dist::Sig(bytes) => sig_bytes = bytes.to_vec(),
            Dist::NoSig => sig_bytes.clear(),
            Dist::StrangerSig => {
                let stranger = tempfile::tempdir().unwrap();
                sig_bytes = pm::pki::SigningKey::load_or_create(stranger.path())
                    .unwrap()
                    .sign(&good_manifest)
                    .unwrap();
            }
            Dist::OldSig => sig_bytes = std::fs::read(previous.join("manifest.sig")).unwrap(),
            Dist::Signed(pointer, value) => {
                let mut changed = manifest.clone();
                let pointer = pointer.replace("/files/0/", &format!("/files/{cvd_index}/"));
                *changed.pointer_mut(&pointer).unwrap() = serde_json::from_str(value).unwrap();
                (manifest_bytes, sig_bytes) = sign_json(&changed);
            }
            Dist::FileFlip => {
                let mut bytes = good_cvd.clone();
                let at = bytes.len() / 2;
                bytes[at] ^= 1;
                cvd_bytes = Some(bytes);
            }
            Dist::FileCut => cvd_bytes = Some(good_cvd[..good_cvd.len() / 2].to_vec()),
            Dist::FileGone => cvd_bytes = None,
            Dist::SignedBadCvd => {
                let mut bytes = good_cvd.clone();
                bytes[100] ^= 0x20;
                let mut changed = manifest.clone();
                changed["files"][cvd_index]["sha256"] =
                    pm::manifest::hex(&openssl::sha::sha256(&bytes)).into();
                (manifest_bytes, sig_bytes) = sign_json(&changed);
                cvd_bytes = Some(bytes);
            }
        }
        std::fs::write(&manifest_path, &manifest_bytes).unwrap();
        if matches!(case.input, Dist::NoSig) {
            std::fs::remove_file(&sig_path).unwrap();
        } else {
            std::fs::write(&sig_path, &sig_bytes).unwrap();
        }
        match &cvd_bytes {
            Some(bytes) => std::fs::write(&cvd_path, bytes).unwrap(),
            None => std::fs::remove_file(&cvd_path).unwrap(),
        }
        // The agent (at version 3) would build test.cvd from the cdiffs; with them broken it
        // must fetch the whole file the case is about.
        let file_case = matches!(
            case.input,
            Dist::FileFlip | Dist::FileCut | Dist::FileGone | Dist::SignedBadCvd
        );
        if file_case {
            for (path, _) in &cdiffs {
                std::fs::write(path, b"not a cdiff").unwrap();
            }
        }
        let got = run_limited(
            pm_command(Pm::agent(&setup.state()).args(["update"])),
            Duration::from_secs(60),
        );
        std::fs::write(&manifest_path, &good_manifest).unwrap();
        std::fs::write(&sig_path, &good_sig).unwrap();
        std::fs::write(&cvd_path, &good_cvd).unwrap();
        for (path, bytes) in &cdiffs {
            std::fs::write(path, bytes).unwrap();
        }
        let after = agent_state();
        tally.check(case, &got, false, changes(&before, &after));
        before = after;
        assert!(!Path::new("/tmp/pm-escape").exists(), "{}", case.name);
    }
    // With dist whole again, the same agent installs it.
    let done = setup.agent_cmd(&["update"]);
    assert_eq!(done["revision"], "r2", "{done}");
    tally.finish();
}

// ---------------------------------------------------------------------------------------------
// JSON answers from agents to pm-poll

/// What a simulated agent answers `GET /v1/poll` with (status 200); `{deep}` is 200 nested
/// arrays and `{scans}` 51 scan reports.
static ANSWERS: &[Case<&str>] = &[
    case("not JSON", "<html>hello</html>", 3, "not a poll answer"),
    case("empty body", "", 3, "not a poll answer"),
    case("JSON null", "null", 3, "not a poll answer"),
    case("a JSON array", "[1, 2, 3]", 3, "not a poll answer"),
    case("an empty object", "{}", 3, "not a poll answer"),
    case(
        "cut in the middle",
        "{\"status\": {\"host_name\": \"sim",
        3,
        "not a poll answer",
    ),
    case(
        "trailing garbage",
        "{deep_ok} trailing",
        3,
        "not a poll answer",
    ),
    case("nested 200 deep", "{deep}", 3, "not a poll answer"),
    case(
        "activated a string",
        "{\"status\": {\"host_name\": \"x\", \"agent_version\": \"0.1.0\", \"activated\": \"yes\", \"engine\": \"clamav\"}, \"schedule\": [], \"scans\": [], \"updates\": []}",
        3,
        "not a poll answer",
    ),
    case("51 scan reports", "{scans}", 3, "not a poll answer"),
    case(
        "a timestamp that is no time",
        "{bad_time}",
        3,
        "not a poll answer",
    ),
    case("a negative serial", "{bad_serial}", 3, "not a poll answer"),
    case(
        "an unknown scan result",
        "{bad_result}",
        3,
        "not a poll answer",
    ),
    case(
        "not UTF-8",
        "{\"status\": \"\u{FFFD}\"}",
        3,
        "not a poll answer",
    ),
];

#[test]
fn every_bad_poll_answer_is_recorded_as_bad_response_and_changes_nothing_about_that_host() {
    let home = Home::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = ANSWERS.len() as u32 + 1;
    let spec = FleetSpec {
        count,
        first_address: Ipv4Addr::new(127, 212, 0, 1),
        port: 0,
        ..FleetSpec::default()
    };
    let fleet = SimFleet::enrol(home.path(), &spec).unwrap();
    let running = runtime.block_on(fleet.serve()).unwrap();
    // A real answer to mutate: host 0's, as a simulated agent sends it.
    let good: serde_json::Value = {
        let ca = pm::pki::ca::ManagerCa::load_or_create(home.path()).unwrap();
        let identity = ca.client_identity(home.path()).unwrap();
        let client = pm::tls::client_builder(
            Some(ca.certificate()),
            None,
            Some((&identity.0, &identity.1)),
        )
        .unwrap()
        .build()
        .unwrap();
        let url = format!(
            "https://{}{}",
            running.spec().address(0).to_string() + ":" + &running.spec().port.to_string(),
            pm::proto::POLL_PATH
        );
        runtime.block_on(async {
            let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
            serde_json::from_slice(&bytes).unwrap()
        })
    };
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut value = good.clone();
        f(&mut value);
        serde_json::to_string(&value).unwrap()
    };
    let scan = good["scans"][0].clone();
    let body = |template: &str| -> Vec<u8> {
        let text = match template {
            "{deep}" => format!("{}{}", "[".repeat(200), "]".repeat(200)),
            "{deep_ok}" => serde_json::to_string(&good).unwrap(),
            "{scans}" => mutate(&|v| {
                v["scans"] = serde_json::Value::Array(vec![scan.clone(); 51]);
            }),
            "{bad_time}" => mutate(&|v| v["installed"]["installed_at"] = "last tuesday".into()),
            "{bad_serial}" => mutate(&|v| v["installed"]["serial"] = (-3).into()),
            "{bad_result}" => mutate(&|v| v["scans"][0]["result"] = "exploded".into()),
            other if other.starts_with("{deep_ok}") => {
                other.replace("{deep_ok}", &serde_json::to_string(&good).unwrap())
            }
            other => other.to_string(),
        };
        text.into_bytes()
    };
    // Host 0 stays a good agent: the poll must see it, which proves the others were asked.
    for (index, case) in ANSWERS.iter().enumerate() {
        let mut bytes = body(case.input);
        if case.input.contains('\u{FFFD}') {
            bytes = b"{\"status\": \"\xff\xfe\"}".to_vec();
        }
        running.set_raw_answer(index + 1, Some(bytes));
    }
    let got = run_limited(
        pm_command(Pm::poll(&home).args(["--json", "--timeout", "5s"])),
        Duration::from_secs(60),
    );
    let document: serde_json::Value = serde_json::from_str(&got.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}\n{}", got.stdout, got.stderr));
    let inventory = pm::inventory::Inventory::open_read_only(home.path(), Duration::from_secs(30))
        .unwrap()
        .unwrap();
    let rows = |sql: String| inventory.query_strings(&sql).unwrap();
    let mut tally = Tally::new("poll answers from agents (pm-poll)");
    let kept_of = |name: &str| {
        rows(format!(
            "SELECT 'components ' || (SELECT count(*) FROM component_versions WHERE host = '{name}') \
             || ', installed ' || (SELECT count(*) FROM installed_components WHERE host = '{name}') \
             || ', scans ' || (SELECT count(*) FROM scans WHERE host = '{name}') \
             || ', agent ' || coalesce((SELECT max(agent_version) FROM host_state \
             WHERE host = '{name}'), 'none')"
        ))
        .join("")
    };
    let nothing = "components 0, installed 0, scans 0, agent none";
    assert_ne!(
        kept_of(&spec.host_name(0)),
        nothing,
        "the good host's answer is recorded: {document}"
    );
    for (index, case) in ANSWERS.iter().enumerate() {
        let name = spec.host_name(index as u32 + 1);
        let line = document["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == name.as_str())
            .cloned()
            .unwrap_or_default();
        let error = rows(format!(
            "SELECT coalesce(p.error, '') FROM polls p JOIN host_ids i ON i.id = p.host_id \
             WHERE i.host = '{name}'"
        ))
        .join("; ");
        let kept = kept_of(&name);
        let changed = if kept == nothing {
            Vec::new()
        } else {
            vec![kept]
        };
        // One poll serves every case: the per-host line and the recorded error are its output.
        let outcome = Outcome {
            code: got.code,
            stdout: format!("polled {}", line["polled"]),
            stderr: format!("error: {error}"),
        };
        let mut case_changed = changed;
        if line["polled"] != "bad_response" {
            case_changed.push(format!("polled {}", line["polled"]));
        }
        tally.check(case, &outcome, false, case_changed);
    }
    drop(inventory);
    tally.finish();
}
