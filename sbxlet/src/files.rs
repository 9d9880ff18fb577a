//! Files inside a container, reached from the host without ever leaving the container's root.
//!
//! Every path is resolved by `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` against the
//! container's root directory (`/proc/<pid>/root`, which sees the container's own mounts such as its
//! `/tmp`). The kernel then treats that directory as `/` for `..` and for every symlink, absolute or
//! not, so no path the container controls can lead to a host file. Paths with a `..` component are
//! refused before that. Kernel filesystems (proc, sysfs, cgroup…) are refused: the agent writes as
//! host root, and `/proc/sys` inside a container is still the host's kernel. Everything below is
//! blocking and runs on the blocking pool.

use crate::error::RuntimeError;
use rustix::fs::{AtFlags, FileType as RawType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sandboxd_api::dataplane::{DirListing, FileEntry, FileType};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Magic numbers (`statfs.f_type`) of the kernel filesystems that file access refuses.
const KERNEL_FILESYSTEMS: [(i64, &str); 17] = [
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x1cd1, "devpts"),
    (0x1980_0202, "mqueue"),
    (0x7363_6673, "securityfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0xcafe_4a11, "bpf"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
    (0x4249_4e4d, "binfmt_misc"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x6573_5543, "fusectl"),
    (0x6e73_6673, "nsfs"),
];

/// Deepest directory tree archived or removed (each level holds a descriptor and a stack frame).
const MAX_DEPTH: usize = 256;

/// The root directory of one container, as the agent reaches it.
pub struct ContainerRoot {
    root: OwnedFd,
    /// Largest file read or written, and largest archive extracted, in bytes.
    max_bytes: u64,
    /// Paths (and everything under them) refused, with why: mounts the container sees that this
    /// root does not hold.
    refused: (&'static [&'static str], &'static str),
}

/// What a path names: a file to stream, or a directory listing.
pub enum ReadTarget {
    File { file: std::fs::File, size: u64 },
    Dir(DirListing),
}

impl ContainerRoot {
    /// Opens `root` (e.g. `/proc/<pid>/root`) as the directory every path resolves in.
    pub fn open(root: &Path, max_bytes: u64) -> Result<ContainerRoot, RuntimeError> {
        let fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| RuntimeError::Failed(format!("opening the container's root: {e}")))?;
        Ok(ContainerRoot { root: fd, max_bytes, refused: (&[], "") })
    }

    /// Refuses `paths` and everything under them, saying `why`: they are mounts the container sees
    /// but this root does not hold, so a file there would not be the container's.
    pub fn refusing(self, paths: &'static [&'static str], why: &'static str) -> ContainerRoot {
        ContainerRoot { refused: (paths, why), ..self }
    }

    /// `clean`, and refuses the paths this root does not hold.
    fn checked_path(&self, path: &str) -> Result<PathBuf, RuntimeError> {
        let path = clean(path)?;
        self.check_reachable(&path)?;
        Ok(path)
    }

    fn check_reachable(&self, path: &Path) -> Result<(), RuntimeError> {
        let (paths, why) = self.refused;
        match paths.iter().find(|refused| path.starts_with(refused)) {
            Some(refused) => Err(RuntimeError::BadPath(format!("{} is refused: {refused} {why}", display(path)))),
            None => Ok(()),
        }
    }

    /// Whether the opened root is the directory at `path` (same device and inode).
    pub fn is_same_directory(&self, path: &Path) -> bool {
        let Ok(opened) = rustix::fs::fstat(&self.root) else { return false };
        let Ok(expected) = rustix::fs::stat(path) else { return false };
        (opened.st_dev, opened.st_ino) == (expected.st_dev, expected.st_ino)
    }

    /// Reads a regular file or lists a directory.
    pub fn read(&self, path: &str) -> Result<ReadTarget, RuntimeError> {
        let path = self.checked_path(path)?;
        let fd = self.resolve(&path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        refuse_kernel_fs(&fd, &path)?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(&path, e))?;
        match RawType::from_raw_mode(stat.st_mode) {
            RawType::Directory => Ok(ReadTarget::Dir(DirListing { path: display(&path), entries: list(&fd, &path)? })),
            RawType::RegularFile => {
                let size = stat.st_size as u64;
                if size > self.max_bytes {
                    return Err(too_large(&path, size, self.max_bytes));
                }
                Ok(ReadTarget::File { file: std::fs::File::from(fd), size })
            }
            _ => Err(RuntimeError::BadPath(format!("{}: not a regular file or directory", display(&path)))),
        }
    }

    /// Writes `body` to `path` atomically (a temporary file renamed into place), creating missing
    /// parent directories. Over `max_bytes` nothing is left behind.
    pub fn write(&self, path: &str, mode: u32, body: &mut dyn Read) -> Result<u64, RuntimeError> {
        let path = self.checked_path(path)?;
        let (parent, name) = split(&path)?;
        let dir = self.make_dirs(&parent)?;
        if let Ok(existing) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            refuse_mount_point(&dir, &existing, &path)?;
        }
        write_in(&dir, &path, name, mode, body, self.max_bytes)
    }

    /// Removes a file, a symlink, an empty directory, or (with `recursive`) a whole tree.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), RuntimeError> {
        let path = self.checked_path(path)?;
        let (parent, name) = split(&path)?;
        let dir = self.resolve(&parent, OFlags::RDONLY | OFlags::DIRECTORY)?;
        refuse_kernel_fs(&dir, &parent)?;
        let stat = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_error(&path, e))?;
        refuse_mount_point(&dir, &stat, &path)?;
        if RawType::from_raw_mode(stat.st_mode) != RawType::Directory {
            return rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| io_error(&path, e));
        }
        match rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR) {
            Err(Errno::NOTEMPTY) if recursive => {
                let child = open_child_dir(&dir, name).map_err(|e| io_error(&path, e))?;
                refuse_kernel_fs(&child, &path)?;
                remove_contents(&child, 0).map_err(|e| io_error(&path, e))?;
                rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| io_error(&path, e))
            }
            Err(Errno::NOTEMPTY) => Err(RuntimeError::NotRunning(format!(
                "{}: directory not empty (pass recursive=true to remove it with its contents)",
                display(&path)
            ))),
            other => other.map_err(|e| io_error(&path, e)),
        }
    }

    /// Writes a tar archive of `path` to `out`: its entries are named from the last component of
    /// `path` down (as `docker cp` does). Symlinks are archived, never followed; kernel filesystems
    /// below `path` are skipped.
    pub fn archive(&self, path: &str, out: &mut dyn Write) -> Result<(), RuntimeError> {
        let path = self.checked_path(path)?;
        let fd = self.resolve(&path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY)?;
        refuse_kernel_fs(&fd, &path)?;
        let top = path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        let mut budget = self.max_bytes;
        append(&mut builder, &fd, &top, &mut budget, 0).map_err(|e| archive_error(&path, e))?;
        builder.finish().map_err(|e| RuntimeError::Failed(format!("writing the archive: {e}")))
    }

    /// Extracts a tar archive into the directory `path` (created if missing). Entries must be
    /// relative and stay below `path`; regular files, directories and symlinks are supported.
    pub fn extract(&self, path: &str, archive: &mut dyn Read) -> Result<u64, RuntimeError> {
        let base = self.checked_path(path)?;
        self.make_dirs(&base)?;
        let mut archive = tar::Archive::new(archive);
        let mut budget = self.max_bytes;
        let mut count = 0;
        let entries = archive.entries().map_err(|e| RuntimeError::BadPath(format!("archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| RuntimeError::BadPath(format!("archive: {e}")))?;
            let relative = entry.path().map_err(|e| RuntimeError::BadPath(format!("archive: {e}")))?.into_owned();
            let Some(target) = entry_target(&base, &relative)? else { continue };
            self.check_reachable(&target)?;
            let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    self.make_dirs(&target)?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.header().size().unwrap_or(0);
                    if size > budget {
                        return Err(too_large(&target, size, self.max_bytes));
                    }
                    budget -= size;
                    let (parent, name) = split(&target)?;
                    let dir = self.make_dirs(&parent)?;
                    write_in(&dir, &target, name, mode, &mut entry, budget + size)?;
                }
                tar::EntryType::Symlink => {
                    let link = entry.link_name().ok().flatten().ok_or_else(|| {
                        RuntimeError::BadPath(format!("archive: symlink {} has no target", relative.display()))
                    })?;
                    let (parent, name) = split(&target)?;
                    let dir = self.make_dirs(&parent)?;
                    let _ = rustix::fs::unlinkat(&dir, name, AtFlags::empty());
                    rustix::fs::symlinkat(link.as_os_str(), &dir, name).map_err(|e| io_error(&target, e))?;
                }
                other => {
                    return Err(RuntimeError::BadPath(format!(
                        "archive: {} is a {other:?} entry; only files, directories and symlinks are extracted",
                        relative.display()
                    )))
                }
            }
            count += 1;
        }
        Ok(count)
    }

    /// Opens `path` inside the root; `..` and symlinks are scoped to the root by the kernel.
    fn resolve(&self, path: &Path, flags: OFlags) -> Result<OwnedFd, RuntimeError> {
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        rustix::fs::openat2(&self.root, path, flags | OFlags::CLOEXEC, Mode::empty(), resolve)
            .map_err(|e| io_error(path, e))
    }

    /// `mkdir -p` inside the root; returns the last directory, opened.
    fn make_dirs(&self, path: &Path) -> Result<OwnedFd, RuntimeError> {
        let mut current = PathBuf::from("/");
        let mut dir = self.resolve(&current, OFlags::RDONLY | OFlags::DIRECTORY)?;
        for component in path.components().skip(1) {
            let name = component.as_os_str();
            current.push(name);
            dir = match self.resolve(&current, OFlags::RDONLY | OFlags::DIRECTORY) {
                Err(RuntimeError::NoSuchPath(_)) => {
                    refuse_kernel_fs(&dir, &current)?;
                    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_error(&current, e)),
                    }
                    self.resolve(&current, OFlags::RDONLY | OFlags::DIRECTORY)?
                }
                other => other?,
            };
        }
        refuse_kernel_fs(&dir, path)?;
        Ok(dir)
    }
}

