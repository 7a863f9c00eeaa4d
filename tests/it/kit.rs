//! The install kit: `pm-lab generate` (man pages that groff renders, bash completions that
//! load), `scripts/install.sh` (the installed tree, twice), the systemd units
//! (`systemd-analyze verify`) and every unit's command line started with its hardening
//! settings emulated without systemd (see [`hardened`]). The packaged units under a real
//! systemd are `ansible/test.sh`'s (tests/it/ansible.rs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{AgentSetup, Home, Lab, Pm, Server, bin, free_port, http_get, runtime};

/// The tools `scripts/install.sh` installs: all but pm-lab, which stays in the build tree.
fn installed_tools() -> Vec<String> {
    pm::kit::commands()
        .iter()
        .map(|command| command.get_name().to_string())
        .filter(|name| name != "pm-lab")
        .collect()
}

const UNITS: [&str; 8] = [
    "pm-agent.service",
    "pm-agent@.service",
    "pm-exporter.service",
    "pm-mirror-serve.service",
    "pm-mirror-sync.service",
    "pm-mirror-sync.timer",
    "pm-poll.service",
    "pm-poll.timer",
];

/// The directory of the binaries under test (target/debug in a plain `cargo test`).
fn bin_dir() -> PathBuf {
    Path::new(bin("pm-mirror")).parent().unwrap().to_path_buf()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `path` is under /tmp or /var/tmp, which a unit's `PrivateTmp=yes` replaces.
fn under_private_tmp(path: &Path) -> bool {
    path.starts_with("/tmp") || path.starts_with("/var/tmp")
}

/// Where a sandboxed unit's files go: cargo's target tmpdir, unless the checkout itself is
/// under /tmp (a CI clone may be), then a directory of /var/cache (these tests run as root; not
/// below /var/lib/pm, which the unit rewrites replace).
fn outside_private_tmp() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    if !under_private_tmp(&target) {
        return target;
    }
    let base = PathBuf::from("/var/cache/pm-kit-tests");
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// A temporary directory outside /tmp, which a unit's `PrivateTmp=yes` hides.
fn tempdir_outside_tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(outside_private_tmp()).unwrap()
}

fn run(command: &mut Command) -> (i32, String, String) {
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn generate(out: &Path) {
    let run = Pm::new("pm-lab")
        .args(["generate", "--out"])
        .args([out])
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
}

#[test]
fn generate_writes_a_man_page_per_tool_that_groff_renders_and_that_names_its_subcommands() {
    let out = tempfile::tempdir().unwrap();
    generate(out.path());
    for command in pm::kit::commands() {
        let mut command = command.disable_help_subcommand(true);
        command.build();
        let tool = command.get_name().to_string();
        assert!(
            Path::new(bin(&tool)).is_file(),
            "{tool} is a binary of this package"
        );
        let page = out.path().join(format!("man/man1/{tool}.1"));
        let (code, text, stderr) = run(Command::new("groff")
            .args(["-man", "-Tutf8", "-P-cbou", "-ww"])
            .arg(&page));
        assert_eq!((code, stderr.as_str()), (0, ""), "{}", page.display());
        // groff justifies lines: compare with single spaces.
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains(&format!("{tool} - ")), "{tool}: {text}");
        for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
            let name = format!("{tool}-{}", subcommand.get_name());
            assert!(
                text.contains(&format!("{name}(1)")),
                "{tool} names {name}: {text}"
            );
            let sub_page = out.path().join(format!("man/man1/{name}.1"));
            assert!(sub_page.is_file(), "{}", sub_page.display());
        }
    }
    // man itself reads a page from a file as an operator would after installing.
    let (code, text, stderr) = run(Command::new("man")
        .arg("-l")
        .arg(out.path().join("man/man1/pm-push-update.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert_eq!(code, 0, "{stderr}");
    assert!(text.contains("--wave-size"), "{text}");
}

#[test]
fn the_bash_completion_loads_and_completes_subcommands_and_their_flags() {
    // Regression test for clap-rs/clap issue 6421 (see `pm::kit`): with a hyphen in the binary
    // name, no option of a subcommand completed.
    let out = tempfile::tempdir().unwrap();
    generate(out.path());
    let file = out.path().join("completions/bash/pm-push");
    let script = r#"source "$1"; complete -p pm-push
        function=$(complete -p pm-push | sed 's/.* -F \([^ ]*\) .*/\1/')
        COMP_WORDS=(pm-push up); COMP_CWORD=1; COMP_LINE="pm-push up"; COMP_POINT=10
        "$function" pm-push up pm-push; echo "subcommands: ${COMPREPLY[*]}"
        COMP_WORDS=(pm-push update --wave); COMP_CWORD=2
        "$function" pm-push --wave update; echo "flags: ${COMPREPLY[*]}""#;
    let (code, stdout, stderr) = run(Command::new("bash")
        .args(["--norc", "-c", script, "bash"])
        .arg(&file));
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    assert!(stdout.starts_with("complete "), "{stdout}");
    assert!(stdout.contains("subcommands: update"), "{stdout}");
    assert!(stdout.contains("flags: --wave-size"), "{stdout}");
}

/// Every file under `dir`, relative and sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap();
                files.push(relative.to_str().unwrap().to_string());
            }
        }
    }
    files.sort();
    files
}

