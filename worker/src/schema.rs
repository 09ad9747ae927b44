//! The one definition of the lab's persistent shapes: the lease table, the metadata table and
//! their attribute names. The worker creates what is missing at start; `kds-worker init` (used
//! by the lab's init Job and by `cargo xtask`) creates the stream too.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_kinesis::types::StreamStatus;
use tokio::time::{Instant, sleep};

use crate::aws::{AwsClients, AwsError, call};

/// Partition key of the metadata table.
pub const META_KEY: &str = "key";
/// Metadata item holding the coordinator's lease.
pub const COORDINATOR_ITEM: &str = "coordinator";
/// Metadata item holding the published limit.
pub const LEASE_LIMITS_ITEM: &str = "lease_limits";
/// Prefix of heartbeat items: `worker#<worker_id>`.
pub const WORKER_ITEM_PREFIX: &str = "worker#";
/// Attribute DynamoDB's TTL deletes long-dead heartbeat items by.
pub const TTL_ATTRIBUTE: &str = "ttl";
/// Partition key of the KCL-compatible lease table.
pub const LEASE_KEY: &str = "leaseKey";
/// Global secondary index of the lease table on `leaseOwner` (all attributes projected): each
/// worker reads only its own leases through it, so reads grow with shards + workers.
pub const OWNER_INDEX: &str = "leaseOwner-index";
/// The attribute [`OWNER_INDEX`] is keyed on.
pub const OWNER_ATTRIBUTE: &str = "leaseOwner";

/// How long to wait for a table or stream to become ACTIVE.
pub const ACTIVE_DEADLINE: Duration = Duration::from_secs(120);

pub fn worker_item_key(worker_id: &str) -> String {
    format!("{WORKER_ITEM_PREFIX}{worker_id}")
}

/// Creates a PAY_PER_REQUEST table with one string hash key if it is missing, and waits until
/// it is ACTIVE. Safe when many workers race: losing the CreateTable race is success.
pub async fn ensure_table(aws: &AwsClients, table: &str, hash_key: &str) -> Result<(), AwsError> {
    ensure_table_with(aws, table, hash_key, None).await
}

fn string_attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("name and type are set")
}

fn hash_key_on(name: &str) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(KeyType::Hash)
        .build()
        .expect("name and type are set")
}

/// The `leaseOwner` index (on-demand table: no throughput to set).
fn owner_index() -> GlobalSecondaryIndex {
    GlobalSecondaryIndex::builder()
        .index_name(OWNER_INDEX)
        .key_schema(hash_key_on(OWNER_ATTRIBUTE))
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()
        .expect("name, key and projection are set")
}

/// The lease table: keyed on `leaseKey`, with the `leaseOwner` index. A table made by an
/// earlier version without the index gets it added (and is waited for until it is ACTIVE).
pub async fn ensure_lease_table(aws: &AwsClients, table: &str) -> Result<(), AwsError> {
    ensure_table_with(aws, table, LEASE_KEY, Some(owner_index())).await?;
    let described = call(
        &aws.metrics,
        "dynamodb",
        "DescribeTable",
        aws.dynamodb.describe_table().table_name(table).send(),
    )
    .await?;
    let has_index = described
        .table()
        .map(|t| t.global_secondary_indexes())
        .unwrap_or_default()
        .iter()
        .any(|i| i.index_name() == Some(OWNER_INDEX));
    if has_index {
        return Ok(());
    }
    tracing::warn!(
        table,
        index = OWNER_INDEX,
        "lease table has no owner index; adding it"
    );
    let added = call(
        &aws.metrics,
        "dynamodb",
        "UpdateTable",
        aws.dynamodb
            .update_table()
            .table_name(table)
            .attribute_definitions(string_attribute(OWNER_ATTRIBUTE))
            .global_secondary_index_updates(
                GlobalSecondaryIndexUpdate::builder()
                    .create(
                        CreateGlobalSecondaryIndexAction::builder()
                            .index_name(OWNER_INDEX)
                            .key_schema(hash_key_on(OWNER_ATTRIBUTE))
                            .projection(
                                Projection::builder()
                                    .projection_type(ProjectionType::All)
                                    .build(),
                            )
                            .build()
                            .expect("name, key and projection are set"),
                    )
                    .build(),
            )
            .send(),
    )
    .await;
    match added {
        // Another worker added it first.
        Ok(_) | Err(AwsError::AlreadyExists { .. }) => {}
        Err(AwsError::Unavailable { message, .. }) if message.contains("already exists") => {}
        Err(e) => return Err(e),
    }
    wait_active(aws, table).await
}

