//! The node's image store: pulls from OCI registries (through `oci-client`) or imports OCI archives,
//! keeps blobs content-addressed, unpacks each layer once, and collects what nothing uses.
//!
//! Layout under `root`: `blobs/sha256/<hex>`, `layers/<hex>/` (unpacked), `refs/<key>.json` (one
//! image record per reference; its modification time is when a sandbox last used it).

use crate::error::RuntimeError;
use futures::future::{BoxFuture, FutureExt, Shared};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const GZIP_LAYER_TYPES: [&str; 2] =
    ["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"];

/// An image as the runtime needs it: its layers (bottom first) and the process defaults of its config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Image {
    pub reference: String,
    pub layers: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

/// Where images come from and where they are kept.
#[derive(Debug, Clone, Default)]
pub struct ImageSettings {
    /// Pull images of Docker Hub from this registry (`host:port`) instead.
    pub registry_mirror: Option<String>,
    /// Registries spoken to over plain http besides loopback ones.
    pub insecure_registries: Vec<String>,
}

/// Layers and blobs no image names are kept this long, for imports still writing their record.
const ORPHAN_GRACE: Duration = Duration::from_secs(600);

type Pull = Shared<BoxFuture<'static, Result<Arc<Image>, String>>>;

/// Images on this node.
pub struct ImageStore {
    root: PathBuf,
    settings: ImageSettings,
    /// Pulls in flight by reference, so a second sandbox of the same image waits for the first pull.
    pulls: Mutex<HashMap<String, Pull>>,
    /// Pulls hold it shared, garbage collection exclusively: a pull that finds a layer on disk must
    /// not have it collected before its record names it.
    collecting: tokio::sync::RwLock<()>,
}