/// An absolute path without `..` (which the API refuses rather than clamps), `.` removed.
fn clean(path: &str) -> Result<PathBuf, RuntimeError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(RuntimeError::BadPath(format!("path {path:?} must be absolute")));
    }
    let mut clean = PathBuf::from("/");
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => clean.push(name),
            Component::ParentDir => {
                return Err(RuntimeError::BadPath(format!("path {path:?} must not contain '..'")));
            }
            Component::Prefix(_) => unreachable!("no prefixes on unix"),
        }
    }
    Ok(clean)
}

fn split(path: &Path) -> Result<(PathBuf, &OsStr), RuntimeError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), name)),
        _ => Err(RuntimeError::BadPath("the root directory itself cannot be written or removed".into())),
    }
}

/// Where an archive entry goes under `base`; `None` for the archive's own `.` entry.
fn entry_target(base: &Path, relative: &Path) -> Result<Option<PathBuf>, RuntimeError> {
    let mut target = base.to_path_buf();
    let mut any = false;
    for component in relative.components() {
        match component {
            Component::Normal(name) => {
                target.push(name);
                any = true;
            }
            Component::CurDir => {}
            _ => {
                return Err(RuntimeError::BadPath(format!(
                    "archive: entry {} must be relative and must not contain '..'",
                    relative.display()
                )))
            }
        }
    }
    Ok(any.then_some(target))
}

