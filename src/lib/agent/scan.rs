//! Scans through an engine adapter: `pm-agent scan PATH...` for the host's admin, and
//! `POST /v1/scan` / `GET /v1/scans` for the manager (mutual TLS).
//!
//! Adapters (the `engine` of `agent.toml`):
//!
//! - `clamav` runs the real `clamscan -r --infected --database=<database_dir> -- PATH...`, or,
//!   when `clamd_socket` is set in `agent.toml`, the real
//!   `clamdscan --config-file=<state>/clamdscan.conf --fdpass --infected -- PATH...` through the
//!   running clamd (its databases are already loaded, and `--fdpass` lets it read files it has no
//!   permission for). `clamdscan.conf` is written by the agent and holds only `LocalSocket`,
//!   the exclusion of names with control characters and the directory depth limit.
//!   clamscan still runs when the active profile has form keys (clamdscan takes no per-scan
//!   options: they are `clamd.conf` settings) or when clamd does not answer `PING` on the socket
//!   (a warning, not a failure); each case says so in a log line.
//! - `command` runs `scan_command` from `agent.toml` (an argv list, e.g.
//!   `scan_command = ["/opt/engine/bin/scan", "--recursive"]`) with the paths appended as separate
//!   arguments.
//!
//! Both are read the same way: exit status 0 = clean, 1 = something found, anything else (or a
//! signal) = error, with the engine's stderr as the error text. The agent's own walk of the
//! paths (see `names`) makes it `error` too, whatever the engine found elsewhere: a path that
//! does not resolve (given to no engine), directories past the depth limit the engines share
//! with the walk, or an engine that scanned none of the files the walk found. Each stdout line of the form
//! `PATH: SIGNATURE FOUND` is a finding; a `Scanned files: N` line gives the number of files
//! scanned (clamscan's summary; a `command` engine may print one too; clamdscan prints none, so
//! its reports have no count). A file name cannot add or move a finding: names with control
//! characters never reach the engine's output, the files they lead to are scanned through
//! private aliases, and a finding must name a path the engine was given (see `names`).
//!
//! No shell is ever involved: the engine argv comes from the agent's own configuration, and each
//! path is one separate argument. Paths are made absolute (the CLI) or must be absolute (the
//! API), so none can be taken for an option; clamscan additionally gets `--` before them.
//!
//! The active scan profile is the one the manager set up (`setup.json`, see `setup`): its form
//! keys become `clamscan` options; a `command` engine reads `profile.conf` where its
//! `scan_command` says `{profile}`. Without one, the engine runs with its defaults.
//!
//! A stopping agent (see `stop`) starts no scan, and ends the engine of the one under way: its
//! report says so (result `error`).
//!
//! Reports are kept as `scans/<id>.json` (write aside, fsync, rename); ids sort by start time
//! and only the newest `scan_reports_keep` (default 20) are kept.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus as ProcessStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use super::{Agent, AgentConfig, Engine, error, from_manager, io_error, load_config, parse_body};
use crate::cli::{ExitStatus, UserError};
use crate::profile::{Profile, ProfileBody};
use crate::proto::{self, ScanList, ScanReport, ScanResult};
use crate::tls::TlsConnectInfo;

mod names;

/// Directory of the kept scan reports, relative to the state directory.
pub const SCANS_DIR: &str = "scans";
/// How many scan reports are kept when `scan_reports_keep` is absent.
pub const DEFAULT_REPORTS_KEEP: usize = 20;
/// The agent's own `clamdscan` configuration in the state directory: only `LocalSocket`, so the
/// host's `/etc/clamav/clamd.conf` never decides where scans go.
pub const CLAMDSCAN_CONF: &str = "clamdscan.conf";
/// How long clamd may take to answer `PING` before a scan falls back to clamscan.
const CLAMD_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A `scan_command` argument that stands for the path of the active profile's `profile.conf`.
pub const PROFILE_PLACEHOLDER: &str = "{profile}";
/// At most this many paths in one API request.
const MAX_PATHS: usize = 1000;
/// At most this much of the engine's stderr is kept as the error text.
const MAX_ERROR_TEXT: usize = 8 * 1024;
/// How often a running engine is checked for its end and for a stop of the agent.
const ENGINE_POLL: Duration = Duration::from_millis(20);
/// At most this many aliases per run of a `command` engine (they are arguments).
const ALIASES_PER_RUN: usize = 1000;

