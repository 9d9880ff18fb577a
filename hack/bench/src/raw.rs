//! A lean HTTP/1.1 load generator: keep-alive connections that write whole requests and read back
//! only the status line, `Content-Length` and the body bytes, as wrk does, so that on a machine where
//! client and server share two cores the client takes as little of them as it can.

use crate::load::Sent;
use anyhow::{bail, ensure, Context};
use sandboxd_api::SandboxSpec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head this client reads; the API's are a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// One keep-alive connection, one request at a time.
pub struct RawConnection {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
}

/// A response's status and body.
pub struct RawResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<RawConnection> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(RawConnection { stream, host: addr.to_string(), buf: Vec::with_capacity(4096) })
    }

    /// Sends `method path` with a JSON body and reads the whole answer.
    pub async fn send_json(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<RawResponse> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        self.stream.write_all(&request).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> anyhow::Result<RawResponse> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            ensure!(self.buf.len() <= MAX_HEAD, "response head longer than {MAX_HEAD} bytes");
            self.fill().await?;
        };
        let (status, length) = parse_head(&self.buf[..head_end])?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        // One request in flight per connection, so nothing follows the body.
        self.buf.drain(..head_end + length);
        Ok(RawResponse { status, body })
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        ensure!(n > 0, "the server closed the connection mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The status code and `Content-Length` of a response head; a body without a length (chunked) is
/// refused, since no answer this client asks for has one.
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize)> {
    let text = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                return Ok((status, value.trim().parse().context("bad Content-Length")?));
            }
        }
    }
    bail!("response without Content-Length: {status_line}")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Creates every id through `POST /api/v1/sandboxes` from `concurrency` tasks, one raw connection
/// each; fails on the first answer that is not 201. The spec is encoded once, each body around it.
pub async fn create_raw(
    addr: SocketAddr,
    ids: &[String],
    spec: &SandboxSpec,
    concurrency: usize,
) -> anyhow::Result<Vec<Sent>> {
    let spec_json: Arc<[u8]> = serde_json::to_vec(spec)?.into();
    let next = Arc::new(AtomicUsize::new(0));
    let ids: Arc<[String]> = ids.into();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (spec_json, ids, next) = (spec_json.clone(), ids.clone(), next.clone());
        workers.spawn(async move {
            let mut connection = RawConnection::connect(addr).await?;
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { return anyhow::Ok(sent) };
                let body = create_body(id, &spec_json);
                let at = Instant::now();
                let answer = connection.send_json("POST", "/api/v1/sandboxes", &body).await?;
                let latency = at.elapsed();
                ensure!(
                    answer.status == 201,
                    "create {id}: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
                sent.push(Sent { id: id.clone(), at, latency });
            }
        });
    }
    let mut all = Vec::with_capacity(ids.len());
    while let Some(joined) = workers.join_next().await {
        all.extend(joined??);
    }
    Ok(all)
}

/// `{"id":ID,"spec":SPEC}` with the spec already encoded.
fn create_body(id: &str, spec_json: &[u8]) -> Vec<u8> {
    let id = serde_json::to_string(id).expect("a string encodes");
    let mut body = Vec::with_capacity(id.len() + spec_json.len() + 16);
    body.extend_from_slice(b"{\"id\":");
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(b",\"spec\":");
    body.extend_from_slice(spec_json);
    body.push(b'}');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_status_and_length_and_refuse_chunked_bodies() {
        let head = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 42\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), (201, 42));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(parse_head(chunked).is_err());
        assert!(parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").is_err());
    }

    #[test]
    fn a_create_body_is_the_request_shape_the_api_reads() {
        let spec = crate::load::spec("10m", 1);
        let body = create_body("a\"b", &serde_json::to_vec(&spec).unwrap());
        let parsed: sandboxd_api::sandbox::SandboxCreateRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!((parsed.id.as_str(), parsed.spec.ports.len()), ("a\"b", 1));
    }
}
