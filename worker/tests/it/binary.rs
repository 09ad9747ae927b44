//! The `kds-worker` binary as an operator meets it: bad configuration, a stream created after
//! the worker started, `init`, `config`, and a real process serving its endpoints and exiting
//! 0 on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn worker_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kds-worker"));
    // Only what each test sets: no KDS_* from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("KDS_") {
            c.env_remove(k);
        }
    }
    c.env("KDS_LOG_FORMAT", "pretty");
    c
}

/// A worker process killed when the test ends, passed or not (a panicking test must not leave
/// it running).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reap {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reap {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

async fn table_exists(aws: &kds_worker::aws::AwsClients, table: &str) -> bool {
    aws.dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await
        .is_ok()
}

/// Each bad value exits 2 with one line naming the key, and writes nothing to DynamoDB.
#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key_and_writes_nothing() {
    let aws = aws().await;
    let stream = unique("badcfg");
    create_stream(&aws, &stream, 1).await;
    let cases: &[(&str, &str, &str)] = &[
        ("KDS_MAX_LEASES_CAP", "0", "max_leases_cap"),
        ("KDS_MAX_LEASES_CAP", "-1", "max_leases_cap"),
        ("KDS_MAX_LEASES_CAP", "eighty", "max_leases_cap"),
        ("KDS_STREAM_NAME", "", "stream_name"),
        (
            "KDS_WORKER_COUNT_SOURCE",
            "zookeeper",
            "worker_count_source",
        ),
        ("KDS_HEARTBEAT_INTERVAL", "0s", "heartbeat_interval"),
        ("KDS_SHARD_POLL_INTERVAL", "0ms", "shard_poll_interval"),
        ("KDS_FAILOVER_TIMEOUT", "1s", "failover_timeout"),
        // Twice the heartbeat used to be accepted; the fence then rose on every heartbeat.
        ("KDS_FAILOVER_TIMEOUT", "4s", "failover_timeout"),
        ("KDS_FAILOVER_TIMEOUT", "7s", "failover_timeout"),
        ("KDS_HEARTBEAT_INTERVAL", "50ms", "heartbeat_interval"),
        ("KDS_SHARD_POLL_INTERVAL", "500ms", "shard_poll_interval"),
        ("KDS_HTTP_ADDR", "localhost", "http_addr"),
        ("KDS_LOG_FORMAT", "yaml", "log_format"),
        ("KDS_MAX_LEASE_CAP", "5", "max_lease_cap"),
    ];
    for &(var, value, key) in cases {
        let app = unique("badcfg");
        let out = worker_bin()
            .env("KDS_APP_NAME", &app)
            .env("KDS_STREAM_NAME", &stream)
            .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
            .env("KDS_HEARTBEAT_INTERVAL", "2s")
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {stderr}");
        let lines: Vec<_> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}={value}: one line expected: {stderr}");
        assert!(lines[0].contains(key), "{var}={value}: {stderr}");
        if key == "failover_timeout" {
            // Both keys of the rule, with their values.
            assert!(
                lines[0].contains(&format!("failover_timeout = \"{value}\""))
                    && lines[0].contains("heartbeat_interval = \"2s\""),
                "{var}={value}: {stderr}"
            );
        }
        assert!(
            !table_exists(&aws, &app).await,
            "{var}={value} created a table"
        );
        assert!(!table_exists(&aws, &format!("{app}_meta")).await);
    }
}

