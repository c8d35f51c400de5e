//! The files of an org's storage directory, reached without ever following a link.
//!
//! Runs write into this directory as root, so anything may be planted there: symbolic
//! links (to `/etc/passwd`, to `/`, to another org's directory), FIFOs, device nodes.
//! Every path is therefore walked one component at a time from a descriptor of the
//! org's directory, each component opened with `O_NOFOLLOW` (and `O_DIRECTORY` for
//! directories) relative to the previous one: a link is never followed, wherever it
//! sits in the path. Listing skips links and does not descend into them; reads open
//! regular files only, checked before opening (so a device is never opened) and again
//! on the open descriptor; writes go into a new file under a fresh name that is renamed
//! into place, so they never open, truncate or write through what a run left at the
//! key, and they create directories and regular files only, never links. A write that
//! does not finish leaves nothing behind.
//!
//! Every function here blocks: call them from `spawn_blocking`.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// Directories deeper than this are not listed (a run can nest them without end).
const MAX_DEPTH: usize = 64;
/// Names of files being written, before they are renamed into place (never listed,
/// never a key).
pub(crate) const UPLOAD_PREFIX: &str = ".stoa-upload-";

/// Why a key cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("not found")]
    NotFound,
    /// `at` (a prefix of the key) is a symbolic link.
    #[error("{at} is a symbolic link; storage never follows links")]
    Link { at: String },
    /// `at` is not a directory although the key goes on below it.
    #[error("{at} is not a directory")]
    NotDir { at: String },
    /// The key names something other than a regular file.
    #[error("not a regular file")]
    NotFile,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<Errno> for PathError {
    fn from(e: Errno) -> Self {
        PathError::Io(e.into())
    }
}

/// What [`valid_key`] asks of a key, in words.
pub const KEY_RULES: &str =
    "key must be a relative path of at most 64 parts, without '..', '.', empty parts, '\\' or NUL";

/// Whether `key` may name a file: a relative path without `.`, `..`, empty parts,
/// backslashes or NUL, no deeper than listings go, and no part that is one of
/// storage's own in-flight names.
pub fn valid_key(key: &str) -> bool {
    stoa_core::validate::safe_relative_path(key)
        && key.split('/').count() <= MAX_DEPTH
        && key.split('/').all(|p| !p.starts_with(UPLOAD_PREFIX))
}

/// Size, modification time and entity tag of a stored file.
#[derive(Debug, Clone)]
pub struct Meta {
    pub size: u64,
    pub modified: SystemTime,
    /// Changes whenever the file is replaced or written (device, inode, size, mtime).
    pub etag: String,
}

impl Meta {
    // The stat fields' integer types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    fn of(st: &rustix::fs::Stat) -> Meta {
        let mut m = Meta::sized(st);
        let mut h = Sha256::new();
        for n in [
            st.st_dev,
            st.st_ino,
            st.st_size as u64,
            st.st_mtime as u64,
            st.st_mtime_nsec as u64,
        ] {
            h.update(n.to_le_bytes());
        }
        m.etag = hex::encode(&h.finalize()[..16]);
        m
    }

    /// Size and time only (no entity tag).
    #[allow(clippy::unnecessary_cast)]
    fn sized(st: &rustix::fs::Stat) -> Meta {
        let secs = Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
        Meta {
            size: st.st_size as u64,
            modified: SystemTime::UNIX_EPOCH + secs,
            etag: String::new(),
        }
    }
}

/// One listed file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the org's storage root, with `/`.
    pub key: String,
    pub meta: Meta,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the org's own directory (made by the server, never by a run).
fn open_root(root: &Path) -> Result<OwnedFd, PathError> {
    match rustix::fs::open(root, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) => Err(PathError::NotFound),
        Err(e) => Err(e.into()),
    }
}

pub use stoa_config::make_storage_root as make_root;

/// What is at `name` in `dir`, without following a link.
fn kind_at(dir: &OwnedFd, name: &str) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the directory `parts` below `root`, one component at a time and never through
/// a link; with `create`, missing directories are made.
fn open_dir(root: OwnedFd, parts: &[&str], create: bool) -> Result<OwnedFd, PathError> {
    let mut dir = root;
    for (i, part) in parts.iter().enumerate() {
        let at = || parts[..=i].join("/");
        let next = match rustix::fs::openat(&dir, *part, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) if create => {
                // 0777: Python runs (another uid) write below directories made here.
                match rustix::fs::mkdirat(&dir, *part, Mode::from_raw_mode(0o777)) {
                    Ok(()) => {
                        let _ = rustix::fs::chmodat(
                            &dir,
                            *part,
                            Mode::from_raw_mode(0o777),
                            AtFlags::empty(),
                        );
                    }
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                // Opened like any other component: a link planted since is refused.
                rustix::fs::openat(&dir, *part, DIR_FLAGS, Mode::empty())
                    .map_err(|e| classify(&dir, part, e, at()))?
            }
            Err(e) => return Err(classify(&dir, part, e, at())),
        };
        dir = next;
    }
    Ok(dir)
}