/// One scan at a time per process: engines are heavy, and the report store is pruned after each.
static SCAN_LOCK: Mutex<()> = Mutex::new(());

/// `pm-agent scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Files or directories to scan (directories recursively)
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// How a scan runs its engine: the argv before the paths of the main run, and of the run over
/// the aliases of names the main run must not see (see `names`).
struct Engines {
    /// The main run's argv; the paths follow.
    main: Vec<OsString>,
    /// The alias run's argv: clamscan over a `--file-list` of aliases (`clamav`), or the same
    /// argv with the aliases as paths (`command`).
    aliases: Vec<OsString>,
    /// Whether the engine is told to skip names with control characters itself (`clamav`).
    excludes_names: bool,
    /// Whether links inside the tree are followed (the profile's `follow_symlinks`).
    follow_symlinks: bool,
    /// Whether the profile excludes files (`exclude`, `exclude_dir`): the engine may then
    /// rightly scan fewer files than the agent's walk finds, none included.
    excludes_files: bool,
}

/// The engine argv before the paths, with the active profile applied: `clamav` runs clamdscan
/// when clamd can take the scan (see [`clamd_takes`]), else clamscan with the form keys as
/// options; `command` gets the path of `profile.conf` wherever its `scan_command` has an
/// argument `{profile}`.
fn engine_argv(dir: &Path, config: &AgentConfig) -> Result<Engines> {
    let profile = super::setup::load(dir)?.profile;
    match config.engine {
        Engine::Clamav => {
            let options = match &profile {
                Some(Profile {
                    body: ProfileBody::Form { options },
                    ..
                }) => options.clone(),
                _ => Default::default(),
            };
            let follow_symlinks = options.follow_symlinks == Some(true);
            let excludes_files = !options.exclude.is_empty() || !options.exclude_dir.is_empty();
            let options = options.clamscan_args();
            let mut database = OsString::from("--database=");
            database.push(config.database_dir.as_os_str());
            let clamscan = |extra: &[&str]| -> Vec<OsString> {
                let mut argv: Vec<OsString> = vec!["clamscan".into()];
                argv.extend(extra.iter().map(OsString::from));
                argv.extend(["--infected".into(), database.clone()]);
                argv.extend(options.iter().map(OsString::from));
                argv
            };
            // The aliases are links given directly: followed even when the profile says never
            // (`=1` is clamscan's default: links given directly only; `=2` also chains).
            let mut aliases: Vec<OsString> = clamscan(&[])
                .into_iter()
                .filter(|arg| !arg.as_bytes().starts_with(b"--follow-file-symlinks="))
                .collect();
            aliases.push(
                if follow_symlinks {
                    "--follow-file-symlinks=2"
                } else {
                    "--follow-file-symlinks=1"
                }
                .into(),
            );
            let main = if let Some(socket) = &config.clamd_socket
                && clamd_takes(socket, &options)
            {
                clamdscan_argv(dir, socket)?
            } else {
                let exclude = names::CONTROL_CHARACTERS;
                let mut argv = clamscan(&["-r"]);
                argv.push(format!("--max-dir-recursion={}", names::MAX_DEPTH).into());
                argv.push(format!("--exclude={exclude}").into());
                argv.push(format!("--exclude-dir={exclude}").into());
                argv.push("--".into());
                argv
            };
            Ok(Engines {
                main,
                aliases,
                excludes_names: true,
                follow_symlinks,
                excludes_files,
            })
        }
        Engine::Command => match &config.scan_command {
            Some(argv) if !argv.is_empty() && !argv[0].is_empty() => {
                let conf = super::setup::profile_conf(dir);
                let argv: Vec<OsString> = argv
                    .iter()
                    .map(|arg| {
                        if arg == PROFILE_PLACEHOLDER {
                            conf.clone().into_os_string()
                        } else {
                            OsString::from(arg)
                        }
                    })
                    .collect();
                Ok(Engines {
                    main: argv.clone(),
                    aliases: argv,
                    excludes_names: false,
                    follow_symlinks: false,
                    excludes_files: false,
                })
            }
            _ => Err(UserError::usage(
                "the `command` engine needs `scan_command` in agent.toml".to_string(),
            )
            .with_hint(
                "add e.g. `scan_command = [\"/opt/engine/bin/scan\", \"--recursive\"]`; the paths \
                 are appended, one argument each",
            )
            .into()),
        },
    }
}

