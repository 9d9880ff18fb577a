//! `apply`: reads Node and Sandbox documents (YAML or JSON, several per file) and creates or updates them.

use anyhow::{anyhow, bail, Context};
use sandboxd_api::node::NodeSpec;
use sandboxd_api::SandboxSpec;
use sandboxd_client::Client;
use serde::Deserialize;
use std::io::Read;
use std::path::Path;

/// One document: `kind`, a name (`id`, `name` or `metadata.name`) and a `spec`.
#[derive(Debug, Deserialize)]
struct Document {
    kind: String,
    id: Option<String>,
    name: Option<String>,
    metadata: Option<Metadata>,
    #[serde(default)]
    spec: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: Option<String>,
}

impl Document {
    fn object_name(&self) -> anyhow::Result<String> {
        self.id
            .clone()
            .or_else(|| self.name.clone())
            .or_else(|| self.metadata.as_ref().and_then(|m| m.name.clone()))
            .ok_or_else(|| anyhow!("{} document without id, name or metadata.name", self.kind))
    }
}

/// Applies every document of every source; returns 1 if any failed, after trying them all.
pub async fn apply(client: &Client, sources: &[String]) -> anyhow::Result<i32> {
    let mut documents = Vec::new();
    for source in sources {
        documents.extend(read_source(source)?);
    }
    if documents.is_empty() {
        bail!("no documents found in {}", sources.join(", "));
    }
    let mut failures = 0;
    for (origin, document) in documents {
        match apply_one(client, &document).await {
            Ok(line) => say!("{line}"),
            Err(e) => {
                failures += 1;
                eprintln!("error: {origin}: {}", format!("{e:#}").replace('\n', " "));
            }
        }
    }
    Ok(if failures > 0 { 1 } else { 0 })
}

fn read_source(source: &str) -> anyhow::Result<Vec<(String, Document)>> {
    if source == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
        return parse_documents(&text).map(|docs| docs.into_iter().map(|d| ("stdin".to_string(), d)).collect());
    }
    let path = Path::new(source);
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("reading {source}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
            .collect();
        files.sort();
        let mut all = Vec::new();
        for file in files {
            all.extend(read_file(&file)?);
        }
        return Ok(all);
    }
    read_file(path)
}

fn read_file(path: &Path) -> anyhow::Result<Vec<(String, Document)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = parse_documents(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(docs.into_iter().map(|d| (path.display().to_string(), d)).collect())
}

/// JSON (one object or a list) or YAML with `---` separated documents.
fn parse_documents(text: &str) -> anyhow::Result<Vec<Document>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return Ok(serde_json::from_str(text)?);
    }
    if trimmed.starts_with('{') {
        return Ok(vec![serde_json::from_str(text)?]);
    }
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(de)?;
        if value.is_null() {
            continue;
        }
        docs.push(serde_json::from_value(value)?);
    }
    Ok(docs)
}

async fn apply_one(client: &Client, document: &Document) -> anyhow::Result<String> {
    let name = document.object_name()?;
    match document.kind.as_str() {
        "Sandbox" => apply_sandbox(client, &name, &document.spec).await,
        "Node" => apply_node(client, &name, &document.spec).await,
        other => bail!("kind {other:?} is not Node or Sandbox"),
    }
}

/// Creates or updates a sandbox. An update carries the `resource_version` it read, so a change made
/// meanwhile is never overwritten: on a conflict the sandbox is read again and the update retried.
async fn apply_sandbox(client: &Client, name: &str, spec: &serde_json::Value) -> anyhow::Result<String> {
    let spec: SandboxSpec = serde_json::from_value(spec.clone()).with_context(|| format!("sandbox/{name}: spec"))?;
    for _ in 0..3 {
        match client.get_sandbox(name).await {
            Err(e) if e.is_not_found() => {
                client.create_sandbox(name, &spec).await.with_context(|| format!("sandbox/{name}"))?;
                return Ok(format!("sandbox/{name} created"));
            }
            Err(e) => return Err(e.into()),
            Ok(existing) if existing.spec == spec => return Ok(format!("sandbox/{name} unchanged")),
            Ok(existing) => match client.update_sandbox(name, &spec, Some(&existing.resource_version)).await {
                Ok(_) => return Ok(format!("sandbox/{name} configured")),
                Err(e) if e.is_conflict() && e.to_string().contains("resource_version") => continue,
                Err(e) => return Err(anyhow::Error::from(e).context(format!("sandbox/{name}"))),
            },
        }
    }
    bail!("sandbox/{name}: changed by someone else three times while applying; try again")
}

async fn apply_node(client: &Client, name: &str, spec: &serde_json::Value) -> anyhow::Result<String> {
    let spec: NodeSpec = serde_json::from_value(spec.clone()).with_context(|| format!("node/{name}: spec"))?;
    let verb = match client.get_node(name).await {
        Err(e) if e.is_not_found() => "created",
        Err(e) => return Err(e.into()),
        Ok(existing) if existing.spec() == spec => return Ok(format!("node/{name} unchanged")),
        Ok(_) => "configured",
    };
    client.apply_node(name, &spec).await.with_context(|| format!("node/{name}"))?;
    Ok(format!("node/{name} {verb}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_streams_json_objects_and_lists_all_parse() {
        let yaml = "kind: Node\nid: n1\nspec: {ip: 127.0.1.1, port: 8080}\n---\nkind: Sandbox\nmetadata: {name: s1}\nspec:\n  containers: [{name: web, image: nginx}]\n";
        let docs = parse_documents(yaml).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].object_name().unwrap(), "s1");
        assert_eq!(parse_documents(r#"{"kind":"Node","name":"n","spec":{}}"#).unwrap().len(), 1);
        assert_eq!(parse_documents(r#"[{"kind":"Node","id":"a"},{"kind":"Node","id":"b"}]"#).unwrap().len(), 2);
        assert!(parse_documents("kind: [").is_err());
    }
}
