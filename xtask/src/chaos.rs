//! `cargo xtask chaos [--minutes N] [--seed S]`: random faults against a local lab under load,
//! judged from the records the workers processed.
//!
//! Its own lab (`.lab/chaos`): 30 shards, 3 workers, a producer putting records all along.
//! Every few seconds one seeded-random action: `kill -9` of a worker (restarted after a
//! few seconds), a graceful restart (SIGTERM), a freeze longer than `failover_timeout`
//! (SIGSTOP … SIGCONT: a stalled process that wakes after its leases were taken, as after a
//! cut network), a reshard 30 ↔ 60, or a scale 3 ↔ 4. Then the producer stops, every
//! record must be processed, and `kds-worker admin audit` counts overlaps (two workers
//! reading one shard at once), lost records and duplicates; the lease table's checkpoints,
//! sampled after every action, must never move back. Overlaps, lost records and checkpoint
//! regressions fail the run; duplicates are allowed only after a kill or a freeze, and counted. The record and
//! process logs stay in `.lab/chaos-evidence/` after the lab is cleaned up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use serde::Serialize;

use crate::lab::Audit;
use crate::lab::{Driver, wait_until};
use crate::local::Local;
use crate::runner::Runner;
use crate::util::{project_root, secs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long to inject faults (then the lab drains and is audited).
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seed of the action sequence (printed; the same seed replays the same actions).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Records per second the producer puts.
    #[arg(long, default_value_t = 40)]
    pub rate: u64,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
}

/// The local lab's `failover_timeout` (see `local::config_toml`): a freeze lasts longer.
const LAB_FAILOVER: Duration = Duration::from_secs(10);
/// Every produced record is processed within this after the producer stops: a failover, the
/// longest consumer backoff, a lease round or two, and room for a loaded 2-core machine.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// xorshift64*: a seeded sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Kill,
    Restart,
    Freeze,
    Reshard,
    Scale,
}

impl Action {
    /// May make a successor re-read records after the victim's last checkpoint.
    fn may_repeat(self) -> bool {
        matches!(self, Action::Kill | Action::Freeze)
    }
}

#[derive(Debug, Serialize)]
struct Outcome {
    seed: u64,
    minutes: f64,
    actions: BTreeMap<Action, u32>,
    log: Vec<String>,
    produced: usize,
    processed: usize,
    duplicates: usize,
    overlaps: usize,
    lost: usize,
    /// Times a lease's checkpoint was seen lower than at an earlier sample.
    checkpoint_regressions: usize,
    /// Checkpoint samples taken (one after every action, one at the end).
    checkpoint_samples: usize,
    drained_seconds: f64,
    by_worker: BTreeMap<String, usize>,
    /// The first few overlapping reads, as the audit reports them.
    overlap_examples: Vec<serde_json::Value>,
}

/// The workers' record logs and process logs, kept in `.lab/chaos-evidence/` for a look after
/// the lab is gone.
fn keep_evidence() {
    let lab = crate::util::lab_dir();
    let evidence = project_root().join(".lab").join("chaos-evidence");
    let _ = std::fs::remove_dir_all(&evidence);
    for dir in ["records", "logs"] {
        let (from, to) = (lab.join(dir), evidence.join(dir));
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        for entry in std::fs::read_dir(&from).into_iter().flatten().flatten() {
            let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.minutes > 0.0 && args.minutes <= 600.0,
        "--minutes must be above 0 and at most 600 (got {})",
        args.minutes
    );
    ensure!(
        (1..=1000).contains(&args.rate),
        "--rate must be 1..=1000 records/s (got {})",
        args.rate
    );
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    // Its own lab beside a developer's. Set before any thread starts.
    // SAFETY: single-threaded here; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("XTASK_LAB_DIR", project_root().join(".lab").join("chaos")) };
    eprintln!(
        "chaos: seed {seed}, {} minutes, {} records/s (replay: cargo xtask chaos --minutes {} --seed {seed})",
        args.minutes, args.rate, args.minutes
    );
    let mut lab = Local::open(Runner::new(false)?)?;
    // A leftover from an interrupted run goes first.
    lab.cleanup(false)?;
    let mut lab = Local::open(Runner::new(false)?)?;
    let result = inject(&mut lab, &args, seed);
    keep_evidence();
    let cleanup = lab.cleanup(false);
    let outcome = result?;
    cleanup?;
    print(&outcome);
    for o in &outcome.overlap_examples {
        eprintln!("overlap: {o}");
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&outcome)?)?;
    }
    let repeats_allowed = outcome.actions.keys().any(|a| a.may_repeat());
    ensure!(
        outcome.overlaps == 0 && outcome.lost == 0 && outcome.checkpoint_regressions == 0,
        "chaos found {} overlapping reads, {} lost records and {} checkpoint regressions (seed {seed})",
        outcome.overlaps,
        outcome.lost,
        outcome.checkpoint_regressions
    );
    ensure!(
        outcome.duplicates == 0 || repeats_allowed,
        "{} records processed twice without a kill or a freeze (seed {seed})",
        outcome.duplicates
    );
    Ok(())
}