/// Whether a scan goes through clamd on `socket`: the profile has no clamscan options (clamdscan
/// cannot take them per scan), the socket path fits on a `clamdscan.conf` line, and clamd
/// answers `PING`. Each "no" is logged with its reason; the scan then runs clamscan.
fn clamd_takes(socket: &Path, profile_options: &[String]) -> bool {
    let socket_text = socket.display();
    if !profile_options.is_empty() {
        tracing::info!(
            socket = %socket_text,
            options = ?profile_options,
            "the active profile has scan options that clamdscan cannot take per scan (they are \
             clamd.conf settings); scanning with clamscan"
        );
        return false;
    }
    if socket
        .to_str()
        .is_none_or(|text| text.contains(['\n', '\r']))
    {
        tracing::warn!(socket = %socket_text, "`clamd_socket` cannot be written into clamdscan.conf; scanning with clamscan");
        return false;
    }
    match super::install::clamd_command(socket, "PING", CLAMD_PING_TIMEOUT) {
        Ok(answer) if answer == "PONG" => true,
        Ok(answer) => {
            tracing::warn!(socket = %socket_text, answer, "clamd answered PING oddly; scanning with clamscan");
            false
        }
        Err(err) => {
            tracing::warn!(socket = %socket_text, error = %err, "clamd does not answer on its socket; scanning with clamscan");
            false
        }
    }
}

/// clamdscan's argv before the paths, after writing `clamdscan.conf` when it changed.
fn clamdscan_argv(dir: &Path, socket: &Path) -> Result<Vec<OsString>> {
    let conf = dir.join(CLAMDSCAN_CONF);
    let text = format!(
        "LocalSocket {}\nExcludePath {}\nMaxDirectoryRecursion {}\n",
        socket.display(),
        names::CONTROL_CHARACTERS,
        names::MAX_DEPTH
    );
    if std::fs::read(&conf).ok().as_deref() != Some(text.as_bytes()) {
        crate::durable::write_atomic(&conf, text.as_bytes(), 0o644)
            .map_err(io_error("write", &conf))?;
    }
    let mut config_file = OsString::from("--config-file=");
    config_file.push(conf.as_os_str());
    Ok(vec![
        "clamdscan".into(),
        config_file,
        "--fdpass".into(),
        "--infected".into(),
        "--".into(),
    ])
}

/// The end of `text`, at most [`MAX_ERROR_TEXT`] bytes, on a character boundary.
fn tail(text: &str) -> String {
    let text = text.trim();
    let mut start = text.len().saturating_sub(MAX_ERROR_TEXT);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

fn new_id(at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{}-{}",
        at.format("%Y%m%dT%H%M%S%.6fZ"),
        &proto::nonce()[..8]
    )
}

/// What one run of an engine gave.
struct EngineRun {
    /// Its stdout, read after it ended.
    stdout: Vec<u8>,
    /// `None` when it ran to completion; else why not (cannot start, a status other than 0 and
    /// 1, a signal, the agent stopping).
    error: Option<String>,
}

/// Runs `argv` + `paths` and waits for it, reading its output, ending it if the agent is asked
/// to stop meanwhile. Never fails: an engine that cannot run is an [`EngineRun`] with an error.
fn run_engine(argv: &[OsString], paths: &[PathBuf], c_locale: bool) -> EngineRun {
    let program = argv[0].to_string_lossy().into_owned();
    let started = Instant::now();
    let mut command = engine_command(&argv[0]);
    command
        .args(&argv[1..])
        .args(paths)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if c_locale {
        // `[[:cntrl:]]` means exactly the ASCII control characters.
        command.env("LC_ALL", "C");
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return EngineRun {
                stdout: Vec::new(),
                error: Some(format!("cannot run `{program}`: {err}")),
            };
        }
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut ended_by_stop = false;
    let status: std::io::Result<ProcessStatus> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(err) => break Err(err),
        }
        if super::stop::stopping() && !ended_by_stop {
            ended_by_stop = true;
            tracing::warn!(program, "the agent is stopping: ending the scan engine");
            let _ = child.kill();
        }
        std::thread::sleep(ENGINE_POLL);
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let error = match status {
        _ if ended_by_stop => Some(format!(
            "the agent stopped during the scan: `{program}` was ended after {:.1} s; scan again",
            started.elapsed().as_secs_f64()
        )),
        Err(err) => Some(format!("cannot wait for `{program}`: {err}")),
        Ok(status) => match status.code() {
            Some(0 | 1) => None,
            code => {
                let how = match code {
                    Some(code) => format!("`{program}` exited with status {code}"),
                    None => format!("`{program}` was killed by a signal"),
                };
                let text = tail(&stderr);
                Some(if text.is_empty() {
                    how
                } else {
                    format!("{how}: {text}")
                })
            }
        },
    };
    EngineRun { stdout, error }
}

