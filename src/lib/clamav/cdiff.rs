//! Incremental database updates: applies ClamAV cdiffs to a `.cvd` or `.cld` on disk and writes
//! the `.cld` freshclam would write, verified end to end with ClamAV's keys.
//!
//! Reimplemented from ClamAV (`libclamav_rust/src/cdiff.rs` for the script, `buildcld` and
//! `mkdir_and_chdir_for_cdiff_tmp` in `libfreshclam/libfreshclam_internal.c` for the rest):
//!
//! * The database is unpacked into a work directory, one file per tar member, after its own
//!   check (a CVD's MD5 and signature, then for CVD and CLD alike the signed `.info` against
//!   every member, as [`super::verify_cld`] does).
//! * Each cdiff's signature is checked ([`super::verify_cdiff`]), its header version must be
//!   the next one, and its gzip script runs against the directory. Script lines are
//!   `COMMAND args`; lines starting with `#` are comments, anything else unknown is an error.
//!   - `OPEN name` selects a file; it need not exist (a new file is created by its `ADD`s).
//!   - `ADD text` queues `text` (with the script line's newline) to be appended at `CLOSE`,
//!     after the existing lines, in script order.
//!   - `DEL n prefix` and `XCHG n prefix new line` delete or replace line `n` (1-based) of the
//!     file as it was at `OPEN`; the line must start with `prefix` (one space-free word), which
//!     is ClamAV's integrity check.
//!   - `CLOSE` applies the edits by streaming the file into a new one (every line must end with
//!     a newline then, and every edited line must exist), then appends the additions.
//!   - `MOVE src dst n1 prefix1 n2 prefix2` moves lines `n1..=n2` of `src` to the end of the
//!     existing file `dst`; lines `n1` and `n2` must start with their prefixes. No file may be
//!     open, and as in ClamAV (which never finishes a one-line move) `n2` must exceed `n1`.
//!   - `UNLINK name` deletes a file; no file may be open.
//! * The result is written as freshclam's `buildcld` does: the first line of the new `.info`,
//!   space-padded to 512 bytes, as the header (md5 and dsig are "X"), then the tar, here
//!   gzip-compressed (freshclam writes it plain; libclamav reads either).
//!   Members keep their order; new ones follow in the order the `.info` lists them.
//!
//! Stricter than ClamAV, never for cdiffs Talos publishes: names in scripts must be plain ASCII
//! file names (letters, digits, `.`, `_`, not starting with `.`; ClamAV also takes other
//! Unicode letters and does not check `MOVE`'s names at all); two edits of one line, a script
//! that ends with a file open, or a last line without a newline are errors (ClamAV lets the
//! later edit win, drops the pending edits, or panics).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use openssl::hash::{Hasher, MessageDigest};

use super::{
    Bounded, CVD_HEADER_LEN, ClamavError, CvdHeader, HASH_CHUNK, INFO_MAX_LEN, INFO_SUFFIX,
    body_inflate_limit, check_cvd_signature, check_tarball, ends_with_ignore_case,
    parse_cdiff_header, parse_cvd_header, parse_info, scan_database_body, verify_cdiff, verify_cld,
};

/// Scratch file `CLOSE` streams a rewritten file into; member names never start with `.`.
const CLOSE_SCRATCH: &str = ".cdiff-close";

/// Scratch file `MOVE` streams the remaining lines of its source into.
const MOVE_SCRATCH: &str = ".cdiff-move";

/// Longest member name: the tar name field libclamav reads (no long-name extensions).
const MAX_NAME_LEN: usize = 100;

/// How much of a script line an error quotes.
const QUOTE_LEN: usize = 80;

/// Why cdiffs could not be applied; the caller falls back to downloading the whole `.cvd`.
#[derive(Debug, thiserror::Error)]
pub enum CdiffError {
    /// A file system step failed.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done, e.g. "read".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The database to update does not verify (or cannot be unpacked).
    #[error("database `{path}` does not verify: {source}")]
    Database {
        /// The `.cvd` or `.cld`.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ClamavError,
    },
    /// A cdiff's signature or header does not verify.
    #[error("cdiff `{path}` does not verify: {source}")]
    Cdiff {
        /// The cdiff.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ClamavError,
    },
    /// A cdiff is not the next one: a gap, a repeat, or one for another database version.
    #[error("cdiff `{path}` makes version {found}, but the next version is {expected}")]
    WrongVersion {
        /// The cdiff.
        path: PathBuf,
        /// The version after the database's (or the previous cdiff's).
        expected: u32,
        /// The version in the cdiff's header.
        found: u32,
    },
    /// A cdiff's script does not apply to the database.
    #[error("cdiff `{path}` does not apply: {source}")]
    Script {
        /// The cdiff.
        path: PathBuf,
        /// Which script line failed and why (boxed: it is the largest variant by far).
        #[source]
        source: Box<ScriptError>,
    },
    /// The `.cld` built from the updated files does not verify.
    #[error("the cld built for `{path}` does not verify: {source}")]
    Result {
        /// Where it was to be written.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ClamavError,
    },
    /// The `.cld` built verifies but is not of the version the last cdiff makes.
    #[error("the cld built for `{path}` has version {found}, expected {expected}")]
    ResultVersion {
        /// Where it was to be written.
        path: PathBuf,
        /// Version of the last cdiff.
        expected: u32,
        /// Version in the built `.cld`.
        found: u32,
    },
}

/// A cdiff script line that failed.
#[derive(Debug, thiserror::Error)]
#[error("script line {line} `{command}`: {fault}")]
pub struct ScriptError {
    /// 1-based line number in the (inflated) script.
    pub line: usize,
    /// The line, cut after 80 bytes.
    pub command: String,
    /// What went wrong.
    #[source]
    pub fault: ScriptFault,
}

