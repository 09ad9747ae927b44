//! `cargo xtask bench`: this worker beside the peer libraries people run, on the same
//! emulators, with the same script, one system at a time on fresh emulators:
//!
//! 1. 30 shards, 3 consumers start together, every shard gets one record a second;
//! 2. a 4th consumer joins;
//! 3. one consumer is killed with SIGKILL;
//! 4. the stream is resharded 30 → 60;
//! 5. production stops; idle steady state.
//!
//! Every system reaches Kinesis and DynamoDB only through [`proxy::RecordingProxy`], and every
//! consumer writes the records its callback received in one line format, so every figure
//! comes from the same kind of evidence: delivered records and counted requests
//! ([`analysis`]). Results go to `bench/results.json` and `bench/REPORT.md` ([`report`]).

pub mod analysis;
pub mod proxy;
pub mod report;
pub mod swarm;
pub mod systems;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use xshell::{Shell, cmd};

use crate::emulators;
use crate::process::{self, Launch, Signal};
use crate::util::{free_port, lab_dir, project_root, secs};
use systems::System;

#[derive(clap::Args)]
pub struct Args {
    /// Shorter phases (the whole run in about 10 minutes on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Systems to run, in order, from: worker, worker-lifion-timings,
    /// worker-async-kinesis-timings, naive, lifion, async-kinesis. Default: all six; with
    /// `--quick`, worker, lifion and async-kinesis (to stay under 10 minutes). The two timing
    /// rows run this worker at each peer's failure timeout, for a fair comparison; naive is
    /// this worker also polling the stream and renewing every lease itself.
    #[arg(long, value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Where results.json, REPORT.md and the plots go.
    #[arg(long, default_value = "bench")]
    pub out: PathBuf,
    /// The control plane alone at scale instead: many non-reading workers in one process
    /// (3 to 100 workers × 30 to 2,000 shards, each also naive; `--quick`: four pairs and
    /// the naive design at 10 × 300).
    #[arg(long)]
    pub swarm: bool,
    /// With `--swarm`, only these fleets from the full grid (`100x2000,10x300-naive`); the
    /// others in results.json are kept.
    #[arg(long, value_delimiter = ',', requires = "swarm")]
    pub pairs: Option<Vec<String>>,
    /// Only write REPORT.md again from results.json (nothing is run).
    #[arg(long)]
    pub report_only: bool,
    /// Which consumer the SIGKILL hits: the one named `c1` (the default), or this worker's
    /// coordinator, or one of its followers, as their `/status` says (c1 where no consumer
    /// serves `/status` or none says so: the peers and the naive design).
    #[arg(long, value_enum, default_value = "c1")]
    pub kill: Victim,
}

/// The consumer the kill phase stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Victim {
    /// The consumer named c1.
    C1,
    /// This worker's coordinator at that moment, as its `/status` says.
    Coordinator,
    /// The first of this worker's consumers (c0, c1, …) whose `/status` says it follows.
    Follower,
}

/// How long each phase of the script lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// Longest wait for the first full coverage.
    pub start_deadline_s: u64,
    pub join_s: u64,
    pub kill_s: u64,
    pub reshard_s: u64,
    pub idle_s: u64,
}

impl Phases {
    fn new(quick: bool) -> Phases {
        if quick {
            Phases {
                start_deadline_s: 90,
                join_s: 30,
                kill_s: 75,
                reshard_s: 45,
                idle_s: 15,
            }
        } else {
            Phases {
                start_deadline_s: 180,
                join_s: 90,
                kill_s: 360,
                reshard_s: 120,
                idle_s: 60,
            }
        }
    }
}

pub const SHARDS: u64 = 30;
pub const RESHARD_TO: u64 = 60;
const STREAM: &str = "bench-stream";
const APP: &str = "bench-app";
/// After production stops, the consumers count as caught up once no record was delivered
/// for this long...
const QUIET_FOR: Duration = Duration::from_secs(3);
/// ...or after this long at most.
const IDLE_CATCH_UP: Duration = Duration::from_secs(60);
/// Coverage counts a shard as read if a record from it was delivered this recently.
pub const COVERAGE_WINDOW_S: f64 = 5.0;

/// A point in the script, in seconds since the consumers started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mark {
    pub name: String,
    pub at: f64,
}

/// One consumer process; killed when dropped, so a failed run leaves nothing behind.
struct Consumer {
    name: String,
    handle: duct::Handle,
    record_log: PathBuf,
    /// Where this worker serves `/ready` (this worker's rows only).
    http: Option<SocketAddr>,
    started: Instant,
    /// CPU seconds and peak RSS (KiB), sampled before it stopped.
    usage: Option<(f64, u64)>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.handle.kill();
    }
}

/// A process killed when dropped (the producer).
struct KillOnDrop(duct::Handle);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

