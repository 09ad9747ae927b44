//! The bench's figures for one system ([`figures`]) and the files they go to
//! ([`write`]): `results.json` (every figure, versions, the machine), `REPORT.md` (a table
//! per scenario, each figure also as a ratio to this worker, and the swarm's scale table) and
//! three plots drawn with plotters: `coverage.svg` (shards read over time for each system,
//! with the join, kill and reshard marked), `dynamodb.svg` (DynamoDB capacity units per second
//! over time) and `scale.svg` (the swarm's fleet units per second against shards, beside the
//! KCL model).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::analysis::{self, Exactness};
use super::proxy::{self, Tally};
use super::swarm::SwarmResult;
use super::{COVERAGE_WINDOW_S, Phases, RESHARD_TO, RunData, SHARDS};
use crate::util::secs;

/// Every figure for one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemResult {
    pub system: String,
    pub version: String,
    pub seconds: u64,
    pub marks: Vec<super::Mark>,
    /// Seconds from start until every shard had delivered a record.
    pub time_to_full_coverage_s: Option<u64>,
    /// Max − min shards read per live worker at the end of the join phase.
    pub spread_after_join: Option<u64>,
    pub shards_per_worker_after_join: BTreeMap<String, u64>,
    /// Seconds after the join until the joiner read its first record.
    pub joiner_first_read_s: Option<f64>,
    pub unread_shard_seconds_join: u64,
    pub unread_shard_seconds_kill: u64,
    pub unread_shard_seconds_reshard: u64,
    /// Seconds after the SIGKILL until every shard the victim read was read by another.
    pub failover_s: Option<f64>,
    /// The consumer killed, and its role then (`coordinator` or `follower`; this worker's
    /// rows).
    #[serde(default)]
    pub victim: String,
    #[serde(default)]
    pub victim_role: Option<String>,
    /// The phases this row ran with (a row kept from an earlier run may differ from the
    /// last run's).
    #[serde(default)]
    pub phases: Option<Phases>,
    /// Seconds after the reshard finished until all 60 shards were read.
    pub reshard_full_coverage_s: Option<u64>,
    pub exactness: Exactness,
    pub lag_p50_s: Option<f64>,
    pub lag_p95_s: Option<f64>,
    /// DynamoDB per second over the whole run, per category.
    pub dynamodb: BTreeMap<String, CategoryRate>,
    /// DynamoDB per second in the idle phase (steady state, no records), per category.
    pub dynamodb_idle: BTreeMap<String, CategoryRate>,
    pub conditional_writes: u64,
    pub conditional_write_failure_rate: Option<f64>,
    /// Kinesis control-plane calls (everything but GetRecords/GetShardIterator) per minute.
    pub kinesis_control_per_min: f64,
    pub kinesis_control_by_operation: BTreeMap<String, u64>,
    /// Per consumer process: CPU seconds and peak RSS (MiB).
    pub processes: Vec<ProcessUsage>,
    /// Seconds from process start to the first `/ready` 200, the slowest of the three
    /// consumers started together (this worker's `kds-worker run` rows only).
    #[serde(default)]
    pub ready_s: Option<f64>,
    /// Coverage (shards read in the last 5 s) at every second.
    pub coverage: Vec<u64>,
    /// DynamoDB capacity units (read + write) in every second.
    pub dynamodb_units: Vec<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CategoryRate {
    pub calls_per_s: f64,
    pub read_units_per_s: f64,
    pub write_units_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessUsage {
    pub name: String,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
}

fn rates(
    calls: &[&proxy::Call],
    seconds: f64,
    category: impl Fn(&proxy::Call) -> &'static str,
) -> BTreeMap<String, CategoryRate> {
    let owned: Vec<proxy::Call> = calls.iter().map(|c| (*c).clone()).collect();
    let mut by_category: BTreeMap<String, Tally> = BTreeMap::new();
    for ((cat, _op), t) in proxy::tally(&owned, category) {
        let e = by_category.entry(cat).or_default();
        e.calls += t.calls;
        e.read_units += t.read_units;
        e.write_units += t.write_units;
    }
    let total = by_category.values().fold(Tally::default(), |mut a, t| {
        a.calls += t.calls;
        a.read_units += t.read_units;
        a.write_units += t.write_units;
        a
    });
    by_category.insert("all".into(), total);
    by_category
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                CategoryRate {
                    calls_per_s: t.calls as f64 / seconds.max(1.0),
                    read_units_per_s: t.read_units / seconds.max(1.0),
                    write_units_per_s: t.write_units / seconds.max(1.0),
                },
            )
        })
        .collect()
}

