//! The one envelope every `lmc` artifact is written in.
//!
//! ```text
//! offset size  field
//!  0      8    magic  b"LMCARTF\0"
//!  8      4    format version (u32 LE)      -- bumped whenever any payload schema changes
//! 12      4    kind (u32 LE)                -- Run, Dataset, Ticket, Probe, and a kind per checkpoint
//! 16     32    provenance hash (SHA-256 of stage + config + input hashes)
//! 48      8    payload length (u64 LE)
//! 56      4    CRC-32 of bytes 0..56 and of the payload
//! 60      n    payload (bincode)
//! ```
//! Writes go to a temporary file in the same folder, are synced, then renamed over the target, so a
//! reader never sees a half-written artifact. Reads check every field before decoding and name the
//! file and the problem when one is off.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use bincode::Options as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// First bytes of every artifact.
pub const MAGIC: &[u8; 8] = b"LMCARTF\0";
/// The envelope + payload format this build writes and the newest it reads. Version 2: the
/// Ticket payload keeps its IMP-only fields in its IMP origin. Version 3: an interpolation
/// Probe's settings record a test-split subsample (`test_samples`).
pub const FORMAT_VERSION: u32 = 3;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 60;

/// What an artifact holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum Kind {
    /// A trained network (`lmc train`).
    Run = 1,
    /// A dataset, usually distilled (`lmc distill`).
    Dataset = 2,
    /// A sparse subnetwork: init parameters and mask (`lmc prune`).
    Ticket = 3,
    /// Probe results (`lmc probe`).
    Probe = 4,
    /// Resumable training state (written next to an unfinished `lmc train` output or IMP round).
    Checkpoint = 5,
    /// Resumable distillation state (pixels, momentum, counters).
    DistillCheckpoint = 6,
    /// Resumable loss-landscape state (the rows done so far).
    LandscapeCheckpoint = 7,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Run,
            2 => Kind::Dataset,
            3 => Kind::Ticket,
            4 => Kind::Probe,
            5 => Kind::Checkpoint,
            6 => Kind::DistillCheckpoint,
            7 => Kind::LandscapeCheckpoint,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// SHA-256 naming what produced an artifact: the stage, its full configuration, and the
/// provenance of its inputs ("configuration is identity").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Provenance(pub [u8; 32]);

impl Provenance {
    /// Hash of `stage`, the JSON form of `config`, and the input provenances in order.
    pub fn of(stage: &str, config: &impl Serialize, inputs: &[Provenance]) -> Provenance {
        let mut h = Sha256::new();
        h.update(stage.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(config).expect("configs serialise to JSON"));
        for i in inputs {
            h.update(i.0);
        }
        Provenance(h.finalize().into())
    }
    /// Hex form (64 characters).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// First 12 hex characters, for file names.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Debug for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.hex())
    }
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.hex())
    }
}

/// A payload type that can be stored in the envelope.
pub trait Artifact: Serialize + DeserializeOwned {
    /// Its kind tag.
    const KIND: Kind;
    /// The oldest format version whose payload of this kind this build decodes: raise it to
    /// [`FORMAT_VERSION`] when this kind's payload schema changes, so an older file is refused by
    /// name instead of being decoded as the new schema.
    const MIN_FORMAT: u32 = 1;

    /// Checks a decoded payload for what its type cannot say: vector lengths against their
    /// layout, a model against its spec, labels against the class count, finite values where
    /// they must be. [`decode`] calls it for every kind, so a file that decodes but does not hold
    /// together (re-sealed after an edit, or written by a buggy tool) is a [`Error::BadFile`]
    /// naming what is wrong instead of a panic or garbage later on.
    fn validate_payload(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// The decoded fixed header of an artifact.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Header {
    /// Format version it was written with.
    pub version: u32,
    /// What it holds.
    pub kind: Kind,
    /// What produced it.
    pub provenance: Provenance,
    /// Payload bytes.
    pub payload_len: u64,
}

/// Serialises `value` into an envelope and writes it atomically to `path`.
/// The payload is validated first ([`Artifact::validate_payload`]): what this build writes, it
/// must read back.
pub fn write<A: Artifact>(path: &Path, value: &A, provenance: Provenance) -> Result<()> {
    value.validate_payload().map_err(|msg| {
        Error::data(format!("{}: refusing to write an invalid {}: {msg}", path.display(), A::KIND))
    })?;
    write_unchecked(path, value, provenance)
}

/// [`write`] without validating the payload: what a buggy or hostile tool could write, with a
/// valid envelope and checksum. Only for tests of the readers' validation.
#[doc(hidden)]
pub fn write_unchecked<A: Artifact>(path: &Path, value: &A, provenance: Provenance) -> Result<()> {
    let payload = bincode::serialize(value)
        .map_err(|e| Error::bad_file(path, format!("cannot encode {}: {e}", A::KIND)))?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(A::KIND as u32).to_le_bytes());
    bytes.extend_from_slice(&provenance.0);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes);
    crc.update(&payload);
    bytes.extend_from_slice(&crc.finalize().to_le_bytes());
    bytes.extend_from_slice(&payload);
    write_atomic(path, &bytes)
}