/// What one system's run left behind, for [`analysis`] and [`report`].
pub struct RunData {
    pub system: System,
    pub t0_micros: u128,
    pub marks: Vec<Mark>,
    pub record_logs: Vec<PathBuf>,
    pub produced: Vec<String>,
    pub kinesis_calls: Vec<proxy::Call>,
    pub dynamodb_calls: Vec<proxy::Call>,
    pub usage: Vec<(String, f64, u64)>,
    pub victim: String,
    /// The victim's role when it was killed, from its `/status` (this worker's rows).
    pub victim_role: Option<String>,
    /// Seconds from the DynamoDB proxy's start to the consumers' start (`Call::at` − this
    /// is the time since the consumers started).
    pub proxy_offset: f64,
    /// Seconds from each first consumer's process start to its first `/ready` 200 (this
    /// worker's rows; `None`: not ready within [`READY_DEADLINE`]).
    pub ready_s: Vec<(String, Option<f64>)>,
    pub seconds: u64,
}

/// A consumer's role as its `/status` says (this worker's rows; `None` for the peers).
fn role(c: &Consumer) -> Option<String> {
    let (_, body) = crate::util::http_get(c.http?, "/status")?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["role"].as_str().map(str::to_owned)
}

fn worker_bin() -> PathBuf {
    crate::util::built_binary("release", "kds-worker")
}

fn swarm_bin() -> PathBuf {
    crate::util::built_binary("release", "kds-swarm")
}

/// `kds-worker` admin commands straight to the emulators (set-up and production are not
/// counted).
fn admin(emu: &emulators::Emulators, args: &[&str]) -> anyhow::Result<()> {
    admin_as(emu, APP, STREAM, args)
}