/// What can go wrong with one script line.
#[derive(Debug, thiserror::Error)]
pub enum ScriptFault {
    /// The script could not be read (corrupt gzip, inflates too far).
    #[error("cannot read the script: {0}")]
    Read(#[source] io::Error),
    /// The command is none of OPEN, ADD, DEL, XCHG, CLOSE, MOVE, UNLINK.
    #[error("unknown command")]
    UnknownCommand,
    /// An argument is missing or malformed.
    #[error("missing or malformed {0}")]
    Malformed(&'static str),
    /// A file name is not a plain file name.
    #[error("{0:?} is not a plain file name (ASCII letters, digits, '.', '_', no leading '.')")]
    BadName(String),
    /// ADD, DEL, XCHG or CLOSE without an OPEN file.
    #[error("{0} needs an open file")]
    NothingOpen(&'static str),
    /// OPEN, MOVE or UNLINK (or the end of the script) while a file is open.
    #[error("`{0}` is still open")]
    StillOpen(String),
    /// The same line is edited twice before CLOSE.
    #[error("line {0} is edited twice")]
    DuplicateEdit(usize),
    /// A line does not start with the prefix the script gives: the database is not the one the
    /// cdiff was made for.
    #[error("line {line} of `{file}` does not start with {expected:?} (it is {found:?})")]
    PrefixMismatch {
        /// The database file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// The prefix in the script.
        expected: String,
        /// The start of the line found.
        found: String,
    },
    /// The script edits or moves a line beyond the end of the file.
    #[error("`{file}` has {lines} lines, the script needs line {line}")]
    LineMissing {
        /// The database file.
        file: String,
        /// 1-based line number asked for.
        line: usize,
        /// Lines in the file.
        lines: usize,
    },
    /// A file to edit does not end its line with a newline.
    #[error("line {line} of `{file}` has no newline")]
    NoNewline {
        /// The database file.
        file: String,
        /// 1-based line number.
        line: usize,
    },
    /// A file system step failed.
    #[error("cannot {action} `{file}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The database file.
        file: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Applies `cdiffs` (paths, in version order N+1..=M) to the database at `database` (a `.cvd`
/// or `.cld` of version N) and writes the resulting `.cld` of version M to `output`; returns
/// its verified header.
///
/// `work_dir` is created (emptied first if it exists), holds one file per database member
/// while the scripts run, and is removed at the end, whatever the outcome. The `.cld` is
/// written next to `output`, fsynced, verified ([`super::verify_cld`], version M) and only then
/// renamed to `output`, so `output` is never half-written or unverified: after an error it is
/// as it was (absent, or the previous database). Nothing larger than a member's line, the
/// `.info` or one cdiff's edits is held in memory.
pub fn apply_cdiffs(
    database: &Path,
    cdiffs: &[PathBuf],
    work_dir: &Path,
    output: &Path,
) -> Result<CvdHeader, CdiffError> {
    let partial = partial_path(output);
    let result = empty_dir(work_dir).and_then(|()| update(database, cdiffs, work_dir, &partial));
    let result = result.and_then(|header| {
        fs::rename(&partial, output).map_err(io_error("rename into", output))?;
        crate::durable::sync_parent_dir(output)
            .map_err(io_error("sync the directory of", output))?;
        Ok(header)
    });
    if result.is_err() {
        // Absent unless the failure came after it was written.
        let _ = fs::remove_file(&partial);
    }
    if let Err(error) = fs::remove_dir_all(work_dir) {
        tracing::warn!(%error, path = %work_dir.display(), "cannot remove the cdiff work directory");
    }
    result.map_err(|err| match err {
        CdiffError::Result { source, .. } => CdiffError::Result {
            path: output.to_path_buf(),
            source,
        },
        CdiffError::ResultVersion {
            expected, found, ..
        } => CdiffError::ResultVersion {
            path: output.to_path_buf(),
            expected,
            found,
        },
        other => other,
    })
}

/// Verifies the `.cld` at `path` with [`super::verify_cld`], the gzip bound derived from its
/// size.
pub fn verify_cld_file(path: &Path) -> Result<CvdHeader, CdiffError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("read", path))?.len();
    verify_cld(
        file,
        body_inflate_limit(usize::try_from(len).unwrap_or(usize::MAX)),
    )
    .map_err(|source| CdiffError::Result {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs one cdiff script against the files in `dir` (see the module documentation). Stops at
/// the first failing line; files already changed stay changed, so run it on a copy.
pub fn apply_script(mut script: impl BufRead, dir: &Path) -> Result<(), ScriptError> {
    let mut state = ScriptState {
        dir,
        open: None,
        edits: BTreeMap::new(),
        additions: Vec::new(),
    };
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        let read = script.read_until(b'\n', &mut line);
        number += 1;
        let fail = |fault| ScriptError {
            line: number,
            command: quote(&line),
            fault,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(fail(ScriptFault::Read(e))),
        }
        if line.first() == Some(&b'#') {
            continue;
        }
        if let Err(fault) = state.run(&line) {
            let error = fail(fault);
            let _ = fs::remove_file(dir.join(CLOSE_SCRATCH));
            let _ = fs::remove_file(dir.join(MOVE_SCRATCH));
            return Err(error);
        }
    }
    match state.open {
        Some(name) => Err(ScriptError {
            line: number - 1,
            command: "(end of script)".to_string(),
            fault: ScriptFault::StillOpen(name),
        }),
        None => Ok(()),
    }
}

/// Unpacks and updates the database, then writes and verifies the `.cld` at `partial`.
fn update(
    database: &Path,
    cdiffs: &[PathBuf],
    work_dir: &Path,
    partial: &Path,
) -> Result<CvdHeader, CdiffError> {
    let (base, order) = unpack_database(database, work_dir)?;
    let mut version = base.version;
    for path in cdiffs {
        let expected = version.saturating_add(1);
        apply_cdiff(path, expected, work_dir)?;
        version = expected;
    }
    write_cld(work_dir, &order, partial)?;
    let header = verify_cld_file(partial)?;
    if header.version != version {
        return Err(CdiffError::ResultVersion {
            path: partial.to_path_buf(),
            expected: version,
            found: header.version,
        });
    }
    Ok(header)
}

/// Checks the database at `path` and unpacks its members into `dir`; returns its header and
/// the member names in archive order.
fn unpack_database(path: &Path, dir: &Path) -> Result<(CvdHeader, Vec<String>), CdiffError> {
    let invalid = |source| CdiffError::Database {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("read", path))?.len();
    let mut head = [0u8; CVD_HEADER_LEN];
    file.read_exact(&mut head).map_err(|_| {
        invalid(ClamavError::Truncated {
            len: usize::try_from(len).unwrap_or(usize::MAX),
            need: CVD_HEADER_LEN,
        })
    })?;
    let header = parse_cvd_header(&head).map_err(invalid)?;
    // A CLD carries "X" for both; anything else must be a CVD's signed MD5, checked before the
    // body is inflated.
    if header.md5 != "X" || header.dsig != "X" {
        let mut hasher = Hasher::new(MessageDigest::md5()).map_err(|e| invalid(e.into()))?;
        let mut chunk = vec![0u8; HASH_CHUNK];
        loop {
            let n = file.read(&mut chunk).map_err(io_error("read", path))?;
            if n == 0 {
                break;
            }
            hasher
                .update(chunk.get(..n).unwrap_or_default())
                .map_err(|e| invalid(e.into()))?;
        }
        let digest = hasher.finish().map_err(|e| invalid(e.into()))?;
        check_cvd_signature(&header, &digest).map_err(invalid)?;
        // Should the file change from here on, the signed .info still catches it.
        file.seek(SeekFrom::Start(CVD_HEADER_LEN as u64))
            .map_err(io_error("read", path))?;
    }
    let body_len = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .saturating_sub(CVD_HEADER_LEN);
    let unpack = |name: &str| {
        if !is_plain_member_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain file name (no '/', '..', NUL or leading '.')",
            ));
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))?;
        Ok(BufWriter::new(file))
    };
    let body = BufReader::with_capacity(HASH_CHUNK, file);
    let tarball =
        scan_database_body(body, body_inflate_limit(body_len), unpack).map_err(invalid)?;
    let mut order: Vec<String> = tarball.members.iter().map(|m| m.name.clone()).collect();
    if let Some((info, _)) = &tarball.info {
        order.insert(tarball.info_position.min(order.len()), info.clone());
    }
    check_tarball(&header, tarball).map_err(invalid)?;
    Ok((header, order))
}

/// Checks one cdiff and runs its script in `dir`.
fn apply_cdiff(path: &Path, expected: u32, dir: &Path) -> Result<(), CdiffError> {
    let invalid = |source| CdiffError::Cdiff {
        path: path.to_path_buf(),
        source,
    };
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    verify_cdiff(&bytes).map_err(invalid)?;
    let header = parse_cdiff_header(&bytes).map_err(invalid)?;
    if header.version != expected {
        return Err(CdiffError::WrongVersion {
            path: path.to_path_buf(),
            expected,
            found: header.version,
        });
    }
    // The script is the gzip between the header's third ':' and the ':' before the signature
    // (whose alphabet has no ':').
    let colon = |&(_, &b): &(usize, &u8)| b == b':';
    let start = bytes
        .iter()
        .enumerate()
        .filter(colon)
        .nth(2)
        .map(|(at, _)| at);
    let end = bytes.iter().rposition(|&b| b == b':');
    let (Some(start), Some(end)) = (start, end) else {
        return Err(invalid(ClamavError::NoCdiffSignature));
    };
    let gzip = bytes.get(start + 1..end).unwrap_or_default();
    let script = Bounded::new(GzDecoder::new(gzip), body_inflate_limit(gzip.len()));
    apply_script(BufReader::new(script), dir).map_err(|source| CdiffError::Script {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Writes the `.cld` of the files in `dir` to `partial`: the `.info`'s first line as header,
/// then the members (in `order`, then new ones) as a gzip-compressed tar, fsynced.
fn write_cld(dir: &Path, order: &[String], partial: &Path) -> Result<(), CdiffError> {
    let mut present = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let name = entry.map_err(io_error("list", dir))?.file_name();
        match name.into_string() {
            Ok(name) if is_plain_member_name(&name) => present.push(name),
            _ => {}
        }
    }
    let mut members: Vec<String> = order
        .iter()
        .filter(|name| present.contains(name))
        .cloned()
        .collect();
    let info_name = members
        .iter()
        .chain(present.iter())
        .find(|name| ends_with_ignore_case(name.as_bytes(), INFO_SUFFIX))
        .cloned();
    let not_verified = |source| CdiffError::Result {
        path: partial.to_path_buf(),
        source,
    };
    let info_name = info_name.ok_or_else(|| not_verified(ClamavError::NoInfo))?;
    let info_path = dir.join(&info_name);
    let info_len = fs::metadata(&info_path)
        .map_err(io_error("read", &info_path))?
        .len();
    if info_len > INFO_MAX_LEN {
        return Err(not_verified(ClamavError::InfoTooLarge {
            size: info_len,
            max: INFO_MAX_LEN,
        }));
    }
    let info = fs::read(&info_path).map_err(io_error("read", &info_path))?;
    let listed = parse_info(&info).map_err(not_verified)?.entries;
    let mut new: Vec<String> = present
        .into_iter()
        .filter(|name| !members.contains(name))
        .collect();
    new.sort_by_key(|name| {
        let position = listed.iter().position(|e| &e.name == name);
        (position.unwrap_or(usize::MAX), name.clone())
    });
    members.extend(new);

    // freshclam's buildcld: the first 512 bytes of the .info, cut at the first newline and
    // space-padded.
    let first_line = info
        .get(..CVD_HEADER_LEN.min(info.len()))
        .and_then(|head| head.iter().position(|&b| b == b'\n'))
        .and_then(|end| info.get(..end))
        .ok_or_else(|| not_verified(ClamavError::NotCvd))?;
    let mut header = first_line.to_vec();
    header.resize(CVD_HEADER_LEN, b' ');

    let file = File::create(partial).map_err(io_error("create", partial))?;
    let mut out = BufWriter::with_capacity(HASH_CHUNK, file);
    out.write_all(&header).map_err(io_error("write", partial))?;
    // Compressed (libclamav reads either): the agent keeps this file in its local copies and
    // backups as well as in the database directory, and an inflated daily is several times
    // its CVD. Fast compression: this runs on every host at every update.
    let gzip = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gzip);
    for name in &members {
        let path = dir.join(name);
        let member = File::open(&path).map_err(io_error("open", &path))?;
        let size = member.metadata().map_err(io_error("read", &path))?.len();
        let mut entry = tar::Header::new_ustar();
        entry
            .set_path(name)
            .map_err(io_error("name a tar member after", &path))?;
        entry.set_size(size);
        entry.set_mode(0o644);
        entry.set_mtime(0);
        entry.set_entry_type(tar::EntryType::Regular);
        entry.set_cksum();
        tar.append(&entry, member.take(size))
            .map_err(io_error("write", partial))?;
    }
    let gzip = tar.into_inner().map_err(io_error("write", partial))?;
    let out = gzip.finish().map_err(io_error("write", partial))?;
    let file = out
        .into_inner()
        .map_err(|e| io_error("write", partial)(e.into_error()))?;
    file.sync_all().map_err(io_error("sync", partial))
}

/// The files a script works on and what it has queued for the open one.
struct ScriptState<'a> {
    dir: &'a Path,
    /// The file named by the last OPEN, until CLOSE.
    open: Option<String>,
    /// DEL (no replacement) and XCHG edits by line number.
    edits: BTreeMap<usize, Edit>,
    /// ADD lines, newlines included, appended at CLOSE.
    additions: Vec<u8>,
}

/// One DEL or XCHG.
struct Edit {
    prefix: Vec<u8>,
    /// The new line for XCHG, `None` for DEL.
    replacement: Option<Vec<u8>>,
}

impl ScriptState<'_> {
    /// Runs one script line (with its newline, if it has one).
    fn run(&mut self, line: &[u8]) -> Result<(), ScriptFault> {
        let split = line.iter().position(|&b| b == b' ' || b == b'\n');
        let (command, with_newline) = match split {
            Some(at) => (line.get(..at).unwrap_or_default(), line.get(at + 1..)),
            None => (line, None),
        };
        let args = || {
            with_newline
                .and_then(|rest| rest.strip_suffix(b"\n"))
                .ok_or(ScriptFault::Malformed("arguments (or the line's newline)"))
        };
        match command {
            b"OPEN" => {
                if let Some(open) = &self.open {
                    return Err(ScriptFault::StillOpen(open.clone()));
                }
                self.open = Some(script_file_name(Some(args()?))?);
                Ok(())
            }
            b"ADD" => {
                self.require_open("ADD")?;
                let text = with_newline.ok_or(ScriptFault::Malformed("line to add"))?;
                self.additions.extend_from_slice(text);
                Ok(())
            }
            b"DEL" => {
                self.require_open("DEL")?;
                let mut fields = args()?.split(|&b| b == b' ');
                let number = line_number(fields.next())?;
                let prefix = fields.next().ok_or(ScriptFault::Malformed("line prefix"))?;
                self.edit(number, prefix, None)
            }
            b"XCHG" => {
                self.require_open("XCHG")?;
                let mut fields = args()?.splitn(3, |&b| b == b' ');
                let number = line_number(fields.next())?;
                let prefix = fields.next().ok_or(ScriptFault::Malformed("line prefix"))?;
                let new_line = fields.next().ok_or(ScriptFault::Malformed("new line"))?;
                self.edit(number, prefix, Some(new_line))
            }
            b"CLOSE" => self.close(),
            b"MOVE" => {
                self.require_closed()?;
                let mut fields = args()?.split(|&b| b == b' ');
                let src = script_file_name(fields.next())?;
                let dst = script_file_name(fields.next())?;
                let start = line_number(fields.next())?;
                let start_prefix = fields.next().ok_or(ScriptFault::Malformed("line prefix"))?;
                let end = line_number(fields.next())?;
                let end_prefix = fields.next().ok_or(ScriptFault::Malformed("line prefix"))?;
                if src == dst || end <= start {
                    return Err(ScriptFault::Malformed("MOVE range"));
                }
                let range = MoveRange {
                    start,
                    start_prefix,
                    end,
                    end_prefix,
                };
                self.move_lines(&src, &dst, &range)
            }
            b"UNLINK" => {
                self.require_closed()?;
                let name = script_file_name(Some(args()?))?;
                let path = self.dir.join(&name);
                fs::remove_file(path).map_err(io_fault("remove", &name))
            }
            _ => Err(ScriptFault::UnknownCommand),
        }
    }

