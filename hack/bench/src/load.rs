//! Load generation: concurrent or paced creates, GET loops, and latency summaries.

use futures::stream::{self, StreamExt};
use sandboxd_api::{Container, ContainerResource, PortSpec, Protocol, SandboxSpec};
use sandboxd_client::Client;
use std::time::{Duration, Instant};

/// A small sandbox: one container of `cpu`, 16Mi, and `ports` tcp ports.
pub fn spec(cpu: &str, ports: usize) -> SandboxSpec {
    SandboxSpec {
        containers: vec![Container {
            name: "app".into(),
            image: "busybox:latest".into(),
            args: vec![],
            env: vec![],
            work_dir: String::new(),
            resource: Some(ContainerResource {
                cpu: Some(cpu.into()),
                memory: Some("16Mi".into()),
                ephemeral_storage: None,
            }),
        }],
        ports: (0..ports)
            .map(|i| PortSpec { container_port: 8000 + i as i64, protocol: Protocol::Tcp, host_port: None })
            .collect(),
        ..SandboxSpec::default()
    }
}

/// One answered create: when it was sent and how long it took.
#[derive(Debug, Clone)]
pub struct Sent {
    pub id: String,
    pub at: Instant,
    pub latency: Duration,
}

/// Creates every id with `concurrency` requests in flight; fails on the first error.
pub async fn create_concurrently(
    client: &Client,
    ids: &[String],
    spec: &SandboxSpec,
    concurrency: usize,
) -> anyhow::Result<Vec<Sent>> {
    let results: Vec<anyhow::Result<Sent>> = stream::iter(ids.iter().cloned())
        .map(|id| async move {
            let at = Instant::now();
            client.create_sandbox(&id, spec).await?;
            Ok(Sent { id, at, latency: at.elapsed() })
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Like `create_concurrently`, but the `concurrency` requests in flight are driven by as many
/// tasks, so the load generator itself can use every core instead of polling all of them from one
/// task (which held store-create's client to one core).
pub async fn create_on_tasks(
    client: &Client,
    ids: &[String],
    spec: &SandboxSpec,
    concurrency: usize,
) -> anyhow::Result<Vec<Sent>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ids: std::sync::Arc<[String]> = ids.into();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, spec, ids, next) = (client.clone(), spec.clone(), ids.clone(), next.clone());
        workers.spawn(async move {
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = ids.get(i) else { return anyhow::Ok(sent) };
                let at = Instant::now();
                client.create_sandbox(id, &spec).await?;
                sent.push(Sent { id: id.clone(), at, latency: at.elapsed() });
            }
        });
    }
    let mut all = Vec::with_capacity(ids.len());
    while let Some(joined) = workers.join_next().await {
        all.extend(joined??);
    }
    Ok(all)
}

/// Creates every id at a steady `per_second` rate, each request on its own task.
pub async fn create_paced(
    client: &Client,
    ids: &[String],
    spec: &SandboxSpec,
    per_second: f64,
) -> anyhow::Result<Vec<Sent>> {
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (client, spec, id) = (client.clone(), spec.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            client.create_sandbox(&id, &spec).await?;
            anyhow::Ok(Sent { id, at, latency: at.elapsed() })
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for t in tasks {
        sent.push(t.await??);
    }
    Ok(sent)
}

/// Runs `call` with `concurrency` loops for `duration`; returns completed calls per second and latencies.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    duration: Duration,
    max_calls: usize,
    call: F,
) -> (f64, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now();
    let per_loop = max_calls / concurrency.max(1);
    let mut loops = Vec::new();
    for l in 0..concurrency {
        let call = call.clone();
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while start.elapsed() < duration && i < per_loop {
                let t = Instant::now();
                if call(l * per_loop + i).await {
                    latencies.push(t.elapsed());
                }
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await.unwrap_or_default());
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    (rate, all)
}

/// The value at quantile `q` of `values` (sorted in place).
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Work running on a thread and current-thread runtime of its own, so that its timings never wait
/// behind the tasks of the bench's runtime (a flood, a hundred watchers); `finish` waits for it.
pub struct OwnThread<T>(tokio::sync::oneshot::Receiver<anyhow::Result<T>>);

impl<T: Send + 'static> OwnThread<T> {
    pub fn spawn<F, Fut>(work: F) -> OwnThread<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let done = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(work()));
            let _ = tx.send(done);
        });
        OwnThread(rx)
    }

    pub async fn finish(self) -> anyhow::Result<T> {
        self.0.await.map_err(|_| anyhow::anyhow!("the bench's own thread died"))?
    }
}
