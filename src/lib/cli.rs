//! Conventions shared by every tool (DESIGN.md section 4): global flags, exit statuses,
//! errors with hints, logging to stderr and results on stdout as a table or one JSON document.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

/// Flags every manager tool accepts, before or after its subcommand.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Manager state directory [default: /var/lib/pm as root, else $XDG_DATA_HOME/pm]
    #[arg(long, global = true, env = "PM_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Print one JSON document on stdout instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// Show what would change, change nothing
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// How long to wait for another process that holds the inventory (e.g. 30s, 2m)
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub lock_timeout: Duration,
    /// More logging on stderr (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors: no logs but errors on stderr, no summary of sync/publish on stdout (for cron)
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

impl GlobalArgs {
    /// The manager home: `--home`, else `/var/lib/pm` for root, else `$XDG_DATA_HOME/pm`.
    pub fn home(&self) -> PathBuf {
        if let Some(home) = &self.home {
            return home.clone();
        }
        default_home()
    }

    /// Whether progress bars may be drawn: stderr is a terminal and the output is not JSON.
    pub fn show_progress(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }
}

fn default_home() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the effective user: root gets the system location.
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/pm");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(xdg).join("pm");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/pm"),
        None => PathBuf::from("/var/lib/pm"),
    }
}

/// Parses durations like `30s`, `2m`, `1h`, `500ms` or plain seconds (`30`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 30s, 2m, 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}`: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

/// A timeout, deadline or interval: [`parse_duration`], refusing zero (which would fail or spin
/// every time rather than mean anything).
pub fn parse_nonzero_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "`{text}` would end at once: give a duration longer than 0, e.g. 10s"
        ));
    }
    Ok(duration)
}

/// A count of hosts per wave or at once: a number of at least 1.
pub fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("`{text}` is not a number of hosts")),
    }
}

/// How a tool ended; the process exit code scripts and Ansible rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// Everything asked for was done (or was already so).
    Success,
    /// The operation failed; nothing was half-done.
    Failure,
    /// Bad flags, a bad config file or other bad input.
    Usage,
    /// Some hosts or products failed, the rest succeeded.
    Partial,
}

impl ExitStatus {
    /// The numeric exit code: 0, 1, 2 or 3.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Partial => 3,
        }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// An error a user can fix, with the exit status it maps to and an optional `hint:` line.
#[derive(Debug)]
pub struct UserError {
    /// What went wrong, lowercase, naming the thing in backticks.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// Usage (2) for bad input, Failure (1) otherwise.
    pub status: ExitStatus,
}

impl UserError {
    /// Bad input: exit status 2.
    pub fn usage(message: impl Into<String>) -> Self {
        UserError {
            message: message.into(),
            hint: None,
            status: ExitStatus::Usage,
        }
    }

    /// A failed operation: exit status 1.
    pub fn failure(message: impl Into<String>) -> Self {
        UserError {
            message: message.into(),
            hint: None,
            status: ExitStatus::Failure,
        }
    }

