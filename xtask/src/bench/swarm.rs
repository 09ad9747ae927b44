//! `cargo xtask bench --swarm`: the control plane alone, at scale. `kds-swarm` runs many
//! workers in one process, each a full worker (election, heartbeats, leases, its own AWS
//! clients) that does not read, behind the same recording proxy as the bench. For each
//! (workers, shards) pair it measures the time until every shard is leased and the fleet is
//! balanced, the fleet's DynamoDB calls and capacity units per second in steady state, the time
//! to rebalance after one worker leaves, and CPU and memory per worker. Beside each row, the
//! same figures computed for a KCL 2.x-style fleet from its documented defaults (a model, not a
//! measurement): every lease renewed every failover/3, every worker's lease taker scanning
//! the whole lease table every 2 × failover.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::proxy::{self, RecordingProxy};
use crate::emulators::Emulators;
use crate::util::secs;

/// The most shards kinesis-mock's CreateStream accepts.
const MAX_CREATE_SHARDS: u64 = 1000;
/// Heartbeats waited after the fleet is leased and balanced before the steady-state window:
/// the worker's settling window (two heartbeats) and one more.
const SETTLING_HEARTBEATS: u64 = 3;

/// The worker's default timings (heartbeat, failover), at which the smaller fleets run.
pub const DEFAULT_TIMINGS: Timings = Timings {
    heartbeat_s: 2,
    failover_s: 10,
};
/// The 2,000-shard fleets' timings: lifion's failure timeout, with this worker's four
/// heartbeats per timeout. moto's DynamoDB serves one request at a time on one core; at 2 s
/// heartbeats 100 workers' Queries (each a walk over every item in moto) keep it saturated, so
/// those fleets never finish leasing. Every figure per second scales with 1/timeout for this
/// worker and for the model alike, so the ratio to the model holds at either timing.
pub const LARGE_TIMINGS: Timings = Timings {
    heartbeat_s: 30,
    failover_s: 120,
};
/// A KCL lease item's size in bytes (key, owner, counter, checkpoint, parents): ~300.
pub const KCL_LEASE_ITEM_BYTES: f64 = 300.0;

/// A heartbeat interval and failover timeout, in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub heartbeat_s: u64,
    pub failover_s: u64,
}

/// One fleet the swarm runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub workers: u64,
    pub shards: u64,
    pub naive: bool,
    pub timings: Timings,
}

impl Pair {
    fn new(workers: u64, shards: u64, naive: bool) -> Pair {
        let timings = if shards > 300 {
            LARGE_TIMINGS
        } else {
            DEFAULT_TIMINGS
        };
        Pair {
            workers,
            shards,
            naive,
            timings,
        }
    }

    /// `WORKERSxSHARDS` or `WORKERSxSHARDS-naive`, as `--pairs` takes them.
    pub fn name(&self) -> String {
        let naive = if self.naive { "-naive" } else { "" };
        format!("{}x{}{naive}", self.workers, self.shards)
    }
}

fn default_timings() -> Timings {
    DEFAULT_TIMINGS
}

/// One (workers, shards) pair's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwarmResult {
    /// `coordinator` (this worker) or `naive` (each worker also polls the stream and renews
    /// each lease every failover/3 itself; `kds-swarm --naive`).
    pub mode: String,
    pub workers: u64,
    pub shards: u64,
    /// Seconds from start until every shard was leased and no worker held more than the limit.
    pub time_to_coverage_s: Option<f64>,
    /// Seconds after one worker left until its shards were leased by the others again.
    pub rebalance_s: Option<f64>,
    pub dynamodb_calls_per_s: f64,
    pub read_units_per_s: f64,
    pub write_units_per_s: f64,
    pub conditional_failure_rate: Option<f64>,
    pub kinesis_calls_per_min: f64,
    pub cpu_s_per_worker_per_min: f64,
    pub rss_mib_per_worker: f64,
    pub kcl_model: KclModel,
    /// The timings the fleet ran at (rows from before they were recorded ran at the defaults).
    #[serde(default = "default_timings")]
    pub timings: Timings,
    /// Steady-state DynamoDB units per second by table kind and operation
    /// (`heartbeats/UpdateItem`, `leases/Query`, ...): where the cost goes.
    #[serde(default)]
    pub units_by_operation: std::collections::BTreeMap<String, f64>,
    /// The UTC date the row was measured (empty in rows from before it was recorded).
    #[serde(default)]
    pub measured: String,
}