async fn ensure_table_with(
    aws: &AwsClients,
    table: &str,
    hash_key: &str,
    index: Option<GlobalSecondaryIndex>,
) -> Result<(), AwsError> {
    let mut req = aws
        .dynamodb
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(string_attribute(hash_key))
        .key_schema(hash_key_on(hash_key));
    if let Some(index) = index {
        let key = index.key_schema()[0].attribute_name().to_owned();
        req = req
            .attribute_definitions(string_attribute(&key))
            .global_secondary_indexes(index);
    }
    let created = call(&aws.metrics, "dynamodb", "CreateTable", req.send()).await;
    match created {
        Ok(_) => tracing::info!(table, "created table"),
        Err(AwsError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    wait_active(aws, table).await
}

/// Waits until the table and each of its indexes are ACTIVE.
async fn wait_active(aws: &AwsClients, table: &str) -> Result<(), AwsError> {
    let deadline = Instant::now() + ACTIVE_DEADLINE;
    loop {
        let described = call(
            &aws.metrics,
            "dynamodb",
            "DescribeTable",
            aws.dynamodb.describe_table().table_name(table).send(),
        )
        .await?;
        let status = described.table().and_then(|t| t.table_status()).cloned();
        let indexes_active = described
            .table()
            .map(|t| t.global_secondary_indexes())
            .unwrap_or_default()
            .iter()
            .all(|i| i.index_status().is_none_or(|s| *s == IndexStatus::Active));
        if status == Some(TableStatus::Active) && indexes_active {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(AwsError::Unavailable {
                operation: "DescribeTable",
                message: format!(
                    "table {table} not ACTIVE after {ACTIVE_DEADLINE:?} (status {status:?})"
                ),
            });
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Both tables of one application; the metadata table gets TTL on `ttl` so items of workers
/// that died without cleaning up disappear by themselves.
pub async fn ensure_tables(
    aws: &AwsClients,
    lease_table: &str,
    meta_table: &str,
) -> Result<(), AwsError> {
    ensure_lease_table(aws, lease_table).await?;
    ensure_table(aws, meta_table, META_KEY).await?;
    let ttl = call(
        &aws.metrics,
        "dynamodb",
        "UpdateTimeToLive",
        aws.dynamodb
            .update_time_to_live()
            .table_name(meta_table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL_ATTRIBUTE)
                    .build()
                    .expect("fields are set"),
            )
            .send(),
    )
    .await;
    match ttl {
        Ok(_) => Ok(()),
        // Enabling TTL twice is a ValidationException on AWS: already done is fine.
        Err(AwsError::Unavailable { message, .. }) if message.contains("already enabled") => Ok(()),
        Err(e) => {
            tracing::warn!(table = meta_table, error = %e, "could not enable TTL; dead heartbeat items will stay until deleted");
            Ok(())
        }
    }
}

/// Creates the stream with `shards` shards if it is missing and waits until it is ACTIVE.
/// Returns the open shard count (an existing stream keeps its own count).
pub async fn ensure_stream(aws: &AwsClients, stream: &str, shards: u32) -> Result<u64, AwsError> {
    let created = call(
        &aws.metrics,
        "kinesis",
        "CreateStream",
        aws.kinesis
            .create_stream()
            .stream_name(stream)
            .shard_count(shards as i32)
            .send(),
    )
    .await;
    match created {
        Ok(_) => tracing::info!(stream, shards, "created stream"),
        Err(AwsError::AlreadyExists { .. }) => tracing::info!(stream, "stream exists already"),
        Err(e) => return Err(e),
    }
    wait_stream_active(aws, stream, ACTIVE_DEADLINE).await
}

/// Waits until the stream is ACTIVE; returns its open shard count.
pub async fn wait_stream_active(
    aws: &AwsClients,
    stream: &str,
    deadline: Duration,
) -> Result<u64, AwsError> {
    let until = Instant::now() + deadline;
    loop {
        let summary = call(
            &aws.metrics,
            "kinesis",
            "DescribeStreamSummary",
            aws.kinesis
                .describe_stream_summary()
                .stream_name(stream)
                .send(),
        )
        .await?;
        let d = summary.stream_description_summary();
        if let Some(d) = d
            && d.stream_status() == &StreamStatus::Active
        {
            return Ok(d.open_shard_count().max(0) as u64);
        }
        if Instant::now() > until {
            return Err(AwsError::Unavailable {
                operation: "DescribeStreamSummary",
                message: format!("stream {stream} not ACTIVE after {deadline:?}"),
            });
        }
        sleep(Duration::from_millis(200)).await;
    }
}
