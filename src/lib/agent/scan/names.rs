//! File names an engine's line output cannot carry, and reading that output so that no file
//! name can invent a finding or move one to another file.
//!
//! clamscan, clamdscan and most `command` engines print one finding per line,
//! `PATH: SIGNATURE FOUND`, with the path as it is. A name holding a newline adds lines: a
//! directory `evil\n/etc` holding a file `passwd: Backdoor.Fake FOUND\nx` prints a line that
//! reads as a finding at `/etc/passwd`, and a file `d\nD/report.txt` puts its finding on a clean
//! `D/report.txt`. No option of clamscan or clamdscan escapes names, and neither has a
//! machine-readable output (`--gen-json` is for development and prints to the debug log), so
//! the agent makes sure such a name never reaches the output:
//!
//! 1. The engine's own walk skips every path holding a control character (ASCII 0x01-0x1f,
//!    0x7f): clamscan gets `--exclude=[[:cntrl:]] --exclude-dir=[[:cntrl:]]`, clamdscan
//!    `ExcludePath [[:cntrl:]]` in its configuration (both match it against the real path, so
//!    a symbolic link cannot smuggle one in). A `command` engine cannot be told; it gets only
//!    the parts of the tree that hold no such name (see [`plan`]).
//! 2. The agent walks the paths itself ([`plan`]) and finds the regular files such names lead
//!    to. Each is given to a second run of the engine under a private alias (a symbolic link
//!    `<state>/scan-names.<pid>/<n>` to the file: clamscan prints the alias, never the name),
//!    and the finding is given the true path.
//! 3. The output is read strictly ([`parse`]): a finding must name an alias or a path under
//!    one of the paths the engine was given; anything else is dropped and logged.
//! 4. Paths in reports are escaped ([`escape`]): `\` as `\\`, control characters as `\n`,
//!    `\r`, `\t` or `\u{..}`, bytes that are not UTF-8 as `\xNN`; every other path reads as is.
//!
//! A `command` engine walks the parts it is given with its own rules, after the agent's walk: a
//! name created in between reaches its output. clamscan and clamdscan exclude it whenever it
//! appears; SECURITY.md says so.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use crate::durable;
use crate::proto::ScanFinding;

/// The exclusion given to clamscan (`--exclude`, `--exclude-dir`) and clamdscan
/// (`ExcludePath`): any control character. POSIX class, so it fits on a configuration line; the
/// engines run with `LC_ALL=C`, where it is exactly ASCII 0x00-0x1f and 0x7f.
pub(super) const CONTROL_CHARACTERS: &str = "[[:cntrl:]]";
/// Prefix of the directory of aliases, in the state directory; the pid follows.
const ALIASES_PREFIX: &str = "scan-names.";
/// Directories this many levels below a path asked for are not walked, by the agent or the
/// engine: clamscan gets it as `--max-dir-recursion`, clamdscan as `MaxDirectoryRecursion`
/// (both stop at 15 by default, which silently left deeper files unscanned). Anything deeper
/// makes the scan's result `error` ([`Plan::too_deep`]).
pub(super) const MAX_DEPTH: usize = 256;

/// Paths this long (bytes) or longer cannot be opened by name (`PATH_MAX`, its NUL included):
/// the engines skip them without a word (clamscan stops going down and still exits 0).
const PATH_MAX: usize = 4096;

/// Whether a name or path holds a character the engine's line output cannot carry.
pub(super) fn unprintable(bytes: &[u8]) -> bool {
    bytes.iter().any(|b| b.is_ascii_control())
}

/// A path as reports show it: `\` as `\\`, control characters as `\n`, `\r`, `\t` or
/// `\u{..}`, bytes that are not UTF-8 as `\xNN`. Two different paths never read the same.
pub fn escape(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '\n' => text.push_str("\\n"),
                '\r' => text.push_str("\\r"),
                '\t' => text.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(text, "\\u{{{:x}}}", c as u32);
                }
                c => text.push(c),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02x}");
        }
    }
    text
}

