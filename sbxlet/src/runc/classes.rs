//! The runtime classes of a real node: which OCI runtime binary runs each class, with which global
//! flags, and which classes this node can actually run (probed at start).
//!
//! gVisor's flags, and why:
//! - `--network=host`: the sandbox's containers share one network namespace (the veth on the node
//!   bridge, `localhost` between containers) exactly as under runc. Each container is its own runsc
//!   sandbox, and with gVisor's own network stack (`--network=sandbox`) each would take over the same
//!   veth. With `host`, gVisor's kernel passes socket calls to the namespace's stack instead; the
//!   namespace, not the node, is what the sandbox reaches. (runsc 20221219, Debian 12's, also
//!   refuses `sandbox` on kernels that namespace `net.core.rmem_default`: it takes any such
//!   namespace for the root one.)
//! - `--file-access=shared`: the files API writes into the container's rootfs from the host. With
//!   the default (`exclusive`), gVisor caches the tree and never sees a file created after it looked.
//! - `--overlay2=none`: the container's writes land in its rootfs on the host, where the files API
//!   reads them, instead of in a memory overlay inside gVisor (newer runsc defaults to that).
//! - the platform is runsc's own default (ptrace in 20221219, systrap later) unless the node's
//!   config names one: `kvm` is faster but needs `/dev/kvm`, and under nested virtualisation it can
//!   hang at boot (seen on this project's CI machines), so it is never chosen by default.

use super::container::OciRuntime;
use super::host::run_within;
use crate::error::RuntimeError;
use sandboxd_api::{RuntimeClass, RuntimeClasses};
use std::path::Path;
use std::time::Duration;

/// Longest a probe may take: a runsc whose platform cannot start (kvm without nesting) hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// The flags every runsc call gets (see the module docs).
const GVISOR_FLAGS: [&str; 3] = ["--network=host", "--file-access=shared", "--overlay2=none"];

/// How a node runs each runtime class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSettings {
    /// The runc binary, and extra global flags for it.
    pub runc: String,
    pub runc_flags: Vec<String>,
    /// The runsc (gVisor) binary, and extra global flags for it.
    pub runsc: String,
    pub runsc_flags: Vec<String>,
    /// gVisor's platform (`ptrace`, `systrap`, `kvm`); `None`: runsc's default.
    pub gvisor_platform: Option<String>,
    /// The classes the operator asked for; `None`: every class whose probe passes.
    pub wanted: Option<RuntimeClasses>,
}

impl Default for ClassSettings {
    fn default() -> Self {
        ClassSettings {
            runc: "runc".into(),
            runc_flags: Vec::new(),
            runsc: "runsc".into(),
            runsc_flags: Vec::new(),
            gvisor_platform: None,
            wanted: None,
        }
    }
}

/// The OCI runtime of every class, and the classes this node offers.
#[derive(Debug, Clone)]
pub(crate) struct Runtimes {
    runc: OciRuntime,
    gvisor: OciRuntime,
    offered: RuntimeClasses,
}

impl Runtimes {
    /// The runtime of each class (state roots under `state_dir`), without probing: every class is
    /// taken as offered. For teardown, which must reach containers of any class.
    pub fn unprobed(settings: &ClassSettings, state_dir: &Path) -> Runtimes {
        let root = |name: &str| state_dir.join(name).display().to_string();
        let runc = OciRuntime {
            class: RuntimeClass::Runc,
            program: settings.runc.clone(),
            root: root("runc"),
            global_args: settings.runc_flags.clone(),
        };
        let mut gvisor_args: Vec<String> = GVISOR_FLAGS.map(String::from).to_vec();
        if let Some(platform) = &settings.gvisor_platform {
            gvisor_args.push(format!("--platform={platform}"));
        }
        gvisor_args.extend(settings.runsc_flags.iter().cloned());
        let gvisor = OciRuntime {
            class: RuntimeClass::Gvisor,
            program: settings.runsc.clone(),
            root: root("runsc"),
            global_args: gvisor_args,
        };
        Runtimes { runc, gvisor, offered: RuntimeClass::ALL.into_iter().collect() }
    }