fn install(args: &[&str]) -> (i32, String, String) {
    run(Command::new(repo_root().join("scripts/install.sh"))
        .args(args)
        .arg("--bin-dir")
        .arg(bin_dir()))
}

#[test]
fn install_script_installs_tools_completions_man_pages_and_units_and_can_run_again() {
    let root = tempfile::tempdir().unwrap();
    let root_arg = root.path().to_str().unwrap();
    let (code, stdout, stderr) = install(&["--root", root_arg, "--prefix", "/opt/pm"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let first = tree(root.path());

    let mut expected = Vec::new();
    for tool in installed_tools() {
        expected.push(format!("opt/pm/bin/{tool}"));
        expected.push(format!("opt/pm/share/bash-completion/completions/{tool}"));
        expected.push(format!("opt/pm/share/zsh/site-functions/_{tool}"));
        expected.push(format!(
            "opt/pm/share/fish/vendor_completions.d/{tool}.fish"
        ));
        expected.push(format!("opt/pm/share/man/man1/{tool}.1"));
    }
    for unit in UNITS {
        expected.push(format!("opt/pm/lib/systemd/system/{unit}"));
    }
    expected.push("opt/pm/lib/sysusers.d/pm.conf".into());
    expected.push("opt/pm/lib/tmpfiles.d/pm.conf".into());
    expected.push("opt/pm/lib/pm/libduckdb.so".into());
    for file in &expected {
        assert!(first.contains(file), "{file} missing from {first:#?}");
    }
    // Besides those, only the subcommands' man pages; nothing of pm-lab.
    for file in &first {
        assert!(
            expected.contains(file) || file.starts_with("opt/pm/share/man/man1/pm-"),
            "unexpected {file}"
        );
        assert!(!file.contains("pm-lab"), "{file}");
    }
    assert!(first.contains(&"opt/pm/share/man/man1/pm-push-update.1".to_string()));

    let agent_unit = std::fs::read_to_string(
        root.path()
            .join("opt/pm/lib/systemd/system/pm-agent.service"),
    )
    .unwrap();
    assert!(
        agent_unit.contains("ExecStart=/opt/pm/bin/pm-agent run"),
        "{agent_unit}"
    );
    assert!(agent_unit.contains("ReadWritePaths=/var/lib/pm-agent /var/lib/clamav /opt/pm/bin"));
    assert!(!agent_unit.contains("/usr/local"), "{agent_unit}");

    // The manager tools load the libduckdb installed beside them, not the build tree's.
    let installed = root.path().join("opt/pm/bin/pm-mirror");
    let (_, dynamic, _) = run(Command::new("readelf").arg("-d").arg(&installed));
    assert!(dynamic.contains("[$ORIGIN/../lib/pm]"), "{dynamic}");
    let (code, libs, stderr) = run(Command::new("ldd").arg(&installed));
    assert_eq!(code, 0, "{stderr}");
    let libduckdb = root.path().join("opt/pm/bin/../lib/pm/libduckdb.so");
    assert!(
        libs.contains(&format!("libduckdb.so => {} ", libduckdb.display())),
        "{libs}"
    );
    let (_, agent_dynamic, _) = run(Command::new("readelf")
        .arg("-d")
        .arg(root.path().join("opt/pm/bin/pm-agent")));
    assert!(!agent_dynamic.contains("[libduckdb.so]"), "{agent_dynamic}");
    assert!(!agent_dynamic.contains("RUNPATH"), "{agent_dynamic}");

    let (code, _, stderr) = install(&["--root", root_arg, "--prefix", "/opt/pm"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(tree(root.path()), first);

    let (code, _, stderr) = run(Command::new(repo_root().join("scripts/install.sh"))
        .args(["--root", root_arg, "--bin-dir"])
        .arg(root.path().join("nowhere")));
    assert_eq!(code, 2);
    assert!(stderr.contains("error: --bin-dir `"), "{stderr}");
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    // Installed with a real prefix (no --root) so that verify finds the executables.
    let prefix = tempfile::tempdir().unwrap();
    let (code, _, stderr) = install(&["--prefix", prefix.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    for unit in UNITS {
        let path = prefix.path().join("lib/systemd/system").join(unit);
        let (code, stdout, stderr) = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path));
        // An unknown or misspelt setting is only a warning: no output at all is the bar.
        assert_eq!(
            (code, stdout.as_str(), stderr.as_str()),
            (0, "", ""),
            "{unit}"
        );
    }
}

/// The `[Service]` settings of a unit, in order (`ReadWritePaths=` may repeat).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (key, value) = line.split_once('=').unwrap();
            settings.push((key.to_string(), value.to_string()));
        }
    }
    settings
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The unit's `key` command line (ExecStart, ExecStopPost) with the paths of `rewrites`,
/// run as systemd would apply the unit's hardening, emulated without systemd: in a private
/// mount namespace (`unshare -m`) every mount is remounted read-only but the
/// `ReadWritePaths` (ProtectSystem=strict), `ReadOnlyPaths` are bind-mounted read-only, an empty
/// read-only tmpfs covers /home, /root and /run/user (ProtectHome=yes; a read-only bind for
/// `read-only`), a fresh tmpfs covers /tmp and /var/tmp (PrivateTmp=yes), and `setpriv` sets
/// no_new_privs, the capability bounding set and the unit's `User=` (nobody, uid 65534: there is
/// no `pm` user here). Not emulated: `MemoryMax` (no cgroup delegation here) and DynamicUser.
fn hardened(unit_name: &str, key: &str, rewrites: &[(&str, String)]) -> Command {
    let mut unit =
        std::fs::read_to_string(repo_root().join("packaging/systemd").join(unit_name)).unwrap();
    for (from, to) in rewrites {
        unit = unit.replace(from, to);
    }
    let settings = service_settings(&unit);
    let yes = |key: &str| setting(&settings, key).last().is_some_and(|v| *v == "yes");
    let paths = |key: &str| -> Vec<String> {
        setting(&settings, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_string)
            .collect()
    };
    let mut script = String::from("set -e\n");
    let private_tmp = yes("PrivateTmp");
    // A checkout under /tmp (a CI clone may be) keeps the binaries and the libduckdb they load
    // there: a fresh /tmp would hide them, so /tmp stays shared (writable) in that case.
    if private_tmp && !under_private_tmp(&bin_dir()) {
        script.push_str("mount -t tmpfs tmpfs /tmp\nmount -t tmpfs tmpfs /var/tmp\n");
    } else if private_tmp {
        eprintln!("PrivateTmp not emulated: the binaries under test are below /tmp");
    }
    let read_write = paths("ReadWritePaths");
    for path in &read_write {
        script.push_str(&format!("mount --bind '{path}' '{path}'\n"));
    }
    for path in paths("ReadOnlyPaths") {
        script.push_str(&format!(
            "mount --bind '{path}' '{path}'\nmount -o remount,bind,ro '{path}'\n"
        ));
    }
    match setting(&settings, "ProtectHome").last().copied() {
        Some("yes") => script.push_str(
            "for d in /home /root /run/user; do [ -d $d ] && \
             mount -t tmpfs -o ro,mode=0755 tmpfs $d; done\n",
        ),
        Some("read-only") => script.push_str(
            "for d in /home /root /run/user; do [ -d $d ] && mount --bind $d $d && \
             mount -o remount,bind,ro $d; done\n",
        ),
        _ => {}
    }
    if setting(&settings, "ProtectSystem").last() == Some(&"strict") {
        let mut keep = read_write.clone();
        if private_tmp {
            keep.extend(["/tmp".to_string(), "/var/tmp".to_string()]);
        }
        let keep = keep
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join("|");
        script.push_str(&format!(
            "awk '{{print $5}}' /proc/self/mountinfo | sort -u | while read -r m; do\n\
             case \"$m\" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac\n\
             case \"$m\" in {keep}) continue;; esac\n\
             mount -o remount,bind,ro \"$m\" 2>/dev/null || true\ndone\n"
        ));
    }
    let mut setpriv = vec!["setpriv".to_string()];
    if yes("NoNewPrivileges") {
        setpriv.push("--no-new-privs".into());
    }
    if let Some(caps) = setting(&settings, "CapabilityBoundingSet").last() {
        let mut set = String::from("-all");
        for cap in caps.split_whitespace() {
            set.push_str(&format!(
                ",+{}",
                cap.trim_start_matches("CAP_").to_lowercase()
            ));
        }
        setpriv.extend(["--bounding-set".into(), set]);
    }
    if !setting(&settings, "User").is_empty() {
        setpriv.extend(["--reuid=65534", "--regid=65534", "--clear-groups"].map(String::from));
    }
    script.push_str("exec \"$@\"\n");

    let mut command = Command::new("unshare");
    command.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"]);
    command.args(&setpriv).arg("env");
    for environment in setting(&settings, "Environment") {
        command.arg(environment);
    }
    let line = setting(&settings, key);
    assert_eq!(line.len(), 1, "{unit_name} has one {key}");
    command.args(line[0].split_whitespace());
    command
}

/// Rewrites of the manager units: binaries under test (in `bins`), `home` as PM_HOME, loopback
/// `port`.
fn manager_rewrites(bins: &Path, home: &Path, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("/usr/local/bin/", format!("{}/", bins.display())),
        ("/var/lib/pm", home.display().to_string()),
        ("0.0.0.0:8080", format!("127.0.0.1:{port}")),
        ("0.0.0.0:9745", format!("127.0.0.1:{port}")),
    ]
}

fn chown_to_nobody(path: &Path) {
    let (code, _, stderr) = run(Command::new("chown").args(["-R", "65534:65534"]).arg(path));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn the_manager_units_sync_publish_serve_and_export_under_their_hardening() {
    let lab = Lab::start(5);
    let home_dir = tempdir_outside_tmp();
    let bins = bin_dir();
    let home = Home { dir: home_dir };
    home.clamav_config(&lab, "");
    chown_to_nobody(home.path());
    let rewrites = manager_rewrites(&bins, home.path(), free_port());

    // pm-mirror-sync.service: as nobody, everything read-only but PM_HOME.
    for key in ["ExecStart", "ExecStopPost"] {
        let (code, stdout, stderr) = run(&mut hardened("pm-mirror-sync.service", key, &rewrites));
        assert_eq!(code, 0, "{key}: {stdout}{stderr}");
    }
    assert!(home.repo("view/dist/manifest.json").is_file());
    // What it wrote belongs to the unit's user, as under User=pm.
    let (_, owner, _) = run(Command::new("stat")
        .args(["-c", "%u"])
        .arg(home.repo("view/dist/manifest.json")));
    assert_eq!(owner.trim(), "65534");

    // pm-mirror-serve.service: PM_HOME read-only, no capabilities.
    let serve = Server::spawn(Pm::wrap(hardened(
        "pm-mirror-serve.service",
        "ExecStart",
        &rewrites,
    )));
    let (code, manifest) = http_get(&serve.base, "/manifest.json");
    assert_eq!(code, 200, "{manifest}");
    assert!(manifest.contains("test.cvd"), "{manifest}");
    serve.stop();

    // pm-exporter.service: reads the inventory the sync wrote, read-only.
    let exporter = Server::spawn(Pm::wrap(hardened(
        "pm-exporter.service",
        "ExecStart",
        &rewrites,
    )));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(&exporter.base, "/healthz");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "healthz: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, metrics) = http_get(&exporter.base, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("pm_"), "{metrics}");
    exporter.stop();
}

#[test]
fn the_agent_unit_runs_and_installs_under_its_hardening() {
    let mut setup = AgentSetup::new();
    if let Some(mut agent) = setup.agent.take() {
        agent.kill().unwrap();
        agent.wait().unwrap();
    }
    let rewrites = vec![
        ("/usr/local/bin/pm-agent", bin("pm-agent").to_string()),
        ("/usr/local/bin", bin_dir().display().to_string()),
        ("/var/lib/pm-agent", setup.state().display().to_string()),
        ("/var/lib/clamav", setup.db().display().to_string()),
    ];
    // The ClamAV package creates its database directory; a ReadWritePaths= that does not
    // exist keeps the unit from starting.
    std::fs::create_dir_all(setup.db()).unwrap();
    let log_path = setup.tmp.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = hardened("pm-agent.service", "ExecStart", &rewrites)
        .stdin(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while runtime()
        .block_on(pm::tls::fetch_server_certificate(
            setup.addr,
            Duration::from_millis(500),
        ))
        .is_err()
    {
        if let Some(status) = agent.try_wait().unwrap() {
            let log = std::fs::read_to_string(&log_path).unwrap();
            panic!("the hardened pm-agent exited with {status}: {log}");
        }
        assert!(
            Instant::now() < deadline,
            "the hardened pm-agent never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    setup.agent = Some(agent);
    let (code, status) = setup.get("/v1/status");
    assert_eq!(code, 200, "{status}");

    // An install writes the database directory, which ReadWritePaths names.
    let run = Pm::push(&setup.home).args(["update", "--json"]).run();
    assert_eq!(run.code(), 0, "{}{}", run.stdout(), run.stderr());
    assert!(setup.db().join("test.cvd").is_file() || setup.db().join("test.cld").is_file());
}