/// Turns a failed directory open into the reason: a link, not a directory, missing.
fn classify(dir: &OwnedFd, name: &str, e: Errno, at: String) -> PathError {
    match kind_at(dir, name) {
        Ok(Some(FileType::Symlink)) => PathError::Link { at },
        Ok(Some(FileType::Directory)) => PathError::Io(e.into()),
        Ok(Some(_)) => PathError::NotDir { at },
        Ok(None) => PathError::NotFound,
        Err(e) => e.into(),
    }
}

/// Splits a checked key into its directories and file name.
fn split_key(key: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = key.split('/').collect();
    let name = parts.pop().expect("a checked key has a part");
    (parts, name)
}

/// Opens the regular file at `key` for reading.
pub fn open_file(root: &Path, key: &str) -> Result<(std::fs::File, Meta), PathError> {
    let (parts, name) = split_key(key);
    let dir = open_dir(open_root(root)?, &parts, false)?;
    // Opened as a path first (opening a path never acts on what it names: a device or
    // a FIFO can block or act when opened for reading), checked on that descriptor, and
    // only then opened for reading through it: a device node a container renames into
    // place is never opened.
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(PathError::NotFound),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&fd)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        // O_PATH with O_NOFOLLOW opens a link itself.
        FileType::Symlink => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        _ => return Err(PathError::NotFile),
    }
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let file = rustix::fs::open(
        via.as_str(),
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // The same file as the checked descriptor (not something put at its name since).
    let reopened = rustix::fs::fstat(&file)?;
    if (reopened.st_dev, reopened.st_ino) != (st.st_dev, st.st_ino) {
        return Err(PathError::NotFile);
    }
    Ok((std::fs::File::from(file), Meta::of(&st)))
}

/// Reads the whole regular file at `key`.
#[cfg(test)]
fn read_key(root: &Path, key: &str) -> Result<Vec<u8>, PathError> {
    use std::io::Read;
    let (mut f, _) = open_file(root, key)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A file being written at a key: a new file next to it, renamed over the key by
/// [`NewFile::commit`], removed when dropped uncommitted.
pub struct NewFile {
    dir: OwnedFd,
    tmp: String,
    name: String,
    committed: bool,
}

/// Starts a write at `key` (its directories are made); write the content into the
/// returned file, then commit.
pub fn create(root: &Path, key: &str) -> Result<(NewFile, std::fs::File), PathError> {
    make_root(root)?;
    let (parts, name) = split_key(key);
    let dir = open_dir(open_root(root)?, &parts, true)?;
    match kind_at(&dir, name)? {
        None | Some(FileType::RegularFile) => {}
        Some(FileType::Symlink) => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        Some(_) => return Err(PathError::NotFile),
    }
    let tmp = format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )?;
    // The umask took write from the sandbox uid of Python runs.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o666))?;
    let new = NewFile {
        dir,
        tmp,
        name: name.to_string(),
        committed: false,
    };
    Ok((new, std::fs::File::from(fd)))
}

impl NewFile {
    /// Puts the written file in place of whatever is at the key.
    pub fn commit(mut self) -> Result<Meta, PathError> {
        // A rename replaces the entry itself: whatever a run put at the key since the
        // check (a link included) is replaced, never written through.
        rustix::fs::renameat(&self.dir, self.tmp.as_str(), &self.dir, self.name.as_str())?;
        self.committed = true;
        let st = rustix::fs::statat(&self.dir, self.name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(Meta::of(&st))
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), AtFlags::empty());
        }
    }
}

/// Writes `body` at `key`.
#[cfg(test)]
fn write_key(root: &Path, key: &str, body: &[u8]) -> Result<(), PathError> {
    use std::io::Write;
    let (new, mut f) = create(root, key)?;
    f.write_all(body)?;
    drop(f);
    new.commit().map(|_| ())
}

/// Makes the directory `key` (a "folder" object, `key/` in S3) and those above it.
pub fn make_dir(root: &Path, key: &str) -> Result<(), PathError> {
    make_root(root)?;
    let parts: Vec<&str> = key.split('/').collect();
    open_dir(open_root(root)?, &parts, true).map(|_| ())
}

