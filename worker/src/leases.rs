//! The KCL-compatible lease table `<app_name>`: one item per shard that still needs reading.
//!
//! Liveness is *not* renewed per lease: a lease is alive while its owner's heartbeat is (see
//! [`crate::election::LivenessTracker`]), so steady-state writes grow with workers, not shards.
//!
//! Every write is conditional on the `leaseOwner` and `leaseCounter` the writer saw, and the
//! counter moves on every change of who may read: an assignment, a worker acquiring a lease
//! before it reads it, a hand-off, a release. A reader holds the counter of its own acquire
//! ([`Held`]); its checkpoints, hand-off and release are conditional on it, so a stale reader
//! can neither keep reading past a successor's take nor move a successor's checkpoint back.
//!
//! Reads: only the coordinator scans the table; each worker queries its own leases through the
//! `leaseOwner` index ([`OWNER_INDEX`]).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;

use crate::aws::{AwsClients, AwsError, call};
use crate::aws::{Consistency, ScanFilter};
use crate::schema::{LEASE_KEY, OWNER_INDEX};

type Item = HashMap<String, AttributeValue>;

/// Checkpoint of a shard nobody has read yet.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// Checkpoint of a shard read to its end (closed by a reshard): its children may start.
pub const SHARD_END: &str = "SHARD_END";

/// What the coordinator asked the owner of a lease to do (attribute `pendingOwner`): hand it
/// to another worker, or (empty string) give it up. The owner acts on it after checkpointing,
/// so the shard is read by one worker at a time and from where the last one stopped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pending {
    HandOff(String),
    Release,
}

/// One lease item as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub shard_id: String,
    /// `None` while unowned.
    pub owner: Option<String>,
    /// `None` when the item has no usable `leaseCounter` (missing, not a number, negative or
    /// beyond u64: written by hand or by another tool): the next conditional write sets it. (A
    /// fractional one cannot be told apart in a condition and stays unwritable: repair by hand.)
    pub counter: Option<u64>,
    pub checkpoint: String,
    pub owner_switches_since_checkpoint: u64,
    pub parents: Vec<String>,
    pub pending: Option<Pending>,
    /// Set by the owner when the shard cannot be read from its checkpoint (see
    /// [`LeaseStore::mark_unreadable`]); such a shard does not count as covered.
    pub unreadable: Option<String>,
}

impl Lease {
    pub fn is_finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }

    /// The counter value this lease's next write sets. A lease whose counter was lost
    /// (removed or mistyped by hand) restarts at the current Unix time in milliseconds: above
    /// any value it can have had, so the counter, a fencing token for the application's sink,
    /// never goes down.
    fn next_counter(&self) -> u64 {
        match self.counter {
            Some(c) => c.saturating_add(1),
            None => restart_counter(),
        }
    }
}

/// The counter of a lease whose counter was lost: the current Unix time in milliseconds.
fn restart_counter() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .max(1)
}

/// A lease as its reader acquired it: the counter it wrote. Every later write of the reader
/// is conditional on the item still having this owner and counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub shard_id: String,
    pub counter: u64,
    pub checkpoint: String,
    /// The worker's fence epoch when the acquire was sent: reading stops for good once the
    /// fence has been up since (see `WorkerState::may_process_in`).
    pub fence_epoch: u64,
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
        owner_switches_since_checkpoint: get_n("ownerSwitchesSinceCheckpoint").unwrap_or(0),
        parents,
        pending: get_s("pendingOwner").map(|p| {
            if p.is_empty() {
                Pending::Release
            } else {
                Pending::HandOff(p)
            }
        }),
        unreadable: get_s("unreadable"),
    })
}

/// Orders Kinesis sequence numbers (decimal strings of up to 128 digits).
pub fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The condition "the item is still as `seen`": same owner (or still unowned) and counter.
struct Seen<'a> {
    owner: Option<&'a str>,
    counter: Option<u64>,
}

impl Seen<'_> {
    fn apply(
        &self,
        req: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        let counter = match self.counter {
            Some(c) => {
                return self
                    .owner_condition(req, "leaseCounter = :seen_counter")
                    .expression_attribute_values(":seen_counter", n(c));
            }
            // Seen without a usable counter (none, not a number, negative: written by hand or
            // by another tool): still without one, so a write that set a counter since wins.
            None => {
                "(attribute_not_exists(leaseCounter) OR NOT attribute_type(leaseCounter, :number) \
                 OR leaseCounter < :zero OR leaseCounter > :max_counter)"
            }
        };
        self.owner_condition(req, counter)
            .expression_attribute_values(":number", s("N"))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":max_counter", n(u64::MAX))
    }

    fn owner_condition(
        &self,
        req: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
        counter: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        match self.owner {
            Some(owner) => req
                .condition_expression(format!("{counter} AND leaseOwner = :seen_owner"))
                .expression_attribute_values(":seen_owner", s(owner)),
            None => req.condition_expression(format!(
                "{counter} AND attribute_exists(leaseKey) AND (attribute_not_exists(leaseOwner) \
                 OR leaseOwner = :empty OR NOT attribute_type(leaseOwner, :string))"
            ))
            .expression_attribute_values(":empty", s(""))
            .expression_attribute_values(":string", s("S")),
        }
    }
}