/// A KCL 2.x-style fleet's DynamoDB load from its documented defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KclModel {
    pub write_units_per_s: f64,
    pub read_units_per_s: f64,
}

/// The model: renewals are one conditional UpdateItem (1 WCU) per lease every failover/3;
/// each worker's lease taker scans every lease every 2 × failover (eventually consistent,
/// 0.5 RCU per 4 KiB). Checkpoints are left out, as the swarm does not read.
pub fn kcl_model(workers: u64, shards: u64, failover_s: u64) -> KclModel {
    let renew_every = failover_s as f64 / 3.0;
    let scan_every = 2.0 * failover_s as f64;
    let scan_units = (shards as f64 * KCL_LEASE_ITEM_BYTES / 4096.0).ceil() * 0.5;
    KclModel {
        write_units_per_s: shards as f64 / renew_every,
        read_units_per_s: workers as f64 * scan_units / scan_every,
    }
}

/// The grid: `--quick` runs four pairs and the naive design at 10 × 300; the full run every
/// pair, each also naive. The 2,000-shard fleets run at [`LARGE_TIMINGS`].
pub fn grid(quick: bool) -> Vec<Pair> {
    if quick {
        vec![
            Pair::new(3, 30, false),
            Pair::new(10, 300, false),
            Pair::new(10, 300, true),
            Pair::new(30, 2000, false),
            Pair::new(100, 2000, false),
        ]
    } else {
        let mut g = Vec::new();
        for shards in [30, 300, 2000] {
            for workers in [3, 10, 30, 100] {
                g.push(Pair::new(workers, shards, false));
                g.push(Pair::new(workers, shards, true));
            }
        }
        g
    }
}