/// A worker started before its stream (a StatefulSet applied with the Job that creates it)
/// waits instead of exiting into a crash loop: `/ready` 503 naming the stream, `/health` 200,
/// `kds_stream_missing 1`, nothing written; once the stream exists it starts and reads. An
/// admin command on a missing stream still exits 3.
#[tokio::test]
async fn a_missing_stream_is_waited_for_then_read() {
    let aws = aws().await;
    let (app, stream) = (unique("nostream"), unique("late"));
    let out = worker_bin()
        .args(["admin", "reshard", "4"])
        .env("KDS_APP_NAME", &app)
        .env("KDS_STREAM_NAME", &stream)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&stream) && stderr.contains("kds-worker init"),
        "{stderr}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Reap(
        worker_bin()
            .env("KDS_APP_NAME", &app)
            .env("KDS_STREAM_NAME", &stream)
            .env("KDS_WORKER_ID", "late-0")
            .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
            .env("KDS_HEARTBEAT_INTERVAL", "300ms")
            .env("KDS_FAILOVER_TIMEOUT", "2s")
            .env("KDS_HTTP_ADDR", addr.to_string())
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (body, _) = wait_for(
        Duration::from_secs(20),
        "/ready to say the worker waits for its stream",
        || {
            let exited = child.try_wait().unwrap();
            async move {
                assert!(exited.is_none(), "the worker exited: {exited:?}");
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(_) => {
                        let (code, body) = http_get(addr, "/ready").await;
                        (code == 503 && body.contains("waiting for stream")).then_some(body)
                    }
                    Err(_) => None,
                }
            }
        },
    )
    .await;
    assert!(body.contains(&stream), "{body}");
    assert_eq!(http_get(addr, "/health").await.0, 200);
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(metrics.contains("kds_stream_missing 1"), "{metrics}");
    assert!(
        !table_exists(&aws, &app).await,
        "a waiting worker wrote a table"
    );

    create_stream(&aws, &stream, 2).await;
    let created = tokio::time::Instant::now();
    wait_for(
        Duration::from_secs(60),
        "the worker to start once the stream exists",
        || {
            let exited = child.try_wait().unwrap();
            async move {
                assert!(exited.is_none(), "the worker exited: {exited:?}");
                (http_get(addr, "/ready").await.0 == 200).then_some(())
            }
        },
    )
    .await;
    eprintln!("ready {:?} after the stream was created", created.elapsed());
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(metrics.contains("kds_stream_missing 0"), "{metrics}");
    wait_for(
        Duration::from_secs(30),
        "the worker to lease both shards",
        || async move {
            let (_, status) = http_get(addr, "/status").await;
            let status: serde_json::Value = serde_json::from_str(&status).unwrap();
            (status["leases_held"] == 2 && status["coverage"]["readable_shards"] == 2).then_some(())
        },
    )
    .await;

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, _) = wait_for(Duration::from_secs(10), "exit after SIGTERM", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(0));
}

/// SIGTERM while waiting for the stream: exit 0 at once, nothing written.
#[tokio::test]
async fn a_worker_waiting_for_its_stream_stops_on_sigterm() {
    let aws = aws().await;
    let app = unique("nostream");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Reap(
        worker_bin()
            .env("KDS_APP_NAME", &app)
            .env("KDS_STREAM_NAME", unique("never"))
            .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
            .env("KDS_HTTP_ADDR", addr.to_string())
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(
        Duration::from_secs(20),
        "the worker to be waiting",
        || async move {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => (http_get(addr, "/ready")
                    .await
                    .1
                    .contains("waiting for stream"))
                .then_some(()),
                Err(_) => None,
            }
        },
    )
    .await;
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, _) = wait_for(Duration::from_secs(5), "exit after SIGTERM", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    assert!(!table_exists(&aws, &app).await);
    assert!(!table_exists(&aws, &format!("{app}_meta")).await);
}

#[tokio::test]
async fn config_prints_each_value_with_its_source() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.toml");
    std::fs::write(&file, "stream_name = \"orders\"\nmax_leases_cap = 40\n").unwrap();
    let out = worker_bin()
        .args(["config", "--config"])
        .arg(&file)
        .env("KDS_MAX_LEASES_CAP", "12")
        .env("AWS_SECRET_ACCESS_KEY", "do-not-print-me")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .to_owned()
    };
    assert!(
        line("max_leases_cap").contains("12")
            && line("max_leases_cap").contains("KDS_MAX_LEASES_CAP")
    );
    assert!(line("stream_name").contains("orders") && line("stream_name").contains("config.toml"));
    assert!(
        line("heartbeat_interval").contains("2s") && line("heartbeat_interval").contains("default")
    );
    assert!(
        !stdout.contains("do-not-print-me"),
        "a secret was printed: {stdout}"
    );
    assert!(
        stdout.contains("AWS_SECRET_ACCESS_KEY = set (redacted)"),
        "{stdout}"
    );
}

