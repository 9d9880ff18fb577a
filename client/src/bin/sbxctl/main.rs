//! sbxctl: a kubectl-shaped command-line client for sandboxd-o.

/// Prints a line to stdout with control characters escaped (an object's strings must not drive the
/// terminal); a closed pipe (`sbxctl get ... | head`) ends the program quietly instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => { $crate::print_line(&$crate::escape_controls(&format!($($arg)*))) };
}

/// Like `say!`, unescaped: for a container's own output (logs), which is printed as written.
macro_rules! say_raw {
    ($($arg:tt)*) => { $crate::print_line(&format!($($arg)*)) };
}

/// Control characters other than newline and tab, escaped as `\u{1b}`.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return text.to_string();
    }
    text.chars()
        .map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_unicode().to_string() } else { c.to_string() })
        .collect()
}

pub fn print_line(line: &str) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

mod dataplane;
mod drain;
mod events;
mod manifest;
mod render;
mod wait;

use anyhow::{anyhow, bail, Context};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use reqwest::Method;
use sandboxd_client::{Client, ClientConfig, ClientError};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sbxctl", version, about = "Command-line client for sandboxd-o")]
struct Cli {
    /// API server URL [default: the client config's, else http://127.0.0.1:8082].
    #[arg(long, env = "SANDBOXD_SERVER", global = true)]
    server: Option<String>,
    /// Bearer token [default: the client config's].
    #[arg(long, env = "SANDBOXD_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Client config (server URL, CA, token) that `sandboxd-o serve` writes [default:
    /// ./sandboxd-data/client.json, else ~/.config/sandboxd/client.json].
    #[arg(long, env = "SANDBOXD_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update objects from YAML or JSON files (`-f FILE|DIR|-`).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects, or show one.
    Get {
        resource: Listable,
        /// The object's name; for events, the object they are about (`sandbox/ID`, `node/NAME`).
        name: Option<String>,
        #[arg(short = 'o', long)]
        output: Option<Output>,
        /// Keep streaming changes from the watch API.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show one object in detail.
    Describe { resource: Resource, name: String },
    /// Delete an object.
    Delete {
        resource: Resource,
        name: String,
        /// Wait until the object is gone.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Print a sandbox's logs; `-f` keeps printing new lines until the sandbox ends.
    Logs {
        sandbox: String,
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(long)]
        tail: Option<usize>,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command in a Running sandbox: `sbxctl exec SANDBOX [-c C] [-i] [-t] -- CMD...`.
    /// The exit code is the command's.
    Exec {
        sandbox: String,
        /// The container (default: the sandbox's first).
        #[arg(short = 'c', long)]
        container: Option<String>,
        /// Pass this terminal's stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Run the command under a terminal (for interactive shells; use with -i).
        #[arg(short = 't', long)]
        tty: bool,
        /// Kill the command after this long (e.g. 30s, 5m).
        #[arg(long)]
        timeout: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy files and directories: `sbxctl cp LOCAL SANDBOX:PATH` or `sbxctl cp SANDBOX:PATH LOCAL`.
    Cp { source: String, destination: String },
    /// Wait for a condition: `wait sandbox/NAME --for phase=Running`.
    Wait {
        target: String,
        #[arg(long = "for")]
        condition: String,
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Run one heartbeat against a node now: `heartbeat node/NAME`.
    Heartbeat { target: String },
    /// Mark a node unschedulable: nothing new is placed there, running sandboxes stay.
    Cordon { node: String },
    /// Make a cordoned node schedulable again.
    Uncordon { node: String },
    /// Cordon a node and evict its sandboxes (`restart_policy: Reschedule` ones move to other
    /// nodes, the others end Evicted); prints progress until the node is empty.
    Drain {
        node: String,
        /// How long each sandbox's containers get between SIGTERM and SIGKILL.
        #[arg(long, default_value = "30s")]
        grace_period: String,
        /// Give up waiting after this long (the server stops waiting for the node's agent then too).
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
    /// API tokens: issue one for a role, list, revoke, and show who you are.
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Issue a token for IDENTITY with a role (admin, user, controller or node:NAME); it is printed once.
    Issue {
        identity: String,
        #[arg(long)]
        role: String,
        /// The token stops working after this long (e.g. 24h); default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List issued tokens (never their secrets).
    List,
    /// Revoke a token by its id (the part after `sbx_`).
    Revoke { id: String },
    /// Show the identity and role of the token in use.
    Whoami,
}

/// What `get` lists: the objects, and the events about them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Listable {
    #[value(alias = "node", alias = "no")]
    Nodes,
    #[value(alias = "sandbox", alias = "sbx")]
    Sandboxes,
    #[value(alias = "lease")]
    Leases,
    #[value(alias = "event", alias = "ev")]
    Events,
}

impl Listable {
    /// The object kind, or `None` for events.
    fn object(self) -> Option<Resource> {
        match self {
            Listable::Nodes => Some(Resource::Nodes),
            Listable::Sandboxes => Some(Resource::Sandboxes),
            Listable::Leases => Some(Resource::Leases),
            Listable::Events => None,
        }
    }
}

/// The kinds sbxctl knows, with kubectl-style short names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Resource {
    #[value(alias = "node", alias = "no")]
    Nodes,
    #[value(alias = "sandbox", alias = "sbx")]
    Sandboxes,
    #[value(alias = "lease")]
    Leases,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Wide,
    Json,
    Yaml,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

/// The error as one readable line; connection failures say where and how to start the server.
fn one_line(e: &anyhow::Error) -> String {
    if let Some(ClientError::Connect { server, message }) = e.downcast_ref::<ClientError>() {
        let why = if message.contains("refused") { "connection refused" } else { message.as_str() };
        return format!(
            "cannot reach {server} ({why}); start it with `sandboxd-o serve --demo-agents 3` or point --server / SANDBOXD_SERVER at it"
        );
    }
    format!("{e:#}").replace('\n', " ")
}

/// Whether `path` is a file of this user that nobody else may write.
fn owned_and_private(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return false };
    meta.is_file() && meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o022 == 0
}

/// Where sbxctl looks for a client config when none is named.
fn default_config_paths() -> Vec<std::path::PathBuf> {
    let mut paths = vec![std::path::PathBuf::from("sandboxd-data/client.json")];
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(std::path::Path::new(&home).join(".config/sandboxd/client.json"));
    }
    paths
}

/// The client config in effect: the named one, else the first default one found that is the
/// user's own file (nobody else may write it, so no planted config is read). Flags and env vars
/// win over it. A token given by flag or env var goes only to a server named, or to the one of
/// such a config over its TLS: never by default to plain HTTP.
fn client_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let mut config = match &cli.config {
        Some(path) => ClientConfig::load(path).map_err(|e| anyhow!("client config {e}"))?,
        None => default_config_paths()
            .iter()
            .filter(|p| owned_and_private(p))
            .find_map(|p| ClientConfig::load(p).ok())
            .filter(|c| cli.server.as_deref().is_none_or(|s| s.trim_end_matches('/') == c.server))
            .unwrap_or_default(),
    };
    if let Some(server) = &cli.server {
        config.server = server.clone();
    }
    if config.server.is_empty() {
        if cli.token.is_some() {
            bail!(
                "a token is given but no server: name one with --server (or SANDBOXD_SERVER), or use a client config"
            );
        }
        config.server = "http://127.0.0.1:8082".into();
    }
    if cli.token.is_some() {
        config.token = cli.token.clone();
    }
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = Client::from_config(&client_config(&cli)?)?;
    match cli.command {
        Command::Apply { files } => manifest::apply(&client, &files).await,
        Command::Get { resource, name, output, watch } => match resource.object() {
            Some(resource) => render::get(&client, resource, name.as_deref(), output, watch).await.map(|_| 0),
            None => events::get(&client, name.as_deref(), output, watch).await.map(|_| 0),
        },
        Command::Describe { resource, name } => render::describe(&client, resource, &name).await.map(|_| 0),
        Command::Delete { resource, name, wait, timeout } => delete(&client, resource, &name, wait, &timeout).await,
        Command::Logs { sandbox, container, tail, follow: true } => {
            dataplane::follow_logs(&client, &sandbox, container.as_deref(), tail).await
        }
        Command::Logs { sandbox, container, tail, follow: false } => {
            logs(&client, &sandbox, container.as_deref(), tail).await
        }
        Command::Exec { sandbox, container, stdin, tty, timeout, command } => {
            let timeout_seconds = timeout.as_deref().map(parse_duration).transpose()?.map(|d| d.as_secs().max(1));
            let options = dataplane::ExecOptions { container, stdin, tty, timeout_seconds };
            dataplane::exec(&client, &sandbox, command, options).await
        }
        Command::Cp { source, destination } => dataplane::cp(&client, &source, &destination).await,
        Command::Wait { target, condition, timeout } => wait::wait(&client, &target, &condition, &timeout).await,
        Command::Heartbeat { target } => heartbeat(&client, &target).await,
        Command::Cordon { node } => cordon(&client, &node, true).await,
        Command::Uncordon { node } => cordon(&client, &node, false).await,
        Command::Drain { node, grace_period, timeout } => drain::drain(&client, &node, &grace_period, &timeout).await,
        Command::Auth(command) => auth(&client, command).await,
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sbxctl", &mut script);
            say!("{}", String::from_utf8_lossy(&script).trim_end());
            Ok(0)
        }
    }
}

async fn auth(client: &Client, command: AuthCommand) -> anyhow::Result<i32> {
    match command {
        AuthCommand::Issue { identity, role, ttl, description } => {
            let ttl_seconds = ttl.as_deref().map(parse_duration).transpose()?.map(|d| d.as_secs().max(1));
            let mut body = serde_json::json!({ "identity": identity, "role": role, "description": description });
            if let Some(ttl) = ttl_seconds {
                body["ttl_seconds"] = ttl.into();
            }
            let (_, answer): (u16, serde_json::Value) =
                client.call(Method::POST, "/api/v1/tokens", Some(&body)).await?;
            let token = &answer;
            eprintln!(
                "token {} for {} ({}); it is shown once, store it now:",
                token["info"]["id"].as_str().unwrap_or("?"),
                token["info"]["identity"].as_str().unwrap_or("?"),
                token["info"]["role"].as_str().unwrap_or("?")
            );
            say!("{}", token["token"].as_str().unwrap_or_default());
        }
        AuthCommand::List => {
            let (_, answer): (u16, serde_json::Value) = client.call(Method::GET, "/api/v1/tokens", None).await?;
            say!("{:<18} {:<24} {:<20} {:<22} EXPIRES", "ID", "IDENTITY", "ROLE", "CREATED");
            for token in answer["items"].as_array().into_iter().flatten() {
                let field = |k: &str| token[k].as_str().unwrap_or("-").to_string();
                say!(
                    "{:<18} {:<24} {:<20} {:<22} {}",
                    field("id"),
                    field("identity"),
                    field("role"),
                    field("created_at"),
                    field("expires_at")
                );
            }
        }
        AuthCommand::Revoke { id } => {
            let id = id.strip_prefix("sbx_").map(|rest| rest.split('_').next().unwrap_or(rest)).unwrap_or(&id);
            let _: (u16, serde_json::Value) =
                client.call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None).await?;
            say!("token/{id} revoked");
        }
        AuthCommand::Whoami => {
            let (_, me): (u16, serde_json::Value) = client.call(Method::GET, "/api/v1/whoami", None).await?;
            say!(
                "{} (role {}, from {})",
                me["identity"].as_str().unwrap_or("?"),
                me["role"].as_str().unwrap_or("?"),
                me["source"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(0)
}

/// `cordon` and `uncordon`: NODE or node/NODE, as kubectl takes it.
async fn cordon(client: &Client, node: &str, unschedulable: bool) -> anyhow::Result<i32> {
    let name = if node.contains('/') { split_target(node, "node")? } else { node };
    let before = client.get_node(name).await?;
    let verb = if unschedulable { "cordoned" } else { "uncordoned" };
    if before.unschedulable == unschedulable {
        say!("node/{name} already {verb}");
        return Ok(0);
    }
    client.set_unschedulable(name, unschedulable).await?;
    say!("node/{name} {verb}");
    Ok(0)
}

/// Parses `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| anyhow!("{s:?} is not a duration like 60s"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().with_context(|| format!("{s:?} is not a duration like 60s"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("{s:?} is not a duration like 60s"),
    })
}

/// Splits `kind/NAME`, checking the kind.
pub fn split_target<'a>(target: &'a str, kind: &str) -> anyhow::Result<&'a str> {
    let (k, name) = target.split_once('/').ok_or_else(|| anyhow!("{target:?} is not {kind}/NAME"))?;
    let matches = match kind {
        "sandbox" => matches!(k, "sandbox" | "sandboxes" | "sbx"),
        _ => matches!(k, "node" | "nodes" | "no"),
    };
    if !matches || name.is_empty() {
        bail!("{target:?} is not {kind}/NAME");
    }
    Ok(name)
}

