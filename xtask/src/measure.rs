//! `cargo xtask measure`: the numbers behind lab/MEASUREMENTS.md, measured on this machine
//! against the emulators with the release worker and the default timings (heartbeat 2 s,
//! shard poll 10 s, failover 10 s). Prints a Markdown report.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::emulators::{self, Emulators};
use crate::process::Launch;
use crate::util::{free_port, http_status, lab_dir, project_root, secs};

#[derive(clap::Args)]
pub struct Args {
    /// Steady-state window for call rates.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub window: Duration,
}

struct Worker {
    name: String,
    addr: SocketAddr,
    handle: duct::Handle,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.handle.kill();
    }
}

fn bin() -> std::path::PathBuf {
    crate::util::built_binary("release", "kds-worker")
}

fn env(emu: &Emulators, app: &str, stream: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = emu
        .aws_env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    v.extend([
        ("KDS_APP_NAME".to_owned(), app.to_owned()),
        ("KDS_STREAM_NAME".to_owned(), stream.to_owned()),
        (
            "KDS_WORKER_COUNT_SOURCE".to_owned(),
            "heartbeats".to_owned(),
        ),
        ("KDS_LOG_FORMAT".to_owned(), "json".to_owned()),
    ]);
    v
}

fn admin(emu: &Emulators, app: &str, stream: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = duct::cmd(bin(), args)
        .full_env(
            std::env::vars()
                .filter(|(k, _)| !k.starts_with("KDS_"))
                .chain(env(emu, app, stream)),
        )
        .stderr_null()
        .read()
        .with_context(|| format!("kds-worker {}", args.join(" ")))?;
    Ok(out)
}

fn start(
    emu: &Emulators,
    app: &str,
    stream: &str,
    name: &str,
) -> anyhow::Result<(Worker, Duration)> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let started = Instant::now();
    let handle = Launch::new(bin(), Vec::<String>::new())
        .full_env(
            std::env::vars()
                .filter(|(k, _)| !k.starts_with("KDS_"))
                .chain(env(emu, app, stream))
                .collect(),
        )
        .env("KDS_WORKER_ID", name)
        .env("KDS_HTTP_ADDR", addr.to_string())
        .log(lab_dir().join("measure").join(format!("{name}.log")), false)
        .start()?;
    while http_status(addr, "/ready") != Some(200) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{name} not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((
        Worker {
            name: name.to_owned(),
            addr,
            handle,
        },
        started.elapsed(),
    ))
}

fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// `kds_aws_api_calls_total` by (service, operation).
fn calls(addr: SocketAddr) -> anyhow::Result<BTreeMap<(String, String), f64>> {
    let text = get(addr, "/metrics")?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("kds_aws_api_calls_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry((label("service"), label("operation")))
            .or_default() += v;
    }
    Ok(out)
}

fn status(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&get(addr, "/status")?)?)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const WRITES: &[&str] = &["UpdateItem", "PutItem", "DeleteItem", "TransactWriteItems"];

struct Rates {
    kinesis: f64,
    dynamodb: f64,
    dynamodb_writes: f64,
}

fn rates(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
    per: Duration,
) -> Rates {
    let delta = |f: &dyn Fn(&(String, String)) -> bool| -> f64 {
        after
            .iter()
            .filter(|(k, _)| f(k))
            .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
            .sum::<f64>()
            / per.as_secs_f64()
    };
    Rates {
        kinesis: delta(&|k| k.0 == "kinesis"),
        dynamodb: delta(&|k| k.0 == "dynamodb"),
        dynamodb_writes: delta(&|k| k.0 == "dynamodb" && WRITES.contains(&k.1.as_str())),
    }
}

/// Each worker's call rates over `window` of steady state.
fn steady_rates(workers: &[Worker], window: Duration) -> anyhow::Result<Vec<Rates>> {
    let before: Vec<_> = workers
        .iter()
        .map(|w| calls(w.addr))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(window);
    let after: Vec<_> = workers
        .iter()
        .map(|w| calls(w.addr))
        .collect::<Result<_, _>>()?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| rates(b, a, window))
        .collect())
}