/// Errors unless `path` is absent or a regular file (or a link to one): the rename of an
/// atomic write would replace whatever is there, a device node or a FIFO included, and reading
/// a FIFO blocks. Called before any read or write of an artifact, and by stages before they
/// start work on an output.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let ft = if meta.file_type().is_symlink() {
        match std::fs::metadata(path) {
            Ok(m) => m.file_type(),
            // A dangling link: the write replaces the link, which is what a file would be.
            Err(_) => return Ok(()),
        }
    } else {
        meta.file_type()
    };
    if ft.is_file() {
        return Ok(());
    }
    let what = if ft.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
        #[cfg(not(unix))]
        {
            "not a regular file"
        }
    };
    Err(Error::bad_file(
        path,
        format!("exists and is {what}, not a regular file: lmc neither reads it nor replaces it"),
    ))
}

/// Temporary file name of a write of `name` by process `pid` (`.NAME.PID.tmp`).
fn temp_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}.tmp")
}

/// Removes the temporary files that writes of `path` by processes no longer running left
/// behind (a killed write). Needs `/proc` to tell which processes run; without it nothing is
/// removed. Failures are ignored: a stale file costs only space.
pub fn remove_stale_temporaries(path: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return };
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let me = std::process::id();
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = f
            .strip_prefix(&format!(".{name}."))
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me
            && f == temp_name(&name, pid)
            && !Path::new("/proc").join(pid.to_string()).exists()
            && e.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Path of the lock file of output `path` (`.NAME.lock` in its folder).
pub fn lock_path(path: &Path) -> PathBuf {
    // A folder named without a last component (`.`, `..`) is locked by its real name.
    let real;
    let path = match path.file_name() {
        Some(_) => path,
        None => {
            real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
            &real
        }
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.lock"))
}

/// An advisory lock on one output (a file, or a folder a command fills), held while a process
/// writes it: a second writer of the same output fails at once with [`Error::Locked`] naming the
/// holder, instead of both running and one result being silently lost.
///
/// The lock is `flock` on a lock file next to the output ([`lock_path`]), which holds the
/// holder's process id. The lock belongs to the open file, so the kernel releases it when the
/// holder exits however it exits (a killed writer never leaves a stale lock), and two locks of
/// one output within one process exclude each other too. Dropping it removes the file while
/// still holding the lock; a writer that opened the file just before then finds, once it holds
/// the lock, that the path no longer names its file and starts over.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl OutputLock {
    /// Takes the lock of output `path`, creating its folder if needed. Fails with
    /// [`Error::Locked`] when another writer holds it. Where no lock file can be made (a
    /// read-only folder: nothing can be written there either) the lock is a no-op, so a cached
    /// output there can still be read.
    pub fn acquire(path: &Path) -> Result<OutputLock> {
        let lock = lock_path(path);
        let dir = match lock.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let read_only = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            )
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return if read_only(&e) {
                Ok(OutputLock { path: lock, file: None })
            } else {
                Err(Error::io(&dir, e))
            };
        }
        check_regular(&lock)?;
        // Bounded: each retry means another writer removed the file between our open and our
        // lock, which takes a finishing writer per try.
        for _ in 0..1000 {
            let mut file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock)
            {
                Ok(f) => f,
                Err(e) if read_only(&e) => return Ok(OutputLock { path: lock, file: None }),
                Err(e) => return Err(Error::io(&lock, e)),
            };
            // Called by path: std's own `File::try_lock` (Rust 1.89) shadows the trait method.
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = std::io::Read::read_to_string(&mut file, &mut text);
                    let pid = text.trim().parse::<u32>().ok();
                    return Err(Error::Locked { path: path.to_path_buf(), pid });
                }
                Err(fs4::TryLockError::Error(e)) => return Err(Error::io(&lock, e)),
            }
            if !same_file(&file, &lock) {
                continue;
            }
            // The id is for the message of a second writer; failing to write it only makes
            // that message say "another process".
            let _ = file.set_len(0);
            let _ = write!(file, "{}", std::process::id());
            return Ok(OutputLock { path: lock, file: Some(file) });
        }
        Err(Error::Locked { path: path.to_path_buf(), pid: None })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
        // The file closes after the removal, which releases the lock.
    }
}

