//! Operator commands (`kds-worker admin …`) used by the lab: a snapshot of the whole fleet's
//! state, stepwise resharding, and a record producer. In a cluster they run through
//! `kubectl exec` in a worker pod, so the lab needs no AWS CLI.

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ScalingType};
use tokio::time::Instant;

use crate::assignment::readable_shards;
use crate::aws::{AwsClients, AwsError, call};
use crate::config::Settings;
use crate::inputs::open_shard_count;
use crate::leases::LeaseStore;
use crate::meta::{LimitReadError, MetaStore};
pub use crate::model::{LeaseSummary, Snapshot};
use crate::schema::wait_stream_active;

pub async fn snapshot(aws: &AwsClients, settings: &Settings) -> Result<Snapshot, AwsError> {
    let meta = MetaStore::new(aws.clone(), settings.meta_table());
    let leases = LeaseStore::new(aws.clone(), settings.lease_table())
        .scan()
        .await?;
    let readable = readable_shards(&leases, None);
    let mut summary = LeaseSummary {
        readable: readable.len() as u64,
        finished: leases.iter().filter(|l| l.is_finished()).count() as u64,
        parents_pending: crate::assignment::blocking_parents(&leases).len() as u64,
        ..Default::default()
    };
    for l in leases
        .iter()
        .filter(|l| readable.contains(l.shard_id.as_str()))
    {
        match &l.owner {
            Some(o) => *summary.by_owner.entry(o.clone()).or_default() += 1,
            None => summary.unowned_readable += 1,
        }
    }
    let (lease_limits, lease_limits_problem) = match meta.read_limit().await {
        Ok(record) => (record, None),
        Err(LimitReadError::Malformed(m)) => (None, Some(m.to_string())),
        Err(LimitReadError::Aws(e)) => return Err(e),
    };
    Ok(Snapshot {
        stream: settings.stream_name.clone(),
        open_shards: open_shard_count(aws, &settings.stream_name).await?,
        lease_limits,
        lease_limits_problem,
        coordinator: meta.read_coordinator().await?,
        heartbeats: meta.scan_heartbeats().await?,
        leases: summary,
    })
}

/// The steps AWS allows from `from` to `to`: at most ×2 or ÷2 per UpdateShardCount call.
/// 60 → 300 is 60 → 120 → 240 → 300.
pub fn reshard_steps(from: u64, to: u64) -> Vec<u64> {
    let mut steps = Vec::new();
    let mut at = from.max(1);
    while at != to {
        at = if to > at {
            to.min(at * 2)
        } else {
            to.max(at.div_ceil(2))
        };
        steps.push(at);
    }
    steps
}

/// Reshards stepwise with UNIFORM_SCALING, waiting for ACTIVE after every step; `progress`
/// hears about each step.
pub async fn reshard(
    aws: &AwsClients,
    stream: &str,
    target: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), AwsError> {
    let from = open_shard_count(aws, stream).await?;
    let mut at = from;
    for step in reshard_steps(from, target) {
        progress(at, step);
        call(
            &aws.metrics,
            "kinesis",
            "UpdateShardCount",
            aws.kinesis
                .update_shard_count()
                .stream_name(stream)
                .target_shard_count(step as i32)
                .scaling_type(ScalingType::UniformScaling)
                .send(),
        )
        .await?;
        // The stream turns UPDATING at once and back to ACTIVE when the step is done.
        tokio::time::sleep(Duration::from_millis(200)).await;
        wait_stream_active(aws, stream, Duration::from_secs(300)).await?;
        at = step;
    }
    Ok(())
}