fn write_in(
    dir: &OwnedFd,
    path: &Path,
    name: &OsStr,
    mode: u32,
    body: &mut dyn Read,
    max_bytes: u64,
) -> Result<u64, RuntimeError> {
    let temp = format!(".{}.sbxlet-{:016x}", name.to_string_lossy(), fastrand::u64(..));
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd =
        rustix::fs::openat(dir, temp.as_str(), flags, Mode::from_raw_mode(0o600)).map_err(|e| io_error(path, e))?;
    let written = copy_capped(body, &mut std::fs::File::from(fd.try_clone().expect("dup")), max_bytes, path)
        .and_then(|n| rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map(|_| n).map_err(|e| io_error(path, e)))
        .and_then(|n| rustix::fs::renameat(dir, temp.as_str(), dir, name).map(|_| n).map_err(|e| io_error(path, e)));
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, temp.as_str(), AtFlags::empty());
    }
    written
}

fn copy_capped(body: &mut dyn Read, out: &mut std::fs::File, max: u64, path: &Path) -> Result<u64, RuntimeError> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Err(too_large(path, max + 1, max)),
            Err(e) => return Err(RuntimeError::Failed(format!("reading the body for {}: {e}", display(path)))),
        };
        total += n as u64;
        if total > max {
            return Err(too_large(path, total, max));
        }
        out.write_all(&buffer[..n]).map_err(|e| RuntimeError::Failed(format!("writing {}: {e}", display(path))))?;
    }
}

