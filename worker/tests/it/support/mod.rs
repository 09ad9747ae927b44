//! Shared test harness: emulator endpoints, unique names, in-process workers, waiting on
//! conditions with deadlines, a tiny HTTP client and a TCP proxy that can cut DynamoDB off.

pub mod faults;
pub mod ledger;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kds_worker::aws::AwsClients;
use kds_worker::config::{LogFormat, Settings, WorkerCountSource};
use kds_worker::leases::{Lease, LeaseStore};
use kds_worker::meta::MetaStore;
use kds_worker::metrics::Metrics;
use kds_worker::processor::RecordProcessor;
use kds_worker::state::{Role, WorkerState};
use kds_worker::worker::Worker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Test timings: fast enough for quick tests, with room for a loaded 2-core machine where one
/// slow emulator request must not raise a worker's fence (at failover − heartbeat).
/// Added to every deadline that follows from the settings: room for a loaded 2-core machine
/// (a debug build, both emulators and a test's workers sharing it), never for a slow design.
pub const MARGIN: Duration = Duration::from_secs(3);
pub const HEARTBEAT: Duration = Duration::from_millis(500);
pub const FAILOVER: Duration = Duration::from_millis(2500);
pub const SHARD_POLL: Duration = Duration::from_millis(1000);

/// The emulator endpoints `cargo xtask test` exports. Running these tests any other way is a
/// mistake worth a clear message, not a silent skip.
pub fn require_emulators() {
    for var in ["AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL_DYNAMODB"] {
        if std::env::var_os(var).is_none() {
            panic!(
                "{var} is not set: these tests talk to the Kinesis and DynamoDB emulators; run them with `cargo xtask test`"
            );
        }
    }
}

/// A name no other test (or earlier run against the same emulators) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn aws() -> AwsClients {
    require_emulators();
    // Worker logs appear with a failing test's output (RUST_LOG=debug for more).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    AwsClients::from_env(Metrics::new()).await
}

/// AWS clients whose DynamoDB calls go to `dynamodb_endpoint` instead (a proxy).
pub async fn aws_with_dynamodb(dynamodb_endpoint: &str) -> AwsClients {
    let base = aws().await;
    let conf = base
        .dynamodb
        .config()
        .to_builder()
        .endpoint_url(dynamodb_endpoint)
        .build();
    AwsClients {
        dynamodb: aws_sdk_dynamodb::Client::from_conf(conf),
        ..base
    }
}

/// Slower timings for tests that run hundreds of consumers on a 2-core machine in a debug
/// build, where the fast ones would measure the machine rather than the worker.
pub fn relaxed(mut s: Settings) -> Settings {
    s.heartbeat_interval = Duration::from_secs(1);
    s.failover_timeout = Duration::from_secs(5);
    s.shard_poll_interval = Duration::from_secs(2);
    s
}

pub fn settings(app: &str, stream: &str, worker_id: &str) -> Settings {
    Settings {
        app_name: app.to_owned(),
        stream_name: stream.to_owned(),
        max_leases_cap: 80,
        worker_id: worker_id.to_owned(),
        worker_count_source: WorkerCountSource::Heartbeats,
        statefulset_name: "kds-consumer".into(),
        namespace: "lab".into(),
        shard_poll_interval: SHARD_POLL,
        heartbeat_interval: HEARTBEAT,
        failover_timeout: FAILOVER,
        idle_poll_max: Duration::from_secs(5),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        log_format: LogFormat::Pretty,
        record_log: None,
    }
}

/// Creates a stream with `shards` shards and waits until it is ACTIVE.
pub async fn create_stream(aws: &AwsClients, stream: &str, shards: u32) {
    kds_worker::schema::ensure_stream(aws, stream, shards)
        .await
        .expect("create stream");
}