/// What the engine is given, from the agent's walk of the paths to scan.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// For clamscan and clamdscan: the paths asked for whose own path (and real path) is
    /// printable; the engine's exclusion keeps it from everything below them that is not.
    pub roots: Vec<PathBuf>,
    /// For a `command` engine: paths that reach every file of the tree that no unprintable
    /// name leads to, none of them holding one (the paths asked for where that is all of them).
    pub parts: Vec<PathBuf>,
    /// Regular files an unprintable name leads to, true paths: scanned through aliases.
    pub aliased: Vec<PathBuf>,
    /// Regular files the walk found, as the engine walks (aliased ones included): what a scan
    /// that ran to completion has scanned.
    pub files: u64,
    /// Paths asked for that do not resolve (missing, a dangling link, a file taken for a
    /// directory), each with why; they are given to no engine.
    pub missing: Vec<String>,
    /// Directories [`MAX_DEPTH`] levels down that hold something: neither the walk nor the
    /// engine went into them.
    pub too_deep: Vec<PathBuf>,
    /// Regular files whose path is longer than the engines can open ([`PATH_MAX`]): how many,
    /// and the first one found (the agent counts them through directory handles).
    pub too_long: u64,
    pub first_too_long: Option<PathBuf>,
}

/// Why `path` does not resolve (`err`: what `stat` said), naming the target of a dangling link.
fn unresolved(path: &Path, err: &std::io::Error) -> String {
    let shown = escape(path.as_os_str().as_bytes());
    match fs::read_link(path) {
        Ok(target) if err.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            format!(
                "`{shown}` is a link to `{}`, which leads back round to itself (a loop of \
                 symbolic links): point the link at a file or directory, or remove it",
                escape(target.as_os_str().as_bytes())
            )
        }
        Ok(target) => format!(
            "`{shown}` is a link to `{}`, which does not resolve ({err}): is it mounted?",
            escape(target.as_os_str().as_bytes())
        ),
        Err(_) => format!("`{shown}` does not exist ({err})"),
    }
}

/// Walks `paths` (absolute) the way the engine would: symbolic links inside the tree only when
/// `follow_symlinks`, `/proc` never. What cannot be read is left to the engine, which reports
/// it. `parts` is only worked out when `split` (a `command` engine).
pub(super) fn plan(paths: &[PathBuf], follow_symlinks: bool, split: bool) -> Plan {
    let mut walk = Walk {
        follow_symlinks,
        split,
        proc_dev: fs::metadata("/proc").ok().map(|m| m.dev()),
        visited: HashSet::new(),
        plan: Plan::default(),
    };
    for path in paths {
        // A path given directly is followed, link or not, as the engines do.
        let meta = fs::metadata(path);
        if let Err(err) = &meta
            && err.kind() != std::io::ErrorKind::PermissionDenied
        {
            walk.plan.missing.push(unresolved(path, err));
            continue;
        }
        let real_unprintable =
            fs::canonicalize(path).is_ok_and(|real| unprintable(real.as_os_str().as_bytes()));
        let bad = unprintable(path.as_os_str().as_bytes()) || real_unprintable;
        if !bad {
            walk.plan.roots.push(path.clone());
        }
        match meta {
            Ok(meta) if meta.is_dir() => {
                walk.visited.insert((meta.dev(), meta.ino()));
                if walk.directory(path, bad, 0) && !bad {
                    walk.plan.parts.push(path.clone());
                }
            }
            Ok(meta) if meta.is_file() => {
                walk.plan.files += 1;
                if bad {
                    walk.plan.aliased.push(path.clone());
                } else {
                    walk.plan.parts.push(path.clone());
                }
            }
            // Unreadable or special: the engine says what it is.
            _ if !bad => walk.plan.parts.push(path.clone()),
            _ => {}
        }
    }
    walk.plan
}

struct Walk {
    follow_symlinks: bool,
    split: bool,
    proc_dev: Option<u64>,
    /// Directories walked, by device and inode: links cannot make the walk go round.
    visited: HashSet<(u64, u64)>,
    plan: Plan,
}