fn inject(lab: &mut Local, args: &Args, seed: u64) -> anyhow::Result<Outcome> {
    let mut rng = Rng(seed.max(1));
    lab.setup(30, 3)?;
    lab.start_producer(args.rate)?;
    let began = Instant::now();
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let mut actions: BTreeMap<Action, u32> = BTreeMap::new();
    let mut log = Vec::new();
    let mut checkpoints = Checkpoints::default();
    let (mut shards, mut workers) = (30u64, 3u64);
    while began.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(rng.range(2, 6)));
        let action = *rng.pick(&[
            Action::Kill,
            Action::Kill,
            Action::Restart,
            Action::Freeze,
            Action::Reshard,
            Action::Scale,
        ]);
        let names = lab.worker_names();
        let victim = rng.pick(&names).clone();
        let at = began.elapsed().as_secs_f64();
        let line = match action {
            Action::Kill => {
                let down = Duration::from_secs(rng.range(1, 5));
                lab.kill_worker(&victim)?;
                std::thread::sleep(down);
                lab.restart_worker(&victim)?;
                format!("kill -9 {victim}, restarted after {}", secs(down))
            }
            Action::Restart => {
                lab.stop_worker(&victim)?;
                lab.restart_worker(&victim)?;
                format!("SIGTERM {victim}, restarted")
            }
            Action::Freeze => {
                let pause = LAB_FAILOVER + Duration::from_secs(rng.range(1, 4));
                lab.pause_worker(&victim, pause)?;
                format!("froze {victim} for {}", secs(pause))
            }
            Action::Reshard => {
                let to = if shards == 30 { 60 } else { 30 };
                lab.set_shards(to)?;
                shards = to;
                format!("resharded to {to}")
            }
            Action::Scale => {
                let to = if workers == 3 { 4 } else { 3 };
                lab.set_workers(to)?;
                workers = to;
                format!("scaled to {to} workers")
            }
        };
        *actions.entry(action).or_default() += 1;
        let regressed = checkpoints.sample(lab)?;
        let line = if regressed.is_empty() {
            format!("{at:>6.1}s {line}")
        } else {
            format!(
                "{at:>6.1}s {line}; CHECKPOINT MOVED BACK: {}",
                regressed.join(", ")
            )
        };
        eprintln!("  {line}");
        log.push(line);
    }
    lab.stop_producer();
    let (audit, drained): (Audit, Duration) = wait_until(
        "every produced record to be processed",
        DRAIN_DEADLINE,
        || {
            let audit = lab.audit_records(None)?;
            Ok(audit.lost.is_empty().then_some(audit))
        },
        || match lab.audit_records(None) {
            Ok(a) => format!(
                "{} of {} produced records unprocessed, e.g. {:?}",
                a.lost.len(),
                a.produced,
                a.lost.iter().take(3).collect::<Vec<_>>()
            ),
            Err(e) => format!("audit failed: {e:#}"),
        },
    )?;
    let regressed = checkpoints.sample(lab)?;
    if !regressed.is_empty() {
        log.push(format!(
            "at the end: CHECKPOINT MOVED BACK: {}",
            regressed.join(", ")
        ));
    }
    Ok(Outcome {
        seed,
        minutes: args.minutes,
        actions,
        log,
        produced: audit.produced,
        processed: audit.processed,
        duplicates: audit.duplicates,
        overlaps: audit.overlaps.len(),
        lost: audit.lost.len(),
        checkpoint_regressions: checkpoints.regressions,
        checkpoint_samples: checkpoints.samples,
        drained_seconds: drained.as_secs_f64(),
        by_worker: audit.by_worker,
        overlap_examples: audit.overlaps.iter().take(5).cloned().collect(),
    })
}

