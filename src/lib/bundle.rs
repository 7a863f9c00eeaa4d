//! Air-gap bundles: one tar file that carries a revision (or what changed since one) across a
//! closed network's boundary, with the exporter's signed manifest and a signed bundle header.
//!
//! ```text
//! bundle.json      BundleHeader: revision, content hash, base revision, included paths
//! bundle.sig       Ed25519 signature of bundle.json by the exporter's key
//! manifest.json    the revision's manifest, as signed by the exporter
//! manifest.sig     its signature
//! keys.json        the exporter's key chain (only when its key was ever rotated; its sha256 is
//!                  in bundle.json)
//! files/<path>     every included file, in manifest order
//! ```
//!
//! The reader trusts nothing it has not checked: the leading members must come first and
//! verify against a trusted key before any file is written; every file member must be a plain
//! file, listed, unique, of the size the manifest says and with its sha256; files are written
//! only below the staging directory given to it.
//!
//! A bundle signed by a key the importer does not trust is accepted when the chain it carries
//! leads from a trusted key to the signer's ([`rotation::follow`]); the reader says so
//! ([`VerifiedBundle::followed`]) and the importer then moves its trust store on. A chain with a
//! statement the trusted key did not sign refuses the bundle.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::manifest::{self, FileEntry, Manifest};
use crate::pki::rotation::{self, ChainError, KeyChain};
use crate::pki::{SigningKey, TrustedKey, VerifyingKey};

/// Format version of `bundle.json`.
pub const BUNDLE_FORMAT: u32 = 1;
const HEADER_MEMBER: &str = "bundle.json";
const HEADER_SIGNATURE_MEMBER: &str = "bundle.sig";
const KEYS_MEMBER: &str = rotation::SERVED_FILE;
const FILES_PREFIX: &str = "files/";
/// Largest `bundle.json` or `manifest.json` accepted.
const DOCUMENT_LIMIT: u64 = 64 << 20;
/// Largest signature member accepted.
const SIGNATURE_LIMIT: u64 = 4096;

/// `bundle.json`: what the bundle carries, signed by the exporter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// [`BUNDLE_FORMAT`].
    pub format: u32,
    /// When the bundle was made.
    pub created_at: DateTime<Utc>,
    /// Fingerprint of the exporter's key.
    pub exporter: String,
    /// The exporter's revision name.
    pub revision: String,
    /// Content hash of the revision (equal on both sides after the import).
    pub content_sha256: String,
    /// sha256 of the `manifest.json` member.
    pub manifest_sha256: String,
    /// For an incremental bundle: the revision the closed side must already hold.
    pub base: Option<BundleBase>,
    /// Paths of the files carried (all of the manifest's for a full bundle).
    pub included: Vec<String>,
    /// sha256 of the `keys.json` member, the exporter's key chain; absent when its key was never
    /// rotated (such bundles stay readable by a pm from before chains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_sha256: Option<String>,
}

/// The revision an incremental bundle builds on, identified by content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleBase {
    /// The exporter's name for it.
    pub revision: String,
    /// Its content hash, which the importer's latest must have.
    pub content_sha256: String,
}