/// The pairs `names` picks from the full grid (`100x2000`, `10x300-naive`); an unknown name
/// is an error that lists the known ones.
pub fn pick(names: &[String]) -> anyhow::Result<Vec<Pair>> {
    let all = grid(false);
    names
        .iter()
        .map(|n| {
            all.iter().find(|p| p.name() == *n).copied().ok_or_else(|| {
                let known: Vec<String> = all.iter().map(Pair::name).collect();
                anyhow::anyhow!("--pairs: no pair {n:?}; the grid has {}", known.join(", "))
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct Line {
    held: Vec<u64>,
    limit: Option<u64>,
}

struct Swarm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Line>,
}

impl Swarm {
    fn start(
        bin: &Path,
        env: Vec<(String, String)>,
        workers: u64,
        naive: bool,
        log: &Path,
    ) -> anyhow::Result<Swarm> {
        let mut child = Command::new(bin)
            .args(naive.then_some("--naive"))
            .arg(workers.to_string())
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(l) = serde_json::from_str::<Line>(&line)
                    && tx.send(l).is_err()
                {
                    return;
                }
            }
        });
        Ok(Swarm {
            child,
            stdin,
            lines: rx,
        })
    }

    /// Waits until `done` holds for a status line; the seconds it took.
    fn wait(
        &mut self,
        deadline: Duration,
        what: &str,
        done: impl Fn(&Line) -> bool,
    ) -> Option<f64> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            match self.lines.recv_timeout(Duration::from_secs(5)) {
                Ok(l) => {
                    eprint!(
                        "\r    {what}: {} leased, {} workers, limit {:?}   ",
                        l.held.iter().sum::<u64>(),
                        l.held.len(),
                        l.limit
                    );
                    if done(&l) {
                        eprintln!();
                        return Some(start.elapsed().as_secs_f64());
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        eprintln!("\n    kds-swarm exited: {status}");
                        return None;
                    }
                }
            }
        }
        eprintln!("\n    {what}: not within {}", secs(deadline));
        None
    }

    fn send(&mut self, line: &str) {
        let _ = writeln!(self.stdin, "{line}");
        let _ = self.stdin.flush();
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn balanced(l: &Line, shards: u64) -> bool {
    let limit = l.limit.unwrap_or(u64::MAX);
    l.held.iter().sum::<u64>() == shards && l.held.iter().all(|h| *h <= limit)
}

/// Runs one (workers, shards) pair against running emulators.
pub fn run_pair(
    emu: &Emulators,
    pair: Pair,
    window: Duration,
    dir: &Path,
) -> anyhow::Result<SwarmResult> {
    let Pair {
        workers,
        shards,
        naive,
        timings,
    } = pair;
    let mode = if naive { "naive" } else { "coordinator" };
    let app = format!("swarm-{workers}x{shards}-{mode}");
    let stream = format!("swarm-{shards}");
    eprintln!("==> swarm ({mode}): {workers} workers x {shards} shards");
    super::admin_as(
        emu,
        &app,
        &stream,
        &["init", "--shards", &shards.to_string()],
    )?;
    let kinesis = RecordingProxy::start(emu.kinesis)?;
    let dynamodb = RecordingProxy::start(emu.dynamodb)?;
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("KDS_") && !k.starts_with("AWS_"))
        .chain(
            crate::emulators::aws_env(&kinesis.url(), &dynamodb.url())
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v)),
        )
        .chain(
            [
                ("KDS_APP_NAME", app.as_str()),
                ("KDS_STREAM_NAME", stream.as_str()),
                ("KDS_WORKER_ID", "swarm"),
                ("KDS_WORKER_COUNT_SOURCE", "heartbeats"),
                ("KDS_LOG_FORMAT", "json"),
                ("RUST_LOG", "warn"),
                (
                    "KDS_HEARTBEAT_INTERVAL",
                    &format!("{}s", timings.heartbeat_s),
                ),
                ("KDS_FAILOVER_TIMEOUT", &format!("{}s", timings.failover_s)),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .collect();
    let bin = super::swarm_bin();
    let mut swarm = Swarm::start(&bin, env, workers, naive, &dir.join(format!("{app}.log")))?;
    let pid = swarm.child.id();
    // Leasing takes a few settling rounds after the first limit, each a quarter heartbeat.
    let deadline = Duration::from_secs(60 + shards / 10 + 6 * timings.heartbeat_s);
    let coverage = swarm.wait(deadline, "coverage", |l| {
        l.held.len() as u64 == workers && balanced(l, shards)
    });
    // Steady state: what the fleet costs when nothing changes. The last moves of the spread
    // leave each worker reading its leases every quarter heartbeat for two heartbeats (the
    // worker's settling window); that tail is part of the spread, not of the steady state.
    std::thread::sleep(Duration::from_secs(
        SETTLING_HEARTBEATS * timings.heartbeat_s,
    ));
    let (cpu0, _) = super::usage(pid).unwrap_or((0.0, 0));
    let k0 = kinesis.calls().len();
    let d0 = dynamodb.calls().len();
    std::thread::sleep(window);
    let d_calls: Vec<proxy::Call> = dynamodb.calls()[d0..].to_vec();
    let k_calls = kinesis.calls().len() - k0;
    let (cpu1, rss) = super::usage(pid).unwrap_or((0.0, 0));
    let mut tally = proxy::Tally::default();
    for c in &d_calls {
        tally.add(c);
    }
    let w = window.as_secs_f64();
    let units_by_operation = proxy::tally(&d_calls, |c| table_kind(c, &app))
        .into_iter()
        .map(|((kind, op), t)| (format!("{kind}/{op}"), (t.read_units + t.write_units) / w))
        .collect();
    // One worker leaves (gracefully, as a scale-down does).
    swarm.send(&format!("stop {}", workers - 1));
    let rebalance = if workers > 1 && coverage.is_some() {
        swarm.wait(deadline, "rebalance", |l| {
            l.held.len() as u64 == workers - 1 && balanced(l, shards)
        })
    } else {
        None
    };
    swarm.send("quit");
    Ok(SwarmResult {
        mode: mode.to_owned(),
        workers,
        shards,
        time_to_coverage_s: coverage,
        rebalance_s: rebalance,
        dynamodb_calls_per_s: tally.calls as f64 / w,
        read_units_per_s: tally.read_units / w,
        write_units_per_s: tally.write_units / w,
        conditional_failure_rate: (tally.conditional > 0)
            .then(|| tally.condition_failed as f64 / tally.conditional as f64),
        kinesis_calls_per_min: k_calls as f64 * 60.0 / w,
        cpu_s_per_worker_per_min: (cpu1 - cpu0) * 60.0 / w / workers as f64,
        rss_mib_per_worker: rss as f64 / 1024.0 / workers as f64,
        kcl_model: kcl_model(workers, shards, timings.failover_s),
        timings,
        units_by_operation,
        measured: crate::util::utc_date(),
    })
}

/// Which of the application's rows a call is for: `heartbeats`, `coordinator` and
/// `lease_limits` in the metadata table (by the key it names; a publication, a transaction
/// over both items, counts as `lease_limits`), `leases` in the lease table.
fn table_kind(call: &proxy::Call, app: &str) -> &'static str {
    let meta = format!("{app}_meta");
    let body = call.body.as_str();
    match call.table.as_deref() {
        _ if body.contains("\"S\":\"lease_limits\"") => "lease_limits",
        _ if body.contains("\"S\":\"coordinator\"") => "coordinator",
        Some(t) if t == meta => "heartbeats",
        _ if body.contains(&meta) => "heartbeats",
        _ => "leases",
    }
}