impl ImageStore {
    pub fn open(root: &Path, settings: ImageSettings) -> std::io::Result<Arc<ImageStore>> {
        for dir in ["blobs/sha256", "layers", "refs"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        Ok(Arc::new(ImageStore {
            root: root.to_path_buf(),
            settings,
            pulls: Mutex::new(HashMap::new()),
            collecting: tokio::sync::RwLock::new(()),
        }))
    }

    /// The image `reference` names, pulled unless it is already here.
    pub async fn ensure(self: &Arc<Self>, reference: &str) -> Result<Arc<Image>, RuntimeError> {
        let _not_collecting = self.collecting.read().await;
        let parsed = parse_reference(reference)?;
        let key = parsed.whole();
        if let Some(image) = self.read_record(&key) {
            self.touch(&key);
            return Ok(Arc::new(image));
        }
        let pull = {
            let mut pulls = self.pulls.lock();
            pulls
                .entry(key.clone())
                .or_insert_with(|| {
                    let store = self.clone();
                    let key = key.clone();
                    async move {
                        let started = std::time::Instant::now();
                        let pulled = store.pull(parsed, &key).await;
                        crate::metrics::observe_pull(pulled.is_ok(), started.elapsed().as_secs_f64());
                        pulled.map(Arc::new).map_err(|e| e.to_string())
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = pull.await;
        self.pulls.lock().remove(&key);
        result.map_err(RuntimeError::Failed)
    }

    /// The unpacked layer directories of `image`, top first, as overlayfs `lowerdir` wants them.
    pub fn lower_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().rev().map(|digest| self.layer_dir(digest)).collect()
    }

    async fn pull(&self, reference: Reference, key: &str) -> Result<Image, RuntimeError> {
        let source = self.source_of(&reference);
        let client = oci_client::Client::new(ClientConfig {
            protocol: if self.is_insecure(source.registry()) { ClientProtocol::Http } else { ClientProtocol::Https },
            // A registry that stops answering must not hold a sandbox's bring-up (and its delete) forever.
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..ClientConfig::default()
        });
        let started = std::time::Instant::now();
        let failed = |e: oci_client::errors::OciDistributionError| {
            RuntimeError::Failed(format!("pulling {}: {e}", source.whole()))
        };
        let (manifest, _digest, config) =
            client.pull_manifest_and_config(&source, &RegistryAuth::Anonymous).await.map_err(failed)?;
        let mut layers = Vec::new();
        for layer in &manifest.layers {
            let hex = digest_hex(&layer.digest)?;
            if !self.blob_path(&hex).exists() {
                let partial = self.root.join("blobs").join(format!("{hex}.partial-{}", fastrand::u64(..)));
                let file = tokio::fs::File::create(&partial).await.map_err(io_failed("creating blob"))?;
                // oci-client checks the digest of what it streams before it returns.
                let written = client.pull_blob(&source, layer, file).await;
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&partial);
                    return Err(failed(e));
                }
                std::fs::rename(&partial, self.blob_path(&hex)).map_err(io_failed("storing blob"))?;
            }
            self.unpack_once(&hex, GZIP_LAYER_TYPES.contains(&layer.media_type.as_str())).await?;
            layers.push(hex);
        }
        let image = image_from_config(key, layers, &config)?;
        self.write_record(key, &image)?;
        tracing::info!(image = key, elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
        Ok(image)
    }

    /// Unpacks a stored layer blob unless it was unpacked before; racing unpacks of one layer are safe.
    async fn unpack_once(&self, hex: &str, gzip: bool) -> Result<(), RuntimeError> {
        let target = self.layer_dir(hex);
        if target.exists() {
            return Ok(());
        }
        let blob = self.blob_path(hex);
        let scratch = self.root.join("layers").join(format!(".{hex}.partial-{}", fastrand::u64(..)));
        let unpacked = {
            let scratch = scratch.clone();
            tokio::task::spawn_blocking(move || super::unpack::unpack_layer(&blob, gzip, &scratch))
                .await
                .map_err(|e| RuntimeError::Failed(format!("unpacking layer {hex}: {e}")))?
        };
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(RuntimeError::Failed(format!("unpacking layer {hex}: {e}")));
        }
        if std::fs::rename(&scratch, &target).is_err() {
            // Another unpack of the same layer won the race.
            let _ = std::fs::remove_dir_all(&scratch);
        }
        Ok(())
    }

    /// Imports every image of an OCI image-layout archive; returns the references imported.
    pub async fn import_archive(&self, archive: &Path) -> Result<Vec<String>, RuntimeError> {
        let blobs = self.root.join("blobs/sha256");
        let index = {
            let (archive, blobs) = (archive.to_path_buf(), blobs.clone());
            tokio::task::spawn_blocking(move || copy_archive_blobs(&archive, &blobs))
                .await
                .map_err(|e| RuntimeError::Failed(e.to_string()))??
        };
        let index: serde_json::Value = serde_json::from_slice(&index).map_err(invalid_archive)?;
        let mut imported = Vec::new();
        for entry in index["manifests"].as_array().cloned().unwrap_or_default() {
            let name = entry["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap_or("").to_string();
            if name.is_empty() {
                continue;
            }
            let manifest: serde_json::Value =
                serde_json::from_slice(&self.read_blob(entry["digest"].as_str().unwrap_or(""))?)
                    .map_err(invalid_archive)?;
            let config = self.read_blob(manifest["config"]["digest"].as_str().unwrap_or(""))?;
            let mut layers = Vec::new();
            for layer in manifest["layers"].as_array().cloned().unwrap_or_default() {
                let hex = digest_hex(layer["digest"].as_str().unwrap_or(""))?;
                let media_type = layer["mediaType"].as_str().unwrap_or("");
                self.unpack_once(&hex, GZIP_LAYER_TYPES.contains(&media_type)).await?;
                layers.push(hex);
            }
            let key = parse_reference(&name)?.whole();
            let image = image_from_config(&key, layers, &String::from_utf8_lossy(&config))?;
            self.write_record(&key, &image)?;
            imported.push(key);
        }
        if imported.is_empty() {
            return Err(invalid_archive("index.json names no image (org.opencontainers.image.ref.name)"));
        }
        Ok(imported)
    }

    /// Removes images no sandbox uses that were last used before `unused_for` ago, then every layer
    /// and blob no remaining image needs. Returns how many images were removed.
    pub fn collect_garbage(&self, in_use: &HashSet<String>, unused_for: Duration) -> usize {
        let _no_pulls = self.collecting.blocking_write();
        let cutoff = SystemTime::now().checked_sub(unused_for).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = 0;
        let mut needed: HashSet<String> = HashSet::new();
        for (path, image) in self.records() {
            let stale = std::fs::metadata(&path).and_then(|m| m.modified()).map(|t| t < cutoff).unwrap_or(false);
            if stale && !in_use.contains(&image.reference) && !self.pulls.lock().contains_key(&image.reference) {
                if std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            } else {
                needed.extend(image.layers);
            }
        }
        if !self.pulls.lock().is_empty() {
            return removed; // a pull in flight may be writing layers no record names yet
        }
        // An import by `sbxlet image import`, another process, writes its layers before its record.
        let young = SystemTime::now().checked_sub(ORPHAN_GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
        for dir in ["layers", "blobs/sha256"] {
            let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let recent = entry.metadata().and_then(|m| m.modified()).map(|t| t > young).unwrap_or(true);
                if !needed.contains(&name) && !recent && !name.starts_with('.') && !name.contains(".partial-") {
                    let path = entry.path();
                    let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                }
            }
        }
        removed
    }

    fn records(&self) -> Vec<(PathBuf, Image)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("refs")) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let image = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                Some((path, image))
            })
            .collect()
    }

    fn source_of(&self, reference: &Reference) -> Reference {
        match &self.settings.registry_mirror {
            Some(mirror) if reference.registry() == "docker.io" => {
                let repository = reference.repository().to_string();
                match (reference.tag(), reference.digest()) {
                    // A pinned digest stays pinned through the mirror.
                    (tag, Some(digest)) => Reference::with_tag_and_digest(
                        mirror.clone(),
                        repository,
                        tag.unwrap_or("latest").to_string(),
                        digest.to_string(),
                    ),
                    (tag, None) => Reference::with_tag(mirror.clone(), repository, tag.unwrap_or("latest").to_string()),
                }
            }
            _ => reference.clone(),
        }
    }

    fn is_insecure(&self, registry: &str) -> bool {
        let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        loopback || self.settings.insecure_registries.iter().any(|r| r == registry)
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("refs").join(format!("{:x}.json", Sha256::digest(key.as_bytes())))
    }

    fn read_record(&self, key: &str) -> Option<Image> {
        serde_json::from_slice(&std::fs::read(self.record_path(key)).ok()?).ok()
    }

    fn write_record(&self, key: &str, image: &Image) -> Result<(), RuntimeError> {
        let path = self.record_path(key);
        let partial = path.with_extension(format!("partial-{}", fastrand::u64(..)));
        std::fs::write(&partial, serde_json::to_vec(image).expect("images serialize"))
            .map_err(io_failed("recording image"))?;
        std::fs::rename(&partial, &path).map_err(io_failed("recording image"))
    }

    /// Marks an image used now, so garbage collection keeps it for another while.
    fn touch(&self, key: &str) {
        let _ = std::fs::File::options()
            .append(true)
            .open(self.record_path(key))
            .and_then(|f| f.set_modified(SystemTime::now()));
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.root.join("layers").join(hex)
    }

    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let hex = digest_hex(digest)?;
        std::fs::read(self.blob_path(&hex)).map_err(|e| invalid_archive(format!("blob {digest}: {e}")))
    }
}