/// Why a bundle was refused. Nothing outside the staging directory is changed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading the bundle or writing the staging directory failed.
    #[error("{action}: {source}")]
    Io { action: String, source: io::Error },
    /// The bundle ended early.
    #[error("bundle is truncated: {0}")]
    Truncated(String),
    /// The bundle exceeds the size limit.
    #[error("bundle is larger than the limit of {limit} bytes (raise it with --max-size)")]
    TooLarge { limit: u64 },
    /// A member is not what the format allows at that place.
    #[error("bundle member `{member}` is refused: {problem}")]
    BadMember { member: String, problem: String },
    /// The header or manifest does not parse or contradicts itself.
    #[error("bundle is malformed: {0}")]
    Malformed(String),
    /// No trusted key made the signature, and no chain the bundle carries leads to it from one.
    #[error(
        "bundle is signed by a key this mirror does not trust (it claims exporter {fingerprint}){}",
        if *carries_chain {
            ", and the key chain it carries leads to it from none of the keys this mirror trusts"
        } else {
            ""
        }
    )]
    Untrusted {
        fingerprint: String,
        carries_chain: bool,
    },
    /// The key chain the bundle carries does not verify: a forged or damaged statement.
    #[error("the key chain in the bundle (`{KEYS_MEMBER}`) is refused: {0}")]
    Chain(ChainError),
    /// The manifest's signature does not verify with the key that signed the header.
    #[error("the manifest in the bundle is not signed by the key that signed the bundle")]
    ManifestSignature,
    /// A file's size or hash differs from the manifest.
    #[error("bundle file `{path}` does not match the manifest: {problem}")]
    Mismatch { path: String, problem: String },
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> BundleError {
    let action = action.into();
    move |source| BundleError::Io { action, source }
}

/// Counts and hashes everything that passes through, and refuses more than `limit` bytes.
struct MeteredReader<R> {
    inner: R,
    read: u64,
    limit: u64,
    hasher: openssl::sha::Sha256,
    exceeded: bool,
}

impl<R: Read> Read for MeteredReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("bundle size limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Hashes and counts everything written through it.
struct HashingWriter<W> {
    inner: W,
    written: u64,
    hasher: openssl::sha::Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenBundle {
    /// Bytes of the bundle file.
    pub size: u64,
    /// Hex sha256 of the bundle file, for operators to compare on both sides.
    pub sha256: String,
}

/// Writes a bundle of the revision in `revision_dir` to `out` (atomically: aside, fsync,
/// rename). `included` are the manifest paths to carry; `progress` is told the bytes written.
pub fn write_bundle(
    out: &Path,
    revision_dir: &Path,
    base: Option<BundleBase>,
    included: Vec<String>,
    key: &SigningKey,
    chain: Option<&[u8]>,
    progress: &dyn Fn(u64),
) -> Result<(BundleHeader, WrittenBundle), BundleError> {
    let manifest_bytes = std::fs::read(revision_dir.join(manifest::MANIFEST_FILE))
        .map_err(io_error("read the manifest"))?;
    let manifest_signature = std::fs::read(revision_dir.join(manifest::SIGNATURE_FILE))
        .map_err(io_error("read the manifest signature"))?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|err| BundleError::Malformed(format!("local manifest: {err}")))?;
    let header = BundleHeader {
        format: BUNDLE_FORMAT,
        created_at: Utc::now(),
        exporter: key
            .fingerprint()
            .map_err(|err| BundleError::Malformed(err.to_string()))?,
        revision: manifest.revision.clone(),
        content_sha256: manifest.content_sha256.clone(),
        manifest_sha256: manifest::hex(&openssl::sha::sha256(&manifest_bytes)),
        base,
        included,
        keys_sha256: chain.map(|bytes| manifest::hex(&openssl::sha::sha256(bytes))),
    };
    let header_bytes = serde_json::to_vec_pretty(&header).expect("bundle header serializes");
    let header_signature = key
        .sign(&header_bytes)
        .map_err(|err| BundleError::Malformed(err.to_string()))?;

    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let write = || -> io::Result<WrittenBundle> {
        let file = File::create(&tmp)?;
        let writer = HashingWriter {
            inner: io::BufWriter::with_capacity(1 << 20, file),
            written: 0,
            hasher: openssl::sha::Sha256::new(),
        };
        let mut tar = tar::Builder::new(writer);
        let mut append = |name: &str, size: u64, data: &mut dyn Read| -> io::Result<()> {
            let mut member = tar::Header::new_ustar();
            member.set_size(size);
            member.set_mode(0o644);
            // Fixed metadata: the same revision exports to the same bytes.
            member.set_mtime(0);
            member.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut member, name, data)?;
            progress(tar.get_ref().written);
            Ok(())
        };
        append(
            HEADER_MEMBER,
            header_bytes.len() as u64,
            &mut header_bytes.as_slice(),
        )?;
        let signature = header_signature.as_slice();
        append(
            HEADER_SIGNATURE_MEMBER,
            signature.len() as u64,
            &mut &*signature,
        )?;
        append(
            manifest::MANIFEST_FILE,
            manifest_bytes.len() as u64,
            &mut manifest_bytes.as_slice(),
        )?;
        let manifest_sig = manifest_signature.as_slice();
        append(
            manifest::SIGNATURE_FILE,
            manifest_sig.len() as u64,
            &mut &*manifest_sig,
        )?;
        if let Some(mut chain) = chain {
            append(KEYS_MEMBER, chain.len() as u64, &mut chain)?;
        }
        for path in &header.included {
            let mut file = File::open(revision_dir.join(path))?;
            let size = file.metadata()?.len();
            append(&format!("{FILES_PREFIX}{path}"), size, &mut file)?;
        }
        let writer = tar.into_inner()?;
        let HashingWriter {
            inner,
            written,
            hasher,
        } = writer;
        let file = inner.into_inner().map_err(|err| err.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)?;
        crate::durable::sync_parent_dir(out)?;
        Ok(WrittenBundle {
            size: written,
            sha256: manifest::hex(&hasher.finish()),
        })
    };
    match write() {
        Ok(written) => Ok((header, written)),
        Err(source) => {
            let _ = std::fs::remove_file(&tmp);
            Err(BundleError::Io {
                action: format!("write `{}`", out.display()),
                source,
            })
        }
    }
}