/// Reshards like AWS allows (at most ×2 or ÷2 per call), waiting for ACTIVE between steps.
pub async fn reshard(aws: &AwsClients, stream: &str, target: u64) {
    loop {
        let open = kds_worker::inputs::open_shard_count(aws, stream)
            .await
            .unwrap();
        if open == target {
            return;
        }
        let step = if target > open {
            target.min(open * 2)
        } else {
            target.max(open.div_ceil(2))
        };
        aws.kinesis
            .update_shard_count()
            .stream_name(stream)
            .target_shard_count(step as i32)
            .scaling_type(aws_sdk_kinesis::types::ScalingType::UniformScaling)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "UpdateShardCount {open} -> {step}: {}",
                    aws_sdk_kinesis::error::DisplayErrorContext(e)
                )
            });
        // UpdateShardCount is asynchronous: wait for UPDATING to end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        kds_worker::schema::wait_stream_active(aws, stream, Duration::from_secs(60))
            .await
            .unwrap();
    }
}

/// A worker running in this process.
pub struct TestWorker {
    pub id: String,
    pub state: Arc<WorkerState>,
    stop: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl TestWorker {
    pub async fn start(
        settings: Settings,
        aws: AwsClients,
        kube: Option<kube::Client>,
    ) -> TestWorker {
        Self::start_with(settings, aws, kube, None).await
    }

    pub async fn start_with(
        settings: Settings,
        aws: AwsClients,
        kube: Option<kube::Client>,
        processor: Option<Arc<dyn RecordProcessor>>,
    ) -> TestWorker {
        let id = settings.worker_id.clone();
        // Each worker counts its own calls, as separate processes would.
        let aws = AwsClients {
            metrics: Metrics::new(),
            ..aws
        };
        let app = settings.app_name.clone();
        let mut worker = Worker::new(settings, aws, kube);
        if let Some(p) = processor {
            worker = worker.with_processor(p);
        }
        let state = worker.state();
        let stop = CancellationToken::new();
        // The tests' streams exist: starting is one DescribeStreamSummary and the tables.
        let started = tokio::time::timeout(Duration::from_secs(120), worker.wait_to_start(&stop))
            .await
            .unwrap_or_else(|_| panic!("{id} not started within 120 s"))
            .expect("worker start");
        assert!(started, "{id}: stopped before starting");
        // Logs name the worker: every test runs several in one process.
        let span = tracing::info_span!("worker", app = %app, id = %id);
        let handle = tokio::spawn(tracing::Instrument::instrument(
            worker.run(stop.clone()),
            span,
        ));
        TestWorker {
            id,
            state,
            stop,
            handle: Some(handle),
        }
    }

    /// False once the worker's task ended by itself (a crash, an early return).
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    pub fn is_coordinator(&self) -> bool {
        self.state.role().0 == Role::Coordinator
    }

    pub fn limit(&self) -> Option<u64> {
        self.state.limit().map(|l| l.max_leases_per_worker)
    }

    /// SIGTERM-like: step down, remove the heartbeat, return.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("worker task");
        }
    }

    /// kill -9-like: every loop stops at once, nothing is cleaned up.
    pub async fn crash(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// Starts `n` workers named `w0..` concurrently (they race for tables and the post).
pub async fn start_workers(
    app: &str,
    stream: &str,
    ids: impl IntoIterator<Item = String>,
    aws: &AwsClients,
) -> Vec<TestWorker> {
    start_workers_with(app, stream, ids, aws, None).await
}

pub async fn start_workers_with(
    app: &str,
    stream: &str,
    ids: impl IntoIterator<Item = String>,
    aws: &AwsClients,
    processor: Option<Arc<dyn RecordProcessor>>,
) -> Vec<TestWorker> {
    start_workers_custom(app, stream, ids, aws, processor, |s| s).await
}

pub async fn start_workers_custom(
    app: &str,
    stream: &str,
    ids: impl IntoIterator<Item = String>,
    aws: &AwsClients,
    processor: Option<Arc<dyn RecordProcessor>>,
    adjust: fn(Settings) -> Settings,
) -> Vec<TestWorker> {
    let mut set = JoinSet::new();
    for id in ids {
        let s = adjust(settings(app, stream, &id));
        let aws = aws.clone();
        let p = processor.clone();
        set.spawn(async move { TestWorker::start_with(s, aws, None, p).await });
    }
    let mut workers = Vec::new();
    while let Some(w) = set.join_next().await {
        workers.push(w.unwrap());
    }
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    workers
}

/// Polls `check` every 25 ms until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return (v, start.elapsed());
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until every worker obeys `limit` (and returns how long it took).
pub async fn wait_limit(workers: &[TestWorker], limit: u64, deadline: Duration) -> Duration {
    let what = format!(
        "all {} workers to obey max_leases_per_worker = {limit}",
        workers.len()
    );
    wait_for(deadline, &what, || async {
        workers
            .iter()
            .all(|w| w.limit() == Some(limit))
            .then_some(())
    })
    .await
    .1
}

pub fn coordinators(workers: &[TestWorker]) -> Vec<&TestWorker> {
    workers.iter().filter(|w| w.is_coordinator()).collect()
}

pub fn meta(aws: &AwsClients, app: &str) -> MetaStore {
    MetaStore::new(aws.clone(), format!("{app}_meta"))
}

/// `GET path` on `addr`; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the worker's HTTP port");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A TCP proxy in front of an emulator that can be cut off (connections refused and open ones
/// reset) and restored on the same port: a real network outage, without losing the
/// emulator's state.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    tasks: Option<JoinSet<()>>,
}