/// `init` twice (idempotent), then a real worker process: ready, status, metrics, SIGTERM → 0.
#[tokio::test]
async fn init_then_run_serves_endpoints_and_exits_0_on_sigterm() {
    let aws = aws().await;
    let (app, stream) = (unique("proc"), unique("proc"));
    for _ in 0..2 {
        let out = worker_bin()
            .args(["init", "--shards", "6"])
            .env("KDS_APP_NAME", &app)
            .env("KDS_STREAM_NAME", &stream)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(table_exists(&aws, &app).await && table_exists(&aws, &format!("{app}_meta")).await);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let started = tokio::time::Instant::now();
    let mut child = worker_bin()
        .env("KDS_APP_NAME", &app)
        .env("KDS_STREAM_NAME", &stream)
        .env("KDS_WORKER_ID", "proc-0")
        .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
        .env("KDS_HEARTBEAT_INTERVAL", "300ms")
        .env("KDS_FAILOVER_TIMEOUT", "2s")
        .env("KDS_HTTP_ADDR", addr.to_string())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (body, took) = wait_for(
        Duration::from_secs(20),
        "the worker process to be ready",
        || async {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => {
                    let (code, body) = http_get(addr, "/ready").await;
                    (code == 200).then_some(body)
                }
                Err(_) => None,
            }
        },
    )
    .await;
    eprintln!("process start to /ready 200: {:?}", started.elapsed());
    let _ = took;
    assert!(body.contains("\"ready\": true"), "{body}");
    assert_eq!(http_get(addr, "/health").await.0, 200);
    let (code, status) = http_get(addr, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["worker_id"], "proc-0");
    assert_eq!(status["role"], "coordinator");
    assert_eq!(status["lease_limits"]["max_leases_per_worker"], 6);
    assert_eq!(status["lease_limits"]["shard_count"], 6);
    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("kds_max_leases_per_worker 6"), "{metrics}");
    assert!(metrics.contains("kds_is_coordinator 1"));
    assert!(metrics.contains(r#"kds_aws_api_calls_total{service="kinesis",operation="DescribeStreamSummary",outcome="ok"}"#));
    assert_eq!(http_get(addr, "/nope").await.0, 404);

    // SIGTERM: exit 0, post vacant, heartbeat gone.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, _) = wait_for(
        Duration::from_secs(10),
        "the process to exit after SIGTERM",
        || {
            let s = child.try_wait().unwrap();
            async move { s }
        },
    )
    .await;
    assert_eq!(status.code(), Some(0));
    let store = meta(&aws, &app);
    let row = store.read_coordinator().await.unwrap().unwrap();
    assert!(row.is_vacant(), "stepped down: {row:?}");
    assert!(store.scan_heartbeats().await.unwrap().is_empty());
}

/// Every pod restarting at once: the start-up `DescribeStreamSummary` is throttled
/// (LimitExceededException) beyond the SDK's own retries. The worker retries with backoff,
/// logging each retry, and runs; it does not exit 1.
#[tokio::test]
async fn a_throttled_start_is_retried_not_fatal() {
    let aws = aws().await;
    let (app, stream) = (unique("throttled"), unique("throttled"));
    create_stream(&aws, &stream, 2).await;
    // The SDK makes 3 attempts per call: 7 refusals need two retries of the worker's own.
    let proxy =
        ThrottlingProxy::start(&std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap(), 7).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::env::temp_dir().join(format!("{}.log", unique("throttled")));
    let mut child = worker_bin()
        .env("KDS_APP_NAME", &app)
        .env("KDS_STREAM_NAME", &stream)
        .env("KDS_WORKER_ID", "throttled-0")
        .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
        .env("KDS_HEARTBEAT_INTERVAL", "300ms")
        .env("KDS_FAILOVER_TIMEOUT", "2s")
        .env("KDS_HTTP_ADDR", addr.to_string())
        .env("AWS_ENDPOINT_URL_KINESIS", proxy.url())
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(90),
        "the throttled worker to be ready",
        || {
            let exited = child.try_wait().unwrap();
            let log = log.clone();
            async move {
                if let Some(status) = exited {
                    panic!(
                        "the worker exited with {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(_) => (http_get(addr, "/ready").await.0 == 200).then_some(()),
                    Err(_) => None,
                }
            }
        },
    )
    .await;
    eprintln!("ready {took:?} after start despite 7 throttled calls");
    assert_eq!(proxy.answered.load(std::sync::atomic::Ordering::SeqCst), 7);
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert!(metrics.contains("kds_start_retries_total 2"), "{metrics}");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, _) = wait_for(Duration::from_secs(10), "exit after SIGTERM", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let retries = text
        .lines()
        .filter(|l| l.contains("failed at start; retrying"))
        .count();
    assert_eq!(retries, 2, "one log line per retry expected:\n{text}");
    assert!(text.contains("LimitExceededException"), "{text}");
    let _ = std::fs::remove_file(&log);
}