/// The highest checkpoint seen per lease, and how often one was seen lower later.
#[derive(Default)]
struct Checkpoints {
    highest: BTreeMap<String, String>,
    regressions: usize,
    samples: usize,
}

impl Checkpoints {
    /// Reads every checkpoint; returns the leases whose checkpoint moved back since.
    fn sample(&mut self, lab: &Local) -> anyhow::Result<Vec<String>> {
        let now = crate::lab::retrying(
            "reading the checkpoints",
            crate::lab::STATUS_READ_DEADLINE,
            || lab.checkpoints(),
        )?;
        self.samples += 1;
        let mut regressed = Vec::new();
        for (shard, cp) in now {
            match self.highest.get(&shard) {
                Some(prev) if position_cmp(&cp, prev) == Some(std::cmp::Ordering::Less) => {
                    regressed.push(format!("{shard} {prev} -> {cp}"));
                    self.regressions += 1;
                }
                Some(prev) if position_cmp(&cp, prev) == Some(std::cmp::Ordering::Equal) => {}
                // New, further on, or not comparable (a pinned LATEST): the one to beat.
                _ => {
                    self.highest.insert(shard, cp);
                }
            }
        }
        Ok(regressed)
    }
}

/// Orders two checkpoints of one lease: `TRIM_HORIZON` < sequence numbers (by value) <
/// `SHARD_END`; `None` for what does not compare (`LATEST`, a pinned time).
fn position_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    fn rank(cp: &str) -> Option<(u8, &str)> {
        match cp {
            "TRIM_HORIZON" => Some((0, "")),
            "SHARD_END" => Some((2, "")),
            seq if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => {
                Some((1, seq.trim_start_matches('0')))
            }
            _ => None,
        }
    }
    let ((ra, sa), (rb, sb)) = (rank(a)?, rank(b)?);
    Some(
        ra.cmp(&rb)
            .then(sa.len().cmp(&sb.len()))
            .then_with(|| sa.cmp(sb)),
    )
}

fn print(o: &Outcome) {
    println!(
        "chaos, seed {}: {} actions in {} min ({})",
        o.seed,
        o.actions.values().sum::<u32>(),
        o.minutes,
        o.actions
            .iter()
            .map(|(a, n)| format!(
                "{n} {}",
                serde_json::to_value(a).unwrap().as_str().unwrap_or("?")
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "records: {} produced, {} processed, {} duplicated, {} lost; overlapping reads: {}; drained in {:.1}s",
        o.produced, o.processed, o.duplicates, o.lost, o.overlaps, o.drained_seconds
    );
    println!(
        "checkpoints: {} samples, {} moved back",
        o.checkpoint_samples, o.checkpoint_regressions
    );
    println!("by worker: {:?}", o.by_worker);
}

#[cfg(test)]
mod tests {
    use super::{Rng, position_cmp};
    use std::cmp::Ordering::{Greater, Less};

    #[test]
    fn checkpoints_order_like_positions_in_a_shard() {
        assert_eq!(position_cmp("TRIM_HORIZON", "4960"), Some(Less));
        assert_eq!(
            position_cmp("4960", "10"),
            Some(Greater),
            "by value, not text"
        );
        assert_eq!(position_cmp("SHARD_END", "99999"), Some(Greater));
        assert_eq!(position_cmp("AT_TIMESTAMP:5", "1"), None);
    }

    #[test]
    fn a_seed_replays_the_same_sequence() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        let xs: Vec<u64> = (0..5).map(|_| a.range(2, 6)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.range(2, 6)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (2..=6).contains(x)));
        assert_ne!(Rng(43).next(), Rng(42).next());
    }
}