/// Whether `path` still names the open `file` (not removed, not replaced by another file).
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        path.exists()
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename. Refuses a `path`
/// that exists and is not a regular file ([`check_regular`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    check_regular(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(temp_name(&name, std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Reads and verifies the envelope of any artifact: header plus the payload bytes.
pub fn read_raw(path: &Path) -> Result<(Header, Vec<u8>)> {
    check_regular(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_raw(path, bytes)
}

/// [`read_raw`] of bytes already in memory (`path` names them in errors).
pub fn parse_raw(path: &Path, mut bytes: Vec<u8>) -> Result<(Header, Vec<u8>)> {
    let bad = |msg: String| Error::bad_file(path, msg);
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(bad("not an lmc artifact (bad magic bytes)".into()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "truncated artifact: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(bad(format!(
            "written by a newer lmc (format version {version}; this build reads up to {FORMAT_VERSION}): upgrade lmc"
        )));
    }
    if version == 0 {
        return Err(bad("corrupted artifact: format version 0".into()));
    }
    let kind_raw = u32_at(12);
    let provenance = Provenance(bytes[16..48].try_into().unwrap());
    let payload_len = u64::from_le_bytes(bytes[48..56].try_into().unwrap());
    let stored_crc = u32_at(56);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < payload_len {
        return Err(bad(format!(
            "truncated artifact: header promises {payload_len} payload bytes, file has {have}"
        )));
    }
    if have > payload_len {
        return Err(bad(format!(
            "corrupted artifact: {} bytes of trailing garbage",
            have - payload_len
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..56]);
    crc.update(&bytes[HEADER_LEN..]);
    if crc.finalize() != stored_crc {
        return Err(bad("corrupted artifact: checksum mismatch".into()));
    }
    let kind =
        Kind::from_u32(kind_raw).ok_or_else(|| bad(format!("unknown artifact kind {kind_raw}")))?;
    let payload = bytes.split_off(HEADER_LEN);
    Ok((Header { version, kind, provenance, payload_len }, payload))
}

/// Reads an artifact of kind `A`, failing clearly on any other kind.
pub fn read<A: Artifact>(path: &Path) -> Result<(Header, A)> {
    let (header, payload) = read_raw(path)?;
    if header.kind != A::KIND {
        return Err(Error::bad_file(
            path,
            format!("is a {} artifact, expected a {}", header.kind, A::KIND),
        ));
    }
    let value = decode(path, &header, &payload)?;
    Ok((header, value))
}

/// The bincode settings artifacts are encoded with (those of `bincode::serialize`: little
/// endian, fixed-size integers, trailing bytes allowed), decoding at most `limit` bytes (the
/// payload's size): a length prefix that claims more than the payload holds is an error before
/// anything is allocated for it. Decoding from a slice, bincode 1.3 checks each length against
/// the bytes left itself (and serde caps what a sequence reserves up front, 1 MiB), so the
/// limit only comes into play if a payload is ever decoded from a stream, where bincode would
/// otherwise size a buffer by the prefix before reading into it.
fn decode_options(limit: usize) -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(limit as u64)
}