/// The key an image is stored under (Docker's defaults filled in), or None for a malformed reference.
pub fn normalized(reference: &str) -> Option<String> {
    parse_reference(reference).ok().map(|r| r.whole())
}

/// A reference with Docker's defaults filled in (`busybox` → `docker.io/library/busybox:latest`).
fn parse_reference(reference: &str) -> Result<Reference, RuntimeError> {
    reference.parse::<Reference>().map_err(|e| RuntimeError::Invalid(format!("image {reference:?}: {e}")))
}

/// The hex part of a `sha256:` digest, refusing anything that could name another path.
fn digest_hex(digest: &str) -> Result<String, RuntimeError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(hex.to_ascii_lowercase()),
        _ => Err(RuntimeError::Failed(format!("unsupported digest {digest:?}"))),
    }
}

/// The process defaults of an image config (`config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`).
fn image_from_config(reference: &str, layers: Vec<String>, config: &str) -> Result<Image, RuntimeError> {
    let value: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| RuntimeError::Failed(format!("image {reference}: config is not JSON: {e}")))?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let process = &value["config"];
    Ok(Image {
        reference: reference.to_string(),
        layers,
        entrypoint: strings(&process["Entrypoint"]),
        cmd: strings(&process["Cmd"]),
        env: strings(&process["Env"]),
        working_dir: process["WorkingDir"].as_str().unwrap_or("").to_string(),
    })
}