fn list(dir: &OwnedFd, path: &Path) -> Result<Vec<FileEntry>, RuntimeError> {
    let mut entries = Vec::new();
    let reader = rustix::fs::Dir::read_from(dir).map_err(|e| io_error(path, e))?;
    for entry in reader {
        let entry = entry.map_err(|e| io_error(path, e))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let Ok(stat) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else { continue };
        let kind = file_type(stat.st_mode);
        let target = (kind == FileType::Symlink)
            .then(|| rustix::fs::readlinkat(dir, name, Vec::new()).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned());
        entries.push(FileEntry {
            name: name.to_string_lossy().into_owned(),
            kind,
            size: stat.st_size as u64,
            mode: format!("{:04o}", stat.st_mode & 0o7777),
            mtime: sandboxd_api::time::format_unix(stat.st_mtime),
            target,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn file_type(mode: u32) -> FileType {
    match RawType::from_raw_mode(mode) {
        RawType::RegularFile => FileType::File,
        RawType::Directory => FileType::Dir,
        RawType::Symlink => FileType::Symlink,
        _ => FileType::Other,
    }
}

fn open_child_dir(dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty())
}

fn child_names(dir: &OwnedFd) -> rustix::io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_os_string());
        }
    }
    Ok(names)
}

/// Empties a directory without following symlinks or crossing into other filesystems (a mount
/// inside the tree, a kernel filesystem): those are refused, and nothing past them is touched.
fn remove_contents(dir: &OwnedFd, depth: usize) -> rustix::io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(Errno::NAMETOOLONG);
    }
    let own = rustix::fs::fstat(dir)?;
    for name in child_names(dir)? {
        let stat = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        if stat.st_dev != own.st_dev {
            return Err(Errno::BUSY);
        }
        if RawType::from_raw_mode(stat.st_mode) == RawType::Directory {
            let child = open_child_dir(dir, &name)?;
            remove_contents(&child, depth + 1)?;
            rustix::fs::unlinkat(dir, &name, AtFlags::REMOVEDIR)?;
        } else {
            rustix::fs::unlinkat(dir, &name, AtFlags::empty())?;
        }
    }
    Ok(())
}

#[derive(Debug)]
enum ArchiveError {
    Io(std::io::Error),
    TooLarge,
}

fn archive_error(path: &Path, e: ArchiveError) -> RuntimeError {
    match e {
        ArchiveError::TooLarge => {
            RuntimeError::TooLarge(format!("{}: the archive is over the size cap", display(path)))
        }
        ArchiveError::Io(e) => RuntimeError::Failed(format!("archiving {}: {e}", display(path))),
    }
}

impl From<std::io::Error> for ArchiveError {
    fn from(e: std::io::Error) -> Self {
        ArchiveError::Io(e)
    }
}

impl From<Errno> for ArchiveError {
    fn from(e: Errno) -> Self {
        ArchiveError::Io(e.into())
    }
}