/// Handle on one application's lease table.
#[derive(Clone)]
pub struct LeaseStore {
    aws: AwsClients,
    table: String,
}

type Update = aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;

impl LeaseStore {
    pub fn new(aws: AwsClients, table: impl Into<String>) -> Self {
        LeaseStore {
            aws,
            table: table.into(),
        }
    }

    /// Every lease, all pages, eventually consistent: what is decided from it is written
    /// conditionally on the owner and counter seen, so a stale item only makes a write fail.
    /// Only the coordinator (and the lab's snapshot) scans.
    pub async fn scan(&self) -> Result<Vec<Lease>, AwsError> {
        let items = crate::aws::scan_all(
            &self.aws,
            &self.table,
            ScanFilter::All,
            Consistency::Eventual,
        )
        .await?;
        let mut leases: Vec<Lease> = items.iter().filter_map(parse).collect();
        leases.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        Ok(leases)
    }

    /// The leases the `leaseOwner` index lists for `owner` (eventually consistent: a worker
    /// acquires each one conditionally before reading it).
    pub async fn owned_by(&self, owner: &str) -> Result<Vec<Lease>, AwsError> {
        let mut leases = Vec::new();
        let mut start = None;
        loop {
            let out = call(
                &self.aws.metrics,
                "dynamodb",
                "Query",
                self.aws
                    .dynamodb
                    .query()
                    .table_name(&self.table)
                    .index_name(OWNER_INDEX)
                    .key_condition_expression("leaseOwner = :me")
                    .expression_attribute_values(":me", s(owner))
                    .set_exclusive_start_key(start.take())
                    .send(),
            )
            .await?;
            leases.extend(out.items().iter().filter_map(parse));
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        // The index may still list a lease that moved on: only the owner's own are kept.
        leases.retain(|l| l.owner.as_deref() == Some(owner));
        leases.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        Ok(leases)
    }

    /// One lease, strongly consistent.
    pub async fn get(&self, shard_id: &str) -> Result<Option<Lease>, AwsError> {
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "GetItem",
            self.aws
                .dynamodb
                .get_item()
                .table_name(&self.table)
                .key(LEASE_KEY, s(shard_id))
                .consistent_read(true)
                .send(),
        )
        .await?;
        Ok(out.item.as_ref().and_then(parse))
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

    fn update(&self, shard_id: &str) -> Update {
        self.aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, s(shard_id))
    }

    async fn send(&self, req: Update) -> Result<(), AwsError> {
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(())
    }

    /// The coordinator gives `seen` (unowned, or owned by a dead worker) to `to`, if nobody
    /// changed it since. `to` acquires it before reading.
    pub async fn assign(&self, seen: &Lease, to: &str) -> Result<(), AwsError> {
        let req = self
            .update(&seen.shard_id)
            .update_expression(
                "SET leaseOwner = :to, leaseCounter = :next, \
                 ownerSwitchesSinceCheckpoint = :switches REMOVE pendingOwner",
            )
            .expression_attribute_values(":to", s(to))
            .expression_attribute_values(":next", n(seen.next_counter()))
            .expression_attribute_values(
                ":switches",
                n(seen.owner_switches_since_checkpoint.saturating_add(1)),
            );
        self.send(
            Seen {
                owner: seen.owner.as_deref(),
                counter: seen.counter,
            }
            .apply(req),
        )
        .await
    }

    /// The coordinator asks the live owner of `seen` to hand it over (or give it up). The
    /// counter does not move: the owner's checkpoints go on succeeding until it acts.
    pub async fn request(&self, seen: &Lease, pending: &Pending) -> Result<(), AwsError> {
        let to = match pending {
            Pending::HandOff(to) => to.as_str(),
            Pending::Release => "",
        };
        let req = self
            .update(&seen.shard_id)
            .update_expression("SET pendingOwner = :pending")
            .expression_attribute_values(":pending", s(to));
        self.send(
            Seen {
                owner: seen.owner.as_deref(),
                counter: seen.counter,
            }
            .apply(req),
        )
        .await
    }