/// Removes the file at `key` and the directories above it that it leaves empty (S3
/// has no empty folders). `false`: there was nothing at the key.
pub fn remove(root: &Path, key: &str) -> Result<bool, PathError> {
    let (parts, name) = split_key(key);
    let root_fd = match open_root(root) {
        Ok(fd) => fd,
        Err(PathError::NotFound) => return Ok(false),
        Err(e) => return Err(e),
    };
    let dir = match open_dir(root_fd, &parts, false) {
        Ok(d) => d,
        Err(PathError::NotFound) => return Ok(false),
        Err(e) => return Err(e),
    };
    match kind_at(&dir, name)? {
        None => return Ok(false),
        Some(FileType::RegularFile) => {}
        Some(FileType::Symlink) => {
            return Err(PathError::Link {
                at: key.to_string(),
            });
        }
        Some(_) => return Err(PathError::NotFile),
    }
    match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) => {}
        Err(Errno::NOENT) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    drop(dir);
    // Empty directories above it go, deepest first; the first that is not empty (or
    // was replaced) stops it.
    for depth in (0..parts.len()).rev() {
        let Ok(parent) = open_root(root).and_then(|r| open_dir(r, &parts[..depth], false)) else {
            break;
        };
        if rustix::fs::unlinkat(&parent, parts[depth], AtFlags::REMOVEDIR).is_err() {
            break;
        }
    }
    Ok(true)
}

/// Removes the folder `key` when it is empty (and the folders above it that it leaves
/// empty). `false`: there was no folder there, or it is not empty.
pub fn remove_empty_dir(root: &Path, key: &str) -> Result<bool, PathError> {
    let parts: Vec<&str> = key.split('/').collect();
    let mut removed = false;
    for depth in (0..parts.len()).rev() {
        let parent = match open_root(root).and_then(|r| open_dir(r, &parts[..depth], false)) {
            Ok(p) => p,
            Err(PathError::NotFound) => return Ok(removed),
            Err(e) => return Err(e),
        };
        // Removes a directory only (never a link or a file), and only an empty one.
        match rustix::fs::unlinkat(&parent, parts[depth], AtFlags::REMOVEDIR) {
            Ok(()) => removed = true,
            Err(_) => return Ok(removed),
        }
    }
    Ok(removed)
}

/// The regular files below `dir` (whose key prefix is `prefix`), never following or
/// descending into links.
fn walk(
    dir: &OwnedFd,
    prefix: &str,
    depth: usize,
    etags: bool,
    out: &mut Vec<Entry>,
) -> Result<(), Errno> {
    let entries = rustix::fs::Dir::read_from(dir)?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let raw = OsStr::from_bytes(name);
        // A name that is not UTF-8 cannot be a key: skipped rather than mangled.
        let Some(name) = raw.to_str() else { continue };
        let key = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        // Gone or replaced since it was read: skipped.
        let Ok(st) = rustix::fs::statat(dir, raw, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory if depth < MAX_DEPTH => {
                // O_NOFOLLOW: a directory swapped for a link since the stat is not entered.
                // A run may change what it holds while it is read: skipped, not an error.
                if let Ok(sub) = rustix::fs::openat(dir, raw, DIR_FLAGS, Mode::empty()) {
                    let _ = walk(&sub, &key, depth + 1, etags, out);
                }
            }
            FileType::RegularFile if !name.starts_with(UPLOAD_PREFIX) => out.push(Entry {
                key,
                meta: if etags {
                    Meta::of(&st)
                } else {
                    Meta::sized(&st)
                },
            }),
            _ => {}
        }
    }
    Ok(())
}

/// The files whose keys start with `prefix`, sorted by key. Only the directory the
/// prefix names (up to its last `/`) is walked.
pub fn list(root: &Path, prefix: &str) -> Result<Vec<Entry>, PathError> {
    let base = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let parts: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == ".." || *p == ".") {
        return Ok(vec![]);
    }
    let dir = match open_root(root).and_then(|r| open_dir(r, &parts, false)) {
        Ok(d) => d,
        // Nothing can be below a prefix that is missing, a file or a link.
        Err(PathError::Io(e)) => return Err(PathError::Io(e)),
        Err(_) => return Ok(vec![]),
    };
    let mut out = Vec::new();
    walk(&dir, &parts.join("/"), parts.len(), true, &mut out)?;
    out.retain(|e| e.key.starts_with(prefix));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Bytes of the regular files below `root` (links and special files count nothing).