impl Walk {
    /// Walks directory `dir` (`bad`: an unprintable name leads to it). Returns whether nothing
    /// unprintable is below it; when something is, the clean parts below are in `parts`.
    fn directory(&mut self, dir: &Path, bad: bool, depth: usize) -> bool {
        if depth >= MAX_DEPTH {
            if fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
                self.plan.too_deep.push(dir.to_owned());
            }
            return !bad;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return !bad;
        };
        let mut clean = !bad;
        let mut clean_children = Vec::new();
        for entry in entries.flatten() {
            let child = entry.path();
            let child_bad = bad || unprintable(entry.file_name().as_bytes());
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if child.as_os_str().len() >= PATH_MAX {
                self.too_long(dir, &entry.file_name(), &child, depth + 1);
                continue;
            }
            let (is_dir, is_file, meta) = if kind.is_symlink() {
                if !self.follow_symlinks {
                    // The engines skip links inside the tree unless told to follow them.
                    continue;
                }
                match fs::metadata(&child) {
                    Ok(meta) => (meta.is_dir(), meta.is_file(), Some(meta)),
                    Err(_) => continue,
                }
            } else {
                (kind.is_dir(), kind.is_file(), None)
            };
            if is_dir {
                let Some(meta) = meta.or_else(|| fs::symlink_metadata(&child).ok()) else {
                    continue;
                };
                if Some(meta.dev()) == self.proc_dev
                    || !self.visited.insert((meta.dev(), meta.ino()))
                {
                    continue;
                }
                // Through a followed link, the engine's exclusion sees the real path.
                let child_bad = child_bad
                    || (kind.is_symlink()
                        && fs::canonicalize(&child)
                            .is_ok_and(|real| unprintable(real.as_os_str().as_bytes())));
                if self.directory(&child, child_bad, depth + 1) && !child_bad {
                    clean_children.push(child);
                } else {
                    clean = false;
                }
            } else if is_file {
                self.plan.files += 1;
                let child_bad = child_bad
                    || (kind.is_symlink()
                        && fs::canonicalize(&child)
                            .is_ok_and(|real| unprintable(real.as_os_str().as_bytes())));
                if child_bad {
                    self.plan.aliased.push(child);
                    clean = false;
                } else if self.split {
                    clean_children.push(child);
                }
            }
        }
        if !clean && self.split {
            self.plan.parts.extend(clean_children);
        }
        clean
    }
}