    /// Adds the `hint:` line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// Sets up `tracing` on stderr: `-q` errors only, default warnings (so cron mails only what
/// needs a look), `-v` info, `-vv` debug; `RUST_LOG` overrides.
pub fn init_logging(args: &GlobalArgs) {
    let default = match (args.quiet, args.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "warn,pm=info",
        (false, _) => "info,pm=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// The `hint:` of a failure caused by a full disk (ENOSPC) that has no hint of its own.
pub const DISK_FULL_HINT: &str = "the disk is full: free space on the filesystem of the path \
     named above (df -h), then run the same command again; what it was replacing is unchanged";

/// Turns a tool's result into an exit code, printing `error:` and `hint:` lines once on stderr.
/// With `--json` a failure also prints one JSON document (`changed: false`, `error`, `hint`) so
/// that scripts reading stdout always get JSON. A closed stdout (`| head`) is not an error.
pub fn finish(result: anyhow::Result<ExitStatus>, json: bool) -> ExitCode {
    let err = match result {
        Ok(status) => return status.into(),
        Err(err) => err,
    };
    let broken_pipe = err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(|io| io.kind())
            == Some(std::io::ErrorKind::BrokenPipe)
            || cause
                .downcast_ref::<serde_json::Error>()
                .and_then(|e| e.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let user = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<UserError>());
    // A full disk says what to do even where the failing step gave no hint of its own.
    let disk_full = err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().map(|io| io.kind())
            == Some(std::io::ErrorKind::StorageFull)
            || cause.to_string().contains("(os error 28)")
    });
    // A key that went missing is met by every tool that signs: one hint, wherever it surfaced.
    let key_hint = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<crate::pki::PkiError>()?.hint());
    let hint = user
        .and_then(|u| u.hint.as_deref())
        .or(key_hint)
        .or(disk_full.then_some(DISK_FULL_HINT));
    let status = user.map(|u| u.status).unwrap_or(ExitStatus::Failure);
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "error: {err:#}");
    if let Some(hint) = hint {
        let _ = writeln!(stderr, "hint: {hint}");
    }
    // `--json` anywhere asks for the document, also when the tool's own flags disagree with
    // it (`pm-query --json --format csv`): the rule `parse_args` follows for clap's errors.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if json || json_requested(&argv) {
        let _ = print_json(&error_document(status, &format!("{err:#}"), hint, None));
    }
    status.into()
}

/// The one JSON document of a failed run (`--json`): what scripts and Ansible read on stdout.
fn error_document(
    status: ExitStatus,
    error: &str,
    hint: Option<&str>,
    usage: Option<&str>,
) -> serde_json::Value {
    let mut document = serde_json::json!({
        "changed": false,
        "failed": true,
        "exit_code": status.code(),
        "error": error,
        "hint": hint,
    });
    if let Some(usage) = usage {
        document["usage"] = usage.into();
    }
    document
}

/// Parses a tool's command line. A usage error (unknown flag, missing or bad value, missing
/// subcommand) is printed by clap on stderr as usual and, when the command line asks for JSON
/// (`--json` anywhere, or `--format json`), also as one JSON document on stdout, so a script
/// reading stdout gets JSON for every failure, not only for those after parsing; then the
/// process exits 2. `--help` and `--version` print their text and exit 0 as usual.
pub fn parse_args<T: clap::Parser>() -> T {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match T::try_parse_from(&argv) {
        Ok(args) => args,
        Err(err) => {
            let program = argv
                .first()
                .map(std::path::Path::new)
                .and_then(|path| path.file_name())
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            exit_on_usage_error(&err, json_requested(&argv), &program)
        }
    }
}

/// Whether a command line asks for JSON output: `--json`, `--format json` or `--format=json`
/// before any `--` (after it everything is a value).
fn json_requested(argv: &[std::ffi::OsString]) -> bool {
    let mut words = argv.iter().skip(1).map(|word| word.to_str().unwrap_or(""));
    while let Some(word) = words.next() {
        match word {
            "--" => return false,
            "--json" | "--format=json" => return true,
            "--format" if words.next() == Some("json") => return true,
            _ => {}
        }
    }
    false
}

fn exit_on_usage_error(err: &clap::Error, json: bool, program: &str) -> ! {
    use clap::error::ErrorKind;
    let usage_error = !matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    );
    if !usage_error || !json {
        err.exit();
    }
    // clap's own text on stderr (coloured on a terminal), as without --json.
    let _ = err.print();
    let (error, hint, usage) = split_clap_message(&err.render().to_string(), program);
    let _ = print_json(&error_document(
        ExitStatus::Usage,
        &error,
        hint.as_deref(),
        usage.as_deref(),
    ));
    std::process::exit(ExitStatus::Usage.code().into());
}