    fn require_open(&self, command: &'static str) -> Result<(), ScriptFault> {
        match self.open {
            Some(_) => Ok(()),
            None => Err(ScriptFault::NothingOpen(command)),
        }
    }

    fn require_closed(&self) -> Result<(), ScriptFault> {
        match &self.open {
            Some(open) => Err(ScriptFault::StillOpen(open.clone())),
            None => Ok(()),
        }
    }

    fn edit(
        &mut self,
        number: usize,
        prefix: &[u8],
        replacement: Option<&[u8]>,
    ) -> Result<(), ScriptFault> {
        let edit = Edit {
            prefix: prefix.to_vec(),
            replacement: replacement.map(<[u8]>::to_vec),
        };
        if self.edits.insert(number, edit).is_some() {
            return Err(ScriptFault::DuplicateEdit(number));
        }
        Ok(())
    }

    /// CLOSE: applies the edits by streaming the file through a scratch file, then appends.
    fn close(&mut self) -> Result<(), ScriptFault> {
        let name = self.open.take().ok_or(ScriptFault::NothingOpen("CLOSE"))?;
        let path = self.dir.join(&name);
        let edits = std::mem::take(&mut self.edits);
        if !edits.is_empty() {
            let mut lines = NumberedLines::open(self.dir, &name)?;
            let (scratch, mut output) = create_scratch(self.dir, CLOSE_SCRATCH)?;
            let mut edits = edits.into_iter().peekable();
            while lines.advance()? {
                let number = lines.number;
                let line = lines
                    .line
                    .strip_suffix(b"\n")
                    .ok_or(ScriptFault::NoNewline {
                        file: name.clone(),
                        line: number,
                    })?;
                match edits.next_if(|(edited, _)| *edited == number) {
                    None => write_line(&mut output, line)?,
                    Some((_, edit)) => {
                        check_prefix(line, &edit.prefix, &name, number)?;
                        if let Some(new_line) = &edit.replacement {
                            write_line(&mut output, new_line)?;
                        }
                    }
                }
            }
            if let Some((number, _)) = edits.next() {
                return Err(ScriptFault::LineMissing {
                    file: name.clone(),
                    line: number,
                    lines: lines.number,
                });
            }
            output.flush().map_err(io_fault("write", CLOSE_SCRATCH))?;
            drop(output);
            fs::rename(&scratch, &path).map_err(io_fault("replace", &name))?;
        }
        if !self.additions.is_empty() {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_fault("open", &name))?;
            file.write_all(&self.additions)
                .map_err(io_fault("append to", &name))?;
            self.additions.clear();
        }
        Ok(())
    }

    /// MOVE: appends lines `start..=end` of `src` to `dst` and streams the others into a
    /// scratch file that replaces `src`.
    fn move_lines(&self, src: &str, dst: &str, range: &MoveRange) -> Result<(), ScriptFault> {
        let mut moved = OpenOptions::new()
            .append(true)
            .open(self.dir.join(dst))
            .map(BufWriter::new)
            .map_err(io_fault("open", dst))?;
        let mut lines = NumberedLines::open(self.dir, src)?;
        let (scratch, mut kept) = create_scratch(self.dir, MOVE_SCRATCH)?;
        while lines.advance()? {
            let (number, line) = (lines.number, lines.line.as_slice());
            if number == range.start {
                check_prefix(line, range.start_prefix, src, number)?;
            }
            if number == range.end {
                check_prefix(line, range.end_prefix, src, number)?;
            }
            if (range.start..=range.end).contains(&number) {
                moved.write_all(line).map_err(io_fault("write", dst))?;
            } else {
                kept.write_all(line)
                    .map_err(io_fault("write", MOVE_SCRATCH))?;
            }
        }
        if lines.number < range.end {
            return Err(ScriptFault::LineMissing {
                file: src.to_string(),
                line: range.end,
                lines: lines.number,
            });
        }
        moved.flush().map_err(io_fault("write", dst))?;
        kept.flush().map_err(io_fault("write", MOVE_SCRATCH))?;
        drop(kept);
        fs::rename(&scratch, self.dir.join(src)).map_err(io_fault("replace", src))
    }
}

