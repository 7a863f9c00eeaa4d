//! Scan profiles (DESIGN.md section 3): a named scan configuration the manager keeps and gives to
//! agents. Two modes, as in the seed's config editor:
//!
//! - `form`: typed keys ([`ScanOptions`]) that each engine adapter renders into its own
//!   arguments (`clamav`: `clamscan` options such as `--exclude-dir=REGEX`);
//! - `file`: raw configuration text for a `command` engine, written to the agent's
//!   `profile.conf` and handed to the engine where its `scan_command` says `{profile}`.
//!
//! `default` always exists (an empty form). Every value is checked here, on the manager before it
//! is stored and again on the agent before it is used; values only ever become single argv
//! entries (`--key=value`), never shell text.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The profile every host has until given another; it cannot be deleted.
pub const DEFAULT_PROFILE: &str = "default";
/// At most this much text in a `file` profile.
pub const MAX_FILE_TEXT: usize = 64 * 1024;
/// At most this many characters in one pattern.
const MAX_PATTERN: usize = 1024;
/// At most this many patterns per list key.
const MAX_PATTERNS: usize = 256;

/// A problem with a profile, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProfileError(pub String);

fn problem(text: impl Into<String>) -> ProfileError {
    ProfileError(text.into())
}

/// The form keys: what the engine adapters understand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanOptions {
    /// Skip files whose path matches one of these regular expressions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Skip directories whose path matches one of these regular expressions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_dir: Vec<String>,
    /// Skip files larger than this many MiB (1..=4000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_filesize_mb: Option<u32>,
    /// Scan at most this many MiB of each file, archives included (1..=4000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_scansize_mb: Option<u32>,
    /// Nesting depth of archives (1..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recursion: Option<u32>,
    /// Look inside archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_archive: Option<bool>,
    /// Report potentially unwanted applications too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_pua: Option<bool>,
    /// Follow symbolic links to files and directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_symlinks: Option<bool>,
}

/// The form keys `--set` accepts, with what each takes.
pub const FORM_KEYS: &[(&str, &str)] = &[
    (
        "exclude",
        "regular expression of files to skip (repeatable)",
    ),
    (
        "exclude_dir",
        "regular expression of directories to skip (repeatable)",
    ),
    ("max_filesize_mb", "skip larger files, 1..=4000"),
    (
        "max_scansize_mb",
        "scan at most this much of a file, 1..=4000",
    ),
    ("max_recursion", "archive nesting depth, 1..=100"),
    ("scan_archive", "yes or no"),
    ("detect_pua", "yes or no"),
    ("follow_symlinks", "yes or no"),
];

fn check_pattern(key: &str, pattern: &str) -> Result<(), ProfileError> {
    if pattern.is_empty() || pattern.chars().count() > MAX_PATTERN {
        return Err(problem(format!(
            "`{key}` patterns must have 1 to {MAX_PATTERN} characters"
        )));
    }
    if pattern.chars().any(char::is_control) {
        return Err(problem(format!(
            "`{key}` pattern `{}` contains a control character",
            pattern.escape_default()
        )));
    }
    Ok(())
}

fn check_range(key: &str, value: Option<u32>, max: u32) -> Result<(), ProfileError> {
    match value {
        Some(v) if v == 0 || v > max => Err(problem(format!("`{key}` must be 1..={max}, not {v}"))),
        _ => Ok(()),
    }
}

impl ScanOptions {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ProfileError> {
        for (key, list) in [
            ("exclude", &self.exclude),
            ("exclude_dir", &self.exclude_dir),
        ] {
            if list.len() > MAX_PATTERNS {
                return Err(problem(format!(
                    "`{key}` has {} patterns; at most {MAX_PATTERNS}",
                    list.len()
                )));
            }
            for pattern in list {
                check_pattern(key, pattern)?;
            }
        }
        check_range("max_filesize_mb", self.max_filesize_mb, 4000)?;
        check_range("max_scansize_mb", self.max_scansize_mb, 4000)?;
        check_range("max_recursion", self.max_recursion, 100)?;
        Ok(())
    }