/// clap's rendered error as the JSON document's `error` (its first paragraph, without the
/// `error: ` prefix), `hint` (its `tip:` lines, else the `--help` of the command its usage line
/// names, else of `program`) and `usage` line.
fn split_clap_message(text: &str, program: &str) -> (String, Option<String>, Option<String>) {
    let mut error = Vec::new();
    let mut tips = Vec::new();
    let mut usage = None;
    let mut in_error = true;
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            in_error = false;
        } else if let Some(tip) = line.trim_start().strip_prefix("tip: ") {
            tips.push(tip.to_string());
        } else if let Some(rest) = line.strip_prefix("Usage: ") {
            usage = Some(rest.trim().to_string());
        } else if in_error {
            error.push(
                line.strip_prefix("error: ")
                    .unwrap_or(line)
                    .trim()
                    .to_string(),
            );
        }
    }
    let hint = if tips.is_empty() {
        let command = usage
            .as_deref()
            .map(|u| {
                u.split_whitespace()
                    .take_while(|w| !w.starts_with(['[', '<', '-']))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| program.to_string());
        Some(format!(
            "`{command} --help` lists the flags and values it takes"
        ))
    } else {
        Some(tips.join("; "))
    };
    (error.join(" "), hint, usage)
}

/// Prints exactly one JSON document on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    stdout.flush()?;
    Ok(())
}

/// A table in the house style: no colour unless on a terminal, width from the terminal.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    if !std::io::stdout().is_terminal() {
        table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    }
    table.set_header(header.iter().map(|h| h.to_string()));
    table
}

/// Prints a table (or any text) followed by a newline on stdout.
pub fn print_text(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// A byte count for people: `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<Duration>) {
        assert_eq!(parse_duration(input).ok(), expected, "input {input:?}");
    }

    #[test]
    fn durations_parse_with_and_without_units() {
        check("30", Some(Duration::from_secs(30)));
        check("30s", Some(Duration::from_secs(30)));
        check("2m", Some(Duration::from_secs(120)));
        check("1h", Some(Duration::from_secs(3600)));
        check("250ms", Some(Duration::from_millis(250)));
        check("1.5s", Some(Duration::from_millis(1500)));
        check("soon", None);
        check("5w", None);
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            ExitStatus::Success,
            ExitStatus::Failure,
            ExitStatus::Usage,
            ExitStatus::Partial,
        ]
        .into_iter()
        .map(ExitStatus::code)
        .collect();
        assert_eq!(codes, [0, 1, 2, 3]);
    }

    #[test]
    fn json_is_requested_by_json_or_format_json_before_a_double_dash() {
        let check = |words: &[&str], expected: bool| {
            let argv: Vec<std::ffi::OsString> = std::iter::once("pm-x")
                .chain(words.iter().copied())
                .map(Into::into)
                .collect();
            assert_eq!(json_requested(&argv), expected, "{words:?}");
        };
        check(&["--json"], true);
        check(&["sync", "--bogus", "--json"], true);
        check(&["--format", "json", "SELECT 1"], true);
        check(&["--format=json", "SELECT 1"], true);
        check(&["--format", "csv", "SELECT 1"], false);
        check(&["--", "--json"], false);
        check(&["status"], false);
    }

    #[test]
    fn a_clap_message_splits_into_error_hint_and_usage() {
        let text = "error: unexpected argument '--bogus' found\n\n  tip: to pass '--bogus' as a \
                    value, use '-- --bogus'\n\nUsage: pm-push update [OPTIONS]\n\nFor more \
                    information, try '--help'.\n";
        let (error, hint, usage) = split_clap_message(text, "pm-push");
        assert_eq!(error, "unexpected argument '--bogus' found");
        assert_eq!(
            hint.as_deref(),
            Some("to pass '--bogus' as a value, use '-- --bogus'")
        );
        assert_eq!(usage.as_deref(), Some("pm-push update [OPTIONS]"));

        let text = "error: the following required arguments were not provided:\n  <SQL>\n\n\
                    Usage: pm-query [OPTIONS] <SQL>\n";
        let (error, hint, _) = split_clap_message(text, "pm-query");
        assert_eq!(
            error,
            "the following required arguments were not provided: <SQL>"
        );
        assert_eq!(
            hint.as_deref(),
            Some("`pm-query --help` lists the flags and values it takes")
        );

        let text = "error: invalid value '0s' for '--timeout <DURATION>': `0s` would end at \
                    once\n\nFor more information, try '--help'.\n";
        let (_, hint, usage) = split_clap_message(text, "pm-poll");
        assert_eq!(
            (hint.as_deref(), usage),
            (
                Some("`pm-poll --help` lists the flags and values it takes"),
                None
            )
        );
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(500 * 1024 * 1024), "500.0 MiB");
    }
}