/// A database file read line by line, numbered from 1.
struct NumberedLines<'a> {
    input: BufReader<File>,
    file: &'a str,
    /// Number of the line in `line`; after the end, how many lines the file has.
    number: usize,
    /// The current line, with its newline if it has one.
    line: Vec<u8>,
}

impl<'a> NumberedLines<'a> {
    fn open(dir: &Path, file: &'a str) -> Result<Self, ScriptFault> {
        let input = File::open(dir.join(file)).map_err(io_fault("open", file))?;
        Ok(Self {
            input: BufReader::new(input),
            file,
            number: 0,
            line: Vec::new(),
        })
    }

    /// Reads the next line; `false` at the end of the file.
    fn advance(&mut self) -> Result<bool, ScriptFault> {
        self.line.clear();
        let read = self
            .input
            .read_until(b'\n', &mut self.line)
            .map_err(io_fault("read", self.file))?;
        if read == 0 {
            return Ok(false);
        }
        self.number += 1;
        Ok(true)
    }
}

/// Creates the scratch file `name` in `dir`; returns its path and a writer.
fn create_scratch(dir: &Path, name: &str) -> Result<(PathBuf, BufWriter<File>), ScriptFault> {
    let path = dir.join(name);
    let file = File::create(&path).map_err(io_fault("create", name))?;
    Ok((path, BufWriter::new(file)))
}

/// Writes `line` and a newline to the CLOSE scratch file.
fn write_line(output: &mut impl Write, line: &[u8]) -> Result<(), ScriptFault> {
    output
        .write_all(line)
        .and_then(|()| output.write_all(b"\n"))
        .map_err(io_fault("write", CLOSE_SCRATCH))
}