/// Appends `fd` (named `name` in the archive) and, for a directory, everything below it.
fn append(
    builder: &mut tar::Builder<&mut dyn Write>,
    fd: &OwnedFd,
    name: &Path,
    budget: &mut u64,
    depth: usize,
) -> Result<(), ArchiveError> {
    if depth >= MAX_DEPTH {
        return Err(ArchiveError::Io(std::io::Error::other(format!("deeper than {MAX_DEPTH} directories"))));
    }
    let stat = rustix::fs::fstat(fd)?;
    let mut header = header_of(&stat);
    match RawType::from_raw_mode(stat.st_mode) {
        RawType::RegularFile => {
            let size = stat.st_size as u64;
            *budget = budget.checked_sub(size).ok_or(ArchiveError::TooLarge)?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let file = std::fs::File::from(fd.try_clone()?);
            // The container may change the file while it is archived: exactly `size` bytes go in,
            // as the header says (zeros after a shrink), or the archive would lose its framing.
            let exact = file.take(size).chain(std::io::repeat(0)).take(size);
            builder.append_data(&mut header, name, exact)?;
        }
        RawType::Directory => {
            if kernel_fs(fd).is_some() {
                return Ok(());
            }
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, name, std::io::empty())?;
            let mut names = child_names(fd)?;
            names.sort();
            for child in names {
                let child_stat = match rustix::fs::statat(fd, &child, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(s) => s,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                let child_name = name.join(&child);
                match RawType::from_raw_mode(child_stat.st_mode) {
                    RawType::Symlink => {
                        let target = rustix::fs::readlinkat(fd, &child, Vec::new())?;
                        let mut link = header_of(&child_stat);
                        link.set_entry_type(tar::EntryType::Symlink);
                        link.set_size(0);
                        builder.append_link(&mut link, &child_name, OsStr::from_bytes(target.as_bytes()))?;
                    }
                    RawType::RegularFile | RawType::Directory => {
                        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
                        let child_fd = match rustix::fs::openat(fd, &child, flags | OFlags::CLOEXEC, Mode::empty()) {
                            Ok(f) => f,
                            Err(Errno::NOENT) => continue,
                            Err(e) => return Err(e.into()),
                        };
                        append(builder, &child_fd, &child_name, budget, depth + 1)?;
                    }
                    // Devices, sockets and fifos have no content to copy.
                    _ => {}
                }
            }
        }
        _ => return Err(ArchiveError::Io(std::io::Error::other("not a regular file or directory"))),
    }
    Ok(())
}

fn header_of(stat: &rustix::fs::Stat) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(stat.st_mode & 0o7777);
    header.set_mtime(stat.st_mtime.max(0) as u64);
    header.set_uid(stat.st_uid as u64);
    header.set_gid(stat.st_gid as u64);
    header
}

fn kernel_fs(fd: &impl AsFd) -> Option<&'static str> {
    let stat = rustix::fs::fstatfs(fd).ok()?;
    let magic = stat.f_type as i64;
    KERNEL_FILESYSTEMS.iter().find(|(m, _)| *m == magic).map(|(_, name)| *name)
}

fn refuse_kernel_fs(fd: &impl AsFd, path: &Path) -> Result<(), RuntimeError> {
    match kernel_fs(fd) {
        Some(kind) => Err(RuntimeError::BadPath(format!(
            "{} is on a kernel filesystem ({kind}); file access there is refused",
            display(path)
        ))),
        None => Ok(()),
    }
}

/// A mount point inside the container (its `/etc/hosts`, `/proc`, `/dev/pts`): replacing or removing
/// it from the host would detach the container's mount.
fn refuse_mount_point(parent: &OwnedFd, stat: &rustix::fs::Stat, path: &Path) -> Result<(), RuntimeError> {
    let parent_stat = rustix::fs::fstat(parent).map_err(|e| io_error(path, e))?;
    if parent_stat.st_dev != stat.st_dev {
        return Err(RuntimeError::BadPath(format!(
            "{} is a mount point; it cannot be replaced or removed",
            display(path)
        )));
    }
    Ok(())
}

