//! The formula's inputs from outside: open shards (Kinesis) and desired replicas (Kubernetes).
//! The coordinator reads them every round; every worker checks the stream once at start, and
//! the admin commands read it for the lab.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::aws::{AwsClients, AwsError, call};

/// `DescribeStreamSummary.OpenShardCount`: closed parents after a reshard are not counted.
pub async fn open_shard_count(aws: &AwsClients, stream: &str) -> Result<u64, AwsError> {
    Ok(stream_summary(aws, stream).await?.open_shards)
}

/// What `DescribeStreamSummary` says about the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// `CREATING`, `ACTIVE`, `UPDATING` or `DELETING`.
    pub status: String,
    pub open_shards: u64,
}

impl StreamSummary {
    /// A stream still being created has no shards to list or read yet.
    pub fn is_creating(&self) -> bool {
        self.status == "CREATING"
    }
}

pub async fn stream_summary(aws: &AwsClients, stream: &str) -> Result<StreamSummary, AwsError> {
    let out = call(
        &aws.metrics,
        "kinesis",
        "DescribeStreamSummary",
        aws.kinesis
            .describe_stream_summary()
            .stream_name(stream)
            .send(),
    )
    .await?;
    let summary = out.stream_description_summary();
    Ok(StreamSummary {
        status: summary
            .map(|d| d.stream_status().as_str().to_owned())
            .unwrap_or_default(),
        open_shards: summary
            .map(|d| d.open_shard_count().max(0) as u64)
            .unwrap_or(0),
    })
}

/// One shard of the stream as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub shard_id: String,
    /// Parent and adjacent parent (after a merge), where the service reports them.
    pub parents: Vec<String>,
    /// The lowest hash key it covers (a producer targets the shard with it).
    pub starting_hash_key: String,
    /// No ending sequence number yet: records still go to it.
    pub open: bool,
}

/// Every shard of the stream, open and closed, all pages. Follow-up pages carry only the
/// NextToken (the API rejects StreamName next to it); pages may be short.
pub async fn list_shards(aws: &AwsClients, stream: &str) -> Result<Vec<ShardInfo>, AwsError> {
    let mut shards = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let req = aws.kinesis.list_shards();
        let req = match &next {
            Some(token) => req.next_token(token),
            None => req.stream_name(stream),
        };
        let out = call(&aws.metrics, "kinesis", "ListShards", req.send()).await?;
        for shard in out.shards() {
            let mut parents: Vec<String> =
                [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect();
            parents.sort();
            shards.push(ShardInfo {
                shard_id: shard.shard_id().to_owned(),
                parents,
                starting_hash_key: shard
                    .hash_key_range()
                    .map(|r| r.starting_hash_key().to_owned())
                    .unwrap_or_default(),
                open: shard
                    .sequence_number_range()
                    .is_none_or(|r| r.ending_sequence_number().is_none()),
            });
        }
        match out.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_owned()),
            _ => break,
        }
    }
    Ok(shards)
}

/// Replica count a StatefulSet asks for; Kubernetes defaults an unset `spec.replicas` to 1.
pub fn desired_replicas(sts: &StatefulSet) -> u64 {
    sts.spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as u64
}

/// Watches one StatefulSet (list + watch, never polling) and publishes its `spec.replicas`
/// into `tx` until `stop` is cancelled. `None` while it is unknown or deleted.
pub async fn watch_desired_replicas(
    client: Client,
    namespace: String,
    name: String,
    tx: watch::Sender<Option<u64>>,
    stop: CancellationToken,
) {
    let api: Api<StatefulSet> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            Some(Ok(watcher::Event::Apply(sts) | watcher::Event::InitApply(sts))) => {
                let replicas = desired_replicas(&sts);
                tx.send_if_modified(|current| {
                    if *current != Some(replicas) {
                        tracing::info!(statefulset = %name, replicas, "desired replicas");
                        *current = Some(replicas);
                        true
                    } else {
                        false
                    }
                });
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                tracing::warn!(statefulset = %name, "StatefulSet deleted; counting live workers only");
                tx.send_replace(None);
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(e)) => {
                // The backoff retries; the last known value stays in force meanwhile.
                tracing::warn!(statefulset = %name, error = %e, "StatefulSet watch failed; retrying");
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_replicas_default_to_one() {
        let sts: StatefulSet = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "kds-consumer"},
            "spec": {"selector": {}, "serviceName": "kds", "template": {}}
        }))
        .unwrap();
        assert_eq!(desired_replicas(&sts), 1);
        let mut sts = sts;
        sts.spec.as_mut().unwrap().replicas = Some(5);
        assert_eq!(desired_replicas(&sts), 5);
    }
}
