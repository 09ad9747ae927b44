//! The metadata table `<app_name>_meta`: coordinator lease, published limit, heartbeats.
//!
//! Every write that decides something is conditional; the conditions are the safety rules of
//! DESIGN.md. All reads are strongly consistent.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, ReturnValue, TransactWriteItem, Update,
};
use serde::Serialize;

use crate::aws::{AwsClients, AwsError, call};
use crate::schema::{
    COORDINATOR_ITEM, LEASE_LIMITS_ITEM, META_KEY, TTL_ATTRIBUTE, WORKER_ITEM_PREFIX,
    worker_item_key,
};

type Item = HashMap<String, AttributeValue>;

/// The coordinator item as read. `owner` is empty while the post is vacant (after a step-down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CoordinatorRow {
    pub owner: String,
    pub epoch: u64,
    pub counter: u64,
    pub renewed_at: String,
}

impl CoordinatorRow {
    pub fn is_vacant(&self) -> bool {
        self.owner.is_empty()
    }
}

/// A heartbeat item as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeartbeatRow {
    pub worker_id: String,
    pub counter: u64,
    pub leases_held: u64,
    pub renewed_at: String,
}

/// The `lease_limits` item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitRecord {
    pub max_leases_per_worker: u64,
    pub shard_count: u64,
    pub worker_count: u64,
    pub desired_workers: Option<u64>,
    pub live_workers: u64,
    pub cap: u64,
    pub capacity_deficit: u64,
    pub epoch: u64,
    pub version: u64,
    pub computed_by: String,
    pub updated_at: String,
}