fn mark(data: &RunData, name: &str) -> f64 {
    data.marks
        .iter()
        .find(|m| m.name == name)
        .map_or(0.0, |m| m.at)
}

/// Computes every figure of one run.
pub fn figures(data: &RunData, phases: Phases) -> SystemResult {
    let text: String = data
        .record_logs
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let d = analysis::parse(&text, data.t0_micros);
    let end = data.seconds;
    let coverage = analysis::coverage(&d, end, COVERAGE_WINDOW_S);
    let (join, kill, reshard, reshard_done, idle) = (
        mark(data, "join"),
        mark(data, "kill"),
        mark(data, "reshard"),
        mark(data, "reshard_done"),
        mark(data, "idle"),
    );
    let s = |x: f64| x.ceil() as u64;
    let live_after_join: Vec<String> = ["c0", "c1", "c2", "c3"].map(String::from).to_vec();
    let per_worker = analysis::shards_per_worker(&d, kill, COVERAGE_WINDOW_S, &live_after_join);
    let spread = per_worker
        .values()
        .max()
        .zip(per_worker.values().min())
        .map(|(a, b)| a - b);
    let joiner_first_read_s = d
        .iter()
        .filter(|x| x.worker == "c3")
        .map(|x| x.at - join)
        .min_by(f64::total_cmp);
    let exactness =
        analysis::exactness(&d, &data.produced, Some((data.victim.as_str(), kill)), 3.0);
    // After the reshard only the children count: a parent's last records arrive for a few
    // seconds and would stand in for a child not yet read.
    let children = analysis::coverage(
        &analysis::shards_first_read_since(&d, reshard),
        end,
        COVERAGE_WINDOW_S,
    );
    let lag = analysis::lag(&d, 0.0, idle);
    let app = "bench-app";
    let system = data.system;
    let all: Vec<&proxy::Call> = data.dynamodb_calls.iter().collect();
    // The idle window: from the moment the consumers had caught up (older results: 5 s after
    // production stopped) to the end.
    let idle_from = data
        .marks
        .iter()
        .find(|m| m.name == "caught_up")
        .map_or(idle + 5.0, |m| m.at);
    let idle_calls: Vec<&proxy::Call> = data
        .dynamodb_calls
        .iter()
        .filter(|c| c.at - data.proxy_offset >= idle_from)
        .collect();
    let conditional = data.dynamodb_calls.iter().filter(|c| c.conditional).count() as u64;
    let failed = data
        .dynamodb_calls
        .iter()
        .filter(|c| c.conditional && c.condition_failed)
        .count() as u64;
    let mut control: BTreeMap<String, u64> = BTreeMap::new();
    for c in data.kinesis_calls.iter().filter(|c| {
        !matches!(
            c.operation.as_str(),
            "GetRecords" | "GetShardIterator" | "PutRecords" | "PutRecord"
        )
    }) {
        *control.entry(c.operation.clone()).or_default() += 1;
    }
    SystemResult {
        system: system.name().to_owned(),
        version: system.version(),
        seconds: data.seconds,
        marks: data.marks.clone(),
        time_to_full_coverage_s: analysis::time_to_cover(&coverage, SHARDS, 0),
        spread_after_join: spread,
        shards_per_worker_after_join: per_worker,
        joiner_first_read_s,
        unread_shard_seconds_join: analysis::unread_shard_seconds(
            &coverage,
            SHARDS,
            s(join),
            s(kill),
        ),
        unread_shard_seconds_kill: analysis::unread_shard_seconds(
            &coverage,
            SHARDS,
            s(kill),
            s(reshard),
        ),
        unread_shard_seconds_reshard: analysis::unread_shard_seconds(
            &children,
            RESHARD_TO,
            s(reshard_done),
            s(idle),
        ),
        failover_s: analysis::failover(&d, &data.victim, kill, COVERAGE_WINDOW_S),
        victim: data.victim.clone(),
        victim_role: data.victim_role.clone(),
        phases: Some(phases),
        reshard_full_coverage_s: analysis::time_to_cover(&children, RESHARD_TO, s(reshard_done)),
        exactness,
        lag_p50_s: lag.map(|l| l.0),
        lag_p95_s: lag.map(|l| l.1),
        dynamodb: rates(&all, data.seconds as f64, |c| system.category(c, app)),
        dynamodb_idle: rates(&idle_calls, (mark(data, "end") - idle_from).max(1.0), |c| {
            system.category(c, app)
        }),
        conditional_writes: conditional,
        conditional_write_failure_rate: (conditional > 0)
            .then(|| failed as f64 / conditional as f64),
        kinesis_control_per_min: control.values().sum::<u64>() as f64 * 60.0
            / (data.seconds as f64).max(1.0),
        kinesis_control_by_operation: control,
        processes: data
            .usage
            .iter()
            .map(|(n, cpu, rss)| ProcessUsage {
                name: n.clone(),
                cpu_s: *cpu,
                peak_rss_mib: *rss as f64 / 1024.0,
            })
            .collect(),
        // The slowest of the three; unknown if any was not ready in time.
        ready_s: data
            .ready_s
            .iter()
            .map(|(_, s)| *s)
            .collect::<Option<Vec<f64>>>()
            .and_then(|v| v.into_iter().max_by(f64::total_cmp)),
        coverage,
        dynamodb_units: units_per_second(&data.dynamodb_calls, data.proxy_offset, end),
    }
}