/// The lines a MOVE takes, with the prefixes its first and last line must start with.
struct MoveRange<'a> {
    start: usize,
    start_prefix: &'a [u8],
    end: usize,
    end_prefix: &'a [u8],
}

/// ClamAV's integrity check: the line (newline aside) starts with the script's prefix.
fn check_prefix(line: &[u8], prefix: &[u8], file: &str, number: usize) -> Result<(), ScriptFault> {
    if line.starts_with(prefix) {
        return Ok(());
    }
    let found = line.strip_suffix(b"\n").unwrap_or(line);
    Err(ScriptFault::PrefixMismatch {
        file: file.to_string(),
        line: number,
        expected: String::from_utf8_lossy(prefix).into_owned(),
        found: quote(found.get(..prefix.len().max(16)).unwrap_or(found)),
    })
}

/// A 1-based line number argument.
fn line_number(field: Option<&[u8]>) -> Result<usize, ScriptFault> {
    field
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(super::parse_digits::<usize>)
        .filter(|&n| n > 0)
        .ok_or(ScriptFault::Malformed("line number"))
}

/// A file name argument: ClamAV's characters (ASCII only here) and a plain member name.
fn script_file_name(field: Option<&[u8]>) -> Result<String, ScriptFault> {
    let raw = field.ok_or(ScriptFault::Malformed("file name"))?;
    let name = String::from_utf8_lossy(raw).into_owned();
    let allowed = raw
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if allowed && is_plain_member_name(&name) {
        Ok(name)
    } else {
        Err(ScriptFault::BadName(name))
    }
}

/// Whether `name` can be a file directly in the work directory: not empty, at most 100 bytes,
/// no `/`, `\`, NUL or `..`, and no leading `.` (which also keeps it apart from the scratch
/// files).
fn is_plain_member_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && !name.contains("..")
        && !name.contains(['/', '\\', '\0'])
}

/// The start of a script line for an error message, newline aside.
fn quote(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let shown = line.get(..QUOTE_LEN).unwrap_or(line);
    let mut text = String::from_utf8_lossy(shown).into_owned();
    if shown.len() < line.len() {
        text.push_str("...");
    }
    text
}

/// Removes `dir` if it exists and creates it empty.
fn empty_dir(dir: &Path) -> Result<(), CdiffError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("empty", dir)(e)),
    }
    fs::create_dir_all(dir).map_err(io_error("create", dir))
}