    /// The owner claims a lease it was given (or still has after a restart or a fence) before
    /// reading it: `leaseCounter + 1` if the item is still as seen. Whoever else wanted it from
    /// the same state (a coordinator judging this worker dead) now fails.
    pub async fn acquire(
        &self,
        seen: &Lease,
        me: &str,
        fence_epoch: u64,
    ) -> Result<Held, AwsError> {
        let next = seen.next_counter();
        let req = self
            .update(&seen.shard_id)
            // A lease acquired again is tried afresh: its unreadable mark is cleared.
            .update_expression("SET leaseCounter = :next REMOVE unreadable")
            .expression_attribute_values(":next", n(next))
            // The checkpoint as of this write: the index read may lag behind the last one.
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew);
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            Seen {
                owner: Some(me),
                counter: seen.counter,
            }
            .apply(req)
            .send(),
        )
        .await?;
        let checkpoint = out
            .attributes()
            .and_then(parse)
            .map_or_else(|| seen.checkpoint.clone(), |l| l.checkpoint);
        Ok(Held {
            shard_id: seen.shard_id.clone(),
            counter: next,
            checkpoint,
            fence_epoch,
        })
    }

    /// Records progress; fails with `ConditionFailed` once the lease is no longer held at
    /// `held.counter` (so a late checkpoint never moves a successor's back).
    pub async fn checkpoint(
        &self,
        held: &Held,
        me: &str,
        checkpoint: &str,
    ) -> Result<(), AwsError> {
        let req = self
            .update(&held.shard_id)
            .update_expression("SET checkpoint = :cp, ownerSwitchesSinceCheckpoint = :zero")
            .expression_attribute_values(":cp", s(checkpoint))
            .expression_attribute_values(":zero", n(0));
        self.send(
            Seen {
                owner: Some(me),
                counter: Some(held.counter),
            }
            .apply(req),
        )
        .await
    }

    /// Checkpoints (if given) and gives the lease to `to` (`None`: nobody) in one conditional
    /// write, so the next owner starts exactly after the last processed record and the shard
    /// is never read by two workers. `held` is what the giver holds: its acquired counter, or
    /// the item as seen when it was not reading it.
    pub async fn give_up(
        &self,
        shard_id: &str,
        counter: Option<u64>,
        me: &str,
        to: Option<&str>,
        checkpoint: Option<&str>,
    ) -> Result<(), AwsError> {
        let next = counter.map_or_else(restart_counter, |c| c.saturating_add(1));
        let mut set = vec!["leaseCounter = :next"];
        let mut req = self
            .update(shard_id)
            .expression_attribute_values(":next", n(next))
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
            None => {
                set.push(
                    "ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one",
                );
                req = req.expression_attribute_values(":one", n(1));
            }
        }
        let mut expression = format!("SET {} REMOVE pendingOwner, unreadable", set.join(", "));
        if to.is_none() {
            expression.push_str(", leaseOwner");
        }
        self.send(
            Seen {
                owner: Some(me),
                counter,
            }
            .apply(req.update_expression(expression)),
        )
        .await
    }

    /// The owner records why it cannot read this shard (a checkpoint that is not valid for
    /// the stream, ...): visible in the table, the coordinator's coverage and `/status`.
    pub async fn mark_unreadable(
        &self,
        held: &Held,
        me: &str,
        reason: &str,
    ) -> Result<(), AwsError> {
        let req = self
            .update(&held.shard_id)
            .update_expression("SET unreadable = :why")
            .expression_attribute_values(":why", s(reason));
        self.send(
            Seen {
                owner: Some(me),
                counter: Some(held.counter),
            }
            .apply(req),
        )
        .await
    }

    /// Clears the owner of a lease whose shard is finished but still names an owner (an item
    /// left so by hand or by another tool), so it counts as done.
    pub async fn repair_finished(&self, seen: &Lease) -> Result<(), AwsError> {
        let req = self
            .update(&seen.shard_id)
            .update_expression("SET leaseCounter = :next REMOVE leaseOwner, pendingOwner")
            .expression_attribute_values(":next", n(seen.next_counter()));
        self.send(
            Seen {
                owner: seen.owner.as_deref(),
                counter: seen.counter,
            }
            .apply(req),
        )
        .await
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

    #[test]
    fn items_parse_with_missing_or_odd_attributes() {
        let mut item = Item::new();
        item.insert(LEASE_KEY.into(), s("shard-1"));
        let l = parse(&item).unwrap();
        assert_eq!(l.counter, None);
        assert!(
            l.next_counter() > 1_700_000_000_000,
            "a lost counter restarts above any it can have had"
        );
        assert_eq!(l.checkpoint, TRIM_HORIZON);
        item.insert("leaseOwner".into(), n(7));
        item.insert("pendingOwner".into(), s(""));
        item.insert("leaseCounter".into(), n(u64::MAX));
        let l = parse(&item).unwrap();
        assert_eq!(l.owner, None, "an owner that is not a string is no owner");
        assert_eq!(l.pending, Some(Pending::Release));
        assert_eq!(l.next_counter(), u64::MAX);
        item.insert("pendingOwner".into(), s("w2"));
        assert_eq!(
            parse(&item).unwrap().pending,
            Some(Pending::HandOff("w2".into()))
        );
    }
}