impl Walk {
    /// Counts `name` in `parent` (a path the engine cannot open: `path`) if a regular file, or
    /// the regular files below it if a directory (links not followed, depth bounded), opened
    /// relative to their parents.
    fn too_long(&mut self, parent: &Path, name: &std::ffi::OsStr, path: &Path, depth: usize) {
        use rustix::fs::{AtFlags, CWD, Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Ok(parent) = rustix::fs::openat(CWD, parent, flags, Mode::empty()) else {
            return;
        };
        // Each entry holds its directory's handle, shared by its siblings.
        let mut stack = vec![(Arc::new(parent), name.to_owned(), path.to_owned(), depth)];
        while let Some((at, name, path, depth)) = stack.pop() {
            let Ok(stat) = rustix::fs::statat(&*at, &name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
                rustix::fs::FileType::RegularFile => {
                    self.plan.too_long += 1;
                    if self.plan.first_too_long.is_none() {
                        self.plan.first_too_long = Some(path);
                    }
                }
                rustix::fs::FileType::Directory if depth < MAX_DEPTH => {
                    let Ok(dir) = rustix::fs::openat(&*at, &name, flags, Mode::empty()) else {
                        continue;
                    };
                    let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
                        continue;
                    };
                    let dir = Arc::new(dir);
                    for entry in entries.flatten() {
                        let child = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
                        if child != "." && child != ".." {
                            let entry = (Arc::clone(&dir), child.to_owned(), path.join(child));
                            stack.push((entry.0, entry.1, entry.2, depth + 1));
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// The private aliases of one scan: `<state>/scan-names.<pid>/<n>` links to the true paths,
/// removed on drop.
pub(super) struct Aliases {
    dir: PathBuf,
    /// Alias path (as the engine prints it) to the true path.
    targets: BTreeMap<Vec<u8>, PathBuf>,
}

impl Aliases {
    /// Makes an alias for each of `paths` in a fresh directory of `state_dir` (0700), after
    /// removing the alias directories of agent processes that no longer run.
    pub(super) fn create(state_dir: &Path, paths: &[PathBuf]) -> Result<Aliases> {
        remove_leftovers(state_dir);
        let dir = state_dir.join(format!("{ALIASES_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        durable::create_private_dir(&dir, 0o700)
            .map_err(super::super::io_error("create directory", &dir))?;
        let mut aliases = Aliases {
            dir,
            targets: BTreeMap::new(),
        };
        for (n, path) in paths.iter().enumerate() {
            let alias = aliases.dir.join(n.to_string());
            std::os::unix::fs::symlink(path, &alias)
                .map_err(super::super::io_error("create the alias", &alias))?;
            aliases
                .targets
                .insert(alias.into_os_string().into_vec(), path.clone());
        }
        Ok(aliases)
    }

    /// The alias paths, in order.
    pub(super) fn paths(&self) -> Vec<PathBuf> {
        self.targets
            .keys()
            .map(|alias| PathBuf::from(OsString::from_vec(alias.clone())))
            .collect()
    }

    /// Writes the alias paths one per line (clamscan's `--file-list`); its path.
    pub(super) fn file_list(&self) -> Result<PathBuf> {
        let path = self.dir.join("list");
        let mut text = Vec::new();
        for alias in self.targets.keys() {
            text.extend_from_slice(alias);
            text.push(b'\n');
        }
        fs::write(&path, text).map_err(super::super::io_error("write", &path))?;
        Ok(path)
    }

    fn target(&self, printed: &[u8]) -> Option<&Path> {
        self.targets.get(printed).map(PathBuf::as_path)
    }
}

impl Drop for Aliases {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes alias directories left by agent processes killed during a scan.
fn remove_leftovers(state_dir: &Path) {
    let Ok(entries) = fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(ALIASES_PREFIX)) else {
            continue;
        };
        let running = pid.parse::<u32>().is_ok_and(|pid| {
            pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
        });
        if !running {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// What one run of an engine printed: its findings and its `Scanned files: N`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Parsed {
    pub findings: Vec<ScanFinding>,
    pub files_scanned: Option<u64>,
    /// Finding lines that named no path the engine was given (dropped).
    pub dropped: Vec<String>,
}

/// Reads an engine's stdout: one finding per line, `PATH: SIGNATURE FOUND`, whose path must
/// be an alias (its true path is reported) or lie under one of `given`; the last
/// `Scanned files: N` line. Paths come out escaped.
pub(super) fn parse(stdout: &[u8], given: &[PathBuf], aliases: Option<&Aliases>) -> Parsed {
    let mut parsed = Parsed::default();
    for line in stdout.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_suffix(b" FOUND")
            && let Some(at) = rest.windows(2).rposition(|w| w == b": ")
        {
            let (path, signature) = (&rest[..at], &rest[at + 2..]);
            let signature = String::from_utf8_lossy(signature).trim().to_string();
            if path.is_empty() || signature.is_empty() {
                continue;
            }
            let path = match aliases.and_then(|a| a.target(path)) {
                Some(target) => escape(target.as_os_str().as_bytes()),
                None if under_any(path, given) => escape(path),
                None => {
                    parsed.dropped.push(escape(line));
                    continue;
                }
            };
            parsed.findings.push(ScanFinding { path, signature });
        } else if let Some(count) = line.strip_prefix(b"Scanned files: ")
            && let Ok(count) = String::from_utf8_lossy(count).trim().parse()
        {
            parsed.files_scanned = Some(count);
        }
    }
    parsed
}

/// Whether `path` is one of `given` or below one.
fn under_any(path: &[u8], given: &[PathBuf]) -> bool {
    given.iter().any(|root| {
        let root = root.as_os_str().as_bytes();
        let root = match root.iter().rposition(|&b| b != b'/') {
            Some(last) => &root[..=last],
            None => b"" as &[u8],
        };
        path.strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn os(bytes: &[u8]) -> &OsStr {
        OsStr::from_bytes(bytes)
    }

    fn check_escape(bytes: &[u8], expected: &str) {
        assert_eq!(escape(bytes), expected, "{bytes:?}");
    }

    #[test]
    fn paths_are_escaped_so_that_two_never_read_the_same() {
        check_escape(b"/srv/plain name.txt", "/srv/plain name.txt");
        check_escape("/srv/é".as_bytes(), "/srv/é");
        check_escape(b"/d/evil\n/etc", "/d/evil\\n/etc");
        check_escape(b"a\rb\tc\x1b\x7f", "a\\rb\\tc\\u{1b}\\u{7f}");
        check_escape(b"/x/\xff\xfe", "/x/\\xff\\xfe");
        // A backslash is escaped too: `a\n` (two characters) differs from a newline.
        check_escape(b"a\\n", "a\\\\n");
        assert_ne!(escape(b"a\\n"), escape(b"a\n"));
        assert!(unprintable(b"a\nb") && unprintable(b"\x7f") && !unprintable("é".as_bytes()));
    }

    fn finding(path: &str, signature: &str) -> ScanFinding {
        ScanFinding {
            path: path.into(),
            signature: signature.into(),
        }
    }

    #[test]
    fn findings_must_name_a_given_path_and_the_summary_is_read() {
        let stdout = b"/d/eicar.com: Eicar-Test-Signature FOUND\n\
                       /d/odd: name.txt: Fake.Sig FOUND\r\n\
                       /etc/passwd: Backdoor.Fake FOUND\n\
                       /dd/x: Near.Miss FOUND\n\
                       x: Eicar-Test-Signature FOUND\n\
                       /d/clean.txt: OK\n\
                       \n----------- SCAN SUMMARY -----------\n\
                       Scanned files: 3\nInfected files: 2\n";
        let parsed = parse(stdout, &[PathBuf::from("/d/")], None);
        assert_eq!(
            parsed.findings,
            [
                finding("/d/eicar.com", "Eicar-Test-Signature"),
                finding("/d/odd: name.txt", "Fake.Sig")
            ]
        );
        assert_eq!(parsed.files_scanned, Some(3));
        assert_eq!(parsed.dropped.len(), 3, "{:?}", parsed.dropped);
        assert_eq!(parse(b"FOUND\n: FOUND\n", &[], None), Parsed::default());
        // Everything is under `/`.
        let all = parse(b"/etc/x: S FOUND\n", &[PathBuf::from("/")], None);
        assert_eq!(all.findings, [finding("/etc/x", "S")]);
    }

    #[test]
    fn an_alias_finding_names_the_true_path() {
        let state = tempfile::tempdir().unwrap();
        let target = PathBuf::from(os(b"/srv/d\n/srv/report.txt"));
        let aliases = Aliases::create(state.path(), std::slice::from_ref(&target)).unwrap();
        let alias = &aliases.paths()[0];
        assert_eq!(fs::read_link(alias).unwrap(), target);
        let mut stdout = alias.as_os_str().as_bytes().to_vec();
        stdout.extend_from_slice(b": Eicar-Test-Signature FOUND\n");
        let parsed = parse(&stdout, &[], Some(&aliases));
        assert_eq!(
            parsed.findings,
            [finding("/srv/d\\n/srv/report.txt", "Eicar-Test-Signature")]
        );
        let dir = alias.parent().unwrap().to_owned();
        drop(aliases);
        assert!(!dir.exists(), "the aliases go with the scan");
    }

    #[test]
    fn the_walk_finds_what_unprintable_names_lead_to_and_the_parts_without_them() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let file = |relative: &[u8]| {
            let path = root.join(os(relative));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, b"x").unwrap();
            path
        };
        let clean_dir_file = file(b"clean/a.txt");
        let top = file(b"top.txt");
        let in_bad_dir = file(b"mixed/evil\n/etc/passwd");
        let bad_name = file(b"mixed/b\tc");
        let beside = file(b"mixed/ok.txt");
        let deep_clean = file(b"mixed/sub/deep.txt");
        // A link to a bad name is skipped unless links are followed.
        std::os::unix::fs::symlink(&bad_name, root.join("link")).unwrap();

        let plan_of = |follow, split| {
            let mut plan = plan(&[root.to_owned()], follow, split);
            plan.parts.sort();
            plan.aliased.sort();
            plan
        };
        let mut aliased = vec![in_bad_dir.clone(), bad_name.clone()];
        aliased.sort();
        let clamav = plan_of(false, false);
        assert_eq!(clamav.roots, [root.to_owned()]);
        assert_eq!(clamav.aliased, aliased);
        assert!(clamav.parts.is_empty(), "{:?}", clamav.parts);

        let command = plan_of(false, true);
        let mut parts = vec![
            root.join("clean"),
            top.clone(),
            beside.clone(),
            root.join("mixed/sub"),
        ];
        parts.sort();
        assert_eq!(command.parts, parts);
        for file in [&clean_dir_file, &deep_clean] {
            assert!(parts.iter().any(|part| file.starts_with(part)), "{file:?}");
        }

        let followed = plan_of(true, false);
        assert!(
            followed.aliased.contains(&root.join("link")),
            "{followed:?}"
        );

        // A path asked for that holds a control character: none of it goes to the engine's
        // own walk; its files go through aliases.
        let bad_root = root.join(os(b"mixed/evil\n"));
        let whole = plan(std::slice::from_ref(&bad_root), false, true);
        assert!(
            whole.roots.is_empty() && whole.parts.is_empty(),
            "{whole:?}"
        );
        assert_eq!(whole.aliased, [in_bad_dir]);
        assert_eq!((clamav.files, command.files, followed.files), (6, 6, 7));
        // Paths that do not resolve go to no engine: missing, a dangling link.
        let missing = root.join("missing");
        let dangling = root.join("data-link");
        std::os::unix::fs::symlink("/mnt/not-mounted", &dangling).unwrap();
        let left = plan(&[missing, dangling, top.clone()], false, true);
        assert_eq!(
            (left.roots, left.parts, left.files),
            (vec![top.clone()], vec![top], 1)
        );
        assert_eq!(left.missing.len(), 2, "{:?}", left.missing);
        assert!(
            left.missing[0].starts_with(&format!("`{}/missing` does not exist", root.display()))
        );
        assert!(
            left.missing[1].contains("is a link to `/mnt/not-mounted`, which does not resolve"),
            "{:?}",
            left.missing
        );
    }

    #[test]
    fn directories_past_the_depth_limit_are_named_not_skipped_in_silence() {
        let root = tempfile::tempdir().unwrap();
        let mut deepest_walked = root.path().to_owned();
        for level in 1..MAX_DEPTH {
            deepest_walked.push(format!("{level}"));
        }
        let too_deep = deepest_walked.join(MAX_DEPTH.to_string());
        fs::create_dir_all(&too_deep).unwrap();
        fs::write(deepest_walked.join("deep-enough"), b"x").unwrap();
        let walked = plan(&[root.path().to_owned()], false, false);
        assert!(
            walked.too_deep.is_empty(),
            "an empty directory past the limit is no loss"
        );
        assert_eq!(walked.files, 1);
        fs::write(too_deep.join("too-deep"), b"x").unwrap();
        let walked = plan(&[root.path().to_owned()], false, false);
        assert_eq!((walked.too_deep, walked.files), (vec![too_deep], 1));
    }
}