/// Limits the reader enforces.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest bundle accepted, in bytes.
    pub max_size: u64,
}

/// A bundle whose signatures, members and hashes all verified; its files are in the staging
/// directory.
#[derive(Debug)]
pub struct VerifiedBundle {
    /// The signed header.
    pub header: BundleHeader,
    /// The revision's manifest.
    pub manifest: Manifest,
    /// The trusted key that signed it.
    pub signer: String,
    /// Bytes of the whole bundle.
    pub size: u64,
    /// Hex sha256 of the whole bundle.
    pub sha256: String,
    /// Bytes of the file members, per product.
    pub bytes_per_product: BTreeMap<String, u64>,
    /// Trusted keys the carried chain moved on from, to the signer's key.
    pub followed: Vec<FollowedKey>,
}

/// A trusted key whose owner rotated away from it, as the bundle's chain shows.
#[derive(Debug, Clone)]
pub struct FollowedKey {
    /// The trusted key's fingerprint.
    pub from: String,
    /// Its file in the trust store.
    pub from_path: PathBuf,
    /// The key the chain led to: the bundle's signer.
    pub to: String,
    /// Its PEM, to trust from now on.
    pub to_pem: String,
    /// Sequence numbers of the rotations followed, oldest first.
    pub rotations: Vec<u64>,
}

/// Reads and verifies a bundle, writing its files below `staging` (which must exist and be
/// empty). Trusts only `trusted` keys.
pub fn read_bundle(
    source: impl Read,
    staging: &Path,
    trusted: &[TrustedKey],
    limits: ReadLimits,
) -> Result<VerifiedBundle, BundleError> {
    let mut metered = MeteredReader {
        inner: source,
        read: 0,
        limit: limits.max_size,
        hasher: openssl::sha::Sha256::new(),
        exceeded: false,
    };
    let result = read_members(&mut metered, staging, trusted);
    let result = match result {
        Err(_) if metered.exceeded => Err(BundleError::TooLarge {
            limit: limits.max_size,
        }),
        other => other,
    };
    let (header, manifest, signer, bytes_per_product, followed) = result?;
    // Whatever follows the tar's end (padding a writer added) still counts and is hashed, so
    // the printed sha256 is that of the whole file.
    io::copy(&mut metered, &mut io::sink()).map_err(|err| {
        if metered.exceeded {
            BundleError::TooLarge {
                limit: limits.max_size,
            }
        } else {
            BundleError::Io {
                action: "read the bundle".into(),
                source: err,
            }
        }
    })?;
    let sha256 = manifest::hex(&metered.hasher.finish());
    Ok(VerifiedBundle {
        header,
        manifest,
        signer,
        size: metered.read,
        sha256,
        bytes_per_product,
        followed,
    })
}