async fn delete(client: &Client, resource: Resource, name: &str, wait: bool, timeout: &str) -> anyhow::Result<i32> {
    let timeout = parse_duration(timeout)?;
    let noun = render::noun(resource);
    match resource {
        Resource::Nodes => client.delete_node(name).await?,
        Resource::Sandboxes => client.delete_sandbox(name).await?,
        Resource::Leases => client.delete_lease(name).await?,
    }
    say!("{noun}/{name} deleted");
    if !wait {
        return Ok(0);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let gone = match resource {
            Resource::Nodes => client.get_node(name).await.err(),
            Resource::Sandboxes => client.get_sandbox(name).await.err(),
            Resource::Leases => client.get_lease(name).await.err(),
        };
        match gone {
            Some(e) if e.is_not_found() => return Ok(0),
            Some(e) => return Err(e.into()),
            None => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {noun}/{name} to be removed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn logs(client: &Client, id: &str, container: Option<&str>, tail: Option<usize>) -> anyhow::Result<i32> {
    let sandbox = client.get_sandbox(id).await?;
    let node = sandbox
        .status
        .node_name
        .ok_or_else(|| anyhow!("sandbox/{id} is {} and not on a node yet", sandbox.status.phase.as_str()))?;
    let mut path = format!("/api/v1/nodes/{node}/sandboxes/{id}/logs");
    let mut query = Vec::new();
    if let Some(tail) = tail {
        query.push(format!("tail={tail}"));
    }
    if let Some(c) = container {
        query.push(format!("container={c}"));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let (_, answer): (u16, serde_json::Value) = client.call(Method::GET, &path, None).await?;
    for line in answer["logs"]["lines"].as_array().into_iter().flatten() {
        say_raw!("{}", line.as_str().unwrap_or_default());
    }
    Ok(0)
}

async fn heartbeat(client: &Client, target: &str) -> anyhow::Result<i32> {
    let name = split_target(target, "node")?;
    let (_, answer): (u16, serde_json::Value) =
        client.call(Method::POST, &format!("/api/v1/nodes/{name}/heartbeat"), None).await?;
    let node = &answer["node"];
    say!(
        "node/{name} heartbeat {} (state {}, success_streak {}, failure_streak {})",
        answer["heartbeat"].as_str().unwrap_or("?"),
        node["state"].as_str().unwrap_or("?"),
        node["success_streak"],
        node["failure_streak"]
    );
    for key in ["heartbeat_error", "status_error"] {
        if let Some(e) = answer[key].as_str().filter(|e| !e.is_empty()) {
            say!("  {key}: {e}");
        }
    }
    Ok(if answer["heartbeat"] == "failed" { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_goes_to_a_server_nobody_named() {
        if default_config_paths().iter().any(|p| p.exists()) {
            return; // a real client config here names a server; the rule is about having none
        }
        let cli = Cli::parse_from(["sbxctl", "--token", "secret", "get", "nodes"]);
        let err = client_config(&cli).unwrap_err().to_string();
        assert!(err.contains("no server"), "{err}");
        let cli = Cli::parse_from(["sbxctl", "--token", "secret", "--server", "https://x:1", "get", "nodes"]);
        assert_eq!(client_config(&cli).unwrap().server, "https://x:1");
        let cli = Cli::parse_from(["sbxctl", "get", "nodes"]);
        assert_eq!(client_config(&cli).unwrap().server, "http://127.0.0.1:8082", "no token: the local default");
    }

    #[test]
    fn terminal_escapes_in_objects_are_shown_not_obeyed() {
        assert_eq!(escape_controls("plain\tline"), "plain\tline");
        assert_eq!(escape_controls("red\u{1b}[31m"), "red\\u{1b}[31m");
        assert_eq!(escape_controls("bell\u{7}"), "bell\\u{7}");
    }
}
