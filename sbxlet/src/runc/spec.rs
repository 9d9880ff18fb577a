//! The OCI runtime spec (`config.json`) of one container: the process from the image and the
//! request, the sandbox's network namespace, cgroup limits, and runc's default hardening.

use sandboxd_api::RuntimeClass;
use serde_json::{json, Value};

/// The most processes one container may run (a fork bomb stops here).
pub(crate) const PIDS_LIMIT: i64 = 1024;
/// The CFS period quotas are expressed in.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// The CFS quota for a request: `cpu_milli` thousandths of a CPU per period (the kernel's floor is 1 ms).
pub(crate) fn cpu_quota_us(cpu_milli: u64) -> u64 {
    (cpu_milli * CPU_PERIOD_US / 1000).max(1000)
}

/// Everything a container's `config.json` is made from.
#[derive(Debug, Clone)]
pub(crate) struct ContainerSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    pub netns_path: String,
    pub cgroups_path: String,
    pub memory_bytes: u64,
    /// Whether runc sets the memory limit (false when a parent cgroup holds it, see `cgroups`).
    pub memory_limit_in_leaf: bool,
    pub cpu_milli: u64,
    /// The sandbox's `/etc/hosts` (localhost and its own name), shared by its containers.
    pub hosts_file: String,
    /// The node's resolver configuration, for sandboxes with egress.
    pub resolv_conf: Option<String>,
    /// The rootfs's `/tmp` on the host, bound onto `/tmp` under gVisor.
    pub rootfs_tmp: String,
}

/// Capabilities a container keeps: the set container runtimes grant by default, none of the
/// administrative ones (no NET_ADMIN, SYS_ADMIN, SYS_MODULE, …).
const CAPABILITIES: [&str; 13] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls refused with EPERM: kernel modules, mounts, namespaces, keyrings, BPF, reboot and the
/// like. A deny list on top of the dropped capabilities; Docker's profile is an allow list.
const DENIED_SYSCALLS: [&str; 27] = [
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "init_module",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "mount",
    "move_mount",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
];

/// CPU shares for a request: 1024 per core, as the kubelet maps requests (at least 2).
pub(crate) fn cpu_shares(cpu_milli: u64) -> u64 {
    (cpu_milli * 1024 / 1000).max(2)
}

/// Mounts a gVisor container sees that live only inside gVisor's kernel (or are bound in from host
/// files), not in its rootfs on the host; the files API refuses them under gVisor.
pub(crate) const GVISOR_INTERNAL_MOUNTS: &[&str] = &["/proc", "/sys", "/dev", "/etc/hosts", "/etc/resolv.conf"];

/// The `config.json` for `spec` under `class`, with the rootfs at `rootfs` (relative to the bundle).
///
/// Under gVisor, `/tmp` is not a tmpfs: a tmpfs there would live in gVisor's memory, out of reach of
/// the files API, which writes into the rootfs on the host. Nor can `/tmp` be left out: runsc then
/// mounts a tmpfs of its own over an empty `/tmp`. So the rootfs's own `/tmp` is bound onto `/tmp`
/// (`spec.rootfs_tmp`, created by the caller): part of the container's writable layer, as in a
/// Docker container, and the directory the files API writes to.
pub(crate) fn runtime_config(spec: &ContainerSpec, class: RuntimeClass) -> Value {
    let capabilities: Vec<&str> = CAPABILITIES.to_vec();
    let mut config = base_config(spec, &capabilities);
    if !spec.memory_limit_in_leaf {
        config["linux"]["resources"].as_object_mut().expect("resources are an object").remove("memory");
    }
    let mounts = config["mounts"].as_array_mut().expect("mounts are a list");
    if class == RuntimeClass::Gvisor {
        for mount in mounts.iter_mut().filter(|m| m["destination"] == "/tmp") {
            *mount = json!({"destination": "/tmp", "type": "bind", "source": spec.rootfs_tmp, "options": ["rbind", "rw", "nosuid", "nodev"]});
        }
    }
    mounts.push(read_only_bind(&spec.hosts_file, "/etc/hosts"));
    if let Some(resolv) = &spec.resolv_conf {
        mounts.push(read_only_bind(resolv, "/etc/resolv.conf"));
    }
    config
}