type Members = (
    BundleHeader,
    Manifest,
    String,
    BTreeMap<String, u64>,
    Vec<FollowedKey>,
);

fn read_members(
    source: &mut dyn Read,
    staging: &Path,
    trusted: &[TrustedKey],
) -> Result<Members, BundleError> {
    let mut archive = tar::Archive::new(source);
    let mut entries = archive.entries().map_err(io_error("read the bundle"))?;
    let mut next_member = |expected: &str| -> Result<tar::Entry<'_, &mut dyn Read>, BundleError> {
        match entries.next() {
            None => Err(BundleError::Truncated(format!("`{expected}` is missing"))),
            Some(Err(err)) => Err(tar_error(err)),
            Some(Ok(entry)) => Ok(entry),
        }
    };
    let mut read_document = |name: &str, limit: u64| -> Result<Vec<u8>, BundleError> {
        let mut entry = next_member(name)?;
        let member = member_name(&entry)?;
        if member != name {
            return Err(BundleError::BadMember {
                member,
                problem: format!("expected `{name}` at this position"),
            });
        }
        check_regular(&entry, &member)?;
        let size = entry.header().size().map_err(tar_error)?;
        if size > limit {
            return Err(BundleError::BadMember {
                member,
                problem: format!("{size} bytes is too large"),
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut bytes).map_err(tar_error)?;
        if bytes.len() as u64 != size {
            return Err(BundleError::Truncated(format!("`{member}` is cut short")));
        }
        Ok(bytes)
    };
    let header_bytes = read_document(HEADER_MEMBER, DOCUMENT_LIMIT)?;
    let header_signature = read_document(HEADER_SIGNATURE_MEMBER, SIGNATURE_LIMIT)?;
    let claimed = serde_json::from_slice::<serde_json::Value>(&header_bytes)
        .ok()
        .and_then(|v| v.get("exporter")?.as_str().map(String::from))
        .unwrap_or_else(|| "unknown".into());
    let trusted_signer = trusted
        .iter()
        .find(|key| key.key.verify(&header_bytes, &header_signature));
    // Parsed before it is verified only to learn whether a chain follows; nothing it says is
    // used until a trusted key, or one a trusted key's rotations lead to, verifies it.
    let parsed = serde_json::from_slice::<BundleHeader>(&header_bytes);
    let carries_chain = parsed.as_ref().is_ok_and(|h| h.keys_sha256.is_some());
    if trusted_signer.is_none() && !carries_chain {
        return Err(BundleError::Untrusted {
            fingerprint: claimed,
            carries_chain,
        });
    }
    let header = parsed.map_err(|err| BundleError::Malformed(format!("bundle.json: {err}")))?;
    if header.format != BUNDLE_FORMAT {
        return Err(BundleError::Malformed(format!(
            "format {} is not supported (this pm reads format {BUNDLE_FORMAT})",
            header.format
        )));
    }
    let manifest_bytes = read_document(manifest::MANIFEST_FILE, DOCUMENT_LIMIT)?;
    let manifest_signature = read_document(manifest::SIGNATURE_FILE, SIGNATURE_LIMIT)?;
    let chain = match &header.keys_sha256 {
        None => None,
        Some(expected) => {
            let bytes = read_document(KEYS_MEMBER, rotation::MAX_CHAIN_BYTES)?;
            if manifest::hex(&openssl::sha::sha256(&bytes)) != *expected {
                return Err(BundleError::Malformed(format!(
                    "{KEYS_MEMBER} is not the one bundle.json names"
                )));
            }
            Some(KeyChain::parse(&bytes).map_err(BundleError::Chain)?)
        }
    };
    let (signer, followed) = match chain {
        Some(chain) => follow_to_signer(&chain, trusted, &header_bytes, &header_signature)
            .map_err(|err| match err {
                BundleError::Untrusted { .. } => BundleError::Untrusted {
                    fingerprint: claimed.clone(),
                    carries_chain,
                },
                other => other,
            })?,
        None => {
            let key = trusted_signer.expect("refused above when no key signed and no chain");
            ((key.fingerprint.clone(), key.key.clone()), Vec::new())
        }
    };
    if manifest::hex(&openssl::sha::sha256(&manifest_bytes)) != header.manifest_sha256 {
        return Err(BundleError::Malformed(
            "manifest.json is not the one bundle.json names".into(),
        ));
    }
    if !signer.1.verify(&manifest_bytes, &manifest_signature) {
        return Err(BundleError::ManifestSignature);
    }
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|err| BundleError::Malformed(format!("manifest.json: {err}")))?;
    check_manifest(&header, &manifest)?;

    let expected: BTreeMap<&str, &FileEntry> = header
        .included
        .iter()
        .map(|path| {
            let entry = manifest
                .file(path)
                .expect("check_manifest: included paths are listed");
            (path.as_str(), entry)
        })
        .collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut bytes_per_product: BTreeMap<String, u64> = BTreeMap::new();
    for entry in entries {
        let mut entry = entry.map_err(tar_error)?;
        let member = member_name(&entry)?;
        check_regular(&entry, &member)?;
        let Some(path) = member.strip_prefix(FILES_PREFIX) else {
            return Err(BundleError::BadMember {
                member,
                problem: "not a file of the revision".into(),
            });
        };
        let Some(file) = expected.get(path) else {
            return Err(BundleError::BadMember {
                member,
                problem: "not listed in the manifest".into(),
            });
        };
        if !seen.insert(path.to_string()) {
            return Err(BundleError::BadMember {
                member,
                problem: "appears twice".into(),
            });
        }
        let size = entry.header().size().map_err(tar_error)?;
        if size != file.size {
            return Err(BundleError::Mismatch {
                path: path.to_string(),
                problem: format!("{size} bytes, the manifest says {}", file.size),
            });
        }
        let target = staging.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_error(format!("create `{}`", parent.display())))?;
        }
        let (written, sha256) = copy_hashing(&mut entry, &target)?;
        if written != file.size {
            return Err(BundleError::Truncated(format!("`{member}` is cut short")));
        }
        if sha256 != file.sha256 {
            return Err(BundleError::Mismatch {
                path: path.to_string(),
                problem: format!("sha256 is {sha256}, the manifest says {}", file.sha256),
            });
        }
        *bytes_per_product.entry(file.product.clone()).or_default() += size;
    }
    if let Some(missing) = header.included.iter().find(|path| !seen.contains(*path)) {
        return Err(BundleError::Truncated(format!(
            "`{FILES_PREFIX}{missing}` is missing"
        )));
    }
    Ok((header, manifest, signer.0, bytes_per_product, followed))
}