/// Runs the grid on one set of emulators (each pair has its own stream and tables). Streams
/// above [`MAX_CREATE_SHARDS`] live in a second moto serving Kinesis: kinesis-mock cannot
/// create them, and building them by resharding would leave the fleet 1,800 closed parents
/// to finish first, which is not the steady state the swarm measures.
pub fn run(
    sh: &xshell::Shell,
    pairs: &[Pair],
    quick: bool,
    dir: &Path,
) -> anyhow::Result<Vec<SwarmResult>> {
    std::fs::create_dir_all(dir)?;
    let emu = crate::emulators::start(sh, &dir.join("logs"))?;
    let mut moto_kinesis: Option<crate::emulators::MotoKinesis> = None;
    let window =
        |t: Timings| Duration::from_secs(if quick { 20 } else { 60 }.max(6 * t.heartbeat_s));
    let mut out = Vec::new();
    for &pair in pairs {
        let Pair {
            workers, shards, ..
        } = pair;
        let r = if shards > MAX_CREATE_SHARDS {
            if moto_kinesis.is_none() {
                moto_kinesis = Some(crate::emulators::MotoKinesis::start(sh, &dir.join("logs"))?);
            }
            let kinesis = moto_kinesis.as_ref().expect("started above").addr;
            run_pair(&emu.with_kinesis(kinesis), pair, window(pair.timings), dir)?
        } else {
            run_pair(&emu, pair, window(pair.timings), dir)?
        };
        eprintln!(
            "    ({}) {} workers x {} shards: covered {}, DynamoDB {:.1} WCU/s + {:.1} RCU/s (KCL model {:.1} + {:.1}), rebalance {}",
            r.mode,
            workers,
            shards,
            r.time_to_coverage_s
                .map_or("never".into(), |s| format!("{s:.1} s")),
            r.write_units_per_s,
            r.read_units_per_s,
            r.kcl_model.write_units_per_s,
            r.kcl_model.read_units_per_s,
            r.rebalance_s
                .map_or("never".into(), |s| format!("{s:.1} s")),
        );
        for (what, units) in &r.units_by_operation {
            eprintln!("        {what}: {units:.2} units/s");
        }
        if r.time_to_coverage_s.is_none() {
            // Kept as a row ("never"): the report says what could not be measured here.
            eprintln!(
                "    {workers} workers never covered {shards} shards; their log is in {}",
                dir.display()
            );
        }
        out.push(r);
    }
    emu.stop();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kcl_model_follows_its_documented_defaults() {
        // 2,000 leases renewed every 3.33 s; 100 takers each scanning 2,000 × 300 B = 147
        // pages of 4 KiB (0.5 RCU each) every 20 s.
        let m = kcl_model(100, 2000, 10);
        assert!((m.write_units_per_s - 600.0).abs() < 1e-9);
        assert!((m.read_units_per_s - 100.0 * 147.0 * 0.5 / 20.0).abs() < 1e-9);
        assert_eq!(grid(true).len(), 5);
        assert_eq!(grid(false).len(), 24);
        // The 2,000-shard fleets run at the slower timings, and the model follows them.
        assert!(
            grid(true)
                .iter()
                .all(|p| (p.shards > 300) == (p.timings == LARGE_TIMINGS))
        );
        let slow = kcl_model(100, 2000, LARGE_TIMINGS.failover_s);
        let slower = LARGE_TIMINGS.failover_s as f64 / 10.0;
        assert!((slow.write_units_per_s * slower - m.write_units_per_s).abs() < 1e-9);
    }

    #[test]
    fn pairs_are_picked_by_name_and_an_unknown_one_is_named() {
        let p = pick(&["100x2000".into(), "10x300-naive".into()]).unwrap();
        assert_eq!((p[0].workers, p[0].shards, p[0].naive), (100, 2000, false));
        assert_eq!(p[0].timings, LARGE_TIMINGS);
        assert_eq!((p[1].workers, p[1].shards, p[1].naive), (10, 300, true));
        let err = pick(&["7x7".into()]).unwrap_err().to_string();
        assert!(err.contains("\"7x7\"") && err.contains("3x30"), "{err}");
    }
}
