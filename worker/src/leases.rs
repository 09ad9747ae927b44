//! The KCL-compatible lease table `<app_name>`: one item per shard that still needs reading.
//!
//! Liveness is *not* renewed per lease: a lease is alive while its owner's heartbeat is (see
//! [`crate::election::LivenessTracker`]), so steady-state writes grow with workers, not shards.
//! Every ownership change is conditional on `leaseOwner` and `leaseCounter`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;

use crate::aws::{AwsClients, AwsError, call};
use crate::schema::LEASE_KEY;

type Item = HashMap<String, AttributeValue>;

/// Checkpoint of a shard nobody has read yet.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// Checkpoint of a shard read to its end (closed by a reshard): its children may start.
pub const SHARD_END: &str = "SHARD_END";

/// One lease item as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub shard_id: String,
    /// `None` while unowned.
    pub owner: Option<String>,
    pub counter: u64,
    pub checkpoint: String,
    pub owner_switches_since_checkpoint: u64,
    pub parents: Vec<String>,
}

impl Lease {
    pub fn is_finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn parse(item: &Item) -> Option<Lease> {
    let get_s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
    let get_n = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut parents = item
        .get("parentShardId")
        .and_then(|v| v.as_ss().ok())
        .cloned()
        .unwrap_or_default();
    parents.sort();
    Some(Lease {
        shard_id: get_s(LEASE_KEY)?,
        owner: get_s("leaseOwner").filter(|o| !o.is_empty()),
        counter: get_n("leaseCounter"),
        checkpoint: get_s("checkpoint").unwrap_or_else(|| TRIM_HORIZON.to_owned()),
        owner_switches_since_checkpoint: get_n("ownerSwitchesSinceCheckpoint"),
        parents,
    })
}

/// Orders Kinesis sequence numbers (decimal strings of up to 128 digits).
pub fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[derive(Clone)]
pub struct LeaseStore {
    aws: AwsClients,
    table: String,
}

impl LeaseStore {
    pub fn new(aws: AwsClients, table: impl Into<String>) -> Self {
        LeaseStore {
            aws,
            table: table.into(),
        }
    }

    /// Every lease, strongly consistent, all pages.
    pub async fn scan(&self) -> Result<Vec<Lease>, AwsError> {
        let items = crate::aws::scan_all(&self.aws, &self.table, None).await?;
        let mut leases: Vec<Lease> = items.iter().filter_map(parse).collect();
        leases.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        Ok(leases)
    }

    /// Creates the lease of a shard if it has none (reading starts at TRIM_HORIZON).
    /// Returns false if it existed.
    pub async fn create_if_missing(
        &self,
        shard_id: &str,
        parents: &[String],
    ) -> Result<bool, AwsError> {
        let mut req = self
            .aws
            .dynamodb
            .put_item()
            .table_name(&self.table)
            .item(LEASE_KEY, s(shard_id))
            .item("leaseCounter", n(0))
            .item("checkpoint", s(TRIM_HORIZON))
            .item("ownerSwitchesSinceCheckpoint", n(0))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", LEASE_KEY);
        if !parents.is_empty() {
            req = req.item("parentShardId", AttributeValue::Ss(parents.to_vec()));
        }
        match call(&self.aws.metrics, "dynamodb", "PutItem", req.send()).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_condition_failed() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the lease of a shard that no longer exists in the stream.
    pub async fn delete(&self, shard_id: &str) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "DeleteItem",
            self.aws
                .dynamodb
                .delete_item()
                .table_name(&self.table)
                .key(LEASE_KEY, s(shard_id))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Takes `seen` (unowned, or owned by a dead worker) for `me`, if nobody changed it since.
    pub async fn take(&self, seen: &Lease, me: &str) -> Result<Lease, AwsError> {
        let mut req = self
            .aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(&seen.shard_id))
            .update_expression(
                "SET leaseOwner = :me, leaseCounter = :next, \
                 ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            )
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":next", n(seen.counter + 1))
            .expression_attribute_values(":seen_counter", n(seen.counter))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1));
        req = match &seen.owner {
            None => req.condition_expression(
                "leaseCounter = :seen_counter AND (attribute_not_exists(leaseOwner) OR leaseOwner = :empty)",
            )
            .expression_attribute_values(":empty", s("")),
            Some(owner) => req
                .condition_expression("leaseCounter = :seen_counter AND leaseOwner = :seen_owner")
                .expression_attribute_values(":seen_owner", s(owner)),
        };
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(Lease {
            owner: Some(me.to_owned()),
            counter: seen.counter + 1,
            owner_switches_since_checkpoint: seen.owner_switches_since_checkpoint + 1,
            ..seen.clone()
        })
    }

    /// Records progress; fails with `ConditionFailed` once the lease is no longer `me`'s.
    pub async fn checkpoint(
        &self,
        shard_id: &str,
        me: &str,
        checkpoint: &str,
    ) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            self.aws
                .dynamodb
                .update_item()
                .table_name(&self.table)
                .key(LEASE_KEY, s(shard_id))
                .update_expression("SET checkpoint = :cp, ownerSwitchesSinceCheckpoint = :zero")
                .condition_expression("leaseOwner = :me")
                .expression_attribute_values(":cp", s(checkpoint))
                .expression_attribute_values(":me", s(me))
                .expression_attribute_values(":zero", n(0))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Checkpoints (if given) and hands the lease straight to `to`, conditional on `me` still
    /// owning it: the shard is never unowned.
    pub async fn transfer(
        &self,
        shard_id: &str,
        me: &str,
        to: &str,
        checkpoint: Option<&str>,
    ) -> Result<(), AwsError> {
        self.give_up(shard_id, me, Some(to), checkpoint).await
    }

    /// Checkpoints (if given) and gives the lease up in one conditional write, so the next
    /// owner starts exactly after the last processed record.
    pub async fn release(
        &self,
        shard_id: &str,
        me: &str,
        checkpoint: Option<&str>,
    ) -> Result<(), AwsError> {
        self.give_up(shard_id, me, None, checkpoint).await
    }

    /// One conditional write: new owner (`to`, or none), counter + 1, and the checkpoint.
    async fn give_up(
        &self,
        shard_id: &str,
        me: &str,
        to: Option<&str>,
        checkpoint: Option<&str>,
    ) -> Result<(), AwsError> {
        let mut set = vec!["leaseCounter = leaseCounter + :one"];
        let mut req = self
            .aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(shard_id))
            .condition_expression("leaseOwner = :me")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":zero", n(0));
        if let Some(to) = to {
            set.push("leaseOwner = :to");
            req = req.expression_attribute_values(":to", s(to));
        }
        match checkpoint {
            Some(cp) => {
                set.push("checkpoint = :cp");
                set.push("ownerSwitchesSinceCheckpoint = :zero");
                req = req.expression_attribute_values(":cp", s(cp));
            }
            None => set.push(
                "ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
            ),
        }
        let mut expression = format!("SET {}", set.join(", "));
        if to.is_none() {
            expression.push_str(" REMOVE leaseOwner");
        }
        call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            req.update_expression(expression).send(),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn sequence_numbers_compare_numerically() {
        assert_eq!(sequence_cmp("9", "10"), Ordering::Less);
        assert_eq!(
            sequence_cmp(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692540925702759324208523137515618"
            ),
            Ordering::Less
        );
        assert_eq!(sequence_cmp("007", "7"), Ordering::Equal);
    }
}