/// [`admin`] for another application and stream.
fn admin_as(
    emu: &emulators::Emulators,
    app: &str,
    stream: &str,
    args: &[&str],
) -> anyhow::Result<()> {
    let out = duct::cmd(worker_bin(), args)
        .full_env(
            std::env::vars()
                .filter(|(k, _)| !k.starts_with("KDS_") && !k.starts_with("AWS_"))
                .chain(emu.aws_env().into_iter().map(|(k, v)| (k.to_owned(), v)))
                .chain([
                    ("KDS_APP_NAME".to_owned(), app.to_owned()),
                    ("KDS_STREAM_NAME".to_owned(), stream.to_owned()),
                ]),
        )
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()?;
    if !out.status.success() {
        bail!(
            "kds-worker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// CPU seconds (user + system) and peak RSS (KiB) of a live process.
pub(crate) fn usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit(')').next()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are the 12th and 13th after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())?;
    // USER_HZ is 100 on Linux.
    Some((ticks / 100.0, hwm))
}

fn read_logs(logs: &[PathBuf]) -> String {
    logs.iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

fn micros_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// Runs the script for one system.
fn run_system(
    sh: &Shell,
    system: System,
    phases: Phases,
    kill: Victim,
    dir: &Path,
) -> anyhow::Result<RunData> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    eprintln!("==> {}: fresh emulators", system.name());
    let emu = emulators::start(sh, &dir.join("logs"))?;
    let kinesis = proxy::RecordingProxy::start(emu.kinesis)?;
    let dynamodb = proxy::RecordingProxy::start(emu.dynamodb)?;
    admin(&emu, &["init", "--shards", &SHARDS.to_string()])?;
    system.prepare(&emu, APP, STREAM)?;
    let produced_log = dir.join("produced.log");
    let producer = KillOnDrop(
        Launch::new(
            worker_bin(),
            [
                "admin",
                "produce",
                "--each-shard",
                "--rate",
                "1",
                "--seconds",
                "0",
                "--out",
                &produced_log.display().to_string(),
            ],
        )
        .full_env(
            std::env::vars()
                .filter(|(k, _)| !k.starts_with("KDS_") && !k.starts_with("AWS_"))
                .chain(emu.aws_env().into_iter().map(|(k, v)| (k.to_owned(), v)))
                .collect(),
        )
        .env("KDS_APP_NAME", APP)
        .env("KDS_STREAM_NAME", STREAM)
        .log(dir.join("logs/producer.log"), false)
        .start()?,
    );

    let t0 = Instant::now();
    let t0_micros = micros_now();
    let proxy_offset = t0.duration_since(dynamodb.started).as_secs_f64();
    let at = || t0.elapsed().as_secs_f64();
    let mut marks = vec![Mark {
        name: "start".into(),
        at: 0.0,
    }];
    let mut consumers: Vec<Consumer> = Vec::new();
    let start = |name: &str| -> anyhow::Result<Consumer> {
        let record_log = dir.join(format!("records/{name}.log"));
        std::fs::create_dir_all(record_log.parent().expect("has a parent"))?;
        let mut launch = system.launch(
            name,
            &record_log,
            &kinesis.url(),
            &dynamodb.url(),
            APP,
            STREAM,
        );
        let http = if system.serves_ready() {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            launch = launch.env("KDS_HTTP_ADDR", addr.to_string());
            Some(addr)
        } else {
            None
        };
        let started = Instant::now();
        let handle = launch
            .log(dir.join(format!("logs/{name}.log")), false)
            .start()?;
        Ok(Consumer {
            name: name.to_owned(),
            handle,
            record_log,
            http,
            started,
            usage: None,
        })
    };
    for i in 0..3 {
        consumers.push(start(&format!("c{i}"))?);
    }
    let ready_s = time_to_ready(&consumers);

    // 1. Until every shard has delivered a record (or the deadline).
    let deadline = Duration::from_secs(phases.start_deadline_s);
    loop {
        let logs: Vec<PathBuf> = consumers.iter().map(|c| c.record_log.clone()).collect();
        let d = analysis::parse(&read_logs(&logs), t0_micros);
        let now = t0.elapsed();
        let covered = analysis::coverage(&d, now.as_secs(), COVERAGE_WINDOW_S)
            .last()
            .copied()
            .unwrap_or(0);
        eprint!("\r  {}: {covered}/{SHARDS} shards read", secs(now));
        if covered >= SHARDS {
            eprintln!();
            break;
        }
        if now > deadline {
            eprintln!("\n  not every shard read within {}", secs(deadline));
            break;
        }
        for c in &mut consumers {
            if c.handle.try_wait()?.is_some() {
                bail!(
                    "{} {} exited; its log ends:\n{}",
                    system.name(),
                    c.name,
                    emulators::tail(&dir.join(format!("logs/{}.log", c.name)), 15)
                );
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(5));

    // 2. A fourth joins.
    marks.push(Mark {
        name: "join".into(),
        at: at(),
    });
    eprintln!("  {}: a 4th consumer joins", secs(t0.elapsed()));
    consumers.push(start("c3")?);
    std::thread::sleep(Duration::from_secs(phases.join_s));

    // 3. One is killed.
    // Every role asked before the kill's instant is marked (a `/status` may take a moment).
    let roles: Vec<(String, Option<String>)> = consumers
        .iter()
        .map(|c| (c.name.clone(), role(c)))
        .collect();
    let role_of = |name: &str| {
        roles
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, r)| r.clone())
    };
    let victim = match kill {
        Victim::C1 => None,
        Victim::Coordinator => roles
            .iter()
            .find(|(_, r)| r.as_deref() == Some("coordinator"))
            .map(|(n, _)| n.clone()),
        Victim::Follower => roles
            .iter()
            .find(|(_, r)| r.as_deref() == Some("follower"))
            .map(|(n, _)| n.clone()),
    }
    .unwrap_or_else(|| "c1".to_owned());
    let victim_role = role_of(&victim);
    marks.push(Mark {
        name: "kill".into(),
        at: at(),
    });
    eprintln!(
        "  {}: SIGKILL {victim}{}",
        secs(t0.elapsed()),
        victim_role
            .as_deref()
            .map_or(String::new(), |r| format!(" (the {r})"))
    );
    if let Some(c) = consumers.iter_mut().find(|c| c.name == victim) {
        let pid = c.handle.pids()[0];
        c.usage = usage(pid);
        process::signal(pid, Signal::Kill);
    }
    std::thread::sleep(Duration::from_secs(phases.kill_s).max(system.min_kill_phase()));

    // 4. Reshard.
    marks.push(Mark {
        name: "reshard".into(),
        at: at(),
    });
    eprintln!("  {}: reshard {SHARDS} -> {RESHARD_TO}", secs(t0.elapsed()));
    admin(&emu, &["admin", "reshard", &RESHARD_TO.to_string()])?;
    marks.push(Mark {
        name: "reshard_done".into(),
        at: at(),
    });
    std::thread::sleep(Duration::from_secs(phases.reshard_s));

    // 5. Idle.
    marks.push(Mark {
        name: "idle".into(),
        at: at(),
    });
    eprintln!("  {}: production stops", secs(t0.elapsed()));
    process::stop(producer.0.pids()[0], Duration::from_secs(5));
    // The idle window starts once the consumers have caught up: no record delivered for
    // QUIET_FOR (or, for a system that never catches up, after IDLE_CATCH_UP at most).
    let logs: Vec<PathBuf> = consumers.iter().map(|c| c.record_log.clone()).collect();
    let delivered = || -> u64 {
        logs.iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    let catch_up_began = Instant::now();
    let (mut last, mut last_change) = (delivered(), Instant::now());
    while last_change.elapsed() < QUIET_FOR && catch_up_began.elapsed() < IDLE_CATCH_UP {
        std::thread::sleep(Duration::from_millis(250));
        let now = delivered();
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    marks.push(Mark {
        name: "caught_up".into(),
        at: at(),
    });
    eprintln!("  {}: consumers caught up; idle window", secs(t0.elapsed()));
    std::thread::sleep(Duration::from_secs(phases.idle_s));
    marks.push(Mark {
        name: "end".into(),
        at: at(),
    });
    let seconds = t0.elapsed().as_secs();
    let kinesis_calls = kinesis.calls();
    let dynamodb_calls = dynamodb.calls();
    for c in &mut consumers {
        if c.usage.is_none() {
            c.usage = usage(c.handle.pids()[0]);
        }
        let _ = c.handle.kill();
    }
    emu.stop();
    let produced: Vec<String> = std::fs::read_to_string(&produced_log)
        .with_context(|| format!("reading {}", produced_log.display()))?
        .lines()
        .map(str::to_owned)
        .collect();
    Ok(RunData {
        system,
        t0_micros,
        marks,
        record_logs: consumers.iter().map(|c| c.record_log.clone()).collect(),
        produced,
        kinesis_calls,
        dynamodb_calls,
        usage: consumers
            .iter()
            .map(|c| {
                let (cpu, rss) = c.usage.unwrap_or((0.0, 0));
                (c.name.clone(), cpu, rss)
            })
            .collect(),
        victim,
        victim_role,
        proxy_offset,
        ready_s,
        seconds,
    })
}

/// The longest the bench waits for a consumer's first `/ready` 200.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Polls each consumer's `/ready` every 20 ms until it answers 200: seconds since its
/// process started (`None` past [`READY_DEADLINE`]). Empty for systems without `/ready`.
fn time_to_ready(consumers: &[Consumer]) -> Vec<(String, Option<f64>)> {
    let mut ready: Vec<(String, Option<f64>)> = Vec::new();
    let waiting: Vec<&Consumer> = consumers.iter().filter(|c| c.http.is_some()).collect();
    let began = Instant::now();
    while ready.len() < waiting.len() && began.elapsed() < READY_DEADLINE {
        for c in &waiting {
            if ready.iter().any(|(n, _)| *n == c.name) {
                continue;
            }
            let addr = c.http.expect("filtered above");
            if crate::util::http_status(addr, "/ready") == Some(200) {
                ready.push((c.name.clone(), Some(c.started.elapsed().as_secs_f64())));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in waiting {
        if !ready.iter().any(|(n, _)| *n == c.name) {
            ready.push((c.name.clone(), None));
        }
    }
    ready.sort_by(|a, b| a.0.cmp(&b.0));
    ready
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let peers = args.peers.clone().unwrap_or_else(|| {
        System::ALL
            .into_iter()
            .filter(|s| !args.quick || s.in_quick())
            .map(|s| s.name().to_owned())
            .collect()
    });
    let systems: Vec<System> = peers
        .iter()
        .map(|p| System::parse(p))
        .collect::<anyhow::Result<_>>()?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        project_root().join(&args.out)
    };
    if args.report_only {
        return report::rewrite_markdown(&out);
    }
    // Bad names fail before the build.
    let pairs = match &args.pairs {
        Some(names) => swarm::pick(names)?,
        None => swarm::grid(args.quick),
    };
    let phases = Phases::new(args.quick);
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    // Both binaries of the package: kds-worker and kds-swarm.
    cmd!(sh, "cargo build --release --quiet -p kds-worker --bins").run()?;
    if args.swarm {
        let began = Instant::now();
        let results = swarm::run(&sh, &pairs, args.quick, &lab_dir().join("bench/swarm"))?;
        report::write(
            &out,
            report::Update::Swarm {
                results,
                took: began.elapsed(),
            },
        )?;
        eprintln!(
            "swarm done in {}: {}",
            secs(began.elapsed()),
            out.join("REPORT.md").display()
        );
        return Ok(());
    }
    for s in &systems {
        s.install(&sh)?;
    }
    let began = Instant::now();
    for s in systems {
        let dir = lab_dir().join("bench").join(s.name());
        let data = run_system(&sh, s, phases, args.kill, &dir)
            .with_context(|| format!("benchmarking {}", s.name()))?;
        let result = report::figures(&data, phases);
        eprintln!("  {}", result.summary());
        // Written after each system: a later one that fails keeps the rows already measured.
        report::write(
            &out,
            report::Update::Systems {
                results: vec![result],
                phases,
                took: began.elapsed(),
            },
        )?;
    }
    eprintln!(
        "bench done in {}: {} and {}",
        secs(began.elapsed()),
        out.join("results.json").display(),
        out.join("REPORT.md").display()
    );
    Ok(())
}