impl Proxy {
    pub async fn start(upstream_url: &str) -> Proxy {
        let upstream: SocketAddr = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("emulator endpoint is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = Proxy {
            addr,
            upstream,
            tasks: None,
        };
        p.serve(listener);
        p
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        self.tasks = Some(tasks);
    }

    /// Outage: drop the listener and every open connection.
    pub async fn cut(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.shutdown().await;
        }
    }

    /// Back on the same port.
    pub async fn restore(&mut self) {
        self.cut().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the proxy port");
        self.serve(listener);
    }

    /// A hung network: open connections are dropped, new ones are accepted and read but never
    /// answered, so every call hangs until the SDK's own timeouts.
    pub async fn stall(&mut self) {
        self.cut().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind the proxy port");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                });
                while conns.try_join_next().is_some() {}
            }
        });
        self.tasks = Some(tasks);
    }
}

/// AWS clients whose Kinesis calls go to `kinesis_endpoint` instead (a proxy).
pub async fn aws_with_kinesis(kinesis_endpoint: &str) -> AwsClients {
    let base = aws().await;
    let conf = base
        .kinesis
        .config()
        .to_builder()
        .endpoint_url(kinesis_endpoint)
        .build();
    AwsClients {
        kinesis: aws_sdk_kinesis::Client::from_conf(conf),
        ..base
    }
}

/// A proxy in front of kinesis-mock that answers the first `throttled` requests itself with
/// Kinesis' `LimitExceededException` (as `DescribeStreamSummary` does beyond 20 calls per
/// second per account), then forwards everything.
pub struct ThrottlingProxy {
    pub addr: SocketAddr,
    pub answered: Arc<AtomicU64>,
    _task: JoinHandle<()>,
}

