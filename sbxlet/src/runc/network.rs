//! Sandbox networking: one node bridge, and per sandbox a network namespace joined to it by a veth
//! pair, with a private IP.
//!
//! Egress is enforced by routing rather than by filtering bridged traffic: a sandbox with egress gets
//! a default route through the bridge and is masqueraded out; one without gets a route to the
//! bridge's address only (so it can answer the node's proxy and probes) and an INPUT rule that drops
//! connections it opens to the node itself. Its containers hold no CAP_NET_ADMIN to change either.

use super::host::{run, run_quietly};
use crate::error::RuntimeError;
use std::net::Ipv4Addr;

/// The node bridge and the pool's network.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u32,
    pub cidr: String,
}

/// What one sandbox holds on the host network, named so that teardown after a restart finds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SandboxNet {
    pub netns: String,
    pub host_veth: String,
    pub ip: Ipv4Addr,
    pub egress: bool,
}

/// A short, stable tag of a name: veth names may have at most 15 characters.
pub(crate) fn short_tag(id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut hasher);
    format!("{:010x}", hasher.finish() & 0xff_ffff_ffff)
}

/// `Network::names_of` for a bridge named `bridge`.
pub(crate) fn host_names(bridge: &str, id: &str) -> (String, String) {
    let tag = short_tag(&format!("{bridge}/{id}"));
    (format!("sbx-{tag}"), format!("sbx{tag}"))
}

/// The iptables comment that marks every rule of one sandbox (and of the bridge), for teardown and audits.
pub(crate) fn rule_comment(bridge: &str, id: &str) -> String {
    format!("sbxlet:{bridge}:{id}")
}

impl Network {
    /// The namespace and host-side veth names of sandbox `id` on this bridge. The bridge is part of
    /// the tag, so two agents on one host (tests, or a node running two) never share a name.
    pub fn names_of(&self, id: &str) -> (String, String) {
        host_names(&self.bridge, id)
    }

    /// Creates the bridge with the gateway address if it is missing, and the node-wide NAT rule.
    pub async fn ensure_bridge(&self) -> Result<(), RuntimeError> {
        if run("ip", &["link", "show", &self.bridge]).await.is_err() {
            run("ip", &["link", "add", &self.bridge, "type", "bridge"]).await?;
            let address = format!("{}/{}", self.gateway, self.prefix_len);
            run("ip", &["addr", "add", &address, "dev", &self.bridge]).await?;
        }
        run("ip", &["link", "set", &self.bridge, "up"]).await?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| RuntimeError::Failed(format!("enabling ip_forward: {e}")))?;
        let comment = rule_comment(&self.bridge, "-");
        let masquerade =
            ["-s", &self.cidr, "!", "-o", &self.bridge, "-m", "comment", "--comment", &comment, "-j", "MASQUERADE"];
        ensure_rule("nat", "POSTROUTING", &masquerade).await?;
        // Hosts with a FORWARD policy of DROP (Docker sets one) would otherwise block egress.
        ensure_rule("filter", "FORWARD", &["-i", &self.bridge, "-m", "comment", "--comment", &comment, "-j", "ACCEPT"])
            .await?;
        let replies = ["-o", &self.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"];
        let mut replies = replies.to_vec();
        replies.extend(["-m", "comment", "--comment", &comment, "-j", "ACCEPT"]);
        ensure_rule("filter", "FORWARD", &replies).await
    }

    /// Removes the bridge and every rule of it or its sandboxes.
    pub async fn remove_bridge(&self) {
        delete_bridge_rules(&self.bridge).await;
        run_quietly("ip", &["link", "del", &self.bridge]).await;
    }

    /// Creates the sandbox's namespace, veth pair, address and routes, and its egress rule.
    /// On failure whatever was made is removed again.
    pub async fn set_up(&self, id: &str, ip: Ipv4Addr, egress: bool) -> Result<SandboxNet, RuntimeError> {
        let (netns, host_veth) = self.names_of(id);
        let net = SandboxNet { netns, host_veth, ip, egress };
        match self.try_set_up(id, &net).await {
            Ok(()) => Ok(net),
            Err(e) => {
                self.tear_down(id, &net).await;
                Err(e)
            }
        }
    }

    async fn try_set_up(&self, id: &str, net: &SandboxNet) -> Result<(), RuntimeError> {
        let peer = format!("{}p", net.host_veth);
        let ns = net.netns.as_str();
        // Two `ip -batch` runs instead of nine `ip` runs: process starts are most of the cost.
        let host_side = [
            format!("netns add {ns}"),
            format!("link add {} type veth peer name {peer}", net.host_veth),
            format!("link set {} master {} up", net.host_veth, self.bridge),
            format!("link set {peer} netns {ns}"),
        ];
        run_batch(None, &host_side).await?;
        let address = format!("{}/{}", net.ip, if net.egress { self.prefix_len } else { 32 });
        let route = if net.egress {
            // Out through the bridge, masqueraded.
            format!("route add default via {}", self.gateway)
        } else {
            // Only the node's bridge address is reachable, and only to answer the node.
            format!("route add {} dev eth0", self.gateway)
        };
        let inside = [
            format!("link set {peer} name eth0"),
            format!("addr add {address} dev eth0"),
            "link set eth0 up".to_string(),
            "link set lo up".to_string(),
            route,
        ];
        run_batch(Some(ns), &inside).await?;
        if !net.egress {
            let source = net.ip.to_string();
            let comment = rule_comment(&self.bridge, id);
            let refuse = [
                "-s",
                &source,
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "DROP",
            ];
            ensure_rule("filter", "INPUT", &refuse).await?;
            // Containers keep CAP_NET_RAW (ping): a crafted frame must not be forwarded out either.
            let no_forward = ["-s", &source, "-m", "comment", "--comment", &comment, "-j", "DROP"];
            ensure_rule("filter", "FORWARD", &no_forward).await?;
        }
        Ok(())
    }