/// Where the `.cld` for `output` is written before it is verified and renamed.
fn partial_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Maps an io error to a [`CdiffError::Io`] about `path`.
fn io_error<'a>(action: &'static str, path: &'a Path) -> impl Fn(io::Error) -> CdiffError + 'a {
    move |source| CdiffError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Maps an io error to a [`ScriptFault::Io`] about `file`.
fn io_fault<'a>(action: &'static str, file: &'a str) -> impl Fn(io::Error) -> ScriptFault + 'a {
    move |source| ScriptFault::Io {
        action,
        file: file.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clamav::tests::{tar_blocks, testdb};
    use std::process::Command;

    /// Name, size and SHA-256 of every member of a CVD or CLD, sorted by name.
    type Members = Vec<(String, u64, String)>;

    /// A CLD with its body inflated if it is compressed (a plain tar, which libclamav reads
    /// too), for tests that look into or alter its bytes.
    fn read_plain(path: &Path) -> Vec<u8> {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !bytes[CVD_HEADER_LEN..].starts_with(&[0x1f, 0x8b]) {
            return bytes;
        }
        let mut plain = bytes[..CVD_HEADER_LEN].to_vec();
        flate2::read::GzDecoder::new(&bytes[CVD_HEADER_LEN..])
            .read_to_end(&mut plain)
            .expect("inflate");
        plain
    }

    fn members(path: &Path) -> Members {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let body = &bytes[CVD_HEADER_LEN..];
        let tarball = scan_database_body(body, 1 << 30, |_| Ok(io::sink())).expect("tar");
        let mut out: Members = tarball
            .members
            .iter()
            .map(|m| (m.name.clone(), m.size, super::super::to_hex(&m.sha256)))
            .collect();
        let (name, info) = tarball.info.expect("info");
        let sha256 = openssl::hash::hash(MessageDigest::sha256(), &info).expect("sha256");
        out.push((name, info.len() as u64, super::super::to_hex(&sha256)));
        out.sort();
        out
    }

    fn cdiffs(versions: std::ops::RangeInclusive<u32>) -> Vec<PathBuf> {
        versions
            .map(|v| testdb().join(format!("test-{v}.cdiff")))
            .collect()
    }

    /// A temp dir with the paths `apply_cdiffs` needs.
    struct Scene {
        dir: tempfile::TempDir,
        work: PathBuf,
        output: PathBuf,
    }

    fn scene() -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        let output = dir.path().join("test.cld");
        Scene { dir, work, output }
    }

    impl Scene {
        fn apply(&self, database: &Path, cdiffs: &[PathBuf]) -> Result<CvdHeader, CdiffError> {
            apply_cdiffs(database, cdiffs, &self.work, &self.output)
        }

        /// Applies and expects an error; checks that nothing is left behind and returns it.
        fn fail(&self, database: &Path, cdiffs: &[PathBuf]) -> String {
            let err = self.apply(database, cdiffs).expect_err("must fail");
            self.assert_clean();
            err.to_string()
        }

        fn assert_clean(&self) {
            assert!(!self.output.exists(), "output left behind");
            assert!(!self.work.exists(), "work dir left behind");
            let left: Vec<_> = fs::read_dir(self.dir.path())
                .expect("list")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }

    #[test]
    fn test_1_cvd_with_cdiffs_2_to_6_gives_the_members_of_test_6_cvd() {
        let s = scene();
        // A stale work dir is emptied first.
        fs::create_dir_all(&s.work).expect("mkdir");
        fs::write(s.work.join("test.ndb"), "stale\n").expect("write");
        let header = s
            .apply(&testdb().join("test-1.cvd"), &cdiffs(2..=6))
            .expect("applies");
        assert_eq!(
            (header.version, header.signatures, header.build_time_unix),
            (6, 14, 1624412045)
        );
        assert_eq!((header.md5.as_str(), header.dsig.as_str()), ("X", "X"));
        assert!(!s.work.exists());
        assert_eq!(members(&s.output), members(&testdb().join("test-6.cvd")));
        let bytes = read_plain(&s.output);
        assert_eq!(
            String::from_utf8_lossy(&bytes[..CVD_HEADER_LEN]).trim_end(),
            "ClamAV-VDB:22 Jun 2021 21-34 -0400:6:14:81:X:X:micasnyd:1624412045"
        );
        // Original order first, new members in the order the .info lists them: here that
        // happens to be test-6.cvd's order except for the two members test-1 already had.
        let order: Vec<String> = {
            let mut tar = tar::Archive::new(&bytes[CVD_HEADER_LEN..]);
            let entries = tar.entries().expect("entries");
            entries
                .map(|e| {
                    e.expect("entry")
                        .path()
                        .expect("path")
                        .display()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(
            order[..6],
            [
                "COPYING",
                "test.info",
                "test.ndb",
                "test.ldb",
                "test.cfg",
                "test.hdb"
            ]
        );
    }

    #[test]
    fn test_3_cvd_with_cdiffs_4_to_6_gives_the_members_of_test_6_cvd() {
        let s = scene();
        let header = s
            .apply(&testdb().join("test-3.cvd"), &cdiffs(4..=6))
            .expect("applies");
        assert_eq!(header.version, 6);
        assert_eq!(members(&s.output), members(&testdb().join("test-6.cvd")));
    }

    #[test]
    fn a_cld_built_earlier_takes_the_next_cdiffs() {
        let s = scene();
        let first = s.dir.path().join("first").join("test.cld");
        fs::create_dir(first.parent().expect("parent")).expect("mkdir");
        let header = apply_cdiffs(
            &testdb().join("test-1.cvd"),
            &cdiffs(2..=3),
            &s.work,
            &first,
        )
        .expect("1 -> 3");
        assert_eq!(header.version, 3);
        assert_eq!(members(&first), members(&testdb().join("test-3.cvd")));
        let header = s.apply(&first, &cdiffs(4..=6)).expect("3 -> 6");
        assert_eq!(header.version, 6);
        assert_eq!(members(&s.output), members(&testdb().join("test-6.cvd")));
        // Updating a cld in place replaces it.
        let header = apply_cdiffs(&testdb().join("test-3.cvd"), &[], &s.work, &first)
            .and_then(|_| apply_cdiffs(&first, &cdiffs(4..=5), &s.work, &first))
            .expect("in place");
        assert_eq!(header.version, 5);
        assert_eq!(members(&first), members(&testdb().join("test-5.cvd")));
    }

    /// Runs a ClamAV tool (scripts/setup.sh installs them; a missing one fails the test).
    fn run(tool: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
        Command::new(tool).args(args).output().unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): install ClamAV's tools (scripts/setup.sh)")
        })
    }

    #[test]
    fn sigtool_and_clamscan_accept_the_built_cld() {
        let s = scene();
        let db_dir = s.dir.path().join("db");
        fs::create_dir(&db_dir).expect("mkdir");
        let cld = db_dir.join("test.cld");
        apply_cdiffs(&testdb().join("test-1.cvd"), &cdiffs(2..=6), &s.work, &cld).expect("ok");
        let info = run("sigtool", &["-i".as_ref(), cld.as_os_str()]);
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&info.stderr)
        );
        assert!(text.lines().any(|l| l == "Version: 6"), "{text}");
        let eicar = s.dir.path().join("eicar.com");
        fs::write(
            &eicar,
            r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*",
        )
        .expect("write");
        let scan = run(
            "clamscan",
            &[
                "--no-summary".as_ref(),
                "-d".as_ref(),
                db_dir.as_os_str(),
                eicar.as_os_str(),
            ],
        );
        let text = String::from_utf8_lossy(&scan.stdout);
        assert_eq!(
            scan.status.code(),
            Some(1),
            "{text}{}",
            String::from_utf8_lossy(&scan.stderr)
        );
        assert!(text.contains("Eicar-Test-Signature FOUND"), "{text}");
    }

    #[test]
    fn a_gap_in_the_cdiffs_fails_and_leaves_nothing_behind() {
        let s = scene();
        let gap = vec![cdiffs(2..=2)[0].clone(), cdiffs(4..=4)[0].clone()];
        let message = s.fail(&testdb().join("test-1.cvd"), &gap);
        assert!(
            message.ends_with("test-4.cdiff` makes version 4, but the next version is 3"),
            "{message}"
        );
    }

    #[test]
    fn a_cdiff_for_another_database_version_is_refused() {
        let s = scene();
        for (database, cdiff) in [("test-3.cvd", 3), ("test-1.cvd", 3), ("test-4.cvd", 2)] {
            let message = s.fail(&testdb().join(database), &cdiffs(cdiff..=cdiff));
            assert!(message.contains("makes version"), "{message}");
        }
    }

    #[test]
    fn a_cdiff_with_a_flipped_byte_fails_its_signature_check() {
        let s = scene();
        let original = fs::read(testdb().join("test-2.cdiff")).expect("read");
        let broken = s.dir.path().join("cdiffs");
        fs::create_dir(&broken).expect("mkdir");
        let path = broken.join("test-2.cdiff");
        for at in [20, original.len() / 2, original.len() - 5] {
            let mut bytes = original.clone();
            bytes[at] ^= 0x01;
            fs::write(&path, &bytes).expect("write");
            let err = apply_cdiffs(
                &testdb().join("test-1.cvd"),
                std::slice::from_ref(&path),
                &s.work,
                &s.output,
            )
            .expect_err("broken");
            assert!(matches!(err, CdiffError::Cdiff { .. }), "{at}: {err}");
            assert!(!s.output.exists() && !s.work.exists());
        }
    }

    /// Builds test.cld version 3 and flips a byte of `test.hdb`'s content in it.
    fn tampered_cld(s: &Scene) -> PathBuf {
        let cld = s.dir.path().join("tampered").join("test.cld");
        fs::create_dir(cld.parent().expect("parent")).expect("mkdir");
        apply_cdiffs(&testdb().join("test-1.cvd"), &cdiffs(2..=3), &s.work, &cld).expect("ok");
        let mut bytes = read_plain(&cld);
        let needle = b"Clamav.Test.File-6";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("test.hdb content");
        bytes[at] = b'K';
        fs::write(&cld, bytes).expect("write");
        cld
    }

    #[test]
    fn a_tampered_member_of_the_input_cld_fails_the_info_check() {
        let s = scene();
        let cld = tampered_cld(&s);
        let err = s.apply(&cld, &cdiffs(4..=6)).expect_err("tampered");
        assert!(
            matches!(
                &err,
                CdiffError::Database {
                    source: ClamavError::MemberHash { member, .. },
                    ..
                } if member == "test.hdb"
            ),
            "{err}"
        );
        assert!(!s.output.exists() && !s.work.exists());
    }

    #[test]
    fn verify_cld_refuses_a_member_changed_after_building() {
        let s = scene();
        let cld = tampered_cld(&s);
        let message = verify_cld_file(&cld).expect_err("tampered").to_string();
        assert!(
            message.contains("cvd member \"test.hdb\" has sha256 "),
            "{message}"
        );
        // And the same file as bytes, gzip-compressed as freshclam can write it.
        let bytes = read_plain(&cld);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes[CVD_HEADER_LEN..]).expect("gzip");
        let mut compressed = bytes[..CVD_HEADER_LEN].to_vec();
        compressed.extend(gz.finish().expect("gzip"));
        assert!(matches!(
            verify_cld(&compressed[..], 1 << 26),
            Err(ClamavError::MemberHash { .. })
        ));
    }

    #[test]
    fn a_good_cld_verifies_plain_or_gzip_and_so_does_a_cvd() {
        let s = scene();
        s.apply(&testdb().join("test-1.cvd"), &cdiffs(2..=4))
            .expect("ok");
        assert_eq!(verify_cld_file(&s.output).expect("plain").version, 4);
        let bytes = read_plain(&s.output);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes[CVD_HEADER_LEN..]).expect("gzip");
        let mut compressed = bytes[..CVD_HEADER_LEN].to_vec();
        compressed.extend(gz.finish().expect("gzip"));
        assert_eq!(
            verify_cld(&compressed[..], 1 << 26).expect("gzip").version,
            4
        );
        // A CVD verifies as a CLD too (its body is a tar with a signed .info).
        assert_eq!(
            verify_cld_file(&testdb().join("test-5.cvd"))
                .expect("cvd")
                .version,
            5
        );
        assert!(matches!(
            verify_cld(&bytes[..100], 1 << 26),
            Err(ClamavError::Truncated { len: 100, .. })
        ));
    }

    #[test]
    fn path_like_member_names_in_the_database_are_refused() {
        let s = scene();
        let header = format!(
            "{:<512}",
            "ClamAV-VDB:22 Jun 2021 21-34 -0400:6:14:81:X:X:micasnyd:1624412045"
        );
        let input = s.dir.path().join("input");
        fs::create_dir(&input).expect("mkdir");
        for name in ["../escape.ndb", ".hidden", "..", "a..b.ndb", "x\\y.ndb"] {
            let mut cld = header.clone().into_bytes();
            cld.extend(tar_blocks(&[("COPYING", b'0', b"c"), (name, b'0', b"x\n")]));
            let path = input.join("test.cld");
            fs::write(&path, cld).expect("write");
            let message = apply_cdiffs(&path, &cdiffs(2..=2), &s.work, &s.output)
                .expect_err(name)
                .to_string();
            assert!(
                message.contains("not a plain file name") || message.contains("'/'"),
                "{name}: {message}"
            );
            assert!(!s.output.exists() && !s.work.exists());
            assert!(!s.dir.path().join("escape.ndb").exists());
        }
    }

    /// Runs `script` on a directory holding `files` (name, content); returns the files after it
    /// (scratch files would show up too) or the error message.
    fn run_script(files: &[(&str, &str)], script: &str) -> Result<Vec<(String, String)>, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            fs::write(dir.path().join(name), content).expect("write");
        }
        apply_script(script.as_bytes(), dir.path()).map_err(|e| e.to_string())?;
        let mut out: Vec<(String, String)> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                let content = fs::read_to_string(e.path()).expect("read");
                (e.file_name().into_string().expect("utf-8"), content)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn check(files: &[(&str, &str)], script: &str, expected: Result<&[(&str, &str)], &str>) {
        let expected = expected.map(|files| {
            files
                .iter()
                .map(|&(n, c)| (n.to_string(), c.to_string()))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            run_script(files, script),
            expected.map_err(str::to_string),
            "{script}"
        );
    }

    const DB: &[(&str, &str)] = &[("a.ndb", "one\ntwo\nthree\n"), ("b.ndb", "x\n")];

    #[test]
    fn scripts_apply_like_libclamav() {
        // Edits refer to the lines at OPEN; additions go after them, in script order.
        check(
            DB,
            "OPEN a.ndb\nADD four\nXCHG 1 on ONE 1\nDEL 2 tw\nADD five\nCLOSE\n",
            Ok(&[("a.ndb", "ONE 1\nthree\nfour\nfive\n"), ("b.ndb", "x\n")]),
        );
        // Comments are skipped; OPEN of a new file creates it with its ADDs; UNLINK removes.
        check(
            DB,
            "# comment\nOPEN c.hdb\nADD sig\nCLOSE\nUNLINK b.ndb\n",
            Ok(&[("a.ndb", "one\ntwo\nthree\n"), ("c.hdb", "sig\n")]),
        );
        // OPEN and CLOSE alone create nothing.
        check(DB, "OPEN c.hdb\nCLOSE\n", Ok(DB));
        // MOVE appends lines n1..=n2 of src to dst.
        check(
            DB,
            "MOVE a.ndb b.ndb 2 tw 3 th\n",
            Ok(&[("a.ndb", "one\n"), ("b.ndb", "x\ntwo\nthree\n")]),
        );
        // A file whose last line has no newline can be appended to (as raw bytes) but not
        // edited.
        check(
            &[("a.ndb", "one")],
            "OPEN a.ndb\nADD two\nCLOSE\n",
            Ok(&[("a.ndb", "onetwo\n")]),
        );
        check(
            &[("a.ndb", "one")],
            "OPEN a.ndb\nDEL 1 one\nCLOSE\n",
            Err("script line 3 `CLOSE`: line 1 of `a.ndb` has no newline"),
        );
        // The empty prefix matches any line.
        check(
            DB,
            "OPEN a.ndb\nDEL 3 \nCLOSE\n",
            Ok(&[("a.ndb", "one\ntwo\n"), ("b.ndb", "x\n")]),
        );
    }

    #[test]
    fn del_and_xchg_whose_prefix_does_not_match_fail() {
        check(
            DB,
            "OPEN a.ndb\nDEL 2 three\nCLOSE\n",
            Err(
                "script line 3 `CLOSE`: line 2 of `a.ndb` does not start with \"three\" \
                 (it is \"two\")",
            ),
        );
        check(
            DB,
            "OPEN a.ndb\nXCHG 1 two TWO\nCLOSE\n",
            Err(
                "script line 3 `CLOSE`: line 1 of `a.ndb` does not start with \"two\" \
                 (it is \"one\")",
            ),
        );
        check(
            DB,
            "OPEN a.ndb\nDEL 4 x\nCLOSE\n",
            Err("script line 3 `CLOSE`: `a.ndb` has 3 lines, the script needs line 4"),
        );
        check(
            DB,
            "MOVE a.ndb b.ndb 1 one 2 three\n",
            Err(
                "script line 1 `MOVE a.ndb b.ndb 1 one 2 three`: line 2 of `a.ndb` does not \
                 start with \"three\" (it is \"two\")",
            ),
        );
        check(
            DB,
            "OPEN a.ndb\nDEL 1 one\nDEL 1 one\n",
            Err("script line 3 `DEL 1 one`: line 1 is edited twice"),
        );
        check(
            DB,
            "OPEN a.ndb\nDEL 1 one\n",
            Err("script line 2 `(end of script)`: `a.ndb` is still open"),
        );
        check(
            DB,
            "OPEN a.ndb\nOPEN b.ndb\n",
            Err("script line 2 `OPEN b.ndb`: `a.ndb` is still open"),
        );
        check(
            DB,
            "ADD x\n",
            Err("script line 1 `ADD x`: ADD needs an open file"),
        );
        check(DB, "\n", Err("script line 1 ``: unknown command"));
        check(
            DB,
            "PATCH a.ndb\n",
            Err("script line 1 `PATCH a.ndb`: unknown command"),
        );
        check(
            DB,
            "OPEN a.ndb\nDEL x one\n",
            Err("script line 2 `DEL x one`: missing or malformed line number"),
        );
        check(
            DB,
            "MOVE a.ndb b.ndb 2 two 2 two\n",
            Err("script line 1 `MOVE a.ndb b.ndb 2 two 2 two`: missing or malformed MOVE range"),
        );
        check(
            DB,
            "UNLINK c.ndb\n",
            Err(
                "script line 1 `UNLINK c.ndb`: cannot remove `c.ndb`: No such file or directory \
                 (os error 2)",
            ),
        );
        // A failed CLOSE leaves the file and no scratch file behind.
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("a.ndb"), "one\n").expect("write");
        assert!(apply_script(&b"OPEN a.ndb\nDEL 1 two\nCLOSE\n"[..], dir.path()).is_err());
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["a.ndb"]);
    }

    #[test]
    fn path_like_names_in_open_unlink_and_move_are_refused() {
        for name in [
            "../a.ndb",
            "/etc/passwd",
            "..",
            ".",
            ".hidden",
            "a..ndb",
            "sub/a.ndb",
            "a\\b",
            "a-b.ndb",
            "é.ndb",
            "",
        ] {
            for script in [
                format!("OPEN {name}\nADD x\nCLOSE\n"),
                format!("UNLINK {name}\n"),
                format!("MOVE {name} b.ndb 1 x 2 y\n"),
                format!("MOVE a.ndb {name} 1 x 2 y\n"),
            ] {
                let message = run_script(DB, &script).expect_err(&script);
                assert!(
                    message.ends_with(&format!(
                        "{name:?} is not a plain file name (ASCII letters, digits, '.', '_', no \
                         leading '.')"
                    )),
                    "{script}: {message}"
                );
            }
        }
    }

    /// Commands, names, separators and out-of-range numbers of cdiff scripts.
    const SCRIPT_TOKENS: &[&[u8]] = &[
        b"OPEN ",
        b"ADD ",
        b"DEL ",
        b"XCHG ",
        b"CLOSE\n",
        b"MOVE ",
        b"UNLINK ",
        b"\n",
        b" ",
        b"#",
        b"../",
        b"/",
        b"..",
        b".cdiff-close",
        b".cdiff-move",
        b"test.ndb",
        b"test.info",
        b"0",
        b"1",
        b"4294967296",
        b"18446744073709551616",
        b"\0",
        b"\r\n",
    ];

    /// The gzip-compressed script of a cdiff, inflated.
    fn script_of(cdiff: &[u8]) -> Vec<u8> {
        let start = cdiff
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b':')
            .nth(2)
            .expect("header")
            .0;
        let end = cdiff.iter().rposition(|&b| b == b':').expect("signature");
        let mut script = Vec::new();
        flate2::read::GzDecoder::new(&cdiff[start + 1..end])
            .read_to_end(&mut script)
            .expect("inflate");
        script
    }

    /// Name and content of every file in `dir`, sorted; panics on anything but plain files
    /// with member names.
    fn plain_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .expect("list")
            .map(|entry| {
                let entry = entry.expect("entry");
                let name = entry.file_name().into_string().expect("utf-8 name");
                let kind = fs::symlink_metadata(entry.path())
                    .expect("stat")
                    .file_type();
                assert!(
                    kind.is_file() && is_plain_member_name(&name),
                    "`{name}` is not a plain member file ({kind:?})"
                );
                (name, fs::read(entry.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    /// One of the test databases with the cdiff that updates it.
    struct Step {
        database: PathBuf,
        cdiff: Vec<u8>,
        script: Vec<u8>,
        /// The database unpacked, one file per member.
        unpacked: Vec<(String, Vec<u8>)>,
        /// The files after the intact script.
        updated: Vec<(String, Vec<u8>)>,
        /// The members of the `.cld` the intact cdiff gives.
        result: Members,
    }

    /// Cdiff scripts and whole cdiffs under damage (harness: `crate::fuzz`), started from the
    /// real test-N.cvd and test-(N+1).cdiff, N = 1..5: no panics; a script writes nothing but
    /// plain member files in its directory and leaves no scratch files, failed or not;
    /// `apply_cdiffs` with a damaged cdiff either fails and leaves nothing behind, or the cdiff
    /// still verifies and gives the same database as the intact one.
    #[test]
    fn mutated_cdiffs_never_panic_and_never_write_outside_their_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = dir.path().join("sandbox");
        let work = sandbox.join("work");
        let output = sandbox.join("test.cld");
        let damaged_path = dir.path().join("damaged.cdiff");
        let damaged_cdiffs = std::slice::from_ref(&damaged_path);
        fs::create_dir(&sandbox).expect("mkdir");
        let steps: Vec<Step> = (1..=5)
            .map(|n| {
                let database = testdb().join(format!("test-{n}.cvd"));
                let cdiff = fs::read(testdb().join(format!("test-{}.cdiff", n + 1))).expect("read");
                let script = script_of(&cdiff);
                let base = dir.path().join(format!("base-{n}"));
                fs::create_dir(&base).expect("mkdir");
                unpack_database(&database, &base).expect("unpacks");
                let unpacked = plain_files(&base);
                apply_script(script.as_slice(), &base).expect("the intact script applies");
                let updated = plain_files(&base);
                fs::write(&damaged_path, &cdiff).expect("write");
                apply_cdiffs(&database, damaged_cdiffs, &work, &output)
                    .expect("the intact cdiff applies");
                let result = members(&output);
                fs::remove_file(&output).expect("remove");
                Step {
                    database,
                    cdiff,
                    script,
                    unpacked,
                    updated,
                    result,
                }
            })
            .collect();
        let campaign = crate::fuzz::campaign("cdiff", 400, |seed| {
            let mut rng = crate::fuzz::Rng::new(seed);
            let step = &steps[rng.below(steps.len())];
            if rng.below(8) == 0 {
                let mut damage = crate::fuzz::Damage::new(&step.cdiff, 0, &mut rng);
                damage.any(SCRIPT_TOKENS);
                fs::write(&damaged_path, &damage.bytes).expect("write");
                let result = apply_cdiffs(&step.database, damaged_cdiffs, &work, &output);
                if result.is_ok() {
                    assert!(verify_cdiff(&damage.bytes).is_ok(), "applied unverified");
                    assert_eq!(members(&output), step.result, "another database");
                    fs::remove_file(&output).expect("remove");
                }
                let left: Vec<_> = fs::read_dir(&sandbox).expect("list").collect();
                assert!(left.is_empty(), "left behind: {left:?}");
                return result.is_ok();
            }
            let mut damage = crate::fuzz::Damage::new(&step.script, 0, &mut rng);
            damage.any(SCRIPT_TOKENS);
            fs::create_dir(&work).expect("mkdir");
            for (name, content) in &step.unpacked {
                fs::write(work.join(name), content).expect("write");
            }
            let result = apply_script(damage.bytes.as_slice(), &work);
            let files = plain_files(&work);
            if damage.bytes == step.script {
                assert!(result.is_ok(), "the intact script failed: {result:?}");
                assert_eq!(files, step.updated);
            }
            fs::remove_dir_all(&work).expect("remove");
            let left: Vec<_> = fs::read_dir(&sandbox).expect("list").collect();
            assert!(
                left.is_empty(),
                "written beside the work directory: {left:?}"
            );
            result.is_ok()
        });
        if !campaign.replay {
            // Otherwise the damage is too coarse to reach the applier's writing paths.
            assert!(campaign.accepted > 0, "no damaged script applied");
        }
    }
}