/// Decodes a verified payload.
pub fn decode<A: Artifact>(path: &Path, header: &Header, payload: &[u8]) -> Result<A> {
    if header.version < A::MIN_FORMAT {
        return Err(Error::bad_file(
            path,
            format!(
                "a {} written by an older lmc (format version {}; this build reads {} artifacts from version {}): recompute it",
                header.kind,
                header.version,
                A::KIND,
                A::MIN_FORMAT
            ),
        ));
    }
    let value: A = decode_options(payload.len()).deserialize(payload).map_err(|e| {
        Error::bad_file(path, format!("{} payload does not decode: {e}", header.kind))
    })?;
    value
        .validate_payload()
        .map_err(|msg| Error::bad_file(path, format!("invalid {}: {msg}", header.kind)))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Toy {
        xs: Vec<f32>,
        name: String,
    }
    impl Artifact for Toy {
        const KIND: Kind = Kind::Probe;
    }

    #[test]
    fn round_trip_and_every_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("toy.lmc");
        let toy = Toy { xs: vec![1.0, -2.5, 3.25], name: "t".into() };
        let prov = Provenance::of("test", &("cfg", 3), &[]);
        write(&p, &toy, prov).unwrap();
        let (h, back) = read::<Toy>(&p).unwrap();
        assert_eq!(back, toy);
        assert_eq!(h.provenance, prov);
        assert_eq!(h.kind, Kind::Probe);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let good = std::fs::read(&p).unwrap();
        let check = |bytes: Vec<u8>, want: &str| {
            std::fs::write(&p, bytes).unwrap();
            let e = read::<Toy>(&p).unwrap_err().to_string();
            assert!(e.contains("toy.lmc") && e.contains(want), "{e}");
        };
        check(good[..good.len() - 3].to_vec(), "truncated");
        check(good[..20].to_vec(), "truncated");
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 2] ^= 0x10;
        check(flipped, "checksum");
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        check(newer, "newer");
        check(
            b"hello world, not an artifact at all......................................".to_vec(),
            "magic",
        );
        let mut other = good.clone();
        other[12..16].copy_from_slice(&(Kind::Run as u32).to_le_bytes());
        // Re-seal the checksum so only the kind is wrong.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&other[..56]);
        crc.update(&other[HEADER_LEN..]);
        let c = crc.finalize().to_le_bytes();
        other[56..60].copy_from_slice(&c);
        check(other, "is a Run artifact, expected a Probe");
    }

    /// `bytes` with the envelope's checksum recomputed: an edit that only validation can catch.
    fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[..56]);
        crc.update(&bytes[HEADER_LEN..]);
        let c = crc.finalize().to_le_bytes();
        bytes[56..60].copy_from_slice(&c);
        bytes
    }

    #[test]
    fn a_hostile_length_prefix_is_refused_within_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("toy.lmc");
        write(&p, &Toy { xs: vec![1.0; 4], name: "abc".into() }, Provenance::default()).unwrap();
        let good = std::fs::read(&p).unwrap();
        // The payload opens with the u64 length of `xs`, then `name`'s after the 4 floats.
        for (at, len) in [(HEADER_LEN, u64::MAX), (HEADER_LEN, 1 << 40), (HEADER_LEN + 24, 1 << 50)]
        {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&len.to_le_bytes());
            std::fs::write(&p, resealed(b)).unwrap();
            let e = read::<Toy>(&p).unwrap_err().to_string();
            assert!(e.contains("toy.lmc") && e.contains("does not decode"), "{e}");
        }
        // From a stream, where bincode sizes a buffer by the prefix before reading into it, the
        // limit is what refuses the prefix.
        let payload = &good[HEADER_LEN..];
        let mut hostile = payload.to_vec();
        hostile[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let e = decode_options(hostile.len())
            .deserialize_from::<_, Toy>(std::io::Cursor::new(&hostile))
            .unwrap_err();
        assert!(e.to_string().contains("size limit"), "{e}");
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Toy2(u8);
    impl Artifact for Toy2 {
        const KIND: Kind = Kind::Probe;
        const MIN_FORMAT: u32 = FORMAT_VERSION;
    }

    #[test]
    fn a_payload_older_than_its_schema_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.lmc");
        write(&p, &Toy2(7), Provenance::default()).unwrap();
        assert_eq!(read::<Toy2>(&p).unwrap().1, Toy2(7));
        // The same file as an older build wrote it (checksum re-sealed).
        let mut b = std::fs::read(&p).unwrap();
        b[8..12].copy_from_slice(&(FORMAT_VERSION - 1).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&b[..56]);
        crc.update(&b[HEADER_LEN..]);
        let c = crc.finalize().to_le_bytes();
        b[56..60].copy_from_slice(&c);
        std::fs::write(&p, b).unwrap();
        let e = read::<Toy2>(&p).unwrap_err().to_string();
        assert!(e.contains("old.lmc") && e.contains("older lmc"), "{e}");
    }

    #[test]
    fn an_output_has_one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sub/o.lmc");
        let first = OutputLock::acquire(&out).unwrap();
        let lock = dir.path().join("sub/.o.lmc.lock");
        assert_eq!(lock_path(&out), lock);
        assert_eq!(std::fs::read_to_string(&lock).unwrap(), std::process::id().to_string());
        // flock belongs to the open file, so a second lock in this process is refused like
        // another process's, naming the holder.
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(matches!(e, Error::Locked { pid: Some(p), .. } if p == std::process::id()), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("o.lmc is being written by process"), "{msg}");
        // A folder named `.` is locked by its name in its parent.
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        let name = cwd.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(lock_path(Path::new(".")), cwd.parent().unwrap().join(format!(".{name}.lock")));
        // Another output in the same folder is free.
        let other = OutputLock::acquire(&dir.path().join("sub/p.lmc")).unwrap();
        drop(first);
        assert!(!lock.exists(), "the lock file goes with the lock");
        let again = OutputLock::acquire(&out).unwrap();
        drop((again, other));
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 0);
        // A lock file left by a killed writer holds no lock: it is taken over.
        std::fs::write(&lock, b"999999999").unwrap();
        drop(OutputLock::acquire(&out).unwrap());
        assert!(!lock.exists());
    }

    #[test]
    fn provenance_depends_on_stage_config_and_inputs() {
        let a = Provenance::of("train", &1, &[]);
        assert_ne!(a, Provenance::of("train", &2, &[]));
        assert_ne!(a, Provenance::of("prune", &1, &[]));
        assert_ne!(a, Provenance::of("train", &1, &[a]));
        assert_eq!(a, Provenance::of("train", &1, &[]));
        assert_eq!(a.hex().len(), 64);
    }
}
