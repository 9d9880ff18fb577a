//! The data plane: exec (buffered and as a WebSocket session), files, archives and followed logs.

use crate::{api_error, error_chain, Client, ClientError, Result};
use bytes::Bytes;
use futures::stream::{BoxStream, SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use sandboxd_api::dataplane::{channel, ExecFrame, ExecRequest, ExecResult, FileWritten};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a streamed exec delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event: the process ended.
    Exit {
        exit_code: i32,
        timed_out: bool,
        duration_ms: u64,
    },
}

/// The sending half of a streamed exec: stdin, end of input, resizes and signals.
pub struct ExecInput {
    sink: SplitSink<Socket, Message>,
    server: String,
}

/// The receiving half of a streamed exec.
pub struct ExecOutputs {
    stream: SplitStream<Socket>,
    server: String,
}

impl ExecInput {
    pub async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 1);
        frame.push(channel::STDIN);
        frame.extend_from_slice(data);
        self.send(Message::Binary(frame.into())).await
    }

    pub async fn close_stdin(&mut self) -> Result<()> {
        self.frame(&ExecFrame::CloseStdin).await
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        self.frame(&ExecFrame::Resize { cols, rows }).await
    }

    pub async fn signal(&mut self, signal: &str) -> Result<()> {
        self.frame(&ExecFrame::Signal { signal: signal.to_string() }).await
    }

    async fn frame(&mut self, frame: &ExecFrame) -> Result<()> {
        let text = serde_json::to_string(frame).expect("frames serialize");
        self.send(Message::Text(text.into())).await
    }

    async fn send(&mut self, message: Message) -> Result<()> {
        self.sink
            .send(message)
            .await
            .map_err(|e| ClientError::Transport { server: self.server.clone(), message: e.to_string() })
    }
}

