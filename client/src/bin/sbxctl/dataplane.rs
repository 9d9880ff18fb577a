//! `sbxctl exec`, `sbxctl cp` and `sbxctl logs -f`: the data plane from a terminal.

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use sandboxd_api::dataplane::ExecRequest;
use sandboxd_client::dataplane::{ExecInput, ExecOutput};
use sandboxd_client::Client;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// Options of `sbxctl exec`.
pub struct ExecOptions {
    pub container: Option<String>,
    pub stdin: bool,
    pub tty: bool,
    pub timeout_seconds: Option<u64>,
}

/// Runs a command in a sandbox over a streamed session; returns the command's exit code.
pub async fn exec(client: &Client, id: &str, command: Vec<String>, options: ExecOptions) -> anyhow::Result<i32> {
    let request = ExecRequest {
        container: options.container,
        command,
        timeout_seconds: options.timeout_seconds,
        tty: options.tty,
        ..ExecRequest::default()
    };
    let (mut input, mut outputs) = client.exec_stream(id, &request).await?;
    let raw = if options.tty { RawTerminal::enter() } else { None };
    if options.tty {
        if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stdout()) {
            input.resize(size.ws_col, size.ws_row).await?;
        }
    }
    let feeding = if options.stdin {
        tokio::spawn(feed(input))
    } else {
        input.close_stdin().await?;
        tokio::spawn(async move {
            // Held open so that the session is not closed from this side before the exit arrives.
            let _input = input;
            std::future::pending::<()>().await
        })
    };
    let mut code = None;
    while let Some(output) = outputs.next().await {
        match output? {
            ExecOutput::Stdout(data) => write_out(&mut std::io::stdout(), &data),
            ExecOutput::Stderr(data) => write_out(&mut std::io::stderr(), &data),
            ExecOutput::Exit { exit_code, timed_out, .. } => {
                drop(raw);
                if timed_out {
                    eprintln!("sbxctl: the command was killed at its timeout");
                }
                code = Some(exit_code);
                break;
            }
        }
    }
    feeding.abort();
    code.ok_or_else(|| anyhow!("the exec session ended without the command's exit"))
}

fn write_out(out: &mut dyn Write, data: &[u8]) {
    let _ = out.write_all(data);
    let _ = out.flush();
}

/// Copies local stdin into the session, then closes the process's stdin; also relays terminal
/// resizes.
async fn feed(mut input: ExecInput) {
    let mut stdin = tokio::io::stdin();
    let mut buffer = vec![0u8; 32 * 1024];
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    loop {
        tokio::select! {
            read = stdin.read(&mut buffer) => match read {
                Ok(0) | Err(_) => {
                    let _ = input.close_stdin().await;
                    std::future::pending::<()>().await;
                }
                Ok(n) => {
                    if input.stdin(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            },
            Some(()) = async { match resized.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stdout()) {
                    let _ = input.resize(size.ws_col, size.ws_row).await;
                }
            }
        }
    }
}

/// The local terminal in raw mode (keys go to the remote shell as typed); restored on drop.
struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.saved);
    }
}

/// A `SANDBOX:/path` argument, or `None` for a local path.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (sandbox, path) = arg.split_once(':')?;
    (sandboxd_api::names::name_problem(sandbox).is_none() && path.starts_with('/')).then_some((sandbox, path))
}

/// `sbxctl cp LOCAL SANDBOX:PATH` or `sbxctl cp SANDBOX:PATH LOCAL`: files and directories.
pub async fn cp(client: &Client, source: &str, destination: &str) -> anyhow::Result<i32> {
    match (remote(source), remote(destination)) {
        (None, Some((id, path))) => upload(client, Path::new(source), id, path).await,
        (Some((id, path)), None) => download(client, id, path, Path::new(destination)).await,
        _ => bail!("one of SOURCE and DESTINATION must be SANDBOX:/absolute/path and the other a local path"),
    }
}

/// A file is written to PATH; a directory's contents go into the directory PATH (created if missing).
async fn upload(client: &Client, local: &Path, id: &str, path: &str) -> anyhow::Result<i32> {
    let meta = std::fs::metadata(local).with_context(|| format!("{}", local.display()))?;
    let written = if meta.is_dir() {
        let archive = tar_of(local.to_path_buf());
        client.upload(id, &[("path", path)], true, reqwest::Body::wrap_stream(archive)).await?
    } else {
        let mode = format!("{:o}", std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777);
        let file = tokio::fs::File::open(local).await.with_context(|| format!("{}", local.display()))?;
        let body = reqwest::Body::wrap_stream(tokio_util_stream(file));
        client.upload(id, &[("path", path), ("mode", &mode)], false, body).await?
    };
    let what = if meta.is_dir() { "entries" } else { "bytes" };
    eprintln!("{} -> {id}:{} ({} {what})", local.display(), written.path, written.size);
    Ok(0)
}

fn tokio_util_stream(
    mut file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    async_stream(move |sender| async move {
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            match file.read(&mut buffer).await {
                Ok(0) => return,
                Ok(n) => {
                    if sender.send(Ok(bytes::Bytes::copy_from_slice(&buffer[..n]))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    return;
                }
            }
        }
    })
}