fn wait_leases(workers: &[Worker], each: u64, deadline: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let held: Vec<u64> = workers
            .iter()
            .map(|w| {
                status(w.addr)
                    .map(|s| s["leases_held"].as_u64().unwrap_or(0))
                    .unwrap_or(0)
            })
            .collect();
        if held.iter().all(|h| *h == each) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            bail!("leases {held:?}, want {each} each");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    cmd!(sh, "cargo build --release --quiet -p kds-worker").run()?;
    let size = std::fs::metadata(bin())?.len();
    std::fs::create_dir_all(lab_dir().join("measure"))?;
    let emu = emulators::start(&sh, &lab_dir().join("measure"))?;
    let mut report = Vec::new();
    report.push(format!(
        "| release binary size | {:.1} MiB ({size} bytes, stripped, thin LTO) |",
        size as f64 / 1048576.0
    ));

    // 30 shards, 3 workers, default timings.
    let (app, stream) = ("measure-app", "measure-stream");
    admin(&emu, app, stream, &["init", "--shards", "30"])?;
    let mut workers = Vec::new();
    let mut ready = Vec::new();
    for i in 0..3 {
        let (w, t) = start(&emu, app, stream, &format!("m{i}"))?;
        ready.push(t);
        workers.push(w);
    }
    report.push(format!(
        "| process start to `/ready` 200 | {} (3 workers started one after another) |",
        ready
            .iter()
            .map(|t| secs(*t))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let t = wait_leases(&workers, 10, Duration::from_secs(60))?;
    report.push(format!(
        "| 30 shards / 3 workers: full coverage (10 each) after the 3rd was ready | {} |",
        secs(t)
    ));
    eprintln!("steady state window {} ...", secs(args.window));
    std::thread::sleep(Duration::from_secs(5));
    let fleet = steady_rates(&workers, args.window)?;
    for (i, w) in workers.iter().enumerate() {
        let role = status(w.addr)?["role"].as_str().unwrap_or("?").to_owned();
        // Per second over the window, shown per minute.
        let r = &fleet[i];
        let pid = w.handle.pids()[0];
        report.push(format!(
            "| {} ({role}), 30 shards / 3 workers, idle stream | Kinesis {:.0} calls/min, DynamoDB {:.0} calls/min ({:.0} writes/min); RSS {:.1} MiB |",
            w.name,
            r.kinesis * 60.0,
            r.dynamodb * 60.0,
            r.dynamodb_writes * 60.0,
            rss_kib(pid) as f64 / 1024.0
        ));
    }

    // 300 shards, 4 workers: DynamoDB writes per second in steady state.
    let reshard_start = Instant::now();
    admin(&emu, app, stream, &["admin", "reshard", "300"])?;
    let (w, _) = start(&emu, app, stream, "m3")?;
    workers.push(w);
    let t = wait_leases(&workers, 75, Duration::from_secs(180))?;
    report.push(format!(
        "| 30 -> 300 shards and a 4th worker: 75 each | {} after the reshard began ({} after the last step) |",
        secs(reshard_start.elapsed()),
        secs(t)
    ));
    std::thread::sleep(Duration::from_secs(10));
    let fleet = steady_rates(&workers, args.window)?;
    let total: f64 = fleet.iter().map(|r| r.dynamodb_writes).sum();
    let kinesis: f64 = fleet.iter().map(|r| r.kinesis).sum();
    let reads: f64 = fleet.iter().map(|r| r.dynamodb - r.dynamodb_writes).sum();
    report.push(format!(
        "| 300 shards / 4 workers, idle stream: DynamoDB writes | {total:.2} writes/s for the fleet ({:.2} per worker); KCL-style per-lease renewal every 3.3 s would be {:.0} writes/s |",
        total / 4.0,
        300.0 / 3.3
    ));
    report.push(format!(
        "| 300 shards / 4 workers: other calls | DynamoDB reads {reads:.1}/s (scans of the lease table and heartbeats, limit and coordinator reads); Kinesis {kinesis:.0} calls/s (GetRecords polling of idle shards, 1 s idle wait) |"
    ));
    drop(workers);

    // Consumption: one worker, 4 shards, records put before it starts.
    let (app, stream) = ("measure-consume", "measure-consume");
    admin(&emu, app, stream, &["init", "--shards", "4"])?;
    let records = 20_000u64;
    admin(
        &emu,
        app,
        stream,
        &[
            "admin",
            "produce",
            "--rate",
            &records.to_string(),
            "--seconds",
            "1",
        ],
    )?;
    let (w, _) = start(&emu, app, stream, "c0")?;
    let begin = Instant::now();
    loop {
        let processed: u64 = status(w.addr)?["leases"]
            .as_array()
            .map(|l| l.iter().map(|x| x["records"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        if processed >= records {
            break;
        }
        if begin.elapsed() > Duration::from_secs(300) {
            bail!("only {processed} of {records} records consumed after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = begin.elapsed();
    report.push(format!(
        "| one worker consuming a 4-shard backlog of {records} records | {:.0} records/s ({}) |",
        records as f64 / took.as_secs_f64(),
        secs(took)
    ));
    drop(w);
    emu.stop();

    println!("| measurement | result |\n|---|---|");
    for line in report {
        println!("{line}");
    }
    Ok(())
}
