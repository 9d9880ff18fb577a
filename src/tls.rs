//! Secure by default: the data directory's credentials (a CA, a serving certificate, the admin
//! token, the secret of the per-node agent tokens), the listener's rustls configuration, and the
//! client config that `sbxctl` reads.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the credentials could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |error| TlsError::Io { path: path.to_path_buf(), error }
}

/// Files under the data directory.
pub const CA_CERT: &str = "pki/ca.crt";
pub const CA_KEY: &str = "pki/ca.key";
pub const SERVER_CERT: &str = "pki/server.crt";
pub const SERVER_KEY: &str = "pki/server.key";
pub const ADMIN_TOKEN: &str = "admin.token";
pub const AGENT_SECRET: &str = "agent.secret";
pub const CLIENT_CONFIG: &str = "client.json";

/// Creates `dir` (and parents) readable by the owner only.
pub fn private_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// Writes `contents` to `path` with mode 0600, through a temporary file so that a crash never
/// leaves half a key.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    file.write_all(contents).and_then(|_| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The contents of `path`, or `make()` written there (mode 0600) when it does not exist yet.
pub fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> Result<String, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = make();
            write_private(path, text.as_bytes())?;
            Ok(text)
        }
        Err(e) => Err(TlsError::Io { path: path.to_path_buf(), error: e }),
    }
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "sandboxd-o CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = valid_for(CA_DAYS);
    Ok(params)
}

/// The CA lasts ten years; the serving certificate a year, and is made again at every start.
const CA_DAYS: i64 = 3650;
const SERVING_DAYS: i64 = 365;

/// From an hour ago (clocks differ a little) to `days` from now.
fn valid_for(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::hours(1), now + time::Duration::days(days))
}

/// The names a serving certificate covers: loopback, the host's name, and the listen address.
pub fn serving_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    names.extend(extra.iter().cloned());
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            names.push(host.to_string());
        }
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

/// Files the server made must be the owner's alone: a looser one (from before this version, or
/// copied in by hand) is tightened to 0600, and the server says so.
pub fn tighten(path: &Path) -> Result<(), TlsError> {
    // A link is left alone: its target may belong to other software.
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)).map_err(io(path))?;
        tracing::warn!(path = %path.display(), was = format!("{mode:o}"), "a credential or store file was readable by others; now 0600");
    }
    Ok(())
}

/// The CA (made once, kept) and a serving certificate for `names` signed by it (made again at
/// every start, so it always covers the current listen address). Returns the CA's PEM.
pub fn ensure_pki(data_dir: &Path, names: &[String]) -> Result<String, TlsError> {
    private_dir(&data_dir.join("pki"))?;
    let ca_key_pem =
        read_or_create(&data_dir.join(CA_KEY), || KeyPair::generate().map(|k| k.serialize_pem()).unwrap_or_default())?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| TlsError::Invalid { path: data_dir.join(CA_KEY), message: e.to_string() })?;
    // The same name and key sign as the stored CA certificate does, so a re-made issuer object is
    // as good as the original for signing.
    let ca = ca_params()?.self_signed(&ca_key)?;
    let ca_pem = read_or_create(&data_dir.join(CA_CERT), || ca.pem())?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, "sandboxd-o");
    (params.not_before, params.not_after) = valid_for(SERVING_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_private(&data_dir.join(SERVER_KEY), key.serialize_pem().as_bytes())?;
    write_private(&data_dir.join(SERVER_CERT), cert.pem().as_bytes())?;
    Ok(ca_pem)
}

/// The rustls configuration of the listener, from PEM files.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |path: &Path, message: String| TlsError::Invalid { path: path.to_path_buf(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| invalid(cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid(cert_path, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| invalid(key_path, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(cert_path, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(key_path, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Says so when a file the operator named is readable by others (never changes it).
pub fn warn_if_loose(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "a credential file is readable by every user");
        }
    }
}

/// The URL clients use for a listen address: a wildcard listen is reached on loopback.
pub fn client_url(listen: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("{scheme}://{ip}:{}", listen.port())
}

/// Writes the client config `sbxctl` reads (the client crate's type, so both read one shape).
pub fn write_client_config(path: &Path, config: &sandboxd_client::ClientConfig) -> Result<(), TlsError> {
    let json = serde_json::to_string_pretty(config).expect("client config serializes");
    write_private(path, format!("{json}\n").as_bytes())
}

/// The bearer token of `node`'s agent: HMAC-SHA256 of the node's name under the agent secret, as
/// hex. Each node's agent holds only its own, so a registration that points at another node's
/// address is refused there (401), and one stolen agent token opens one agent.
pub fn agent_token(secret: &str, node: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"sbxlet-agent-token:");
    mac.update(node.as_bytes());
    crate::apiserver::auth::to_hex(&mac.finalize().into_bytes())
}

/// A new random secret as hex: 32 bytes from the operating system's generator.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random generator");
    crate::apiserver::auth::to_hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_ca_signs_a_certificate_rustls_serves_and_keeps_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let names = serving_names("127.0.0.1:8082".parse().unwrap(), &["sbx.example.org".to_string()]);
        assert!(names.contains(&"sbx.example.org".to_string()));
        let first = ensure_pki(dir.path(), &names).unwrap();
        let second = ensure_pki(dir.path(), &names).unwrap();
        assert_eq!(first, second, "the CA is made once");
        server_config(&dir.path().join(SERVER_CERT), &dir.path().join(SERVER_KEY)).unwrap();
        for file in [CA_KEY, SERVER_KEY, CA_CERT] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = std::fs::metadata(dir.path().join("pki")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn certificates_are_valid_from_now_for_their_whole_term() {
        let (from, to) = valid_for(SERVING_DAYS);
        let now = time::OffsetDateTime::now_utc();
        assert!(from < now && now < to);
        assert!(to - now > time::Duration::days(364), "a year from now, whatever the date");
    }

    #[test]
    fn agent_tokens_are_per_node_and_per_secret() {
        let a1 = agent_token("secret", "n1");
        assert_eq!(a1.len(), 64);
        assert_eq!(a1, agent_token("secret", "n1"));
        assert_ne!(a1, agent_token("secret", "n2"));
        assert_ne!(a1, agent_token("other", "n1"));
    }

    #[test]
    fn loose_credential_files_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        std::fs::write(&file, "t").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        tighten(&file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        tighten(&dir.path().join("absent")).unwrap();
    }

    #[test]
    fn a_wildcard_listen_is_reached_on_loopback() {
        assert_eq!(client_url("0.0.0.0:8082".parse().unwrap(), true), "https://127.0.0.1:8082");
        assert_eq!(client_url("127.0.0.5:1".parse().unwrap(), false), "http://127.0.0.5:1");
        assert_eq!(client_url("[::]:9".parse().unwrap(), true), "https://[::1]:9");
    }
}