/// util-linux's `setpriv`, which starts the engine with `PR_SET_PDEATHSIG` (the crate allows
/// no unsafe code, so no `pre_exec` of our own).
const SETPRIV: &str = "/usr/bin/setpriv";

/// The command that starts `program` so that it dies with the agent (SIGKILL when the thread
/// that started it ends; it waits for the engine, so that is when the agent dies): an agent
/// killed mid-scan (SIGKILL, the OOM killer) leaves no engine scanning on as an orphan. Without
/// `setpriv`, or for a program that cannot run (its own error then says why), the engine is
/// started as it is; under systemd the unit's `KillMode=control-group` ends it all the same.
fn engine_command(program: &std::ffi::OsStr) -> Command {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.as_bytes().contains(&b'/') {
        runnable(Path::new(program))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| runnable(&d.join(program))))
    };
    if found && runnable(Path::new(SETPRIV)) {
        let mut command = Command::new(SETPRIV);
        command.args(["--pdeathsig", "KILL", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Runs the engine over `paths` the way `names` describes (the main run over the parts without
/// unprintable names, a run over the aliases of the files such names lead to) and makes the
/// report. Fails only when the aliases cannot be made.
fn run_scan(
    dir: &Path,
    engine: Engine,
    engines: &Engines,
    paths: &[PathBuf],
) -> Result<ScanReport> {
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let mut plan = names::plan(paths, engines.follow_symlinks, !engines.excludes_names);
    let main_paths = if engines.excludes_names {
        std::mem::take(&mut plan.roots)
    } else {
        std::mem::take(&mut plan.parts)
    };
    let mut findings = Vec::new();
    let mut counts = Vec::new();
    // A path that is not there fails the scan whatever the others found (they are reported).
    let mut errors = plan.missing.clone();
    let mut dropped = Vec::new();
    let mut read = |run: EngineRun, given: &[PathBuf], aliases: Option<&names::Aliases>| {
        let parsed = names::parse(&run.stdout, given, aliases);
        findings.extend(parsed.findings);
        counts.push(parsed.files_scanned);
        dropped.extend(parsed.dropped);
        errors.extend(run.error);
    };
    let c_locale = engines.excludes_names;
    if !main_paths.is_empty() {
        let run = run_engine(&engines.main, &main_paths, c_locale);
        read(run, &main_paths, None);
    }
    if !plan.aliased.is_empty() && !super::stop::stopping() {
        tracing::info!(
            files = plan.aliased.len(),
            "files whose paths hold control characters are scanned through aliases"
        );
        let aliases = names::Aliases::create(dir, &plan.aliased)?;
        if engines.excludes_names {
            let mut file_list = OsString::from("--file-list=");
            file_list.push(aliases.file_list()?);
            let mut argv = engines.aliases.clone();
            argv.push(file_list);
            read(run_engine(&argv, &[], c_locale), &[], Some(&aliases));
        } else {
            for batch in aliases.paths().chunks(ALIASES_PER_RUN) {
                if super::stop::stopping() {
                    break;
                }
                read(
                    run_engine(&engines.aliases, batch, c_locale),
                    &[],
                    Some(&aliases),
                );
            }
        }
    }
    for line in &dropped {
        tracing::warn!(line = %line, "ignoring an engine line that names no path it was given");
    }
    if engines.follow_symlinks {
        let before = findings.len();
        findings = once_per_file(findings);
        if findings.len() < before {
            tracing::info!(
                repeats = before - findings.len(),
                "findings reached through links reported once"
            );
        }
    }
    let files_scanned = counts
        .iter()
        .try_fold(0u64, |sum, count| count.map(|n| sum.saturating_add(n)));
    errors.extend(unscanned(&plan, files_scanned, engines, errors.is_empty()));
    let result = if !errors.is_empty() {
        ScanResult::Error
    } else if findings.is_empty() {
        ScanResult::Clean
    } else {
        ScanResult::Infected
    };
    Ok(ScanReport {
        id: new_id(started_at),
        seq: None,
        started_at,
        finished_at: chrono::Utc::now(),
        duration_seconds: clock.elapsed().as_secs_f64(),
        engine: engine.as_str().to_string(),
        program: Some(engines.main[0].to_string_lossy().into_owned()),
        paths: paths
            .iter()
            .map(|p| names::escape(p.as_os_str().as_bytes()))
            .collect(),
        files_scanned,
        findings,
        result,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    })
}

/// Each infected file once, under the shortest path that reached it: with links followed, one
/// file is reached by several paths (a loop such as `sub/up -> ..` gives it one per way round,
/// up to the depth limit). Findings are one when their files' real paths and signatures are;
/// a path that no longer resolves stands for itself. Order is kept.
fn once_per_file(findings: Vec<proto::ScanFinding>) -> Vec<proto::ScanFinding> {
    let mut first: std::collections::HashMap<(PathBuf, String), usize> = Default::default();
    let mut kept: Vec<proto::ScanFinding> = Vec::with_capacity(findings.len());
    for finding in findings {
        let real =
            std::fs::canonicalize(&finding.path).unwrap_or_else(|_| finding.path.clone().into());
        match first.entry((real, finding.signature.clone())) {
            std::collections::hash_map::Entry::Occupied(seen) => {
                let shown = &mut kept[*seen.get()];
                if finding.path.len() < shown.path.len() {
                    shown.path = finding.path;
                }
            }
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(kept.len());
                kept.push(finding);
            }
        }
    }
    kept
}

/// What makes a scan that ran to completion fail all the same: directories past the depth
/// limit (nothing below them was scanned), or an engine that scanned none of the files the
/// agent's walk found (`ran`: no other error explains it; a profile that excludes files may).
fn unscanned(
    plan: &names::Plan,
    files_scanned: Option<u64>,
    engines: &Engines,
    ran: bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(first) = plan.too_deep.first() {
        let more = match plan.too_deep.len() {
            1 => String::new(),
            n => format!(" (and {} more like it)", n - 1),
        };
        errors.push(format!(
            "`{}`{more} is more than {} directory levels below the path asked for: nothing \
             below it was scanned; scan it as a path of its own",
            names::escape(first.as_os_str().as_bytes()),
            names::MAX_DEPTH,
        ));
    }
    if let Some(first) = &plan.first_too_long {
        let more = match plan.too_long {
            0 | 1 => String::new(),
            n => format!(" (and {} more like it)", n - 1),
        };
        errors.push(format!(
            "`{}`{more} has a path longer than the engine can open (4096 bytes): it was not \
             scanned; scan a directory nearer to it as a path of its own, or move it up",
            names::escape(first.as_os_str().as_bytes()),
        ));
    }
    if ran && files_scanned == Some(0) && plan.files > 0 && !engines.excludes_files {
        errors.push(format!(
            "the engine scanned none of the {} file(s) the paths hold: nothing was checked",
            plan.files
        ));
    }
    errors
}

fn reports_keep(config: &AgentConfig) -> usize {
    config
        .scan_reports_keep
        .unwrap_or(DEFAULT_REPORTS_KEEP)
        .max(1)
}

/// The kept reports, newest first.
pub(super) fn list(dir: &Path) -> Result<Vec<ScanReport>> {
    super::reports::list(&dir.join(SCANS_DIR))
}

/// Scans `paths` (absolute) with the configured engine and keeps the report.
pub(super) fn scan(dir: &Path, config: &AgentConfig, paths: &[PathBuf]) -> Result<ScanReport> {
    let engines = engine_argv(dir, config)?;
    let _one_at_a_time = SCAN_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // Scans queued behind the one that ran when the stop came never start.
    if super::stop::stopping() {
        return Err(super::stop::refusal("the scan"));
    }
    let report = run_scan(dir, config.engine, &engines, paths)?;
    let report =
        super::reports::store_numbered(dir, &dir.join(SCANS_DIR), reports_keep(config), |seq| {
            let report = ScanReport {
                seq: Some(seq),
                ..report
            };
            (report.id.clone(), report)
        })?;
    tracing::info!(
        id = %report.id,
        program = report.program.as_deref().unwrap_or("?"),
        result = report.result.as_str(),
        findings = report.findings.len(),
        files_scanned = ?report.files_scanned,
        "scan finished"
    );
    Ok(report)
}

#[derive(Serialize)]
struct CliReport<'a> {
    changed: bool,
    #[serde(flatten)]
    report: &'a ScanReport,
}

/// `pm-agent scan PATH...`: exit 0 when the scan ran (clean or infected), 1 when it failed.
pub(super) fn scan_command(dir: &Path, args: &ScanArgs, json: bool) -> Result<ExitStatus> {
    let config = load_config(dir)?;
    let paths = args
        .paths
        .iter()
        .map(|path| std::path::absolute(path).map_err(io_error("resolve", path)))
        .collect::<Result<Vec<_>>>()?;
    let report = scan(dir, &config, &paths)?;
    let program = report.program.as_deref().unwrap_or("?");
    if json {
        crate::cli::print_json(&CliReport {
            changed: false,
            report: &report,
        })?;
    } else {
        let mut text = String::new();
        if !report.findings.is_empty() {
            let mut table = crate::cli::table(&["path", "signature"]);
            for finding in &report.findings {
                table.add_row(vec![finding.path.clone(), finding.signature.clone()]);
            }
            text.push_str(&format!("{table}\n"));
        }
        text.push_str(&format!(
            "{}: {} finding(s), {} file(s) scanned in {:.2} s by {} ({program}, report {})",
            report.result.as_str(),
            report.findings.len(),
            report
                .files_scanned
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            report.duration_seconds,
            report.engine,
            report.id
        ));
        crate::cli::print_text(text)?;
        if let Some(error) = &report.error {
            eprintln!("error: the scan failed: {error}");
        }
    }
    Ok(if report.result == ScanResult::Error {
        ExitStatus::Failure
    } else {
        ExitStatus::Success
    })
}

/// Checks the paths of an API request: present, absolute, no NUL.
fn request_paths(request: &proto::ScanRequest) -> Result<Vec<PathBuf>, String> {
    if request.paths.is_empty() {
        return Err("`paths` is empty: give at least one absolute path".into());
    }
    if request.paths.len() > MAX_PATHS {
        return Err(format!("at most {MAX_PATHS} paths per scan"));
    }
    request
        .paths
        .iter()
        .map(|path| {
            if path.contains('\0') || !path.starts_with('/') {
                Err(format!("`{}` is not an absolute path", path.escape_debug()))
            } else {
                Ok(PathBuf::from(path))
            }
        })
        .collect()
}

async fn scan_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
    body: Bytes,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    let request: proto::ScanRequest = match parse_body(&body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let paths = match request_paths(&request) {
        Ok(paths) => paths,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let worker = Arc::clone(&agent);
    let scanned =
        tokio::task::spawn_blocking(move || scan(&worker.dir, &worker.config, &paths)).await;
    match scanned {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(err)) if super::stop::stopping() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            format!("{err:#}"),
        ),
        Ok(Err(err)) => {
            tracing::error!(error = %format!("{err:#}"), "cannot scan");
            // A user error here is the engine configuration (`scan_command` missing).
            let (status, code) = if err.downcast_ref::<UserError>().is_some() {
                (StatusCode::CONFLICT, "engine_not_configured")
            } else {
                (StatusCode::INTERNAL_SERVER_ERROR, "scan_failed")
            };
            error(status, code, format!("the agent cannot scan: {err:#}"))
        }
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the scan stopped: {err}"),
        ),
    }
}