    /// Sets one form key from its text (`--set key=value`); list keys accumulate.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        fn number(key: &str, value: &str) -> Result<Option<u32>, ProfileError> {
            value
                .parse()
                .map(Some)
                .map_err(|_| problem(format!("`{key}` takes a whole number, not `{value}`")))
        }
        fn flag(key: &str, value: &str) -> Result<Option<bool>, ProfileError> {
            match value.to_ascii_lowercase().as_str() {
                "yes" | "true" | "1" | "on" => Ok(Some(true)),
                "no" | "false" | "0" | "off" => Ok(Some(false)),
                _ => Err(problem(format!("`{key}` takes yes or no, not `{value}`"))),
            }
        }
        match key {
            "exclude" => self.exclude.push(value.to_string()),
            "exclude_dir" => self.exclude_dir.push(value.to_string()),
            "max_filesize_mb" => self.max_filesize_mb = number(key, value)?,
            "max_scansize_mb" => self.max_scansize_mb = number(key, value)?,
            "max_recursion" => self.max_recursion = number(key, value)?,
            "scan_archive" => self.scan_archive = flag(key, value)?,
            "detect_pua" => self.detect_pua = flag(key, value)?,
            "follow_symlinks" => self.follow_symlinks = flag(key, value)?,
            _ => {
                let known: Vec<&str> = FORM_KEYS.iter().map(|(k, _)| *k).collect();
                return Err(problem(format!(
                    "`{key}` is not a profile key (known: {})",
                    known.join(", ")
                )));
            }
        }
        self.validate()
    }

    /// `clamscan` options for these keys, one argv entry each.
    pub fn clamscan_args(&self) -> Vec<String> {
        let yes_no = |v: bool| if v { "yes" } else { "no" };
        let mut args = Vec::new();
        args.extend(self.exclude.iter().map(|p| format!("--exclude={p}")));
        args.extend(
            self.exclude_dir
                .iter()
                .map(|p| format!("--exclude-dir={p}")),
        );
        if let Some(mb) = self.max_filesize_mb {
            args.push(format!("--max-filesize={mb}M"));
        }
        if let Some(mb) = self.max_scansize_mb {
            args.push(format!("--max-scansize={mb}M"));
        }
        if let Some(depth) = self.max_recursion {
            args.push(format!("--max-recursion={depth}"));
        }
        if let Some(v) = self.scan_archive {
            args.push(format!("--scan-archive={}", yes_no(v)));
        }
        if let Some(v) = self.detect_pua {
            args.push(format!("--detect-pua={}", yes_no(v)));
        }
        if let Some(v) = self.follow_symlinks {
            // 2: follow always, 0: never.
            let level = if v { 2 } else { 0 };
            args.push(format!("--follow-dir-symlinks={level}"));
            args.push(format!("--follow-file-symlinks={level}"));
        }
        args
    }
}

/// What a profile holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ProfileBody {
    /// Typed keys.
    Form {
        /// The keys.
        options: ScanOptions,
    },
    /// Raw configuration text for a `command` engine.
    File {
        /// The text.
        text: String,
    },
}

/// A named scan profile, as stored by the manager and sent to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// Its content.
    #[serde(flatten)]
    pub body: ProfileBody,
}

/// Checks a profile (or host group) name: 1 to 64 letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<(), ProfileError> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(problem(format!(
            "`{name}` is not a name (1 to 64 letters, digits, `-`, `_`, `.`)"
        )));
    }
    Ok(())
}

impl Profile {
    /// The built-in `default`: an empty form (the engine's own defaults).
    pub fn default_profile() -> Profile {
        Profile {
            name: DEFAULT_PROFILE.into(),
            body: ProfileBody::Form {
                options: ScanOptions::default(),
            },
        }
    }