/// The bundle's signer through the chain it carries: every trusted key follows the chain (a
/// statement one of them did not sign refuses the bundle), and the signer must be a trusted key
/// or the key one of them reaches. Returns the signer and the trusted keys the chain moved on.
fn follow_to_signer(
    chain: &KeyChain,
    trusted: &[TrustedKey],
    header_bytes: &[u8],
    header_signature: &[u8],
) -> Result<((String, VerifyingKey), Vec<FollowedKey>), BundleError> {
    let mut signer = trusted
        .iter()
        .find(|key| key.key.verify(header_bytes, header_signature))
        .map(|key| (key.fingerprint.clone(), key.key.clone()));
    let mut followed = Vec::new();
    for key in trusted {
        let reached = rotation::follow(chain, &key.fingerprint, key.key.clone())
            .map_err(BundleError::Chain)?;
        let (Some(pem), false) = (&reached.pem, reached.steps.is_empty()) else {
            continue;
        };
        if !reached.key.verify(header_bytes, header_signature) {
            // Rotated on past this bundle's signer, or to a key that did not sign it: the
            // bundle decides nothing about this key.
            continue;
        }
        followed.push(FollowedKey {
            from: key.fingerprint.clone(),
            from_path: key.path.clone(),
            to: reached.fingerprint.clone(),
            to_pem: pem.clone(),
            rotations: reached.steps.iter().map(|step| step.sequence).collect(),
        });
        signer.get_or_insert((reached.fingerprint, reached.key));
    }
    match signer {
        Some(signer) => Ok((signer, followed)),
        None => Err(BundleError::Untrusted {
            fingerprint: String::new(),
            carries_chain: true,
        }),
    }
}