/// Puts `rate` records per second for `seconds` (0: until cancelled, riding out transient
/// errors); returns how many were accepted. Each record's data is unique (`{"run":R,"record":N}`, R the start time in ms);
/// with `out`, the data of every accepted record is appended to it as a line, flushed after
/// each batch, for `kds-worker admin audit`.
pub async fn produce(
    aws: &AwsClients,
    stream: &str,
    rate: u64,
    seconds: u64,
    each_shard: bool,
    out: Option<&std::path::Path>,
) -> Result<u64, AwsError> {
    use std::io::Write;
    let mut out = match out {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| AwsError::Invalid {
                    operation: "produce",
                    message: format!("cannot append to {}: {e}", path.display()),
                })?,
        ),
        None => None,
    };
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let start = Instant::now();
    let mut next = 0u64;
    let mut accepted = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // With `each_shard`: every open shard's starting hash key, listed again every 5 s so a
    // reshard's new shards get records too.
    let mut targets: Vec<String> = Vec::new();
    let mut listed: Option<Instant> = None;
    loop {
        tick.tick().await;
        if seconds > 0 && start.elapsed() >= Duration::from_secs(seconds) {
            return Ok(accepted);
        }
        if each_shard && listed.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            match open_shard_hash_keys(aws, stream).await {
                Ok(keys) => {
                    targets = keys;
                    listed = Some(Instant::now());
                }
                Err(e) if seconds == 0 && e.is_transient() => {
                    eprintln!("ListShards failed ({e}); keeping the last list");
                }
                Err(e) => return Err(e),
            }
        }
        let mut remaining = if each_shard {
            rate * targets.len() as u64
        } else {
            rate
        };
        while remaining > 0 {
            let batch = remaining.min(500);
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            // `at`: when it was put, so a consumer's lag can be measured from the data alone.
            let data: Vec<String> = (next..next + batch)
                .map(|n| format!("{{\"run\":{run},\"record\":{n},\"at\":{at}}}"))
                .collect();
            let first = next;
            next += batch;
            remaining -= batch;
            let mut req = aws.kinesis.put_records().stream_name(stream);
            for (i, d) in data.iter().enumerate() {
                let n = first + i as u64;
                let mut entry = PutRecordsRequestEntry::builder()
                    .data(Blob::new(d.clone().into_bytes()))
                    .partition_key(format!("key-{run}-{n}"));
                if each_shard {
                    entry = entry.explicit_hash_key(&targets[(n as usize) % targets.len()]);
                }
                req = req.records(entry.build().expect("data and key are set"));
            }
            let result = match call(&aws.metrics, "kinesis", "PutRecords", req.send()).await {
                Ok(r) => r,
                // A slow or throttled stream (a reshard, a busy emulator) must not end a long
                // run: these records were not put (not logged), the next batch tries again.
                Err(e) if seconds == 0 && e.is_transient() => {
                    eprintln!("PutRecords failed ({e}); going on with the next batch");
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Entries refused inside an accepted call (throttled shards) were not put.
            let put: Vec<&String> = data
                .iter()
                .zip(result.records())
                .filter(|(_, r)| r.error_code().is_none())
                .map(|(d, _)| d)
                .collect();
            accepted += put.len() as u64;
            if let Some(f) = out.as_mut() {
                let lines: String = put.iter().map(|d| format!("{d}\n")).collect();
                f.write_all(lines.as_bytes())
                    .and_then(|()| f.flush())
                    .map_err(|e| AwsError::Invalid {
                        operation: "produce",
                        message: format!("cannot write the produced log: {e}"),
                    })?;
            }
        }
    }
}

/// The starting hash key of every open shard.
async fn open_shard_hash_keys(aws: &AwsClients, stream: &str) -> Result<Vec<String>, AwsError> {
    Ok(crate::inputs::list_shards(aws, stream)
        .await?
        .into_iter()
        .filter(|s| s.open)
        .map(|s| s.starting_hash_key)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::reshard_steps;

    #[test]
    fn reshards_step_like_aws_allows() {
        assert_eq!(reshard_steps(30, 60), vec![60]);
        assert_eq!(reshard_steps(60, 300), vec![120, 240, 300]);
        assert_eq!(reshard_steps(300, 30), vec![150, 75, 38, 30]);
        assert_eq!(reshard_steps(30, 30), Vec::<u64>::new());
        assert_eq!(reshard_steps(1, 5), vec![2, 4, 5]);
    }
}