    /// Checks the name and every value.
    pub fn validate(&self) -> Result<(), ProfileError> {
        check_name(&self.name)?;
        match &self.body {
            ProfileBody::Form { options } => options.validate(),
            ProfileBody::File { text } => {
                if text.len() > MAX_FILE_TEXT {
                    return Err(problem(format!(
                        "the profile text has {} bytes; at most {MAX_FILE_TEXT}",
                        text.len()
                    )));
                }
                if text.contains('\0') {
                    return Err(problem("the profile text contains a NUL byte"));
                }
                Ok(())
            }
        }
    }

    /// `form` or `file`.
    pub fn mode(&self) -> &'static str {
        match self.body {
            ProfileBody::Form { .. } => "form",
            ProfileBody::File { .. } => "file",
        }
    }

    /// The text a `command` engine reads (`{profile}`): the form keys as TOML, or the file.
    pub fn rendered(&self) -> String {
        match &self.body {
            ProfileBody::Form { options } => {
                toml::to_string(options).expect("scan options always serialise")
            }
            ProfileBody::File { text } => text.clone(),
        }
    }

    /// A one-line summary for tables.
    pub fn summary(&self) -> String {
        match &self.body {
            ProfileBody::Form { options } => {
                let value = serde_json::to_value(options).expect("scan options serialise");
                let keys: BTreeMap<String, serde_json::Value> =
                    serde_json::from_value(value).unwrap_or_default();
                if keys.is_empty() {
                    "(engine defaults)".into()
                } else {
                    keys.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            }
            ProfileBody::File { text } => format!("{} bytes of text", text.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_keys_become_one_clamscan_option_each() {
        let mut options = ScanOptions::default();
        options.set("exclude_dir", "^/proc").unwrap();
        options.set("exclude_dir", "^/sys").unwrap();
        options.set("max_filesize_mb", "100").unwrap();
        options.set("scan_archive", "no").unwrap();
        options.set("follow_symlinks", "yes").unwrap();
        assert_eq!(
            options.clamscan_args(),
            [
                "--exclude-dir=^/proc",
                "--exclude-dir=^/sys",
                "--max-filesize=100M",
                "--scan-archive=no",
                "--follow-dir-symlinks=2",
                "--follow-file-symlinks=2"
            ]
        );
    }

    #[test]
    fn bad_form_values_are_refused_with_the_key_named() {
        let mut options = ScanOptions::default();
        for (key, value, expected) in [
            ("max_filesize_mb", "lots", "whole number"),
            ("max_filesize_mb", "0", "1..=4000"),
            ("max_recursion", "1000", "1..=100"),
            ("scan_archive", "maybe", "yes or no"),
            ("exclude", "", "1 to 1024"),
            ("exclude", "a\nb", "control character"),
            ("shell", "rm -rf /", "not a profile key"),
        ] {
            let mut copy = options.clone();
            let err = copy.set(key, value).unwrap_err().to_string();
            assert!(err.contains(expected), "{key}={value}: {err}");
        }
        options.set("detect_pua", "yes").unwrap();
        assert_eq!(options.detect_pua, Some(true));
    }

    #[test]
    fn profiles_travel_as_tagged_json_and_are_checked_on_arrival() {
        let profile = Profile {
            name: "servers".into(),
            body: ProfileBody::Form {
                options: ScanOptions {
                    exclude: vec!["\\.log$".into()],
                    ..ScanOptions::default()
                },
            },
        };
        let json = serde_json::to_string(&profile).unwrap();
        assert!(json.contains("\"mode\":\"form\""), "{json}");
        assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), profile);
        let hostile: Profile =
            serde_json::from_str(r#"{"name":"../x","mode":"file","text":"MaxSize=1"}"#).unwrap();
        assert!(hostile.validate().is_err());
        let unknown =
            serde_json::from_str::<Profile>(r#"{"name":"x","mode":"form","options":{"run":"sh"}}"#);
        assert!(unknown.is_err());
        assert_eq!(Profile::default_profile().summary(), "(engine defaults)");
    }
}