/// ISO-8601 UTC timestamp with milliseconds (informational only: decisions use monotonic time).
pub fn now_iso8601() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s(item: &Item, name: &str) -> String {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

fn get_n(item: &Item, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

/// Handle on one application's metadata table.
#[derive(Clone)]
pub struct MetaStore {
    aws: AwsClients,
    table: String,
}

impl MetaStore {
    pub fn new(aws: AwsClients, table: impl Into<String>) -> Self {
        MetaStore {
            aws,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, AwsError> {
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "GetItem",
            self.aws
                .dynamodb
                .get_item()
                .table_name(&self.table)
                .key(META_KEY, s(key))
                .consistent_read(true)
                .send(),
        )
        .await?;
        Ok(out.item)
    }

    // ---- heartbeats -------------------------------------------------------------------

    /// Renews this worker's heartbeat: `counter + 1`. Returns the new counter.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        leases_held: u64,
        ttl: Duration,
    ) -> Result<u64, AwsError> {
        let now = now_iso8601();
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            self.aws
                .dynamodb
                .update_item()
                .table_name(&self.table)
                .key(META_KEY, s(worker_item_key(worker_id)))
                .update_expression(
                    "SET #c = if_not_exists(#c, :zero) + :one, started_at = if_not_exists(started_at, :now), \
                     renewed_at = :now, leases_held = :held, #ttl = :ttl",
                )
                .expression_attribute_names("#c", "counter")
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", s(now))
                .expression_attribute_values(":held", n(leases_held))
                .expression_attribute_values(":ttl", n(expires))
                .return_values(ReturnValue::UpdatedNew)
                .send(),
        )
        .await?;
        Ok(out
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "counter"))
            .unwrap_or(0))
    }

    /// Removes this worker's heartbeat (graceful shutdown, or a dead worker's row).
    pub async fn delete_heartbeat(&self, worker_id: &str) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "DeleteItem",
            self.aws
                .dynamodb
                .delete_item()
                .table_name(&self.table)
                .key(META_KEY, s(worker_item_key(worker_id)))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Deletes a dead worker's heartbeat only if it has not been renewed since it was judged.
    pub async fn delete_dead_heartbeat(
        &self,
        worker_id: &str,
        counter: u64,
    ) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "DeleteItem",
            self.aws
                .dynamodb
                .delete_item()
                .table_name(&self.table)
                .key(META_KEY, s(worker_item_key(worker_id)))
                .condition_expression("#c = :c")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_values(":c", n(counter))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Every heartbeat item. The table holds O(workers) items, so a paginated scan is cheap.
    pub async fn scan_heartbeats(&self) -> Result<Vec<HeartbeatRow>, AwsError> {
        let items = crate::aws::scan_all(
            &self.aws,
            &self.table,
            Some(("begins_with(#a, :p)", META_KEY, WORKER_ITEM_PREFIX)),
        )
        .await?;
        let mut rows: Vec<HeartbeatRow> = items
            .iter()
            .filter_map(|item| {
                let key = get_s(item, META_KEY);
                let worker_id = key.strip_prefix(WORKER_ITEM_PREFIX)?;
                Some(HeartbeatRow {
                    worker_id: worker_id.to_owned(),
                    counter: get_n(item, "counter").unwrap_or(0),
                    leases_held: get_n(item, "leases_held").unwrap_or(0),
                    renewed_at: get_s(item, "renewed_at"),
                })
            })
            .collect();
        rows.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(rows)
    }

    // ---- coordinator ------------------------------------------------------------------

    pub async fn read_coordinator(&self) -> Result<Option<CoordinatorRow>, AwsError> {
        Ok(self
            .get(COORDINATOR_ITEM)
            .await?
            .map(|item| CoordinatorRow {
                owner: get_s(&item, "owner"),
                epoch: get_n(&item, "epoch").unwrap_or(0),
                counter: get_n(&item, "counter").unwrap_or(0),
                renewed_at: get_s(&item, "renewed_at"),
            }))
    }

    /// Claims the coordinator post with epoch `next_epoch`. `seen` is the row the caller judged
    /// vacant or dead (`None`: no row existed); the write succeeds only if the row is still
    /// exactly that, so of many simultaneous claimants exactly one wins.
    pub async fn claim_coordinator(
        &self,
        me: &str,
        seen: Option<&CoordinatorRow>,
        next_epoch: u64,
    ) -> Result<CoordinatorRow, AwsError> {
        let now = now_iso8601();
        let mut req = self
            .aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(META_KEY, s(COORDINATOR_ITEM))
            .update_expression("SET #o = :me, epoch = :next, #c = :zero, renewed_at = :now")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#c", "counter")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":next", n(next_epoch))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", s(now.clone()));
        req = match seen {
            None => req
                .condition_expression("attribute_not_exists(#k)")
                .expression_attribute_names("#k", META_KEY),
            Some(row) => req
                .condition_expression(
                    "#o = :seen_owner AND epoch = :seen_epoch AND #c = :seen_counter",
                )
                .expression_attribute_values(":seen_owner", s(row.owner.clone()))
                .expression_attribute_values(":seen_epoch", n(row.epoch))
                .expression_attribute_values(":seen_counter", n(row.counter)),
        };
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(CoordinatorRow {
            owner: me.to_owned(),
            epoch: next_epoch,
            counter: 0,
            renewed_at: now,
        })
    }

    /// Renews the coordinator lease; fails with `ConditionFailed` once deposed.
    pub async fn renew_coordinator(&self, me: &str, epoch: u64) -> Result<u64, AwsError> {
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            self.aws
                .dynamodb
                .update_item()
                .table_name(&self.table)
                .key(META_KEY, s(COORDINATOR_ITEM))
                .update_expression("SET #c = #c + :one, renewed_at = :now")
                .condition_expression("#o = :me AND epoch = :e")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":e", n(epoch))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", s(now_iso8601()))
                .return_values(ReturnValue::UpdatedNew)
                .send(),
        )
        .await?;
        Ok(out
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "counter"))
            .unwrap_or(0))
    }

    /// Leaves the post vacant (owner ""), keeping the epoch so the successor's is higher.
    pub async fn step_down(&self, me: &str, epoch: u64) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            self.aws
                .dynamodb
                .update_item()
                .table_name(&self.table)
                .key(META_KEY, s(COORDINATOR_ITEM))
                .update_expression("SET #o = :vacant, #c = #c + :one, renewed_at = :now")
                .condition_expression("#o = :me AND epoch = :e")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_names("#c", "counter")
                .expression_attribute_values(":vacant", s(""))
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":e", n(epoch))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", s(now_iso8601()))
                .send(),
        )
        .await?;
        Ok(())
    }

    // ---- lease_limits -----------------------------------------------------------------

    pub async fn read_limit(&self) -> Result<Option<LimitRecord>, AwsError> {
        Ok(self.get(LEASE_LIMITS_ITEM).await?.map(|item| LimitRecord {
            max_leases_per_worker: get_n(&item, "max_leases_per_worker").unwrap_or(0),
            shard_count: get_n(&item, "shard_count").unwrap_or(0),
            worker_count: get_n(&item, "worker_count").unwrap_or(0),
            desired_workers: get_n(&item, "desired_workers"),
            live_workers: get_n(&item, "live_workers").unwrap_or(0),
            cap: get_n(&item, "cap").unwrap_or(0),
            capacity_deficit: get_n(&item, "capacity_deficit").unwrap_or(0),
            epoch: get_n(&item, "epoch").unwrap_or(0),
            version: get_n(&item, "version").unwrap_or(0),
            computed_by: get_s(&item, "computed_by"),
            updated_at: get_s(&item, "updated_at"),
        }))
    }

    /// Writes `lease_limits` as coordinator of `record.epoch`, atomically with a check that the
    /// caller still owns the coordinator item at that epoch. A deposed coordinator's write
    /// fails with `ConditionFailed`, even before its successor has published anything.
    /// `record.version` must be the previous version + 1.
    pub async fn publish_limit(&self, record: &LimitRecord) -> Result<(), AwsError> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .key(META_KEY, s(COORDINATOR_ITEM))
            .condition_expression("#o = :me AND epoch = :e")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", s(record.computed_by.clone()))
            .expression_attribute_values(":e", n(record.epoch))
            .build()
            .expect("table, key and condition are set");
        let mut set = vec![
            "max_leases_per_worker = :limit",
            "shard_count = :shards",
            "worker_count = :workers",
            "live_workers = :live",
            "cap = :cap",
            "capacity_deficit = :deficit",
            "epoch = :e",
            "version = :v",
            "computed_by = :me",
            "updated_at = :now",
        ];
        let mut update = Update::builder()
            .table_name(&self.table)
            .key(META_KEY, s(LEASE_LIMITS_ITEM))
            .condition_expression("attribute_not_exists(#k) OR (epoch <= :e AND version < :v)")
            .expression_attribute_names("#k", META_KEY)
            .expression_attribute_values(":limit", n(record.max_leases_per_worker))
            .expression_attribute_values(":shards", n(record.shard_count))
            .expression_attribute_values(":workers", n(record.worker_count))
            .expression_attribute_values(":live", n(record.live_workers))
            .expression_attribute_values(":cap", n(record.cap))
            .expression_attribute_values(":deficit", n(record.capacity_deficit))
            .expression_attribute_values(":e", n(record.epoch))
            .expression_attribute_values(":v", n(record.version))
            .expression_attribute_values(":me", s(record.computed_by.clone()))
            .expression_attribute_values(":now", s(record.updated_at.clone()));
        let expression = match record.desired_workers {
            Some(desired) => {
                set.push("desired_workers = :desired");
                update = update.expression_attribute_values(":desired", n(desired));
                format!("SET {}", set.join(", "))
            }
            None => format!("SET {} REMOVE desired_workers", set.join(", ")),
        };
        let update = update
            .update_expression(expression)
            .build()
            .expect("table, key and expression are set");
        call(
            &self.aws.metrics,
            "dynamodb",
            "TransactWriteItems",
            self.aws
                .dynamodb
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().condition_check(check).build())
                .transact_items(TransactWriteItem::builder().update(update).build())
                .send(),
        )
        .await?;
        Ok(())
    }
}