/// Capacity units (read + write) of the calls in each second `0..=end` since the consumers
/// started.
fn units_per_second(calls: &[proxy::Call], offset: f64, end: u64) -> Vec<f64> {
    let mut out = vec![0.0; end as usize + 1];
    for c in calls {
        let t = c.at - offset;
        if t >= 0.0 && (t as usize) < out.len() {
            let mut one = Tally::default();
            one.add(c);
            out[t as usize] += one.read_units + one.write_units;
        }
    }
    out
}

impl SystemResult {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "{}: full coverage {}, failover {}, {} duplicates ({} without a failure), {} concurrent, {} lost of {}, DynamoDB {:.1} calls/s",
            self.system,
            opt_s(self.time_to_full_coverage_s.map(|x| x as f64)),
            opt_s(self.failover_s),
            self.exactness.duplicates,
            self.exactness.duplicates_without_failure,
            self.exactness.concurrent_deliveries,
            self.exactness.lost,
            self.exactness.produced,
            self.dynamodb.get("all").map_or(0.0, |r| r.calls_per_s)
        )
    }
}

fn opt_s(x: Option<f64>) -> String {
    x.map_or("never".to_owned(), |v| format!("{v:.1} s"))
}

fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!(" ({:.2}×)", x / b),
        _ => String::new(),
    }
}

/// The machine, for results.json.
fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    serde_json::json!({ "cpus": cpus, "memory_mib": mem / 1024, "os": std::env::consts::OS })
}

/// Everything results.json holds. `cargo xtask bench` replaces the rows of the systems it
/// ran, `--swarm` the fleets it ran; each keeps the rest of an earlier run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Results {
    pub machine: serde_json::Value,
    pub emulators: String,
    pub phases: Option<Phases>,
    pub systems_took_s: Option<u64>,
    pub systems: Vec<SystemResult>,
    pub swarm_took_s: Option<u64>,
    pub swarm: Vec<SwarmResult>,
}

/// What one run adds to results.json.
pub enum Update {
    Systems {
        results: Vec<SystemResult>,
        phases: Phases,
        took: Duration,
    },
    Swarm {
        results: Vec<SwarmResult>,
        took: Duration,
    },
}

/// Writes REPORT.md again from `out/results.json` (after a change to the report's text).
pub fn rewrite_markdown(out: &Path) -> anyhow::Result<()> {
    let path = out.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}: run `cargo xtask bench` first", path.display()))?;
    let all: Results =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    std::fs::write(out.join("REPORT.md"), markdown(&all))?;
    Ok(())
}