impl ExecOutputs {
    /// The next output; `None` once the session closed without an exit (it broke).
    pub async fn next(&mut self) -> Option<Result<ExecOutput>> {
        loop {
            let message = match self.stream.next().await? {
                Ok(message) => message,
                Err(e) => {
                    return Some(Err(ClientError::Transport { server: self.server.clone(), message: e.to_string() }))
                }
            };
            match message {
                Message::Binary(data) if data.len() > 1 => {
                    let body = data.slice(1..);
                    match data[0] {
                        channel::STDOUT => return Some(Ok(ExecOutput::Stdout(body))),
                        channel::STDERR => return Some(Ok(ExecOutput::Stderr(body))),
                        _ => continue,
                    }
                }
                Message::Text(text) => match serde_json::from_str::<ExecFrame>(text.as_str()) {
                    Ok(ExecFrame::Exit { exit_code, duration_ms, timed_out }) => {
                        return Some(Ok(ExecOutput::Exit { exit_code, timed_out, duration_ms }))
                    }
                    Ok(ExecFrame::Error { error }) => return Some(Err(session_error(&self.server, error))),
                    _ => continue,
                },
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }
}

/// An error frame: the session could not start or broke.
fn session_error(server: &str, error: String) -> ClientError {
    ClientError::Session { server: server.to_string(), message: error }
}

impl Client {
    /// Runs a command to completion in a Running sandbox.
    pub async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecResult> {
        let timeout = request.timeout_seconds.unwrap_or(sandboxd_api::dataplane::DEFAULT_EXEC_TIMEOUT_SECONDS);
        let response = self
            .request(Method::POST, &format!("/api/v1/sandboxes/{id}/exec"))
            .timeout(Duration::from_secs(timeout + 30))
            .json(request)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        self.decode(response).await
    }

    /// Starts a streamed exec; returns once the process started (or with why it could not).
    pub async fn exec_stream(&self, id: &str, request: &ExecRequest) -> Result<(ExecInput, ExecOutputs)> {
        let url = format!("{}/api/v1/sandboxes/{id}/exec/stream", self.base)
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut handshake = url.into_client_request().map_err(|e| self.ws_error(e))?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}").parse().map_err(|_| ClientError::Transport {
                server: self.base.clone(),
                message: "the token is not a valid header value".into(),
            })?;
            handshake.headers_mut().insert("authorization", value);
        }
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let connect = tokio_tungstenite::connect_async_tls_with_config(handshake, None, false, connector);
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .map_err(|_| ClientError::Transport { server: self.base.clone(), message: "handshake timed out".into() })?
            .map_err(|e| self.ws_error(e))?;
        let first = serde_json::to_string(request).expect("requests serialize");
        socket.send(Message::Text(first.into())).await.map_err(|e| self.ws_error(e))?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ExecFrame>(text.as_str()) {
                    Ok(ExecFrame::Started) => break,
                    Ok(ExecFrame::Error { error }) => return Err(session_error(&self.base, error)),
                    _ => continue,
                },
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(self.ws_error(e)),
                None => {
                    return Err(ClientError::Transport {
                        server: self.base.clone(),
                        message: "the session closed before the process started".into(),
                    })
                }
            }
        }
        let (sink, stream) = socket.split();
        Ok((ExecInput { sink, server: self.base.clone() }, ExecOutputs { stream, server: self.base.clone() }))
    }

    fn ws_error(&self, e: tungstenite::Error) -> ClientError {
        match e {
            tungstenite::Error::Http(response) => {
                let body = response.body().clone().unwrap_or_default();
                let status = reqwest::StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
                api_error(status, &body)
            }
            tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                ClientError::Connect { server: self.base.clone(), message: io.to_string() }
            }
            other => ClientError::Transport { server: self.base.clone(), message: error_chain(&other) },
        }
    }

    /// A file's bytes, streamed (`GET …/files?path=`); a directory answers JSON instead (see `list_dir`).
    pub async fn download(
        &self,
        id: &str,
        query: &[(&str, &str)],
        archive: bool,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let tail = if archive { "/files/archive" } else { "/files" };
        let response = self
            .request(Method::GET, &format!("/api/v1/sandboxes/{id}{tail}"))
            .query(query)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        self.stream(response).await
    }

    /// Writes `body` to a file (`archive: false`) or extracts it as a tar into a directory.
    pub async fn upload(
        &self,
        id: &str,
        query: &[(&str, &str)],
        archive: bool,
        body: reqwest::Body,
    ) -> Result<FileWritten> {
        let tail = if archive { "/files/archive" } else { "/files" };
        let response = self
            .request(Method::PUT, &format!("/api/v1/sandboxes/{id}{tail}"))
            .query(query)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        self.decode(response).await
    }

    /// Removes a path in a sandbox (`recursive` for a non-empty directory).
    pub async fn remove_path(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let recursive = if recursive { "true" } else { "false" };
        let response = self
            .request(Method::DELETE, &format!("/api/v1/sandboxes/{id}/files"))
            .query(&[("path", path), ("recursive", recursive)])
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        self.decode::<serde_json::Value>(response).await.map(|_| ())
    }

    /// Log text as it is written (`follow=true`), starting with the last `tail` lines.
    pub async fn follow_logs(
        &self,
        id: &str,
        container: Option<&str>,
        tail: Option<usize>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let mut query = vec![("follow".to_string(), "true".to_string())];
        if let Some(c) = container {
            query.push(("container".into(), c.into()));
        }
        if let Some(t) = tail {
            query.push(("tail".into(), t.to_string()));
        }
        let response = self
            .request(Method::GET, &format!("/api/v1/sandboxes/{id}/logs"))
            .query(&query)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        self.stream(response).await
    }

    async fn stream(&self, response: reqwest::Response) -> Result<BoxStream<'static, Result<Bytes>>> {
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.map_err(|e| self.transport_error(e))?;
            return Err(api_error(status, &bytes));
        }
        let server = self.base.clone();
        Ok(response
            .bytes_stream()
            .map(move |chunk| {
                chunk.map_err(|e| ClientError::Transport { server: server.clone(), message: error_chain(&e) })
            })
            .boxed())
    }

    async fn decode<T: serde::de::DeserializeOwned>(&self, response: reqwest::Response) -> Result<T> {
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { server: self.base.clone(), message: e.to_string() })
    }
}
