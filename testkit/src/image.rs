//! A small test image built from Debian's static busybox: one gzipped layer with `/bin/busybox`, the
//! applets tests use, and `/www/index.html`; pushed to a registry or written as an OCI archive.

use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Where Debian's `busybox-static` installs the static binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// What `/www/index.html` in the image says.
pub const INDEX_HTML: &str = "hello from busybox\n";

const APPLETS: [&str; 16] = [
    "sh", "httpd", "echo", "cat", "sleep", "wget", "nc", "head", "dd", "ls", "true", "false", "yes", "tail", "ps",
    "uname",
];
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The parts of the busybox image.
pub struct TestImage {
    /// The gzipped layer.
    pub layer: Vec<u8>,
    /// The image config (entrypoint none, `Cmd ["sh"]`, `PATH=/bin`).
    pub config: Vec<u8>,
}

/// Whether the static busybox this image needs is installed.
pub fn busybox_available() -> bool {
    Path::new(BUSYBOX).is_file()
}

/// Builds the image from `/bin/busybox`.
pub fn busybox_image() -> std::io::Result<TestImage> {
    busybox_image_with_padding(0)
}

/// The same image with `/padding`, `bytes` of random data: a layer of a size of one's choosing, and a
/// digest no other image shares.
pub fn busybox_image_with_padding(bytes: usize) -> std::io::Result<TestImage> {
    let raw = layer_tar(bytes)?;
    let diff_id = format!("sha256:{:x}", Sha256::digest(&raw));
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw)?;
    let layer = gz.finish()?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    });
    Ok(TestImage { layer, config: serde_json::to_vec(&config).expect("json") })
}

fn layer_tar(padding: usize) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for dir in ["bin", "www", "tmp", "etc"] {
        let mut header = tar_header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut header, dir, std::io::empty())?;
    }
    let busybox = std::fs::read(BUSYBOX)?;
    let mut header = tar_header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    builder.append_data(&mut header, "bin/busybox", busybox.as_slice())?;
    for applet in APPLETS {
        let mut header = tar_header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    let mut header = tar_header(tar::EntryType::Regular, 0o644, INDEX_HTML.len() as u64);
    builder.append_data(&mut header, "www/index.html", INDEX_HTML.as_bytes())?;
    // Random bytes do not compress, so the gzipped layer grows by about `padding`.
    let noise: Vec<u8> = (0..padding).map(|_| fastrand::u8(..)).collect();
    let mut header = tar_header(tar::EntryType::Regular, 0o644, noise.len() as u64);
    builder.append_data(&mut header, "padding", noise.as_slice())?;
    builder.into_inner()
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

impl TestImage {
    /// The layer's digest (`sha256:…`).
    pub fn layer_digest(&self) -> String {
        format!("sha256:{:x}", Sha256::digest(&self.layer))
    }

    /// Pushes the image to `registry` (plain http) as `repository:tag`.
    pub async fn push(&self, registry: &str, repository: &str, tag: &str) -> Result<(), String> {
        use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
        let client =
            oci_client::Client::new(ClientConfig { protocol: ClientProtocol::Http, ..ClientConfig::default() });
        let reference = oci_client::Reference::with_tag(registry.into(), repository.into(), tag.into());
        let layers = [ImageLayer::new(self.layer.clone(), LAYER_MEDIA_TYPE.into(), None)];
        let config = Config::new(self.config.clone(), CONFIG_MEDIA_TYPE.into(), None);
        client
            .push(&reference, &layers, config, &oci_client::secrets::RegistryAuth::Anonymous, None)
            .await
            .map(|_| ())
            .map_err(|e| format!("pushing {}: {e}", reference.whole()))
    }

    /// Writes the image as an OCI image-layout archive naming it `reference`.
    pub fn write_oci_archive(&self, path: &Path, reference: &str) -> std::io::Result<()> {
        let digest = |bytes: &[u8]| format!("sha256:{:x}", Sha256::digest(bytes));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": digest(&self.config), "size": self.config.len()},
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": digest(&self.layer), "size": self.layer.len()}]
        }))
        .expect("json");
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(&manifest),
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": reference}
            }]
        }))
        .expect("json");
        let mut builder = tar::Builder::new(std::fs::File::create(path)?);
        let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let mut header = tar_header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
            builder.append_data(&mut header, name, bytes)
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &index)?;
        for blob in [&self.layer, &self.config, &manifest] {
            add(&format!("blobs/sha256/{}", &digest(blob)["sha256:".len()..]), blob)?;
        }
        builder.into_inner()?.sync_all()
    }
}
