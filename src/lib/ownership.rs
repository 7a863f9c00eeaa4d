//! Who owns a manager home. Every pm command that writes `PM_HOME` runs as the one user that
//! owns it (the `pm` service user on a packaged install): an entry another user wrote there (a
//! `sudo pm-mirror sync` by hand leaves root's revisions, views and keys behind) stops the
//! owner's next run halfway, when it cannot remove or read it. So writers check before they
//! change anything ([`check_home`]) and `pm-doctor` fails on such entries ([`foreign_entries`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cli::UserError;

/// What pm writes in a home, relative to it: every entry below these must belong to the home's
/// user. Licenses, agents' files and `pm.toml` are read only (or belong to other tools).
const WRITTEN: &[&str] = &[
    "repo",
    "pki",
    "trust",
    "inventory.duckdb",
    "inventory.duckdb.wal",
];

/// How many foreign entries a message names before it says "and N more".
const NAMED: usize = 3;

/// The effective user of this process: the owner of `/proc/self` (no libc, no unsafe).
pub fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The login name of `uid` from `/etc/passwd` (system users such as `pm` live there).
pub fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let found: u32 = fields.nth(1)?.parse().ok()?;
        (found == uid).then(|| name.to_string())
    })
}

/// `root (uid 0)`, or `uid 1234` when the uid has no name.
pub fn describe_user(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The name `chown` takes for `uid`: the login name, else the number.
fn chown_name(uid: u32) -> String {
    user_name(uid).unwrap_or_else(|| uid.to_string())
}

/// An entry of a home owned by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignEntry {
    /// The file or directory.
    pub path: PathBuf,
    /// Its owner.
    pub uid: u32,
}

/// The files and directories pm writes in `home` (the home itself, `repo/`, `pki/`, `trust/`,
/// the inventory) that `uid` does not own, in directory order. A foreign directory is named
/// once, not everything below it (`chown -R` repairs it all). Symbolic links are not counted:
/// replacing or removing one takes its directory, which is counted. Missing paths are fine.
pub fn foreign_entries(home: &Path, uid: u32) -> Vec<ForeignEntry> {
    let mut found = Vec::new();
    if let Ok(metadata) = std::fs::metadata(home)
        && metadata.uid() != uid
    {
        found.push(ForeignEntry {
            path: home.to_owned(),
            uid: metadata.uid(),
        });
    }
    for relative in WRITTEN {
        walk(&home.join(relative), uid, &mut found);
    }
    found
}

/// Adds `path` to `found` when another user owns it, else (for a directory, not a link to
/// one) looks below it.
fn walk(path: &Path, uid: u32, found: &mut Vec<ForeignEntry>) {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return;
    };
    if metadata.file_type().is_symlink() {
        return;
    }
    if metadata.uid() != uid {
        found.push(ForeignEntry {
            path: path.to_owned(),
            uid: metadata.uid(),
        });
        return;
    }
    if !metadata.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    let mut children: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    children.sort();
    for child in children {
        walk(&child, uid, found);
    }
}

/// `a`, `b` and `c` (owned by ...) and N more: the first few foreign entries for a message.
pub fn name_foreign(entries: &[ForeignEntry]) -> String {
    let mut named: Vec<String> = entries
        .iter()
        .take(NAMED)
        .map(|entry| {
            format!(
                "`{}` (owned by {})",
                entry.path.display(),
                describe_user(entry.uid)
            )
        })
        .collect();
    if entries.len() > NAMED {
        named.push(format!("{} more", entries.len() - NAMED));
    }
    named.join(", ")
}

/// The `chown` that gives `home` back to `uid`.
pub fn chown_hint(home: &Path, uid: u32) -> String {
    let name = chown_name(uid);
    format!("chown -R {name}: {}", home.display())
}

/// Refuses to write `home` unless this process may, before anything changes:
///
/// - root on a home another user owns is refused (exit 2): what it wrote would belong to root
///   and stop that user's own runs (the service units run as `pm`); run it as the owner;
/// - an entry pm writes that this user does not own (left by such a run) is a failure (exit 1)
///   naming the path and its owner, with the `chown` that repairs it.
///
/// `command` names the command for the hint (`pm-mirror sync`). A home that does not exist
/// yet is fine (it is created by this user).
pub fn check_home(home: &Path, command: &str) -> Result<(), UserError> {
    let Some(me) = effective_uid() else {
        return Ok(());
    };
    let Ok(metadata) = std::fs::metadata(home) else {
        return Ok(());
    };
    let owner = metadata.uid();
    if me == 0 && owner != 0 {
        return Err(UserError::usage(format!(
            "refusing to run as root on `{}`, which belongs to {}: what root writes there stops \
             that user's own runs",
            home.display(),
            describe_user(owner)
        ))
        .with_hint(format!(
            "run it as the owner: `sudo -u {} {command}`",
            chown_name(owner)
        )));
    }
    let foreign = foreign_entries(home, me);
    if foreign.is_empty() {
        return Ok(());
    }
    Err(UserError::failure(format!(
        "{} in `{}` belong to another user than {}, who runs this command: nothing was changed",
        name_foreign(&foreign),
        home.display(),
        describe_user(me)
    ))
    .with_hint(format!(
        "give them back as root: `{}`, then run again (a command run as root in this home left \
         them; run pm as the home's owner)",
        chown_hint(home, me)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_entries_name_what_another_user_owns_below_what_pm_writes() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path();
        for dir in ["repo/revisions/r1/clamav", "pki", "licenses"] {
            std::fs::create_dir_all(path.join(dir)).unwrap();
        }
        std::fs::write(path.join("repo/revisions/r1/clamav/test.cvd"), "x").unwrap();
        std::os::unix::fs::symlink("revisions/r1", path.join("repo/latest")).unwrap();
        let me = std::fs::metadata(path).unwrap().uid();
        assert_eq!(foreign_entries(path, me), []);
        // Seen from another user, the home and the top of what pm writes are foreign; what is
        // below a foreign directory, licenses and links are not named.
        let other = me + 1;
        let foreign: Vec<String> = foreign_entries(path, other)
            .iter()
            .map(|entry| {
                assert_eq!(entry.uid, me);
                entry.path.strip_prefix(path).unwrap().display().to_string()
            })
            .collect();
        assert_eq!(foreign, ["", "repo", "pki"]);
        let named = name_foreign(&foreign_entries(path, other));
        assert!(!named.contains("more"), "{named}");
    }

    #[test]
    fn the_chown_hint_names_the_user_or_its_number() {
        assert_eq!(
            chown_hint(Path::new("/var/lib/pm"), 0),
            "chown -R root: /var/lib/pm"
        );
        assert_eq!(
            chown_hint(Path::new("/h"), 4_000_000_000),
            "chown -R 4000000000: /h"
        );
        assert_eq!(describe_user(0), "root (uid 0)");
    }
}
