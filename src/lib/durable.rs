//! Crash-safe file system steps: write aside, fsync, rename. Every change to the repository goes
//! through these so that a `kill -9` at any instant leaves either the old or the new state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically with the given mode: a temporary file in the same
/// directory is written, fsynced and renamed over `path`, then the directory is fsynced.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = sibling_tmp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        // The umask may have narrowed the mode; secrets must be exactly 0600, not less strict.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Points the symlink `link` at `target` atomically (a new link renamed over the old one).
pub fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    let tmp = sibling_tmp_path(link);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(err) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    sync_parent_dir(link)
}

/// Fsyncs a directory so that renames and creations inside it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Fsyncs the directory that holds `path`.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Creates a directory (and parents) with `mode`, tightening the mode when it already exists.
pub fn create_private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// A unique temporary name next to `path`, so that the final rename never crosses a file system.
fn sibling_tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    path.with_file_name(unique)
}

/// Why [`open_regular`] refused a path.
#[derive(Debug, thiserror::Error)]
pub enum OpenRegularError {
    /// It cannot be opened (missing, no permission).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// It is there but is not a regular file (`kind`: "a FIFO (named pipe)", "a directory").
    #[error("it is {kind}, not a regular file")]
    NotRegular { kind: &'static str },
}

/// Opens a file an operator named for reading, refusing at once anything but a regular file (a
/// symlink to one is fine). A FIFO would block `open` until a writer comes and then hand over a
/// stream that may end anywhere; a device may never end and opening one can have effects (a tape
/// rewinds). So the path is `stat`ed first and only a regular file is opened, with `O_NONBLOCK`
/// so that one swapped for a FIFO between the two steps is never waited on, and the descriptor
/// is checked again (`O_NONBLOCK` is then cleared; regular files ignore it anyway).
pub fn open_regular(path: &Path) -> Result<File, OpenRegularError> {
    check_regular(&fs::metadata(path)?)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    check_regular(&file.metadata()?)?;
    let flags = rustix::fs::fcntl_getfl(&file).map_err(io::Error::from)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(io::Error::from)?;
    Ok(file)
}

/// Reads a whole file an operator named, through [`open_regular`].
pub fn read_regular(path: &Path) -> Result<Vec<u8>, OpenRegularError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Refuses metadata that is not a regular file's, naming what it is.
pub fn check_regular(metadata: &fs::Metadata) -> Result<(), OpenRegularError> {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata.file_type();
    let kind = if kind.is_file() {
        return Ok(());
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "of another kind"
    };
    Err(OpenRegularError::NotRegular { kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_contents_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn open_regular_takes_files_and_links_to_them_and_refuses_the_rest_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bundle.tar");
        fs::write(&file, b"bundle").unwrap();
        let link = dir.path().join("link.tar");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"bundle");
        assert_eq!(read_regular(&link).unwrap(), b"bundle");
        let refused = |path: &Path| match open_regular(path) {
            Err(OpenRegularError::NotRegular { kind }) => kind,
            other => panic!("{}: {other:?}", path.display()),
        };
        assert_eq!(refused(&fifo), "a FIFO (named pipe)");
        assert_eq!(refused(dir.path()), "a directory");
        assert_eq!(refused(Path::new("/dev/null")), "a character device");
        assert!(matches!(
            open_regular(&dir.path().join("missing")),
            Err(OpenRegularError::Io(_))
        ));
    }

    #[test]
    fn replace_symlink_swaps_target() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("current");
        replace_symlink(Path::new("a"), &link).unwrap();
        replace_symlink(Path::new("b"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("b"));
    }
}

/// Why [`read_secret`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// It cannot be read.
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Group or others may read it: it may have leaked already, and whoever made it so will
    /// not notice unless refused.
    #[error("`{path}` is readable by other users (mode {mode:o}): chmod 600 it")]
    Readable { path: PathBuf, mode: u32 },
}

/// Reads a secret (a password, an activation key), refusing a file group or others can read.
pub fn read_secret(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Readable {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io)
}