/// Copies `blobs/sha256/*` of an OCI layout tar into `blobs`, checking each digest; returns index.json.
fn copy_archive_blobs(archive: &Path, blobs: &Path) -> Result<Vec<u8>, RuntimeError> {
    let file = std::fs::File::open(archive).map_err(|e| invalid_archive(format!("{}: {e}", archive.display())))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut index = None;
    for entry in tar.entries().map_err(invalid_archive)? {
        let mut entry = entry.map_err(invalid_archive)?;
        let path = entry.path().map_err(invalid_archive)?.to_string_lossy().trim_start_matches("./").to_string();
        if path == "index.json" {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(invalid_archive)?;
            index = Some(bytes);
        } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let hex = digest_hex(&format!("sha256:{hex}"))?;
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(invalid_archive)?;
            let actual = format!("{:x}", Sha256::digest(&bytes));
            if actual != hex {
                return Err(invalid_archive(format!("blob {hex} has digest {actual}")));
            }
            std::fs::write(blobs.join(&hex), &bytes).map_err(io_failed("storing blob"))?;
        }
    }
    index.ok_or_else(|| invalid_archive("no index.json: not an OCI image layout"))
}

fn invalid_archive(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(format!("image archive: {e}"))
}

fn io_failed(what: &'static str) -> impl Fn(std::io::Error) -> RuntimeError {
    move |e| RuntimeError::Failed(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_docker_defaults_and_digests_are_checked() {
        assert_eq!(parse_reference("busybox").unwrap().whole(), "docker.io/library/busybox:latest");
        assert_eq!(parse_reference("127.0.0.1:5000/bb:1").unwrap().registry(), "127.0.0.1:5000");
        assert!(digest_hex("sha256:../../etc").is_err());
        assert_eq!(digest_hex(&format!("sha256:{}", "A".repeat(64))).unwrap(), "a".repeat(64));
    }

    #[test]
    fn loopback_registries_are_spoken_to_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), ImageSettings::default()).unwrap();
        assert!(store.is_insecure("127.0.0.1:5000") && store.is_insecure("localhost:5000"));
        assert!(!store.is_insecure("registry-1.docker.io"));
    }

    #[test]
    fn the_mirror_serves_docker_hub_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let settings = ImageSettings { registry_mirror: Some("127.0.0.1:5000".into()), ..ImageSettings::default() };
        let store = ImageStore::open(dir.path(), settings).unwrap();
        let hub = store.source_of(&parse_reference("busybox:1.36").unwrap());
        assert_eq!(hub.whole(), "127.0.0.1:5000/library/busybox:1.36");
        let other = store.source_of(&parse_reference("ghcr.io/x/y:1").unwrap());
        assert_eq!(other.whole(), "ghcr.io/x/y:1");
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = store.source_of(&parse_reference(&format!("busybox@{digest}")).unwrap());
        assert_eq!(pinned.digest(), Some(digest.as_str()), "a pinned digest survives the mirror");
    }

    fn age(path: &Path, by: Duration) {
        std::fs::File::open(path).unwrap().set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn garbage_collection_keeps_used_recent_and_young_things_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), ImageSettings::default()).unwrap();
        let image = |name: &str, layer: &str| Image {
            reference: name.into(),
            layers: vec![layer.into()],
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: String::new(),
        };
        let (old, hour) = (Duration::from_secs(7200), Duration::from_secs(3600));
        for (name, layer) in [("unused", "l1"), ("in-use", "l2")] {
            store.write_record(name, &image(name, layer)).unwrap();
            age(&store.record_path(name), old);
        }
        for layer in ["l1", "l2", "young-orphan", "old-orphan"] {
            std::fs::create_dir_all(store.layer_dir(layer)).unwrap();
        }
        for layer in ["l1", "l2", "old-orphan"] {
            age(&store.layer_dir(layer), old);
        }
        let removed = store.collect_garbage(&HashSet::from(["in-use".to_string()]), hour);
        assert_eq!(removed, 1);
        assert!(store.read_record("unused").is_none() && store.read_record("in-use").is_some());
        let kept = |layer: &str| store.layer_dir(layer).exists();
        assert_eq!(
            (kept("l1"), kept("l2"), kept("young-orphan"), kept("old-orphan")),
            (false, true, true, false),
            "an import may still be writing the young orphan's record"
        );
    }

    #[test]
    fn process_defaults_come_from_the_image_config() {
        let config =
            r#"{"config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin"],"WorkingDir":"/srv"}}"#;
        let image = image_from_config("r", vec![], config).unwrap();
        assert_eq!((image.entrypoint.len(), image.cmd[0].as_str(), image.working_dir.as_str()), (2, "echo hi", "/srv"));
    }
}