/// A stream fed by a producer task through a small channel.
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    tokio::spawn(producer(sender));
    futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|item| (item, r)) })
}

/// A tar of a directory's contents (names relative to it), written on a blocking thread.
fn tar_of(dir: PathBuf) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter { sender: sender.clone() };
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        if let Err(e) = builder.append_dir_all(".", &dir).and_then(|_| builder.finish()) {
            let _ = sender.blocking_send(Err(e));
        }
    });
    futures::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|item| (item, r)) })
}

struct ChannelWriter {
    sender: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.sender
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// PATH becomes LOCAL: a file is written there, a directory is recreated there (as `cp -r` does when
/// LOCAL does not exist; into LOCAL/NAME when LOCAL is an existing directory).
async fn download(client: &Client, id: &str, path: &str, local: &Path) -> anyhow::Result<i32> {
    let mut stream = client.download(id, &[("path", path)], true).await?;
    let mut archive = Vec::new();
    while let Some(chunk) = stream.next().await {
        archive.extend_from_slice(&chunk?);
    }
    let name = Path::new(path).file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("root"));
    let target = if local.is_dir() { local.join(&name) } else { local.to_path_buf() };
    let count = extract_renamed(&archive, &target)?;
    eprintln!("{id}:{path} -> {} ({count} entries)", target.display());
    Ok(0)
}

/// Extracts an archive whose entries start with one top component, putting that component at
/// `target`. The archive comes from a container, so it is treated as hostile: only files,
/// directories and symlinks, plain relative names, and never through a symlink an earlier entry
/// made (which could point anywhere on this machine).
fn extract_renamed(archive: &[u8], target: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    for entry in tar::Archive::new(archive).entries()? {
        let mut entry = entry?;
        let name = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink) {
            bail!(
                "the archive entry {} is a {kind:?}; only files, directories and symlinks are copied",
                name.display()
            );
        }
        let rest: PathBuf = name.components().skip(1).collect();
        if rest.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            bail!("the archive entry {} is not a plain relative path", name.display());
        }
        refuse_symlinked_parents(target, &rest)?;
        let destination = if rest.as_os_str().is_empty() { target.to_path_buf() } else { target.join(rest) };
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
        }
        entry.unpack(&destination).with_context(|| format!("{}", destination.display()))?;
        count += 1;
    }
    Ok(count)
}

/// Fails when a directory on the way from `target` to `target/rest` is a symlink.
fn refuse_symlinked_parents(target: &Path, rest: &Path) -> anyhow::Result<()> {
    let mut path = target.to_path_buf();
    let mut parents: Vec<_> = rest.components().collect();
    parents.pop();
    for component in std::iter::once(None).chain(parents.into_iter().map(Some)) {
        if let Some(component) = component {
            path.push(component);
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!("the archive writes through the symlink {}; refused", path.display());
        }
    }
    Ok(())
}

/// `sbxctl logs -f`: prints lines as they are written until the sandbox ends or Ctrl-C.
pub async fn follow_logs(
    client: &Client,
    id: &str,
    container: Option<&str>,
    tail: Option<usize>,
) -> anyhow::Result<i32> {
    let mut stream = client.follow_logs(id, container, tail).await?;
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if stdout.write_all(&chunk).and_then(|_| stdout.flush()).is_err() {
            return Ok(0);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_name_a_sandbox_and_an_absolute_path() {
        assert_eq!(remote("sbx-1:/tmp/x"), Some(("sbx-1", "/tmp/x")));
        assert_eq!(remote("./local"), None);
        assert_eq!(remote("sbx-1:relative"), None);
        assert_eq!(remote("C:/windows"), None, "upper case is no sandbox name");
    }

    #[test]
    fn downloads_never_write_through_a_symlink_of_the_archive() {
        let outside = tempfile::tempdir().unwrap();
        let mut raw = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut raw);
            let mut link = tar::Header::new_gnu();
            link.set_entry_type(tar::EntryType::Symlink);
            link.set_size(0);
            builder.append_link(&mut link, "tree/x", outside.path()).unwrap();
            let mut file = tar::Header::new_gnu();
            file.set_mode(0o644);
            file.set_size(2);
            builder.append_data(&mut file, "tree/x/planted", &b"hi"[..]).unwrap();
            builder.finish().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(extract_renamed(&raw, &dir.path().join("copy")).is_err());
        assert!(!outside.path().join("planted").exists(), "nothing was written outside the target");
    }

    #[test]
    fn downloads_put_the_top_entry_at_the_target() {
        let mut raw = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut raw);
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder.append_data(&mut header, "tree", std::io::empty()).unwrap();
            let mut file = tar::Header::new_gnu();
            file.set_mode(0o644);
            file.set_size(2);
            builder.append_data(&mut file, "tree/a/b", &b"hi"[..]).unwrap();
            builder.finish().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("copy");
        assert_eq!(extract_renamed(&raw, &target).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(target.join("a/b")).unwrap(), "hi");
    }
}