/// Merges `update` into `out/results.json` and writes REPORT.md and the plots from it.
pub fn write(out: &Path, update: Update) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let path = out.join("results.json");
    let mut all: Results = match std::fs::read_to_string(&path) {
        Err(_) => Results::default(),
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            // An older bench's file: say so rather than silently lose its other half.
            eprintln!(
                "{} is not this bench's format ({e}); writing it afresh",
                path.display()
            );
            Results::default()
        }),
    };
    all.machine = machine();
    all.emulators = crate::emulators::load_pins()
        .map(|p| {
            format!(
                "{}@{} and {}=={} (one request at a time)",
                p.kinesis.npm_package,
                p.kinesis.version,
                p.dynamodb.pip_package,
                p.dynamodb.version
            )
        })
        .unwrap_or_default();
    match update {
        Update::Systems {
            results,
            phases,
            took,
        } => {
            // Each run replaces the rows of the systems it ran and keeps the others.
            for r in results {
                match all.systems.iter_mut().find(|x| x.system == r.system) {
                    Some(row) => *row = r,
                    None => all.systems.push(r),
                }
            }
            // This worker first (the ratios are to it), then the order `--peers` lists.
            all.systems.sort_by_key(|r| {
                super::System::ALL
                    .iter()
                    .position(|s| s.name() == r.system)
                    .unwrap_or(usize::MAX)
            });
            all.phases = Some(phases);
            all.systems_took_s = Some(took.as_secs());
            plot_coverage(&out.join("coverage.svg"), &all.systems)?;
            plot_dynamodb(&out.join("dynamodb.svg"), &all.systems)?;
        }
        Update::Swarm { results, took } => {
            // Each run replaces the fleets it ran (`--pairs` runs some) and keeps the others.
            for r in results {
                let same = |x: &SwarmResult| {
                    (x.mode.as_str(), x.workers, x.shards) == (r.mode.as_str(), r.workers, r.shards)
                };
                match all.swarm.iter_mut().find(|x| same(x)) {
                    Some(row) => *row = r,
                    None => all.swarm.push(r),
                }
            }
            all.swarm.sort_by(|a, b| {
                (a.shards, a.workers, &a.mode).cmp(&(b.shards, b.workers, &b.mode))
            });
            all.swarm_took_s = Some(took.as_secs());
            plot_scale(&out.join("scale.svg"), &all.swarm)?;
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")?;
    std::fs::write(out.join("REPORT.md"), markdown(&all))?;
    Ok(())
}

/// REPORT.md: one table per scenario, each figure with its ratio to the first system.
pub fn markdown(all: &Results) -> String {
    let mut md = format!(
        "# Bench: this worker beside the peer libraries\n\n\
         Written by `cargo xtask bench` (and `--swarm`) from results.json, which also records \
         the machine ({} CPUs, {} MiB) and the emulators ({}).\n\n",
        all.machine["cpus"], all.machine["memory_mib"], all.emulators
    );
    if let Some(phases) = all.phases {
        md.push_str(&systems_markdown(
            &all.systems,
            phases,
            Duration::from_secs(all.systems_took_s.unwrap_or(0)),
        ));
    }
    if !all.swarm.is_empty() {
        md.push_str(&swarm_markdown(
            &all.swarm,
            Duration::from_secs(all.swarm_took_s.unwrap_or(0)),
        ));
    }
    md
}

fn systems_markdown(results: &[SystemResult], phases: Phases, took: Duration) -> String {
    let base = results.first();
    let mut md = format!(
        "## Systems side by side\n\n\
         The last run of `cargo xtask bench` took {}; each row comes from the latest run of its \
         system. Script: 30 shards with one record per shard \
         per second, 3 consumers start together; a 4th joins ({} s); one is killed with SIGKILL \
         ({} s, or for this worker at a peer's timings its failover timeout + 2 heartbeats + \
         10 s if longer); reshard 30 → 60 ({} s after it finishes); production stops ({} s idle). Each \
         system ran alone on fresh emulators, reaching them only through a recording proxy. A \
         shard counts as read when a record from it reached a consumer's callback in the last \
         {} s. Ratios are to the first row.\n\n",
        secs(took),
        phases.join_s,
        phases.kill_s,
        phases.reshard_s,
        phases.idle_s,
        COVERAGE_WINDOW_S
    );
    let other_phases: Vec<&str> = results
        .iter()
        .filter(|r| r.phases.is_some_and(|p| p != phases))
        .map(|r| r.system.as_str())
        .collect();
    if !other_phases.is_empty() {
        md.push_str(&format!(
            "Rows kept from an earlier run with other phases: {} (their figures and ratios \
             compare unlike runs).\n\n",
            other_phases.join(", ")
        ));
    }
    md.push_str("### Start, join, kill, reshard\n\n| system | every shard read after | joiner's first record | max − min shards per worker after join | unread shard-seconds: join / kill / reshard | failover after SIGKILL | 60 shards read after reshard |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        let b = base.expect("not empty");
        md.push_str(&format!(
            "| {} | {}{} | {}{} | {} | {} / {} / {} | {}{}{} | {} |\n",
            r.system,
            opt_s(r.time_to_full_coverage_s.map(|x| x as f64)),
            ratio(
                r.time_to_full_coverage_s.map(|x| x as f64),
                b.time_to_full_coverage_s.map(|x| x as f64)
            ),
            opt_s(r.joiner_first_read_s),
            ratio(r.joiner_first_read_s, b.joiner_first_read_s),
            r.spread_after_join.map_or("-".into(), |s| s.to_string()),
            r.unread_shard_seconds_join,
            r.unread_shard_seconds_kill,
            r.unread_shard_seconds_reshard,
            opt_s(r.failover_s),
            ratio(r.failover_s, b.failover_s),
            r.victim_role
                .as_deref()
                .map_or(String::new(), |role| match role {
                    "coordinator" => " (the coordinator was killed)".to_owned(),
                    other => format!(" (a {other} was killed)"),
                }),
            opt_s(r.reshard_full_coverage_s.map(|x| x as f64)),
        ));
    }
    md.push_str("\n### Exactly one reader, nothing lost\n\n\
        \"Read twice without a failure\": a second delivery the SIGKILL does not explain (it \
        is not a re-delivery, after the kill, of a record the killed consumer had delivered). \
        \"Delivered while another read the shard\": within another consumer's reading interval \
        on that shard (a run of its deliveries with no gap above 3 s). \"Not delivered by the \
        end\": put, but not delivered by the end of the idle phase (a shard never read, or \
        still behind).\n\n| system | produced | delivered | read twice (without a failure) | delivered while another read the shard | not delivered by the end | lag p50 / p95 |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        let e = &r.exactness;
        md.push_str(&format!(
            "| {} | {} | {} | {} ({}) | {} | {} | {} / {} |\n",
            r.system,
            e.produced,
            e.delivered,
            e.duplicates,
            e.duplicates_without_failure,
            e.concurrent_deliveries,
            e.lost,
            opt_s(r.lag_p50_s),
            opt_s(r.lag_p95_s)
        ));
    }
    md.push_str("\n### Cost\n\nDynamoDB per second over the run (capacity units approximated from request and answer sizes), and in the idle phase (from when no record had been delivered for 3 s after production stopped, or 60 s at most, to the end); Kinesis control-plane calls per minute.\n\n| system | DynamoDB calls/s | write units/s | read units/s | idle calls/s | by category (calls/s) | conditional writes failed | Kinesis control calls/min | CPU s per process | peak RSS MiB | start to `/ready` |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let b = base.expect("not empty");
        let all = r.dynamodb.get("all").cloned().unwrap_or_default();
        let b_all = b.dynamodb.get("all").cloned().unwrap_or_default();
        let idle = r.dynamodb_idle.get("all").cloned().unwrap_or_default();
        let cats: Vec<String> = r
            .dynamodb
            .iter()
            .filter(|(k, _)| k.as_str() != "all")
            .map(|(k, v)| format!("{k} {:.2}", v.calls_per_s))
            .collect();
        md.push_str(&format!(
            "| {} | {:.2}{} | {:.2} | {:.2} | {:.2} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.system,
            all.calls_per_s,
            ratio(Some(all.calls_per_s), Some(b_all.calls_per_s)),
            all.write_units_per_s,
            all.read_units_per_s,
            idle.calls_per_s,
            cats.join(", "),
            r.conditional_write_failure_rate
                .map_or("-".into(), |f| format!(
                    "{:.1}% of {}",
                    f * 100.0,
                    r.conditional_writes
                )),
            r.kinesis_control_per_min,
            r.processes
                .iter()
                .map(|p| format!("{:.1}", p.cpu_s))
                .collect::<Vec<_>>()
                .join(", "),
            r.processes
                .iter()
                .map(|p| format!("{:.0}", p.peak_rss_mib))
                .collect::<Vec<_>>()
                .join(", "),
            r.ready_s.map_or("-".into(), |s| format!("{s:.2} s")),
        ));
    }
    md.push_str("\n![Shards read over time](coverage.svg)\n\n![DynamoDB capacity units per second](dynamodb.svg)\n\n");
    md
}

fn swarm_markdown(results: &[SwarmResult], took: Duration) -> String {
    let mut md = format!(
        "## Scale: the control plane alone (`--swarm`)\n\n\
         Many workers in one process (`kds-swarm`), none reading, at the timings each row \
         names (heartbeat / failover; the 2,000-shard fleets at {} s / {} s, as moto's \
         DynamoDB, serving one request at a time, cannot serve 100 workers faster); the last \
         run took {}. Mode `naive`: every worker also polls \
         the stream itself and renews each of its leases every failover/3, as the original \
         scripts' design would (the coordinator's effect, measured). DynamoDB figures are the fleet's, per second, \
         over a steady-state window that starts three heartbeats after the fleet is leased and \
         balanced (the workers' settling reads after the last move are over by then). The KCL columns are a **model** from KCL 2.x's documented \
         defaults at the row's failover timeout (each lease renewed every failover/3, each \
         worker's lease taker scanning every lease every 2 × failover), not a measurement; \
         both scale with 1/failover, so the ratio holds at either timing.\n\n\
         | mode | workers × shards | timings | every shard leased, balanced | rebalance after one leaves | DynamoDB calls/s | write units/s | read units/s | per shard | KCL model write / read units/s | ratio to the model | conditional writes failed | Kinesis calls/min | CPU s/min per worker | RSS MiB per worker | measured |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        super::swarm::LARGE_TIMINGS.heartbeat_s,
        super::swarm::LARGE_TIMINGS.failover_s,
        secs(took)
    );
    for r in results {
        let ours = r.write_units_per_s + r.read_units_per_s;
        let model = r.kcl_model.write_units_per_s + r.kcl_model.read_units_per_s;
        md.push_str(&format!(
            "| {} | {} × {} | {} s / {} s | {} | {} | {:.1} | {:.2} | {:.2} | {:.4} | {:.1} / {:.1} | {:.3} | {} | {:.1} | {:.2} | {:.1} | {} |\n",
            r.mode,
            r.workers,
            r.shards,
            r.timings.heartbeat_s,
            r.timings.failover_s,
            opt_s(r.time_to_coverage_s),
            opt_s(r.rebalance_s),
            r.dynamodb_calls_per_s,
            r.write_units_per_s,
            r.read_units_per_s,
            ours / r.shards.max(1) as f64,
            r.kcl_model.write_units_per_s,
            r.kcl_model.read_units_per_s,
            ours / model.max(f64::MIN_POSITIVE),
            r.conditional_failure_rate
                .map_or("-".into(), |f| format!("{:.1}%", f * 100.0)),
            r.kinesis_calls_per_min,
            r.cpu_s_per_worker_per_min,
            r.rss_mib_per_worker,
            if r.measured.is_empty() { "2026-11-28" } else { r.measured.as_str() },
        ));
    }
    let split: Vec<&SwarmResult> = results
        .iter()
        .filter(|r| !r.units_by_operation.is_empty())
        .collect();
    if !split.is_empty() {
        md.push_str(
            "\nWhere the steady-state units go (units per second by table and operation):\n\n",
        );
        for r in split {
            let parts: Vec<String> = r
                .units_by_operation
                .iter()
                .map(|(what, u)| format!("{what} {u:.2}"))
                .collect();
            md.push_str(&format!(
                "- {} {} × {}: {}\n",
                r.mode,
                r.workers,
                r.shards,
                parts.join(", ")
            ));
        }
    }
    md.push_str("\n![Fleet DynamoDB units per second against shards](scale.svg)\n");
    md
}

/// Shards read (in the last 5 s) at every second, one line per system, with the script's
/// marks (the first system's: every run follows the same script).
fn plot_coverage(path: &Path, results: &[SystemResult]) -> anyhow::Result<()> {
    over_time(
        path,
        "Shards read in the last 5 s",
        "shards",
        RESHARD_TO as f64 + 5.0,
        results,
        |r| r.coverage.iter().map(|c| *c as f64).collect(),
    )
}

/// DynamoDB capacity units per second over time, one line per system.
fn plot_dynamodb(path: &Path, results: &[SystemResult]) -> anyhow::Result<()> {
    let top = results
        .iter()
        .flat_map(|r| r.dynamodb_units.iter().copied())
        .fold(1.0f64, f64::max);
    over_time(
        path,
        "DynamoDB capacity units per second",
        "read + write units",
        top * 1.1,
        results,
        |r| r.dynamodb_units.clone(),
    )
}

/// One value per second for each system, against seconds since the consumers started, with
/// the join, kill, reshard and idle marks.
fn over_time(
    path: &Path,
    caption: &str,
    y_desc: &str,
    y_max: f64,
    results: &[SystemResult],
    values: impl Fn(&SystemResult) -> Vec<f64>,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let end = results.iter().map(|r| r.seconds).max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the consumers started")
        .y_desc(y_desc)
        .draw()?;
    for (i, r) in results.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                values(r)
                    .into_iter()
                    .enumerate()
                    .map(|(s, v)| (s as f64, v)),
                color.stroke_width(2),
            ))?
            .label(r.system.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if let Some(r) = results.first() {
        let shown = ["join", "kill", "reshard", "idle"];
        for m in r.marks.iter().filter(|m| shown.contains(&m.name.as_str())) {
            chart.draw_series(LineSeries::new(
                [(m.at, 0.0), (m.at, y_max)],
                BLACK.mix(0.3),
            ))?;
            chart.draw_series(std::iter::once(Text::new(
                m.name.clone(),
                (m.at + 1.0, y_max * 0.96),
                ("sans-serif", 12),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One color per system or worker count, in order.
const COLORS: [plotters::style::RGBColor; 5] = [
    plotters::style::BLUE,
    plotters::style::RED,
    plotters::style::GREEN,
    plotters::style::MAGENTA,
    plotters::style::CYAN,
];

/// The swarm's fleet DynamoDB units per second against shards (log scales), one line per
/// worker count, and the KCL model's for the same fleets dashed.
fn plot_scale(path: &Path, results: &[SwarmResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let units = |r: &SwarmResult| (r.read_units_per_s + r.write_units_per_s).max(0.01);
    let model = |r: &SwarmResult| r.kcl_model.read_units_per_s + r.kcl_model.write_units_per_s;
    let top = results
        .iter()
        .map(|r| units(r).max(model(r)))
        .fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Fleet DynamoDB units per second (measured) and the KCL-style model (dashed)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (20f64..3000f64).log_scale(),
            (0.01f64..top * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("shards")
        .y_desc("read + write units per second")
        .draw()?;
    let mut counts: Vec<u64> = results
        .iter()
        .filter(|r| r.mode == "coordinator")
        .map(|r| r.workers)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    for (i, w) in counts.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut row: Vec<&SwarmResult> = results
            .iter()
            .filter(|r| r.workers == *w && r.mode == "coordinator")
            .collect();
        row.sort_by_key(|r| r.shards);
        chart
            .draw_series(LineSeries::new(
                row.iter().map(|r| (r.shards as f64, units(r))),
                color.stroke_width(2),
            ))?
            .label(format!("{w} workers"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            row.iter()
                .map(|r| Circle::new((r.shards as f64, units(r)), 3, color.filled())),
        )?;
        chart.draw_series(DashedLineSeries::new(
            row.iter().map(|r| (r.shards as f64, model(r))),
            6,
            4,
            color.stroke_width(1),
        ))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