pub fn usage(root: &Path) -> u64 {
    let mut out = Vec::new();
    if let Ok(fd) = open_root(root) {
        let _ = walk(&fd, "", 0, false, &mut out);
    }
    out.iter().map(|e| e.meta.size).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn keys(root: &Path) -> Vec<String> {
        list(root, "").unwrap().into_iter().map(|f| f.key).collect()
    }

    #[test]
    fn links_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("org");
        let other = d.path().join("other");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret"), "theirs").unwrap();
        std::fs::write(root.join("sub/mine.txt"), "mine").unwrap();
        symlink("/etc/passwd", root.join("passwd")).unwrap();
        symlink("/", root.join("rootfs")).unwrap();
        symlink(&other, root.join("other")).unwrap();
        symlink("../../other", root.join("sub/up")).unwrap();

        assert_eq!(keys(&root), ["sub/mine.txt"]);
        assert!(list(&root, "other/").unwrap().is_empty());
        assert!(list(&root, "rootfs/etc/").unwrap().is_empty());
        assert_eq!(read_key(&root, "sub/mine.txt").unwrap(), b"mine");
        for key in [
            "passwd",
            "rootfs/etc/passwd",
            "other/secret",
            "sub/up/secret",
        ] {
            let e = read_key(&root, key).unwrap_err();
            assert!(matches!(e, PathError::Link { .. }), "{key}: {e:?}");
            let e = remove(&root, key).unwrap_err();
            assert!(matches!(e, PathError::Link { .. }), "{key}: {e:?}");
        }
        assert!(matches!(read_key(&root, "nope"), Err(PathError::NotFound)));
        assert!(matches!(read_key(&root, "sub"), Err(PathError::NotFile)));

        for key in [
            "passwd",
            "other/secret",
            "other/new",
            "rootfs/tmp/x",
            "sub/up/x",
        ] {
            let e = write_key(&root, key, b"pwned").unwrap_err();
            assert!(matches!(e, PathError::Link { .. }), "{key}: {e:?}");
        }
        assert_eq!(std::fs::read(other.join("secret")).unwrap(), b"theirs");
        assert!(!other.join("new").exists());
        assert!(std::fs::read_link(root.join("passwd")).is_ok());
        assert!(matches!(
            write_key(&root, "sub/mine.txt/x", b"x"),
            Err(PathError::NotDir { .. })
        ));
        write_key(&root, "a/b/c.txt", b"new").unwrap();
        write_key(&root, "a/b/c.txt", b"newer").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/c.txt")).unwrap(), b"newer");
        assert_eq!(keys(&root), ["a/b/c.txt", "sub/mine.txt"]);
        assert_eq!(usage(&root), 9);
    }

    #[test]
    fn an_unfinished_write_leaves_nothing_and_a_removal_leaves_no_empty_folder() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("org");
        let (new, f) = create(&root, "x/y/z.bin").unwrap();
        drop(f);
        drop(new);
        assert!(keys(&root).is_empty());
        assert_eq!(std::fs::read_dir(root.join("x/y")).unwrap().count(), 0);

        write_key(&root, "x/keep.txt", b"1").unwrap();
        write_key(&root, "x/y/z.bin", b"22").unwrap();
        assert!(remove(&root, "x/y/z.bin").unwrap());
        assert!(!remove(&root, "x/y/z.bin").unwrap());
        assert!(!root.join("x/y").exists());
        assert!(root.join("x/keep.txt").exists());
        assert!(remove(&root, "x/keep.txt").unwrap());
        assert!(!root.join("x").exists());
        assert!(root.exists());
    }

    #[test]
    fn keys_are_checked() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a\0b",
            "a\\b",
            ".stoa-upload-x",
            "d/.stoa-upload-1",
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        // No deeper than listings go.
        assert!(!valid_key(&format!("{}f", "d/".repeat(MAX_DEPTH))));
        assert!(valid_key(&format!("{}f", "d/".repeat(MAX_DEPTH - 1))));
        for good in ["a", "a/b.txt", "..a", "a b/c%20d+e"] {
            assert!(valid_key(good), "{good:?}");
        }
    }

    #[test]
    fn fifos_are_neither_opened_nor_listed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("org");
        std::fs::create_dir_all(&root).unwrap();
        let st = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status();
        if !st.is_ok_and(|s| s.success()) {
            return;
        }
        assert!(keys(&root).is_empty());
        assert!(matches!(read_key(&root, "pipe"), Err(PathError::NotFile)));
        assert!(matches!(
            write_key(&root, "pipe", b"x"),
            Err(PathError::NotFile)
        ));
    }
}