fn read_only_bind(source: &str, destination: &str) -> Value {
    json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind", "ro"]})
}

fn base_config(spec: &ContainerSpec, capabilities: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": capabilities, "effective": capabilities, "permitted": capabilities,
                "inheritable": [], "ambient": []
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "cgroupsPath": spec.cgroups_path,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": spec.memory_bytes, "swap": spec.memory_bytes},
                // The quota is set once the container runs (see `Bundle::start`).
                "cpu": {"shares": cpu_shares(spec.cpu_milli)},
                "pids": {"limit": PIDS_LIMIT}
            },
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": spec.netns_path}
            ],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            },
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            args: vec!["httpd".into(), "-f".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            hostname: "web".into(),
            netns_path: "/var/run/netns/sbx-1".into(),
            cgroups_path: "/sandboxd/s/web/c".into(),
            memory_bytes: 64 << 20,
            memory_limit_in_leaf: true,
            cpu_milli: 250,
            hosts_file: "/state/s/hosts".into(),
            resolv_conf: None,
            rootfs_tmp: "/state/s/containers/web/rootfs/tmp".into(),
        }
    }

    #[test]
    fn requests_become_cgroup_limits() {
        let config = runtime_config(&spec(), RuntimeClass::Runc);
        let resources = &config["linux"]["resources"];
        assert_eq!(resources["memory"]["limit"], 64u64 << 20);
        assert_eq!((resources["cpu"]["shares"].as_u64(), cpu_quota_us(250)), (Some(256), 25_000));
        assert_eq!(resources["pids"]["limit"], PIDS_LIMIT);
        assert_eq!(config["linux"]["cgroupsPath"], "/sandboxd/s/web/c");
    }

    #[test]
    fn containers_join_the_sandbox_network_and_are_hardened() {
        let config = runtime_config(&spec(), RuntimeClass::Runc);
        let namespaces = config["linux"]["namespaces"].as_array().unwrap();
        assert!(namespaces.contains(&json!({"type": "network", "path": "/var/run/netns/sbx-1"})));
        assert_eq!(config["process"]["noNewPrivileges"], true);
        let bounding = config["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(!bounding.contains(&json!("CAP_SYS_ADMIN")) && !bounding.contains(&json!("CAP_NET_ADMIN")));
        assert_eq!(config["linux"]["seccomp"]["syscalls"][0]["action"], "SCMP_ACT_ERRNO");
        let mounts = config["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/etc/hosts" && m["source"] == "/state/s/hosts"));
        assert!(!mounts.iter().any(|m| m["destination"] == "/etc/resolv.conf"), "no resolver without egress");
    }

    #[test]
    fn the_memory_limit_can_be_left_to_a_parent_cgroup() {
        let config = runtime_config(&ContainerSpec { memory_limit_in_leaf: false, ..spec() }, RuntimeClass::Runc);
        assert!(config["linux"]["resources"].get("memory").is_none());
        assert_eq!(config["linux"]["resources"]["pids"]["limit"], PIDS_LIMIT);
    }

    #[test]
    fn under_gvisor_tmp_is_the_rootfs_own_directory_the_host_reaches() {
        let tmp = |class| {
            let config = runtime_config(&spec(), class);
            config["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/tmp").cloned().unwrap()
        };
        assert_eq!(tmp(RuntimeClass::Runc)["type"], "tmpfs");
        let gvisor = tmp(RuntimeClass::Gvisor);
        assert_eq!(
            (gvisor["type"].as_str(), gvisor["source"].as_str()),
            (Some("bind"), Some("/state/s/containers/web/rootfs/tmp"))
        );
    }

    #[test]
    fn tiny_cpu_requests_still_get_the_minimum_shares() {
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_shares(1000), 1024);
    }
}