impl ThrottlingProxy {
    pub async fn start(upstream_url: &str, throttled: u64) -> ThrottlingProxy {
        let upstream: SocketAddr = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("emulator endpoint is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    if count.load(Ordering::SeqCst) < throttled {
                        // One request per connection: read it, refuse it, close.
                        if read_request(&mut client).await.is_some()
                            && count.fetch_add(1, Ordering::SeqCst) < throttled
                        {
                            let body = r#"{"__type":"LimitExceededException","message":"Rate exceeded for stream (test throttling)"}"#;
                            let response = format!(
                                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
                                 x-amzn-RequestId: throttled\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = client.write_all(response.as_bytes()).await;
                            let _ = client.shutdown().await;
                        }
                        return;
                    }
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        ThrottlingProxy {
            addr,
            answered,
            _task: task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ThrottlingProxy {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// Reads one HTTP/1.1 request (headers and a Content-Length body).
async fn read_request(s: &mut TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(())
}

/// Every record a test's workers processed, in processing order.
#[derive(Default)]
pub struct RecordingProcessor {
    pub seen: std::sync::Mutex<Vec<Seen>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub worker: String,
    pub shard: String,
    pub sequence: String,
    pub data: String,
}

impl RecordProcessor for RecordingProcessor {
    fn process(
        &self,
        worker_id: &str,
        shard_id: &str,
        _lease_counter: u64,
        records: &[aws_sdk_kinesis::types::Record],
    ) {
        let mut seen = self.seen.lock().unwrap();
        for r in records {
            seen.push(Seen {
                worker: worker_id.to_owned(),
                shard: shard_id.to_owned(),
                sequence: r.sequence_number().to_owned(),
                data: String::from_utf8_lossy(r.data().as_ref()).into_owned(),
            });
        }
    }
}

impl RecordingProcessor {
    pub fn data(&self) -> std::collections::BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.data.clone())
            .collect()
    }
}

/// Puts `records` records named `{prefix}-{i}` with random-looking partition keys.
pub async fn put_records(
    aws: &AwsClients,
    stream: &str,
    prefix: &str,
    records: usize,
) -> Vec<String> {
    let mut names = Vec::new();
    for chunk in (0..records).collect::<Vec<_>>().chunks(100) {
        let mut req = aws.kinesis.put_records().stream_name(stream);
        for i in chunk {
            let name = format!("{prefix}-{i}");
            req = req.records(
                aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                    .data(aws_sdk_kinesis::primitives::Blob::new(
                        name.clone().into_bytes(),
                    ))
                    .partition_key(format!("pk-{}-{i}", prefix.len() * 7919 + i * 104729))
                    .build()
                    .unwrap(),
            );
            names.push(name);
        }
        let out = req.send().await.expect("PutRecords");
        assert_eq!(
            out.failed_record_count().unwrap_or(0),
            0,
            "PutRecords had failures"
        );
    }
    names
}

pub fn lease_store(aws: &AwsClients, app: &str) -> LeaseStore {
    LeaseStore::new(aws.clone(), app.to_owned())
}

/// The invariants every lease test checks: no shard read by two workers, nobody above the
/// limit, every readable shard owned once capacity allows. Returns the lease table.
pub async fn check_lease_invariants(
    aws: &AwsClients,
    app: &str,
    workers: &[TestWorker],
    limit: u64,
) -> Vec<Lease> {
    let leases = lease_store(aws, app).scan().await.unwrap();
    let mut reading: std::collections::BTreeMap<String, String> = Default::default();
    for w in workers {
        let held = w.state.leases();
        assert!(
            held.len() as u64 <= limit,
            "{} reads {} shards > limit {limit}",
            w.id,
            held.len()
        );
        for shard in held {
            if let Some(other) = reading.insert(shard.clone(), w.id.clone()) {
                panic!("shard {shard} read by both {other} and {}", w.id);
            }
        }
        let in_table = leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(w.id.as_str()))
            .count() as u64;
        assert!(
            in_table <= limit,
            "{} owns {in_table} leases > limit {limit}",
            w.id
        );
    }
    let readable = kds_worker::assignment::readable_shards(&leases, None);
    let owned = leases
        .iter()
        .filter(|l| readable.contains(l.shard_id.as_str()) && l.owner.is_some())
        .count();
    let capacity = workers.len() * limit as usize;
    assert_eq!(
        owned,
        readable.len().min(capacity),
        "readable shards owned once capacity allows"
    );
    leases
}

/// Waits until every worker holds exactly `each` leases and the invariants hold.
pub async fn wait_spread(
    aws: &AwsClients,
    app: &str,
    workers: &[TestWorker],
    limit: u64,
    each: usize,
    deadline: Duration,
) -> Duration {
    let what = format!("each of {} workers to hold {each} leases", workers.len());
    let (_, took) = wait_for(deadline, &what, || async {
        workers
            .iter()
            .all(|w| w.state.leases().len() == each)
            .then_some(())
    })
    .await;
    check_lease_invariants(aws, app, workers, limit).await;
    took
}
