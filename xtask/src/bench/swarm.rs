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
/// The worker's default failover timeout, which the model uses too.
pub const FAILOVER_S: f64 = 10.0;
/// A KCL lease item's size in bytes (key, owner, counter, checkpoint, parents): ~300.
pub const KCL_LEASE_ITEM_BYTES: f64 = 300.0;

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
pub fn kcl_model(workers: u64, shards: u64) -> KclModel {
    let renew_every = FAILOVER_S / 3.0;
    let scan_every = 2.0 * FAILOVER_S;
    let scan_units = (shards as f64 * KCL_LEASE_ITEM_BYTES / 4096.0).ceil() * 0.5;
    KclModel {
        write_units_per_s: shards as f64 / renew_every,
        read_units_per_s: workers as f64 * scan_units / scan_every,
    }
}

/// The grid of (workers, shards, naive): `--quick` runs four pairs and the naive design at
/// 10 × 300; the full run every pair, each also naive.
pub fn grid(quick: bool) -> Vec<(u64, u64, bool)> {
    if quick {
        vec![
            (3, 30, false),
            (10, 300, false),
            (10, 300, true),
            (30, 2000, false),
            (100, 2000, false),
        ]
    } else {
        let mut g = Vec::new();
        for shards in [30, 300, 2000] {
            for workers in [3, 10, 30, 100] {
                g.push((workers, shards, false));
                g.push((workers, shards, true));
            }
        }
        g
    }
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
    (workers, shards, naive): (u64, u64, bool),
    window: Duration,
    dir: &Path,
) -> anyhow::Result<SwarmResult> {
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
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .collect();
    let bin = super::swarm_bin();
    let mut swarm = Swarm::start(&bin, env, workers, naive, &dir.join(format!("{app}.log")))?;
    let pid = swarm.child.id();
    let deadline = Duration::from_secs(60 + shards / 10);
    let coverage = swarm.wait(deadline, "coverage", |l| {
        l.held.len() as u64 == workers && balanced(l, shards)
    });
    // Steady state: what the fleet costs when nothing changes.
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
        kcl_model: kcl_model(workers, shards),
    })
}

/// Runs the grid on one set of emulators (each pair has its own stream and tables). Streams
/// above [`MAX_CREATE_SHARDS`] live in a second moto serving Kinesis: kinesis-mock cannot
/// create them, and building them by resharding would leave the fleet 1,800 closed parents
/// to finish first, which is not the steady state the swarm measures.
pub fn run(sh: &xshell::Shell, quick: bool, dir: &Path) -> anyhow::Result<Vec<SwarmResult>> {
    std::fs::create_dir_all(dir)?;
    let emu = crate::emulators::start(sh, &dir.join("logs"))?;
    let mut moto_kinesis: Option<crate::emulators::MotoKinesis> = None;
    let window = Duration::from_secs(if quick { 20 } else { 60 });
    let mut out = Vec::new();
    for pair in grid(quick) {
        let (workers, shards, _) = pair;
        let r = if shards > MAX_CREATE_SHARDS {
            if moto_kinesis.is_none() {
                moto_kinesis = Some(crate::emulators::MotoKinesis::start(sh, &dir.join("logs"))?);
            }
            let kinesis = moto_kinesis.as_ref().expect("started above").addr;
            run_pair(&emu.with_kinesis(kinesis), pair, window, dir)?
        } else {
            run_pair(&emu, pair, window, dir)?
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
        let m = kcl_model(100, 2000);
        assert!((m.write_units_per_s - 600.0).abs() < 1e-9);
        assert!((m.read_units_per_s - 100.0 * 147.0 * 0.5 / 20.0).abs() < 1e-9);
        assert_eq!(grid(true).len(), 5);
        assert_eq!(grid(false).len(), 24);
    }
}