/// The header and manifest must agree, and every path must be safe to write.
fn check_manifest(header: &BundleHeader, manifest: &Manifest) -> Result<(), BundleError> {
    let malformed = |problem: String| Err(BundleError::Malformed(problem));
    if manifest.revision != header.revision || manifest.content_sha256 != header.content_sha256 {
        return malformed("bundle.json and manifest.json name different revisions".into());
    }
    if manifest::content_sha256(&manifest.files) != manifest.content_sha256 {
        return malformed("the manifest's content hash does not match its file list".into());
    }
    let mut paths = HashSet::new();
    for product in &manifest.products {
        if let Err(problem) = crate::config::check_product_name(&product.name) {
            return malformed(format!("product {problem}"));
        }
    }
    for file in &manifest.files {
        if !crate::manifest::safe_relative_path(&file.path) {
            return malformed(format!("unsafe path `{}` in the manifest", file.path));
        }
        // Every file lives in its product's directory, so none can land on manifest.json or
        // on another product's files.
        let in_product = file
            .path
            .strip_prefix(&file.product)
            .is_some_and(|rest| rest.starts_with('/'));
        if !in_product || manifest.product(&file.product).is_none() {
            return malformed(format!(
                "`{}` is not inside the directory of a product of the manifest",
                file.path
            ));
        }
        if !paths.insert(file.path.as_str()) {
            return malformed(format!("`{}` is listed twice in the manifest", file.path));
        }
    }
    let mut included = HashSet::new();
    for path in &header.included {
        if !paths.contains(path.as_str()) {
            return malformed(format!("`{path}` is included but not in the manifest"));
        }
        if !included.insert(path.as_str()) {
            return malformed(format!("`{path}` is included twice"));
        }
    }
    if header.base.is_none() && included.len() != paths.len() {
        return malformed("a full bundle must carry every file of its manifest".into());
    }
    Ok(())
}

fn member_name(entry: &tar::Entry<'_, &mut dyn Read>) -> Result<String, BundleError> {
    let bytes = entry.path_bytes();
    let name = String::from_utf8(bytes.into_owned()).map_err(|_| BundleError::BadMember {
        member: "(not UTF-8)".into(),
        problem: "member names must be UTF-8".into(),
    })?;
    let bad = |problem: &str| BundleError::BadMember {
        member: name.clone(),
        problem: problem.into(),
    };
    if name.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if name.split('/').any(|part| part == "..") {
        return Err(bad("path traversal (`..`) is not allowed"));
    }
    if !crate::manifest::safe_relative_path(&name) {
        return Err(bad("not a plain relative path"));
    }
    Ok(name)
}

fn check_regular(entry: &tar::Entry<'_, &mut dyn Read>, member: &str) -> Result<(), BundleError> {
    let kind = entry.header().entry_type();
    if kind.is_file() {
        return Ok(());
    }
    let problem = if kind.is_symlink() || kind.is_hard_link() {
        "links are not allowed"
    } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
        "device files are not allowed"
    } else {
        "only plain files are allowed"
    };
    Err(BundleError::BadMember {
        member: member.to_string(),
        problem: problem.into(),
    })
}