    /// The runtimes, offering each class whose probe passes. A class the operator asked for that
    /// fails its probe stops the agent, with the probe's error.
    pub async fn probe(settings: &ClassSettings, state_dir: &Path) -> Result<Runtimes, RuntimeError> {
        let mut runtimes = Runtimes::unprobed(settings, state_dir);
        let mut offered = RuntimeClasses::default();
        for class in RuntimeClass::ALL {
            if settings.wanted.is_some_and(|w| !w.contains(class)) {
                continue;
            }
            match probe_class(runtimes.get(class)).await {
                Ok(()) => offered = offered.with(class),
                Err(e) if settings.wanted.is_some() => {
                    return Err(RuntimeError::Failed(format!("runtime class {class} was asked for: {e}")))
                }
                Err(e) => tracing::info!(class = %class, error = %e, "runtime class not offered"),
            }
        }
        if offered == RuntimeClasses::default() {
            return Err(RuntimeError::Failed("no runtime class can run on this node".into()));
        }
        runtimes.offered = offered;
        Ok(runtimes)
    }

    pub fn get(&self, class: RuntimeClass) -> &OciRuntime {
        match class {
            RuntimeClass::Runc => &self.runc,
            RuntimeClass::Gvisor => &self.gvisor,
        }
    }

    pub fn offered(&self) -> RuntimeClasses {
        self.offered
    }

    /// Every runtime, for teardown.
    pub fn all(&self) -> [&OciRuntime; 2] {
        [&self.runc, &self.gvisor]
    }
}

/// Whether `runtime` can run here: runc answers `--version`; runsc boots a sandbox (`runsc do true`
/// without a network, with the platform and the operator's flags), which also proves that its
/// platform works on this machine.
async fn probe_class(runtime: &OciRuntime) -> Result<(), RuntimeError> {
    match runtime.class {
        RuntimeClass::Runc => run_within(PROBE_TIMEOUT, &runtime.program, &["--version"]).await.map(|_| ()),
        RuntimeClass::Gvisor => {
            // Every global flag parses (a runsc too old for one fails here, not at each create).
            let mut flags = runtime.prefix().split_off(1);
            flags.push("--version".into());
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            run_within(PROBE_TIMEOUT, &runtime.program, &flags).await?;
            let probe_root = format!("{}-probe", runtime.root);
            let mut args: Vec<&str> = vec!["--root", &probe_root];
            // The fixed flags are about bundles; `runsc do` refuses `--file-access=shared`.
            args.extend(runtime.global_args.iter().map(String::as_str).filter(|a| !GVISOR_FLAGS.contains(a)));
            args.extend(["--network=none", "do", "true"]);
            let outcome = run_within(PROBE_TIMEOUT, &runtime.program, &args).await.map(|_| ());
            if outcome.is_err() {
                // A probe that hung leaves its sandbox and gofer behind `runsc do`, which was killed.
                kill_processes_naming(&probe_root);
            }
            let _ = std::fs::remove_dir_all(&probe_root);
            outcome
        }
    }
}

/// SIGKILLs every process whose command line contains `needle`.
fn kill_processes_naming(needle: &str) {
    let own = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid as u32 == own {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gvisor_gets_its_fixed_flags_then_the_platform_then_the_operators_flags() {
        let settings = ClassSettings {
            gvisor_platform: Some("kvm".into()),
            runsc_flags: vec!["--debug".into()],
            ..ClassSettings::default()
        };
        let runtimes = Runtimes::unprobed(&settings, Path::new("/state"));
        let gvisor = runtimes.get(RuntimeClass::Gvisor);
        assert_eq!(
            gvisor.prefix(),
            [
                "runsc",
                "--root",
                "/state/runsc",
                "--network=host",
                "--file-access=shared",
                "--overlay2=none",
                "--platform=kvm",
                "--debug"
            ]
        );
        assert_eq!(runtimes.get(RuntimeClass::Runc).prefix(), ["runc", "--root", "/state/runc"]);
    }

    #[tokio::test]
    async fn a_missing_binary_is_not_offered_unless_it_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ClassSettings { runsc: "/nonexistent/runsc".into(), runc: "true".into(), ..Default::default() };
        let runtimes = Runtimes::probe(&settings, dir.path()).await.unwrap();
        assert_eq!(runtimes.offered(), RuntimeClasses::only(RuntimeClass::Runc));
        let wanted = RuntimeClass::ALL.into_iter().collect();
        let err = Runtimes::probe(&ClassSettings { wanted: Some(wanted), ..settings }, dir.path()).await.unwrap_err();
        assert!(err.to_string().contains("runtime class gvisor was asked for"), "{err}");
    }
}