fn io_error(path: &Path, e: Errno) -> RuntimeError {
    let shown = display(path);
    match e {
        Errno::NOENT => RuntimeError::NoSuchPath(format!("{shown}: no such file or directory")),
        Errno::NOTDIR => RuntimeError::BadPath(format!("{shown}: a component is not a directory")),
        Errno::ISDIR => RuntimeError::BadPath(format!("{shown}: is a directory")),
        Errno::LOOP => RuntimeError::BadPath(format!("{shown}: too many levels of symbolic links")),
        Errno::XDEV => RuntimeError::BadPath(format!("{shown}: resolves outside the container's root")),
        Errno::ROFS => RuntimeError::BadPath(format!("{shown}: read-only filesystem")),
        Errno::BUSY => RuntimeError::BadPath(format!("{shown}: holds a mount point; it cannot be removed")),
        Errno::NAMETOOLONG => RuntimeError::BadPath(format!("{shown}: deeper than {MAX_DEPTH} directories")),
        Errno::NOSPC | Errno::DQUOT => RuntimeError::TooLarge(format!("{shown}: no space left")),
        other => RuntimeError::Failed(format!("{shown}: {other}")),
    }
}

fn too_large(path: &Path, size: u64, max: u64) -> RuntimeError {
    RuntimeError::TooLarge(format!("{}: {size} bytes is over the cap of {max} bytes", display(path)))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(dir: &Path) -> ContainerRoot {
        ContainerRoot::open(dir, 1 << 20).unwrap()
    }

    #[test]
    fn dot_dot_is_refused_before_anything_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let error = root(dir.path()).read("/../etc/passwd").err().unwrap();
        assert!(matches!(error, RuntimeError::BadPath(m) if m.contains("..")));
        assert!(matches!(root(dir.path()).read("relative").err().unwrap(), RuntimeError::BadPath(_)));
    }

    #[test]
    fn symlinks_resolve_inside_the_root_and_never_reach_host_files() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host data").unwrap();
        let container = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::os::unix::fs::symlink(&secret, container.path().join("abs")).unwrap();
        let relative = format!("../../../../../../..{}", secret.display());
        std::os::unix::fs::symlink(&relative, container.path().join("rel")).unwrap();
        let root = root(container.path());
        for link in ["/abs", "/rel"] {
            assert!(matches!(root.read(link).err().unwrap(), RuntimeError::NoSuchPath(_)), "{link} escaped");
            // A write through the link lands inside the root, never on the host file.
            let _ = root.write(link, 0o644, &mut "overwritten".as_bytes());
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host data");
    }

    #[test]
    fn writes_create_parents_set_the_mode_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        assert_eq!(root.write("/a/b/c.txt", 0o640, &mut "hello".as_bytes()).unwrap(), 5);
        let ReadTarget::File { mut file, size } = root.read("/a/b/c.txt").unwrap() else { panic!("not a file") };
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!((text.as_str(), size), ("hello", 5));
        let ReadTarget::Dir(listing) = root.read("/a/b").unwrap() else { panic!("not a dir") };
        assert_eq!(listing.entries.len(), 1);
        assert_eq!((listing.entries[0].mode.as_str(), listing.entries[0].kind), ("0640", FileType::File));
    }

    #[test]
    fn an_upload_over_the_cap_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let root = ContainerRoot::open(dir.path(), 10).unwrap();
        let error = root.write("/big", 0o644, &mut [7u8; 11].as_slice()).err().unwrap();
        assert!(matches!(error, RuntimeError::TooLarge(_)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "a temporary file was left");
    }

    #[test]
    fn a_non_empty_directory_needs_recursive() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        root.write("/d/e/f", 0o644, &mut "x".as_bytes()).unwrap();
        assert!(root.remove("/d", false).is_err());
        root.remove("/d", true).unwrap();
        assert!(!dir.path().join("d").exists());
    }

    #[test]
    fn archives_round_trip_with_symlinks_kept_as_links() {
        let source = tempfile::tempdir().unwrap();
        let root = root(source.path());
        root.write("/tree/x/one", 0o600, &mut "1".as_bytes()).unwrap();
        root.write("/tree/two", 0o755, &mut "22".as_bytes()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", source.path().join("tree/link")).unwrap();
        let mut archive = Vec::new();
        root.archive("/tree", &mut archive).unwrap();
        let target = tempfile::tempdir().unwrap();
        let count = ContainerRoot::open(target.path(), 1 << 20).unwrap().extract("/copy", &mut archive.as_slice());
        assert_eq!(count.unwrap(), 5, "tree, tree/link, tree/two, tree/x, tree/x/one");
        assert_eq!(std::fs::read_to_string(target.path().join("copy/tree/x/one")).unwrap(), "1");
        let mode = std::fs::metadata(target.path().join("copy/tree/two")).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o755);
        let link = std::fs::read_link(target.path().join("copy/tree/link")).unwrap();
        assert_eq!(link, Path::new("/etc/passwd"));
    }

    #[test]
    fn archive_entries_cannot_climb_out() {
        let mut raw = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut raw);
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // `tar` refuses to write `..` itself, so the name goes into the header raw.
            header.as_old_mut().name[..9].copy_from_slice(b"../escape");
            header.set_cksum();
            builder.append(&header, &b"x"[..]).unwrap();
            builder.finish().unwrap();
        }
        let outer = tempfile::tempdir().unwrap();
        std::fs::create_dir(outer.path().join("root")).unwrap();
        let root = root(&outer.path().join("root"));
        assert!(matches!(root.extract("/in", &mut raw.as_slice()).err().unwrap(), RuntimeError::BadPath(_)));
        assert!(!outer.path().join("escape").exists() && !outer.path().join("root/escape").exists());
    }

    #[test]
    fn a_root_is_only_taken_for_the_directory_it_is() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let root = root(a.path());
        assert!(root.is_same_directory(a.path()));
        assert!(!root.is_same_directory(b.path()), "a reused pid's root must not pass for the container's");
    }

    #[test]
    fn archives_keep_their_framing_and_refuse_endless_depth() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path());
        let deep: String = (0..MAX_DEPTH + 1).map(|_| "/d").collect();
        root.write(&format!("{deep}/f"), 0o644, &mut "x".as_bytes()).unwrap();
        let error = root.archive("/d", &mut Vec::new()).err().unwrap();
        assert!(matches!(error, RuntimeError::Failed(m) if m.contains("deeper")));
        assert!(root.remove("/d", true).is_err(), "removal refuses the depth too");
    }

    #[test]
    fn refused_paths_are_refused_for_every_operation_and_their_neighbours_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = root(dir.path()).refusing(&["/proc", "/etc/hosts"], "exists only inside the sandbox");
        let refused = |e: RuntimeError| matches!(&e, RuntimeError::BadPath(m) if m.contains("only inside the sandbox"));
        assert!(refused(root.write("/proc/x", 0o644, &mut "x".as_bytes()).unwrap_err()));
        assert!(refused(root.read("/etc/hosts").err().unwrap()));
        assert!(refused(root.remove("/proc", true).unwrap_err()));
        assert!(refused(root.archive("/proc/self", &mut Vec::new()).unwrap_err()));
        let mut archive = Vec::new();
        {
            let source = tempfile::tempdir().unwrap();
            std::fs::create_dir(source.path().join("proc")).unwrap();
            std::fs::write(source.path().join("proc/x"), "x").unwrap();
            ContainerRoot::open(source.path(), 1 << 20).unwrap().archive("/proc", &mut archive).unwrap();
        }
        assert!(refused(root.extract("/", &mut archive.as_slice()).unwrap_err()), "an archive cannot reach them");
        assert!(!dir.path().join("proc").exists(), "nothing was written there");
        assert_eq!(
            root.write("/processes/x", 0o644, &mut "x".as_bytes()).unwrap(),
            1,
            "a prefix of a name is not refused"
        );
        assert_eq!(root.write("/etc/hostsfile", 0o644, &mut "x".as_bytes()).unwrap(), 1);
    }

    #[test]
    fn proc_is_refused() {
        let root = root(Path::new("/"));
        let error = root.read("/proc/self/status").err().unwrap();
        assert!(matches!(error, RuntimeError::BadPath(m) if m.contains("kernel filesystem")));
    }
}