    /// Removes everything `set_up` made; each step is best effort so a half-made sandbox is cleaned too.
    pub async fn tear_down(&self, id: &str, net: &SandboxNet) {
        delete_rules_with_comment(&rule_comment(&self.bridge, id)).await;
        // Deleting the host end removes the pair; deleting the namespace removes an end left inside.
        run_quietly("ip", &["link", "del", &net.host_veth]).await;
        run_quietly("ip", &["netns", "del", &net.netns]).await;
    }
}

/// Runs `ip` commands from one batch (in namespace `netns` when given); stops at the first failure.
async fn run_batch(netns: Option<&str>, commands: &[String]) -> Result<(), RuntimeError> {
    let script = std::env::temp_dir().join(format!("sbxlet-ip-{}.batch", fastrand::u64(..)));
    std::fs::write(&script, commands.join("\n") + "\n")
        .map_err(|e| RuntimeError::Failed(format!("writing an ip batch: {e}")))?;
    let path = script.display().to_string();
    let mut args: Vec<&str> = Vec::new();
    if let Some(netns) = netns {
        args.extend(["-n", netns]);
    }
    args.extend(["-batch", &path]);
    let result = run("ip", &args).await;
    let _ = std::fs::remove_file(&script);
    result.map(|_| ())
}

/// Appends a rule unless an identical one exists (`iptables -C`), so restarts do not pile up copies.
async fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), RuntimeError> {
    let mut check = vec!["-w", "-t", table, "-C", chain];
    check.extend_from_slice(rule);
    if run("iptables", &check).await.is_ok() {
        return Ok(());
    }
    let mut insert = vec!["-w", "-t", table, "-I", chain, "1"];
    insert.extend_from_slice(rule);
    run("iptables", &insert).await.map(|_| ())
}

/// Deletes every rule, in the filter and nat tables, whose comment is exactly `comment`.
pub(crate) async fn delete_rules_with_comment(comment: &str) {
    delete_rules_where(|c| c == comment).await;
}

/// Deletes every rule of one bridge (all its sandboxes' and its own).
pub(crate) async fn delete_bridge_rules(bridge: &str) {
    let prefix = format!("sbxlet:{bridge}:");
    delete_rules_where(|c| c.starts_with(&prefix)).await;
}

async fn delete_rules_where(wanted: impl Fn(&str) -> bool) {
    for table in ["filter", "nat"] {
        let Ok(rules) = run("iptables", &["-w", "-t", table, "-S"]).await else { continue };
        for rule in rules_with_comment(&rules, &wanted) {
            let mut args = vec!["-w", "-t", table];
            args.extend(rule.iter().map(String::as_str));
            run_quietly("iptables", &args).await;
        }
    }
}

/// The `-D` forms of the rules in `iptables -S` output whose comment `wanted` accepts.
fn rules_with_comment(listing: &str, wanted: &dyn Fn(&str) -> bool) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter(|line| line.starts_with("-A "))
        .map(split_rule)
        .filter(|words| comment_of(words).is_some_and(wanted))
        .map(|mut words| {
            words[0] = "-D".to_string();
            words
        })
        .collect()
}

fn comment_of(words: &[String]) -> Option<&str> {
    let at = words.iter().position(|w| w == "--comment")?;
    words.get(at + 1).map(String::as_str)
}

/// Splits an `iptables -S` line into words, keeping double-quoted words whole (without the quotes).
fn split_rule(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fit_interface_names_and_are_stable() {
        let tag = short_tag("a-rather-long-sandbox-id-0001");
        assert_eq!(tag.len(), 10);
        assert_eq!(tag, short_tag("a-rather-long-sandbox-id-0001"));
        assert_ne!(tag, short_tag("a-rather-long-sandbox-id-0002"));
        assert!(format!("sbx{tag}p").len() <= 15);
        assert_ne!(host_names("br0", "web"), host_names("br1", "web"), "two agents on one host");
    }

    #[test]
    fn only_rules_with_the_exact_comment_are_selected_for_deletion() {
        let listing = "-P INPUT ACCEPT\n\
            -A INPUT -s 10.88.0.2/32 -m conntrack ! --ctstate RELATED,ESTABLISHED -m comment --comment sbxlet:br0:web -j DROP\n\
            -A INPUT -s 10.88.0.3/32 -m comment --comment sbxlet:br0:web-2 -j DROP\n\
            -A FORWARD -i br0 -m comment --comment \"sbxlet:br0:web\" -j ACCEPT\n";
        let rules = rules_with_comment(listing, &|c| c == "sbxlet:br0:web");
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert_eq!(rules[0][..3], ["-D", "INPUT", "-s"]);
        assert_eq!(rules[1].last().map(String::as_str), Some("ACCEPT"));
        assert!(rules[1].contains(&"sbxlet:br0:web".to_string()), "quotes dropped: {:?}", rules[1]);
        assert_eq!(rules_with_comment(listing, &|c| c.starts_with("sbxlet:br0:")).len(), 3);
    }
}
