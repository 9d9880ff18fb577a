//! Unpacking one image layer (a tar, usually gzipped) into a directory that overlayfs can stack:
//! OCI whiteouts become overlay whiteouts (a 0/0 character device, or an opaque directory).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Unpacks the layer blob at `blob` into `target` (created); `gzip` says whether it is compressed.
pub(crate) fn unpack_layer(blob: &Path, gzip: bool, target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let file = BufReader::new(File::open(blob)?);
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(relative) = safe_relative(&path) else {
            tracing::warn!(path = %path.display(), "layer entry outside the root skipped");
            continue;
        };
        let whiteout = whiteout_of(&relative);
        if let Some(Whiteout::Opaque(path) | Whiteout::Removed(path)) = &whiteout {
            // A symlink an earlier entry made (`evil -> /etc`) must not carry a whiteout onto the host.
            if crosses_symlink(target, path) {
                tracing::warn!(path = %relative.display(), "whiteout through a symlink skipped");
                continue;
            }
        }
        match whiteout {
            Some(Whiteout::Opaque(dir)) => mark_opaque(&target.join(dir))?,
            Some(Whiteout::Removed(name)) => make_whiteout(&target.join(name))?,
            None => {
                entry.unpack_in(target)?;
            }
        }
    }
    Ok(())
}

/// What an OCI whiteout entry asks for.
#[derive(Debug, PartialEq, Eq)]
enum Whiteout {
    /// Hide everything lower layers have in this directory.
    Opaque(PathBuf),
    /// Hide this one path of lower layers.
    Removed(PathBuf),
}

fn whiteout_of(relative: &Path) -> Option<Whiteout> {
    let name = relative.file_name()?.to_str()?;
    let parent = relative.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == OPAQUE_MARKER {
        return Some(Whiteout::Opaque(parent));
    }
    name.strip_prefix(WHITEOUT_PREFIX).map(|hidden| Whiteout::Removed(parent.join(hidden)))
}

/// The entry's path without a leading `/` or `./`, or None when it would climb out with `..`.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether any directory on the way from `root` to `relative`'s parent (or `relative` itself, for an
/// opaque directory) is a symlink.
fn crosses_symlink(root: &Path, relative: &Path) -> bool {
    let mut at = root.to_path_buf();
    for component in relative.components() {
        at.push(component);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

fn mark_opaque(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    xattr::set(dir, "trusted.overlay.opaque", b"y")
}

/// An overlay whiteout: a character device with device number 0/0.
fn make_whiteout(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(path);
    let status = std::process::Command::new("mknod").arg(path).args(["c", "0", "0"]).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("mknod {} c 0 0: {status}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_are_recognised() {
        assert_eq!(whiteout_of(Path::new("etc/.wh.passwd")), Some(Whiteout::Removed("etc/passwd".into())));
        assert_eq!(whiteout_of(Path::new("var/cache/.wh..wh..opq")), Some(Whiteout::Opaque("var/cache".into())));
        assert_eq!(whiteout_of(Path::new("bin/busybox")), None);
    }

    #[test]
    fn entries_cannot_climb_out_of_the_layer() {
        assert_eq!(safe_relative(Path::new("/bin/sh")), Some("bin/sh".into()));
        assert_eq!(safe_relative(Path::new("./etc/hosts")), Some("etc/hosts".into()));
        assert_eq!(safe_relative(Path::new("../../etc/shadow")), None);
    }

    #[test]
    fn whiteouts_never_follow_a_symlink_out_of_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), "keep").unwrap();
        let blob = dir.path().join("layer.tar");
        let mut builder = tar::Builder::new(File::create(&blob).unwrap());
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_uid(0);
        link.set_gid(0);
        builder.append_link(&mut link, "evil", &outside).unwrap();
        for name in ["evil/.wh.precious", "evil/.wh..wh..opq"] {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, std::io::empty()).unwrap();
        }
        builder.into_inner().unwrap();

        unpack_layer(&blob, false, &dir.path().join("out")).unwrap();
        assert_eq!(std::fs::read_to_string(outside.join("precious")).unwrap(), "keep");
        assert!(xattr::get(&outside, "trusted.overlay.opaque").unwrap().is_none());
    }

    #[test]
    fn a_gzipped_layer_unpacks_with_modes_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar.gz");
        let gz = flate2::write::GzEncoder::new(File::create(&blob).unwrap(), flate2::Compression::fast());
        let mut builder = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o755);
        header.set_uid(0);
        header.set_gid(0);
        builder.append_data(&mut header, "bin/tool", &b"hi\n"[..]).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_uid(0);
        link.set_gid(0);
        builder.append_link(&mut link, "bin/alias", "tool").unwrap();
        builder.into_inner().unwrap().finish().unwrap();

        let target = dir.path().join("out");
        unpack_layer(&blob, true, &target).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(target.join("bin/tool")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(std::fs::read_link(target.join("bin/alias")).unwrap(), Path::new("tool"));
    }
}