async fn scans_handler(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(info): ConnectInfo<TlsConnectInfo>,
) -> Response {
    if let Err(response) = from_manager(&agent.lock(), &info) {
        return *response;
    }
    match list(&agent.dir) {
        Ok(reports) => axum::Json(ScanList { reports }).into_response(),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the agent cannot read its scan reports: {err:#}"),
        ),
    }
}

/// `POST /v1/scan` and `GET /v1/scans`.
pub(super) fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route(proto::SCAN_PATH, post(scan_handler))
        .route(proto::SCANS_PATH, get(scans_handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a `setup.json` whose profile has the form keys `options`.
    fn set_up_profile(dir: &Path, options: crate::profile::ScanOptions) {
        let setup = super::super::setup::Setup {
            profile: Some(Profile {
                name: "quick".into(),
                body: ProfileBody::Form { options },
            }),
            ..Default::default()
        };
        std::fs::write(
            dir.join(super::super::setup::SETUP_FILE),
            serde_json::to_vec(&setup).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn the_active_profile_becomes_engine_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig {
            listen: "127.0.0.1:7505".parse().unwrap(),
            engine: Engine::Command,
            database_dir: PathBuf::from("/db"),
            host_name: "h".into(),
            scan_command: Some(vec![
                "/opt/scan".into(),
                "--config".into(),
                "{profile}".into(),
            ]),
            scan_reports_keep: None,
            clamd_socket: None,
            schedule: None,
        };
        set_up_profile(
            dir.path(),
            crate::profile::ScanOptions {
                exclude_dir: vec!["^/proc".into()],
                ..Default::default()
            },
        );
        let conf = dir.path().join("profile.conf").into_os_string();
        let engines = engine_argv(dir.path(), &config).unwrap();
        assert_eq!(
            engines.main,
            [OsString::from("/opt/scan"), "--config".into(), conf]
        );
        assert_eq!(engines.aliases, engines.main);
        assert!(!engines.excludes_names);
        config.engine = Engine::Clamav;
        let engines = engine_argv(dir.path(), &config).unwrap();
        assert_eq!(
            engines.main[1..],
            [
                OsString::from("-r"),
                "--infected".into(),
                "--database=/db".into(),
                "--exclude-dir=^/proc".into(),
                "--max-dir-recursion=256".into(),
                "--exclude=[[:cntrl:]]".into(),
                "--exclude-dir=[[:cntrl:]]".into(),
                "--".into()
            ]
        );
        // The aliases: files from a list, links given directly followed, no recursion.
        assert_eq!(
            engines.aliases[1..],
            [
                OsString::from("--infected"),
                "--database=/db".into(),
                "--exclude-dir=^/proc".into(),
                "--follow-file-symlinks=1".into()
            ]
        );
        set_up_profile(
            dir.path(),
            crate::profile::ScanOptions {
                follow_symlinks: Some(false),
                ..Default::default()
            },
        );
        let engines = engine_argv(dir.path(), &config).unwrap();
        assert!(
            engines.main.contains(&"--follow-file-symlinks=0".into())
                && engines
                    .aliases
                    .ends_with(&["--follow-file-symlinks=1".into()])
                && !engines.aliases.contains(&"--follow-file-symlinks=0".into()),
            "{:?}",
            engines.aliases
        );
    }

    #[test]
    fn a_scan_that_scanned_none_of_the_files_found_or_stopped_at_the_depth_limit_fails() {
        let engines = |excludes_files| Engines {
            main: vec!["clamscan".into()],
            aliases: Vec::new(),
            excludes_names: true,
            follow_symlinks: false,
            excludes_files,
        };
        let plan = |files, too_deep: &[&str]| names::Plan {
            files,
            too_deep: too_deep.iter().map(PathBuf::from).collect(),
            ..Default::default()
        };
        let check = |plan: names::Plan, scanned, excludes_files, ran, expected: &[&str]| {
            assert_eq!(
                unscanned(&plan, scanned, &engines(excludes_files), ran),
                expected
            );
        };
        check(plan(2, &[]), Some(2), false, true, &[]);
        // An empty directory holds nothing to miss.
        check(plan(0, &[]), Some(0), false, true, &[]);
        check(
            plan(2, &[]),
            Some(0),
            false,
            true,
            &["the engine scanned none of the 2 file(s) the paths hold: nothing was checked"],
        );
        // A profile may exclude them all; clamdscan counts nothing; another error says why.
        check(plan(2, &[]), Some(0), true, true, &[]);
        check(plan(2, &[]), None, false, true, &[]);
        check(plan(2, &[]), Some(0), false, false, &[]);
        check(
            plan(1, &["/a", "/b"]),
            Some(1),
            false,
            true,
            &[
                "`/a` (and 1 more like it) is more than 256 directory levels below the path asked \
               for: nothing below it was scanned; scan it as a path of its own",
            ],
        );
    }

    #[test]
    fn clamd_scans_only_when_it_answers_and_the_profile_has_no_options() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("clamd.sock");
        let clamd = super::super::install::fake_clamd(&socket, 6, b"PONG\0");
        let mut config: AgentConfig = toml::from_str(
            "listen = \"127.0.0.1:7505\"\nengine = \"clamav\"\n\
             database_dir = \"/db\"\nhost_name = \"h\"\n",
        )
        .unwrap();
        config.clamd_socket = Some(socket.clone());
        let conf = dir.path().join(CLAMDSCAN_CONF);
        let mut config_file = OsString::from("--config-file=");
        config_file.push(&conf);
        let engines = engine_argv(dir.path(), &config).unwrap();
        assert_eq!(
            engines.main,
            [
                OsString::from("clamdscan"),
                config_file,
                "--fdpass".into(),
                "--infected".into(),
                "--".into()
            ]
        );
        // Names clamdscan's output cannot carry go to clamscan through aliases.
        assert_eq!(engines.aliases[0], "clamscan");
        assert_eq!(&clamd.join().unwrap(), b"zPING\0");
        assert_eq!(
            std::fs::read_to_string(&conf).unwrap(),
            format!(
                "LocalSocket {}\nExcludePath [[:cntrl:]]\nMaxDirectoryRecursion 256\n",
                socket.display()
            )
        );
        // Nobody answers on the socket any more: clamscan.
        let argv = engine_argv(dir.path(), &config).unwrap().main;
        assert_eq!(argv[0], "clamscan");
        // Profile options are clamd.conf settings for clamd: clamscan, without asking clamd.
        set_up_profile(
            dir.path(),
            crate::profile::ScanOptions {
                exclude: vec!["\\.log$".into()],
                ..Default::default()
            },
        );
        let argv = engine_argv(dir.path(), &config).unwrap().main;
        assert_eq!(argv[0], "clamscan");
        assert!(
            argv.contains(&OsString::from("--exclude=\\.log$")),
            "{argv:?}"
        );
    }

    #[test]
    fn a_file_reached_by_several_paths_is_one_finding_under_the_shortest() {
        let tmp = tempfile::tempdir().unwrap();
        let sub = tmp.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("e.com"), b"x").unwrap();
        std::os::unix::fs::symlink("..", sub.join("up")).unwrap();
        let finding = |path: &Path, signature: &str| proto::ScanFinding {
            path: path.display().to_string(),
            signature: signature.into(),
        };
        let looped = sub.join("up/sub/up/sub/e.com");
        let direct = sub.join("e.com");
        let gone = tmp.path().join("gone");
        let found = once_per_file(vec![
            finding(&looped, "Eicar"),
            finding(&direct, "Eicar"),
            finding(&direct, "Other"),
            finding(&gone, "Eicar"),
            finding(&gone, "Eicar"),
        ]);
        assert_eq!(
            found,
            vec![
                finding(&direct, "Eicar"),
                finding(&direct, "Other"),
                finding(&gone, "Eicar")
            ]
        );
    }

    #[test]
    fn api_paths_must_be_absolute() {
        let request = |paths: &[&str]| proto::ScanRequest {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        };
        assert!(request_paths(&request(&[])).is_err());
        assert!(request_paths(&request(&["-r"])).is_err());
        assert!(request_paths(&request(&["tmp/x"])).is_err());
        assert!(request_paths(&request(&["/tmp/x\0"])).is_err());
        assert_eq!(
            request_paths(&request(&["/tmp/x", "/srv"])).unwrap(),
            vec![PathBuf::from("/tmp/x"), PathBuf::from("/srv")]
        );
    }

    #[test]
    fn ids_sort_by_start_time_and_the_error_text_is_bounded() {
        let a = new_id("2026-01-01T00:00:00.000001Z".parse().unwrap());
        let b = new_id("2026-01-01T00:00:00.000002Z".parse().unwrap());
        assert!(a < b, "{a} {b}");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let kept = tail(&long);
        assert!(kept.len() <= MAX_ERROR_TEXT && kept.chars().all(|c| c == 'é'));
    }
}