fn tar_error(err: io::Error) -> BundleError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        BundleError::Truncated("it ends in the middle of a member".into())
    } else {
        BundleError::Io {
            action: "read the bundle".into(),
            source: err,
        }
    }
}

/// Copies a member to `target`, fsyncing it, and returns its size and hex sha256.
fn copy_hashing(source: &mut dyn Read, target: &PathBuf) -> Result<(u64, String), BundleError> {
    let io = |action: &str| io_error(format!("{action} `{}`", target.display()));
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(io("create"))?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = source.read(&mut buffer).map_err(tar_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(io("write"))?;
        written += n as u64;
    }
    file.sync_all().map_err(io("fsync"))?;
    Ok((written, manifest::hex(&hasher.finish())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{Damage, Rng, campaign};
    use crate::manifest::ProductEntry;

    /// A signed revision of three files and a bundle of it; returns the bundle, the key that
    /// signed it as trusted, and where the file members start.
    fn sample_bundle(dir: &Path) -> (Vec<u8>, Vec<TrustedKey>, usize) {
        let home = dir.join("home");
        let key = SigningKey::load_or_create(&home).unwrap();
        let revision = dir.join("r1");
        std::fs::create_dir_all(revision.join("vendor/sub")).unwrap();
        let mut files = Vec::new();
        for (path, body) in [
            ("vendor/a.dat", b"alpha".repeat(300)),
            ("vendor/sub/b.dat", b"beta".repeat(700)),
            ("vendor/c.dat", b"gamma".to_vec()),
        ] {
            std::fs::write(revision.join(path), &body).unwrap();
            files.push(FileEntry {
                path: path.into(),
                size: body.len() as u64,
                sha256: manifest::hex(&openssl::sha::sha256(&body)),
                product: "vendor".into(),
                component: path.into(),
                version: Some("1".into()),
                build_time: None,
            });
        }
        let manifest = Manifest {
            format: 1,
            revision: "r1".into(),
            serial: 1,
            created_at: Utc::now(),
            source: "upstream".into(),
            content_sha256: manifest::content_sha256(&files),
            products: vec![ProductEntry {
                name: "vendor".into(),
                kind: "files".into(),
                version: Some("1".into()),
                components: Vec::new(),
                via: None,
            }],
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest).unwrap();
        std::fs::write(revision.join(manifest::MANIFEST_FILE), &json).unwrap();
        std::fs::write(
            revision.join(manifest::SIGNATURE_FILE),
            key.sign(&json).unwrap(),
        )
        .unwrap();
        let included = manifest.files.iter().map(|f| f.path.clone()).collect();
        let out = dir.join("bundle.tar");
        write_bundle(&out, &revision, None, included, &key, None, &|_| {}).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let (fingerprint, verifying) =
            crate::pki::parse_public_key(&key.public_key_pem().unwrap(), &out).unwrap();
        let trusted = vec![TrustedKey {
            fingerprint,
            key: verifying,
            path: out,
        }];
        // The file members follow the four documents: find the first `files/` header.
        let files_start = (0..bytes.len())
            .step_by(512)
            .find(|at| bytes[*at..].starts_with(FILES_PREFIX.as_bytes()))
            .unwrap();
        (bytes, trusted, files_start)
    }

    fn read(
        bytes: &[u8],
        staging: &Path,
        trusted: &[TrustedKey],
    ) -> Result<VerifiedBundle, BundleError> {
        read_bundle(bytes, staging, trusted, ReadLimits { max_size: 1 << 20 })
    }

    #[test]
    fn a_written_bundle_reads_back_with_its_files_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, trusted, _) = sample_bundle(dir.path());
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let verified = read(&bytes, &staging, &trusted).unwrap();
        assert_eq!(
            verified.sha256,
            manifest::hex(&openssl::sha::sha256(&bytes))
        );
        assert_eq!(verified.size, bytes.len() as u64);
        assert_eq!(
            std::fs::read(staging.join("vendor/sub/b.dat")).unwrap(),
            b"beta".repeat(700)
        );
        assert_eq!(verified.bytes_per_product["vendor"], 1500 + 2800 + 5);
    }

    #[test]
    fn the_same_revision_exports_to_the_same_file_members() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _, start) = sample_bundle(&dir.path().join("one"));
        let (second, _, start_again) = sample_bundle(&dir.path().join("two"));
        assert_eq!(start, start_again);
        // Headers differ (time, key); the file members are byte-identical.
        assert_eq!(first[start..], second[start_again..]);
    }

    /// A damaged copy of `bundle`: the shared byte mutations, plus duplicated 512-byte blocks and
    /// rewritten tar type flags and names; half of the damage lands after the signed documents
    /// so the member parser and not only the signature check gets exercised.
    fn mutate(bundle: &[u8], files_start: usize, rng: &mut Rng) -> Vec<u8> {
        let mut damage = Damage::new(bundle, files_start, rng);
        for _ in 0..1 + damage.rng.below(4) {
            match damage.rng.below(8) {
                0 => damage.flip_bits(),
                1 => damage.truncate(),
                2 => damage.insert_junk(1024),
                3 => damage.duplicate(0, 512),
                4 => {
                    // Rewrite a header's type flag: links, devices, directories, pax, gnu.
                    let block = damage.spot() / 512 * 512;
                    let flag = *damage.rng.pick(b"0123456789KLxgDS");
                    if let Some(byte) = damage.bytes.get_mut(block + 156) {
                        *byte = flag;
                    }
                }
                5 => {
                    // Rewrite a header's name.
                    let block = damage.spot() / 512 * 512;
                    let names: [&[u8]; 6] = [
                        b"../x",
                        b"/etc/x",
                        b"files/../../x",
                        b"files/vendor/a.dat",
                        b"files/",
                        b"bundle.json",
                    ];
                    let name = *damage.rng.pick(&names);
                    if let Some(field) = damage.bytes.get_mut(block..block + 100) {
                        field.fill(0);
                        field[..name.len()].copy_from_slice(name);
                    }
                }
                6 => damage.remove(1024),
                _ => damage.scramble(2048),
            }
        }
        damage.bytes
    }

    /// Everything below `dir` that is not a plain file or directory, or that exists outside
    /// `allowed`.
    fn strays(dir: &Path, allowed: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            for entry in std::fs::read_dir(&current).unwrap() {
                let entry = entry.unwrap();
                let kind = entry.file_type().unwrap();
                let path = entry.path();
                if !(kind.is_file() || kind.is_dir())
                    || !path.starts_with(allowed) && path != allowed
                {
                    found.push(path.clone());
                }
                if kind.is_dir() {
                    stack.push(path);
                }
            }
        }
        found
    }

    /// The bundle reader under damaged input: never a panic, never a write outside the staging
    /// directory, never a link (harness: `crate::fuzz`; CONTRIBUTING.md tells how to run it
    /// longer or replay a seed).
    #[test]
    fn bundle_reader_survives_damaged_bundles_without_writing_outside_staging() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, trusted, files_start) = sample_bundle(&dir.path().join("source"));
        let sandbox = dir.path().join("sandbox");
        std::fs::create_dir(&sandbox).unwrap();
        campaign("bundle reader", 400, |seed| {
            let damaged = mutate(&bundle, files_start, &mut Rng::new(seed));
            let staging = sandbox.join("staging");
            std::fs::create_dir(&staging).unwrap();
            let accepted = read(&damaged, &staging, &trusted).is_ok();
            let stray = strays(&sandbox, &staging);
            assert!(
                stray.is_empty(),
                "wrote outside staging or made links: {stray:?}"
            );
            std::fs::remove_dir_all(&staging).unwrap();
            accepted
        });
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 2,
            "nothing appeared beside the sandbox"
        );
    }
}
