//! Cgroups of sandboxes: which version the host mounts, where a container's cgroup lives, whether
//! its memory limit killed it, and removing what runc leaves behind.
//!
//! runc creates the container's cgroup `/{parent}/{sandbox}/{container}/c` and removes only that leaf
//! when the container ends, so what tells of an OOM kill must live in `{container}`, which stays until
//! the sandbox is removed. Under v2, `memory.events` counts a leaf's kills in its ancestors, so runc
//! sets the memory limit on the leaf as usual. Under v1 nothing is counted above the leaf, so the
//! memory limit is set on `{container}` here instead of by runc, and its peak usage reaching the limit
//! tells (its `failcnt` stays 0 when the kernel goes straight to the OOM killer).

use std::path::{Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CgroupVersion {
    /// Per-controller hierarchies (`/sys/fs/cgroup/memory`, …), possibly beside a v2 `unified` mount.
    V1,
    /// One unified hierarchy at `/sys/fs/cgroup`.
    V2,
}

/// Detects the version from the mounts: v2 when `/sys/fs/cgroup` itself is cgroup2.
pub(crate) fn detect() -> CgroupVersion {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// The cgroups of one node's sandboxes, under `parent`.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    pub version: CgroupVersion,
    pub parent: String,
}

impl Cgroups {
    /// The `cgroupsPath` runc gets for a container.
    pub fn runc_path(&self, sandbox: &str, container: &str) -> String {
        format!("/{}/{sandbox}/{container}/c", self.parent)
    }

    /// Whether runc sets the memory limit on the container's leaf (v2), or `limit_memory` does (v1).
    pub fn memory_limit_in_leaf(&self) -> bool {
        self.version == CgroupVersion::V2
    }

    /// Under v1, creates the container's own memory cgroup with its limit (see the module docs).
    pub fn limit_memory(&self, sandbox: &str, container: &str, bytes: u64) -> std::io::Result<()> {
        if self.memory_limit_in_leaf() {
            return Ok(());
        }
        let dir = Path::new(CGROUP_ROOT).join("memory").join(&self.parent).join(sandbox).join(container);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
        // Without swap accounting the file is absent, and the limit above already holds.
        let swap = dir.join("memory.memsw.limit_in_bytes");
        if swap.exists() {
            std::fs::write(swap, bytes.to_string())?;
        }
        Ok(())
    }

    /// Sets the CFS quota of a running container's leaf (see `Bundle::start` for why only now).
    pub fn limit_cpu(&self, sandbox: &str, container: &str, quota_us: u64, period_us: u64) -> std::io::Result<()> {
        let leaf = Path::new(&self.parent).join(sandbox).join(container).join("c");
        match self.version {
            CgroupVersion::V1 => {
                let dir = Path::new(CGROUP_ROOT).join("cpu").join(leaf);
                std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())?;
                std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())
            }
            CgroupVersion::V2 => {
                std::fs::write(Path::new(CGROUP_ROOT).join(leaf).join("cpu.max"), format!("{quota_us} {period_us}"))
            }
        }
    }

    /// Whether the container was killed for memory: under v2, `memory.events` counts the kill in
    /// `{container}`; under v1 the kill is counted only in runc's removed leaf, so a container whose
    /// own limit (held by `{container}`) was hit, and that died of SIGKILL, counts as OOM-killed.
    pub fn oom_killed(&self, sandbox: &str, container: &str) -> bool {
        let relative = format!("{}/{sandbox}/{container}", self.parent);
        match self.version {
            CgroupVersion::V1 => {
                let dir = Path::new(CGROUP_ROOT).join("memory").join(relative);
                let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok()?.trim().parse::<u64>().ok();
                match (read("memory.max_usage_in_bytes"), read("memory.limit_in_bytes")) {
                    (Some(peak), Some(limit)) => peak >= limit,
                    _ => false,
                }
            }
            CgroupVersion::V2 => {
                let events = Path::new(CGROUP_ROOT).join(relative).join("memory.events");
                std::fs::read_to_string(events).map(|text| counter(&text, "oom_kill") > 0).unwrap_or(false)
            }
        }
    }

    /// Every directory under `relative` (itself included), deepest first, in every hierarchy.
    fn dirs_under(&self, relative: &Path) -> Vec<PathBuf> {
        let roots: Vec<PathBuf> = match self.version {
            CgroupVersion::V2 => vec![PathBuf::from(CGROUP_ROOT)],
            CgroupVersion::V1 => std::fs::read_dir(CGROUP_ROOT)
                .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
                .unwrap_or_default(),
        };
        let mut dirs = Vec::new();
        for root in roots {
            let top = root.join(relative);
            if top.is_dir() {
                collect_depth_first(&top, &mut dirs);
            }
        }
        dirs
    }

    fn sandbox_dirs(&self, sandbox: &str) -> Vec<PathBuf> {
        self.dirs_under(&Path::new(&self.parent).join(sandbox))
    }

    /// Removes the node's parent cgroup and anything left under it (see `purge`).
    pub fn remove_parent(&self) {
        for dir in self.dirs_under(Path::new(&self.parent)) {
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// Removes a sandbox's cgroup directories (emptied by then: its containers are gone).
    pub fn remove_sandbox(&self, sandbox: &str) {
        for dir in self.sandbox_dirs(sandbox) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::debug!(dir = %dir.display(), error = %e, "cgroup not removed");
            }
        }
    }
}

/// Children before their parent, so `rmdir` can remove them in order.
fn collect_depth_first(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_depth_first(&path, out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line).
fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_is_read_from_either_file_format() {
        assert_eq!(counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"), 2);
        assert_eq!(counter("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n", "oom_kill"), 1);
        assert_eq!(counter("oom_kill_disable 0\n", "oom_kill"), 0);
    }

    #[test]
    fn containers_get_a_leaf_under_their_own_cgroup() {
        let cgroups = Cgroups { version: CgroupVersion::V1, parent: "sandboxd".into() };
        assert_eq!(cgroups.runc_path("sbx-1", "web"), "/sandboxd/sbx-1/web/c");
    }
}
