//! The metadata table `<app_name>_meta`: coordinator lease, published limit, heartbeats.
//!
//! Every write that decides something is conditional; the conditions are the safety rules of
//! README's "How it works". Reads are strongly consistent, except a follower's heartbeat
//! look at the coordinator item ([`MetaStore::follow_coordinator`]).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, TransactWriteItem, Update};
use serde::Serialize;

use crate::aws::{AwsClients, AwsError, Consistency, ScanFilter, call, scan_all};
pub use crate::model::{
    CoordinatorRow, HeartbeatRow, LeaseStamp, LimitStamp, OwnerHeartbeat, PublishedLimit,
};
use crate::schema::{
    COORDINATOR_ITEM, LEASE_LIMITS_ITEM, META_KEY, TTL_ATTRIBUTE, WORKER_ITEM_PREFIX,
    worker_item_key,
};

type Item = HashMap<String, AttributeValue>;

/// Who writes a heartbeat: the configured worker id, this process's random instance id (two
/// processes started with one worker id must not both process records) and the failover
/// timeout published with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatOwner {
    pub worker_id: String,
    pub instance: String,
    pub failover: Duration,
}

impl HeartbeatOwner {
    fn failover_ms(&self) -> u64 {
        u64::try_from(self.failover.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A `lease_limits` item that cannot be obeyed: what was wrong with it, and the epoch and
/// version it carries where they can be read (a claimant must go above that epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("lease_limits item is malformed: {}", .problems.join("; "))]
pub struct MalformedLimit {
    /// One entry per bad attribute, e.g. `max_leases_per_worker is missing`.
    pub problems: Vec<String>,
    /// The item's epoch: exact when it is a u64, `u64::MAX` for a larger number.
    pub epoch: Option<u64>,
    /// The item's version when it is a u64.
    pub version: Option<u64>,
}

/// Why `lease_limits` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LimitReadError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// The item exists but is not a complete record: never obey it (it would read as zeros),
    /// keep the last good limit; the coordinator replaces it.
    #[error(transparent)]
    Malformed(MalformedLimit),
}

impl LimitReadError {
    /// The item's epoch as far as it is known (`None`: the read failed).
    pub fn malformed_epoch(&self) -> Option<u64> {
        match self {
            LimitReadError::Malformed(m) => Some(m.epoch.unwrap_or(0)),
            LimitReadError::Aws(_) => None,
        }
    }
}

/// The coordinator row as a follower last read it, as far as the limit and lease loops care:
/// the post's epoch, the stamp of the limit its owner last published and the lease table's
/// generation as its owner last stamped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenCoordinator {
    pub epoch: u64,
    pub limit_stamp: Option<LimitStamp>,
    pub lease_stamp: Option<LeaseStamp>,
}

impl SeenCoordinator {
    /// The lease stamp if its owner wrote it in this term: one from an earlier term (an owner
    /// that has not finished its first lease round yet, or a binary that does not stamp)
    /// says nothing about the lease table now.
    pub fn lease_generation(&self) -> Option<LeaseStamp> {
        self.lease_stamp.filter(|s| s.epoch == self.epoch)
    }
}

/// Whether a follower reads `lease_limits` now. `held`: the limit it obeys; `seen`: the
/// coordinator row as it last read it (`None`: not read, or the last read failed);
/// `since_read`: how long ago it last read `lease_limits` successfully; `refresh`: the longest
/// it goes without reading it (`Settings::stamp_refresh_interval`).
///
/// The row's stamp is written in the same transaction as `lease_limits`, so a stamp of the
/// row's own epoch (its owner published in this term) that is not above the held limit means
/// the item is still the one held: no read. Anything else reads: no limit held yet, no row, a
/// row without a stamp or with one from an earlier term (an owner that has not published yet,
/// or a binary that does not stamp), a newer stamp. And at least every `refresh` whatever the
/// stamps say, so a `lease_limits` item written by hand is seen within that interval (an
/// older binary's coordinator shows its own epoch without a stamp of it: read every time).
pub fn limit_read_due(
    held: Option<LimitStamp>,
    seen: Option<SeenCoordinator>,
    since_read: Option<Duration>,
    refresh: Duration,
) -> bool {
    let (Some(held), Some(seen), Some(since_read)) = (held, seen, since_read) else {
        return true;
    };
    since_read >= refresh || !stamp_confirms(held, seen)
}

/// Whether the coordinator row `seen` shows that `held` is still the latest publication: it
/// carries a stamp of its own epoch (its owner published in this term, in the transaction
/// that wrote `lease_limits`) and that stamp is not above `held`.
pub fn stamp_confirms(held: LimitStamp, seen: SeenCoordinator) -> bool {
    matches!(seen.limit_stamp, Some(stamp) if stamp.epoch == seen.epoch && stamp <= held)
}

/// Publications are ordered by `(epoch, version)`. A new epoch continues the previous version
/// unless that would pass this bound, then it starts again at 1: a term always has room.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// The version of the next publication by the coordinator of `epoch`, after `previous` (the
/// last record it knows). Never overflows.
pub fn next_version(previous: Option<&PublishedLimit>, epoch: u64) -> u64 {
    match previous {
        None => 1,
        Some(p) if p.epoch < epoch => match p.version.checked_add(1) {
            Some(v) if v <= MAX_VERSION => v,
            _ => 1,
        },
        Some(p) => p.version.saturating_add(1),
    }
}

/// Describes an attribute for a problem report: its type and value.
fn describe(v: &AttributeValue) -> String {
    match v {
        AttributeValue::S(s) => format!("the string {s:?}"),
        AttributeValue::N(n) => format!("the number {n}"),
        AttributeValue::Bool(b) => format!("the boolean {b}"),
        AttributeValue::Null(_) => "NULL".to_owned(),
        other => format!("{other:?}"),
    }
}

/// A numeric attribute as u64, saturating: a larger number reads as `u64::MAX`, a negative or
/// fractional one below 1 as 0. `None` when it is missing or not a number.
fn n_saturating(item: &Item, name: &str) -> Option<u64> {
    let text = item.get(name)?.as_n().ok()?;
    if let Ok(v) = text.trim().parse::<u64>() {
        return Some(v);
    }
    let f: f64 = text.trim().parse().ok()?;
    Some(if f >= u64::MAX as f64 {
        u64::MAX
    } else if f > 0.0 {
        f as u64
    } else {
        0
    })
}

/// Parses a `lease_limits` item. Every numeric attribute must be a u64 (`desired_workers` may
/// be absent); nothing is invented for a missing one.
pub fn parse_limit(
    item: &HashMap<String, AttributeValue>,
) -> Result<PublishedLimit, MalformedLimit> {
    let mut problems = Vec::new();
    let mut num = |name: &str, required: bool| -> Option<u64> {
        match item.get(name) {
            None if required => {
                problems.push(format!("{name} is missing"));
                None
            }
            None => None,
            Some(v) => match v.as_n().ok().map(|n| n.trim().parse::<u64>()) {
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    problems.push(format!(
                        "{name} is {}, not an integer 0..=18446744073709551615",
                        describe(v)
                    ));
                    None
                }
                None => {
                    problems.push(format!("{name} is {}, not a number", describe(v)));
                    None
                }
            },
        }
    };
    let max_leases_per_worker = num("max_leases_per_worker", true);
    let shard_count = num("shard_count", true);
    let worker_count = num("worker_count", true);
    let desired_workers = num("desired_workers", false);
    let live_workers = num("live_workers", true);
    let cap = num("cap", true);
    let capacity_deficit = num("capacity_deficit", true);
    let epoch = num("epoch", true);
    let version = num("version", true);
    let mut text = |name: &str| -> String {
        match item.get(name) {
            None => String::new(),
            Some(AttributeValue::S(s)) => s.clone(),
            Some(v) => {
                problems.push(format!("{name} is {}, not a string", describe(v)));
                String::new()
            }
        }
    };
    let computed_by = text("computed_by");
    let updated_at = text("updated_at");
    match (
        max_leases_per_worker,
        shard_count,
        worker_count,
        live_workers,
        cap,
        capacity_deficit,
        epoch,
        version,
    ) {
        (
            Some(max_leases_per_worker),
            Some(shard_count),
            Some(worker_count),
            Some(live_workers),
            Some(cap),
            Some(capacity_deficit),
            Some(epoch),
            Some(version),
        ) if problems.is_empty() => Ok(PublishedLimit {
            max_leases_per_worker,
            shard_count,
            worker_count,
            desired_workers,
            live_workers,
            cap,
            capacity_deficit,
            // Written for whoever reads the table, but always derived when read: a coordinator
            // of an older version updates the item without it, leaving a stale value behind,
            // and a display figure must never make the limit unobeyed.
            workers_needed: crate::policy::workers_needed(shard_count, cap),
            epoch,
            version,
            computed_by,
            updated_at,
        }),
        _ => Err(MalformedLimit {
            problems,
            epoch: n_saturating(item, "epoch"),
            version,
        }),
    }
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

fn heartbeat_row(worker_id: &str, item: &Item) -> HeartbeatRow {
    HeartbeatRow {
        worker_id: worker_id.to_owned(),
        counter: get_n(item, "counter").unwrap_or(0),
        leases_held: get_n(item, "leases_held").unwrap_or(0),
        renewed_at: get_s(item, "renewed_at"),
        instance: item
            .get("instance")
            .and_then(|v| v.as_s().ok())
            .filter(|i| !i.is_empty())
            .cloned(),
        failover_ms: get_n(item, "failover_ms"),
    }
}

/// A call sent once: the SDK's retries off, for writes whose effect must be known exactly.
fn without_sdk_retries() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::default()
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
}

/// A heartbeat write's condition over this instance's own row: it holds an older counter.
const OWN_ROW_WITH_LOWER_COUNTER: &str =
    "(#i = :mine AND (attribute_not_exists(#c) OR #c < :write))";

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

    async fn get(&self, key: &str) -> Result<Option<Item>, AwsError> {
        self.get_with(key, Consistency::Strong).await
    }

    async fn get_with(
        &self,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<Item>, AwsError> {
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "GetItem",
            self.aws
                .dynamodb
                .get_item()
                .table_name(&self.table)
                .key(META_KEY, s(key))
                .consistent_read(consistency == Consistency::Strong)
                .send(),
        )
        .await?;
        Ok(out.item)
    }

    // ---- heartbeats -------------------------------------------------------------------

    /// Renews this worker's heartbeat: sets `counter` to `write`, this process's number for
    /// this write (1, 2, 3, …: one per attempt, failed ones included), and publishes the
    /// instance and the failover timeout. Returns the counter written.
    ///
    /// The number comes from the process, not from the row (`counter + 1`), so a row's
    /// `(instance, counter)` never repeats: a row deleted (a coordinator judged the worker
    /// dead, an operator) and written again by the same process carries a counter no
    /// observer has seen before, and an observer that saw the old row takes it as progress.
    /// Each number is sent once (no SDK retry), so each is applied at most once; over this
    /// instance's own row the write also needs a lower counter there, so an earlier write that
    /// timed out here but reaches DynamoDB after a later one is refused. Two reads showing the
    /// same `(instance, counter)` therefore mean no write of it landed in between, even when
    /// the row was deleted and written again meanwhile.
    ///
    /// The write is conditional on the row being this instance's (or having none): while
    /// another process with the same worker id holds it, this fails with `ConditionFailed`.
    /// `take_over`: the row as last read, held by an instance judged silent; the write then
    /// succeeds only if that row is still exactly as read (instance and counter).
    pub async fn heartbeat(
        &self,
        me: &HeartbeatOwner,
        write: u64,
        leases_held: u64,
        ttl: Duration,
        take_over: Option<&HeartbeatRow>,
    ) -> Result<u64, AwsError> {
        let now = now_iso8601();
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let mut req = self
            .aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(META_KEY, s(worker_item_key(&me.worker_id)))
            .update_expression(
                "SET #c = :write, started_at = if_not_exists(started_at, :now), \
                 renewed_at = :now, leases_held = :held, #ttl = :ttl, #i = :mine, failover_ms = :f",
            )
            .expression_attribute_names("#c", "counter")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_names("#i", "instance")
            .expression_attribute_values(":write", n(write))
            .expression_attribute_values(":now", s(now))
            .expression_attribute_values(":held", n(leases_held))
            .expression_attribute_values(":ttl", n(expires))
            .expression_attribute_values(":mine", s(me.instance.clone()))
            .expression_attribute_values(":f", n(me.failover_ms()))
            .return_values(ReturnValue::UpdatedNew);
        req = match take_over.and_then(|row| row.instance.as_ref().map(|i| (i, row.counter))) {
            Some((seen, counter)) => req
                .condition_expression(format!(
                    "attribute_not_exists(#i) OR {OWN_ROW_WITH_LOWER_COUNTER} OR (#i = :seen AND #c = :seen_counter)"
                ))
                .expression_attribute_values(":seen", s(seen.clone()))
                .expression_attribute_values(":seen_counter", n(counter)),
            None => req.condition_expression(format!("attribute_not_exists(#i) OR {OWN_ROW_WITH_LOWER_COUNTER}")),
        };
        // One attempt per number: the SDK's own retry would send the same number again, and
        // a first attempt that is applied but unanswered, then a second applied after a later
        // write, would show an observer a counter it already saw.
        let out = call(
            &self.aws.metrics,
            "dynamodb",
            "UpdateItem",
            req.customize()
                .config_override(without_sdk_retries())
                .send(),
        )
        .await?;
        Ok(out
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "counter"))
            .unwrap_or(0))
    }

    /// One worker's heartbeat item (strongly consistent).
    pub async fn read_heartbeat(&self, worker_id: &str) -> Result<Option<HeartbeatRow>, AwsError> {
        Ok(self
            .get(&worker_item_key(worker_id))
            .await?
            .map(|item| heartbeat_row(worker_id, &item)))
    }

    /// Removes this instance's heartbeat (graceful shutdown), so a successor with the same
    /// worker id starts at once. A row another instance holds is left alone
    /// (`ConditionFailed`).
    pub async fn delete_heartbeat(&self, me: &HeartbeatOwner) -> Result<(), AwsError> {
        call(
            &self.aws.metrics,
            "dynamodb",
            "DeleteItem",
            self.aws
                .dynamodb
                .delete_item()
                .table_name(&self.table)
                .key(META_KEY, s(worker_item_key(&me.worker_id)))
                .condition_expression("attribute_not_exists(#i) OR #i = :mine")
                .expression_attribute_names("#i", "instance")
                .expression_attribute_values(":mine", s(me.instance.clone()))
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Deletes a dead worker's heartbeat only if it has not been renewed since it was judged:
    /// the same counter written by the same process. Sent once (no SDK retry): a delete
    /// applied but unanswered, retried, would come back as `ConditionFailed`, and the caller
    /// would not know the row it judged is gone.
    pub async fn delete_dead_heartbeat(
        &self,
        worker_id: &str,
        counter: u64,
        instance: Option<&str>,
    ) -> Result<(), AwsError> {
        // A row without an instance (or an empty one, which reads as none).
        let same_instance = match instance {
            Some(_) => "#i = :i",
            None => "(attribute_not_exists(#i) OR #i = :i)",
        };
        call(
            &self.aws.metrics,
            "dynamodb",
            "DeleteItem",
            self.aws
                .dynamodb
                .delete_item()
                .table_name(&self.table)
                .key(META_KEY, s(worker_item_key(worker_id)))
                .condition_expression(format!("#c = :c AND {same_instance}"))
                .expression_attribute_names("#c", "counter")
                .expression_attribute_names("#i", "instance")
                .set_expression_attribute_values(Some(
                    [(":c".to_owned(), n(counter))]
                        .into_iter()
                        .chain([(":i".to_owned(), s(instance.unwrap_or_default()))])
                        .collect(),
                ))
                .customize()
                .config_override(without_sdk_retries())
                .send(),
        )
        .await?;
        Ok(())
    }

    /// Every heartbeat item. The table holds O(workers) items, so a paginated scan is cheap.
    pub async fn scan_heartbeats(&self) -> Result<Vec<HeartbeatRow>, AwsError> {
        let heartbeats = ScanFilter::BeginsWith {
            attribute: META_KEY,
            prefix: WORKER_ITEM_PREFIX,
        };
        let items = scan_all(&self.aws, &self.table, heartbeats, Consistency::Strong).await?;
        let mut rows: Vec<HeartbeatRow> = items
            .iter()
            .filter_map(|item| {
                let key = get_s(item, META_KEY);
                let worker_id = key.strip_prefix(WORKER_ITEM_PREFIX)?;
                Some(heartbeat_row(worker_id, item))
            })
            .collect();
        rows.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(rows)
    }

    // ---- coordinator ------------------------------------------------------------------

    pub async fn read_coordinator(&self) -> Result<Option<CoordinatorRow>, AwsError> {
        self.coordinator_with(Consistency::Strong).await
    }

    /// A follower's look at the coordinator item every heartbeat: eventually consistent, at
    /// half the price. A stale answer never hastens anything: an older counter counts as a
    /// change (restarting the silence clock), a claim goes by a strong read and is conditional
    /// on the exact row seen, and a stale stamp leaves a new limit for the next look. It can
    /// cost a little, within the replicas' lag after a write: a takeover up to a look later,
    /// a needless heartbeat scan when a renewal looks missed, an extra strong read before a
    /// claim, a limit obeyed a look later, `/status` showing the previous coordinator.
    pub async fn follow_coordinator(&self) -> Result<Option<CoordinatorRow>, AwsError> {
        self.coordinator_with(Consistency::Eventual).await
    }

    async fn coordinator_with(
        &self,
        consistency: Consistency,
    ) -> Result<Option<CoordinatorRow>, AwsError> {
        Ok(self
            .get_with(COORDINATOR_ITEM, consistency)
            .await?
            .map(|item| CoordinatorRow {
                owner: get_s(&item, "owner"),
                epoch: n_saturating(&item, "epoch").unwrap_or(0),
                counter: get_n(&item, "counter").unwrap_or(0),
                renewed_at: get_s(&item, "renewed_at"),
                failover_ms: get_n(&item, "failover_ms"),
                heartbeat_ms: get_n(&item, "heartbeat_ms"),
                limit_stamp: match (get_n(&item, "limit_epoch"), get_n(&item, "limit_version")) {
                    (Some(epoch), Some(version)) => Some(LimitStamp { epoch, version }),
                    _ => None,
                },
                lease_stamp: match (
                    get_n(&item, "lease_epoch"),
                    get_n(&item, "lease_generation"),
                ) {
                    (Some(epoch), Some(generation)) => Some(LeaseStamp { epoch, generation }),
                    _ => None,
                },
                verdict_due_in_ms: get_n(&item, "verdict_due_in_ms"),
                owner_heartbeat: match (
                    get_n(&item, "owner_heartbeat"),
                    get_s(&item, "owner_instance"),
                ) {
                    (Some(counter), instance) if !instance.is_empty() => {
                        Some(OwnerHeartbeat { counter, instance })
                    }
                    _ => None,
                },
            }))
    }

    /// Claims the coordinator post with epoch `next_epoch`. `seen` is the row the caller judged
    /// vacant or dead (`None`: no row existed); the write succeeds only if the row is still
    /// exactly that, so of many simultaneous claimants exactly one wins. `failover` and
    /// `heartbeat` are the claimant's `failover_timeout` (followers wait at least that long)
    /// and `heartbeat_interval` (how often it renews), published with the claim.
    pub async fn claim_coordinator(
        &self,
        me: &str,
        seen: Option<&CoordinatorRow>,
        next_epoch: u64,
        failover: Duration,
        heartbeat: Duration,
    ) -> Result<CoordinatorRow, AwsError> {
        let now = now_iso8601();
        let failover_ms = u64::try_from(failover.as_millis()).unwrap_or(u64::MAX);
        let heartbeat_ms = u64::try_from(heartbeat.as_millis()).unwrap_or(u64::MAX);
        let mut req = self
            .aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(META_KEY, s(COORDINATOR_ITEM))
            .update_expression(
                "SET #o = :me, epoch = :next, #c = :zero, renewed_at = :now, failover_ms = :f, \
                 heartbeat_ms = :h REMOVE owner_heartbeat, owner_instance",
            )
            .expression_attribute_names("#o", "owner")
            .expression_attribute_names("#c", "counter")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":next", n(next_epoch))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", s(now.clone()))
            .expression_attribute_values(":f", n(failover_ms))
            .expression_attribute_values(":h", n(heartbeat_ms));
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
            failover_ms: Some(failover_ms),
            heartbeat_ms: Some(heartbeat_ms),
            // Left as the previous owner stamped it: this owner stamps its first publication.
            limit_stamp: None,
            lease_stamp: None,
            owner_heartbeat: None,
            verdict_due_in_ms: None,
        })
    }

    /// An update of the coordinator item that lands only while `me` holds the post in `epoch`
    /// (`#o` names `owner`; `:me` and `:e` are bound).
    fn owner_update(
        &self,
        me: &str,
        epoch: u64,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.aws
            .dynamodb
            .update_item()
            .table_name(&self.table)
            .key(META_KEY, s(COORDINATOR_ITEM))
            .condition_expression("#o = :me AND epoch = :e")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":e", n(epoch))
    }

    /// Stamps the lease table's generation on the coordinator item, with the time until the
    /// next suspect's verdict (`None` removes it; see [`CoordinatorRow::verdict_due_in_ms`]),
    /// conditional on `me` still holding the post in `epoch`; fails with `ConditionFailed`
    /// once deposed. The owner's counter is left alone: a stamp is not a renewal.
    pub async fn stamp_leases(
        &self,
        me: &str,
        stamp: LeaseStamp,
        verdict_due_in: Option<Duration>,
    ) -> Result<(), AwsError> {
        let req = self
            .owner_update(me, stamp.epoch)
            .expression_attribute_values(":g", n(stamp.generation));
        let req = match verdict_due_in {
            Some(due) => req
                .update_expression(
                    "SET lease_epoch = :e, lease_generation = :g, verdict_due_in_ms = :v",
                )
                .expression_attribute_values(
                    ":v",
                    n(u64::try_from(due.as_millis()).unwrap_or(u64::MAX)),
                ),
            None => req.update_expression(
                "SET lease_epoch = :e, lease_generation = :g REMOVE verdict_due_in_ms",
            ),
        };
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(())
    }

    /// Takes this term's lease stamp off the coordinator item (its lease rounds failed or
    /// stopped): followers query their leases every heartbeat until a round stamps again.
    pub async fn clear_lease_stamp(&self, me: &str, epoch: u64) -> Result<(), AwsError> {
        let req = self
            .owner_update(me, epoch)
            .update_expression("REMOVE lease_epoch, lease_generation, verdict_due_in_ms");
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(())
    }

    /// Renews the coordinator lease; fails with `ConditionFailed` once deposed. `heartbeat`:
    /// this worker's last acknowledged heartbeat as the renewal is sent (see
    /// [`CoordinatorRow::owner_heartbeat`]); `None` leaves none recorded.
    pub async fn renew_coordinator(
        &self,
        me: &str,
        epoch: u64,
        heartbeat: Option<&OwnerHeartbeat>,
    ) -> Result<u64, AwsError> {
        let req = self
            .owner_update(me, epoch)
            .expression_attribute_names("#c", "counter")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", s(now_iso8601()))
            .return_values(ReturnValue::UpdatedNew);
        let req = match heartbeat {
            Some(h) => req
                .update_expression(
                    "SET #c = #c + :one, renewed_at = :now, owner_heartbeat = :hc, \
                     owner_instance = :hi",
                )
                .expression_attribute_values(":hc", n(h.counter))
                .expression_attribute_values(":hi", s(h.instance.clone())),
            None => req.update_expression(
                "SET #c = #c + :one, renewed_at = :now REMOVE owner_heartbeat, owner_instance",
            ),
        };
        let out = call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(out
            .attributes
            .as_ref()
            .and_then(|a| get_n(a, "counter"))
            .unwrap_or(0))
    }

    /// Leaves the post vacant (owner ""), keeping the epoch so the successor's is higher.
    pub async fn step_down(&self, me: &str, epoch: u64) -> Result<(), AwsError> {
        let req = self
            .owner_update(me, epoch)
            // A vacant post vouches for no lease generation: followers query every heartbeat
            // until the next owner stamps its own.
            .update_expression(
                "SET #o = :vacant, #c = #c + :one, renewed_at = :now \
                 REMOVE lease_epoch, lease_generation, verdict_due_in_ms",
            )
            .expression_attribute_names("#c", "counter")
            .expression_attribute_values(":vacant", s(""))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", s(now_iso8601()));
        call(&self.aws.metrics, "dynamodb", "UpdateItem", req.send()).await?;
        Ok(())
    }

    // ---- lease_limits -----------------------------------------------------------------

    /// The published limit. A malformed item (a missing or non-integer attribute) is an error
    /// naming what is wrong, never a record of zeros.
    pub async fn read_limit(&self) -> Result<Option<PublishedLimit>, LimitReadError> {
        match self.get(LEASE_LIMITS_ITEM).await? {
            None => Ok(None),
            Some(item) => parse_limit(&item)
                .map(Some)
                .map_err(LimitReadError::Malformed),
        }
    }

    /// Writes `lease_limits` as coordinator of `record.epoch`, atomically with a check that the
    /// caller still owns the coordinator item at that epoch, and stamps that item with the
    /// record's (epoch, version) in the same transaction (followers read `lease_limits` when
    /// the stamp shows a limit they do not hold: [`limit_read_due`]). A deposed coordinator's
    /// write fails with `ConditionFailed`, even before its successor has published anything.
    /// `record.version` should be [`next_version`] of the last record the caller knows.
    ///
    /// The item itself must not be newer: a missing item, one without a numeric epoch or
    /// version, an older epoch, or this epoch at a lower version is overwritten. When the write
    /// is refused although the caller still owns the post, the item is what blocks it: a
    /// malformed one, or one claiming a later epoch than the coordinator item allows, is then
    /// replaced (logged with what was wrong), still under the coordinator check. A well-formed
    /// item of this epoch at a version not below `record.version` refuses the write
    /// (`ConditionFailed`): re-read it and publish with the next version.
    pub async fn publish_limit(&self, record: &PublishedLimit) -> Result<(), AwsError> {
        match self.transact_limit(record, true).await {
            Err(e) if e.is_condition_failed() => {}
            other => return other,
        }
        let refused = || AwsError::ConditionFailed {
            operation: "TransactWriteItems",
        };
        let still_mine = self
            .read_coordinator()
            .await?
            .is_some_and(|row| row.owner == record.computed_by && row.epoch == record.epoch);
        if !still_mine {
            return Err(refused());
        }
        let problem = match self.read_limit().await {
            Err(LimitReadError::Malformed(m)) => m.to_string(),
            Err(LimitReadError::Aws(e)) => return Err(e),
            Ok(Some(current)) if current.epoch > record.epoch => format!(
                "lease_limits carries epoch {} (version {}, by {:?}) above the coordinator item's epoch {}",
                current.epoch, current.version, current.computed_by, record.epoch
            ),
            Ok(Some(current))
                if current.epoch == record.epoch
                    && current.version == u64::MAX
                    && record.version == u64::MAX =>
            {
                "lease_limits version is at its maximum".to_owned()
            }
            Ok(_) => return Err(refused()),
        };
        tracing::warn!(
            epoch = record.epoch,
            version = record.version,
            "replacing the lease_limits item: {problem}"
        );
        self.transact_limit(record, false).await
    }

    /// The publication transaction: the coordinator check with its stamp, plus the update,
    /// `guarded` by the condition that the item is not newer than `record`.
    async fn transact_limit(&self, record: &PublishedLimit, guarded: bool) -> Result<(), AwsError> {
        // The stamp leaves the owner's counter alone: a publication is not a renewal.
        let check = Update::builder()
            .table_name(&self.table)
            .key(META_KEY, s(COORDINATOR_ITEM))
            .update_expression("SET limit_epoch = :e, limit_version = :v")
            .condition_expression("#o = :me AND epoch = :e")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", s(record.computed_by.clone()))
            .expression_attribute_values(":e", n(record.epoch))
            .expression_attribute_values(":v", n(record.version))
            .build()
            .expect("table, key and expression are set");
        let mut set = vec![
            "max_leases_per_worker = :limit",
            "shard_count = :shards",
            "worker_count = :workers",
            "live_workers = :live",
            "cap = :cap",
            "capacity_deficit = :deficit",
            "workers_needed = :needed",
            "epoch = :e",
            "version = :v",
            "computed_by = :me",
            "updated_at = :now",
        ];
        let mut update = Update::builder()
            .table_name(&self.table)
            .key(META_KEY, s(LEASE_LIMITS_ITEM))
            .expression_attribute_values(":limit", n(record.max_leases_per_worker))
            .expression_attribute_values(":shards", n(record.shard_count))
            .expression_attribute_values(":workers", n(record.worker_count))
            .expression_attribute_values(":live", n(record.live_workers))
            .expression_attribute_values(":cap", n(record.cap))
            .expression_attribute_values(":deficit", n(record.capacity_deficit))
            .expression_attribute_values(":needed", n(record.workers_needed))
            .expression_attribute_values(":e", n(record.epoch))
            .expression_attribute_values(":v", n(record.version))
            .expression_attribute_values(":me", s(record.computed_by.clone()))
            .expression_attribute_values(":now", s(record.updated_at.clone()));
        if guarded {
            // Comparisons only where the attribute is a number (a missing or mistyped one must
            // not block the coordinator for ever).
            update = update
                .condition_expression(
                    "attribute_not_exists(#k) OR NOT attribute_type(epoch, :num) OR epoch < :e \
                     OR (epoch = :e AND (NOT attribute_type(version, :num) OR version < :v))",
                )
                .expression_attribute_names("#k", META_KEY)
                .expression_attribute_values(":num", s("N"));
        }
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
                .transact_items(TransactWriteItem::builder().update(check).build())
                .transact_items(TransactWriteItem::builder().update(update).build())
                .send(),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_item() -> Item {
        let mut item = Item::new();
        for (k, v) in [
            ("max_leases_per_worker", 10),
            ("shard_count", 30),
            ("worker_count", 3),
            ("live_workers", 3),
            ("cap", 80),
            ("capacity_deficit", 0),
            ("epoch", 7),
            ("version", 12),
        ] {
            item.insert(k.to_owned(), n(v));
        }
        item.insert("computed_by".into(), s("w1"));
        item.insert("updated_at".into(), s("2026-01-01T00:00:00.000Z"));
        item.insert(META_KEY.into(), s(LEASE_LIMITS_ITEM));
        item
    }

    #[test]
    fn a_complete_item_parses() {
        let r = parse_limit(&good_item()).unwrap();
        assert_eq!(r.max_leases_per_worker, 10);
        assert_eq!((r.epoch, r.version), (7, 12));
        assert_eq!(r.desired_workers, None);
        assert_eq!(r.computed_by, "w1");
        let mut item = good_item();
        item.insert("desired_workers".into(), n(4));
        assert_eq!(parse_limit(&item).unwrap().desired_workers, Some(4));
        // A limit of 0 (no open shards) is a legitimate decision.
        item.insert("max_leases_per_worker".into(), n(0));
        assert_eq!(parse_limit(&item).unwrap().max_leases_per_worker, 0);
        // workers_needed is derived from shard_count and cap (ceil(30 / 80) = 1), whatever the
        // item says: a stale value left by an older coordinator, or a mistyped one, changes
        // nothing and is not a reason to ignore the limit.
        assert_eq!(parse_limit(&good_item()).unwrap().workers_needed, 1);
        item.insert("workers_needed".into(), n(5));
        assert_eq!(parse_limit(&item).unwrap().workers_needed, 1);
        item.insert("workers_needed".into(), s("five"));
        assert_eq!(parse_limit(&item).unwrap().workers_needed, 1);
        item.insert("cap".into(), n(0));
        assert_eq!(
            parse_limit(&item).unwrap().workers_needed,
            30,
            "a cap of 0 counts as 1"
        );
    }

    #[test]
    fn a_missing_or_mistyped_attribute_is_reported_not_zeroed() {
        let mut item = good_item();
        item.remove("max_leases_per_worker");
        let err = parse_limit(&item).unwrap_err();
        assert_eq!(err.problems, vec!["max_leases_per_worker is missing"]);
        assert_eq!((err.epoch, err.version), (Some(7), Some(12)));

        let mut item = good_item();
        item.remove("version");
        item.insert("cap".into(), s("eighty"));
        let err = parse_limit(&item).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(
            err.to_string()
                .contains("cap is the string \"eighty\", not a number"),
            "{err}"
        );
        assert!(err.to_string().contains("version is missing"), "{err}");
        assert_eq!(err.version, None);

        let mut item = good_item();
        item.insert("epoch".into(), AttributeValue::N("1e30".into()));
        item.insert("worker_count".into(), AttributeValue::N("-1".into()));
        item.insert("desired_workers".into(), AttributeValue::N("2.5".into()));
        let err = parse_limit(&item).unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        // An epoch beyond u64 still tells a claimant to go as high as it can.
        assert_eq!(err.epoch, Some(u64::MAX));

        let mut item = good_item();
        item.insert("computed_by".into(), n(3));
        assert!(parse_limit(&item).is_err());
    }

    #[test]
    fn a_follower_reads_lease_limits_only_when_the_stamp_or_the_clock_says_so() {
        let stamp = |epoch, version| LimitStamp { epoch, version };
        let seen = |epoch, limit_stamp| {
            Some(SeenCoordinator {
                epoch,
                limit_stamp,
                lease_stamp: None,
            })
        };
        let refresh = Duration::from_secs(10);
        let recent = Some(Duration::from_secs(3));
        let held = Some(stamp(4, 7));
        let due = |held, seen, since| limit_read_due(held, seen, since, refresh);
        let current = seen(4, Some(stamp(4, 7)));
        // The row's owner stamped this term with the held limit, or an older one: no read.
        assert!(!due(held, current, recent));
        assert!(!due(held, seen(4, Some(stamp(4, 6))), recent));
        // A newer stamp reads.
        assert!(due(held, seen(4, Some(stamp(4, 8))), recent));
        // A stamp from before this term (the new owner has not published, or an older
        // binary's coordinator publishes without stamping) reads every time.
        assert!(due(held, seen(5, Some(stamp(4, 7))), recent));
        // No stamp, no row read, no limit held, never read: reads.
        assert!(due(held, seen(4, None), recent));
        assert!(due(held, None, recent));
        assert!(due(None, current, recent));
        assert!(due(held, current, None));
        // However the stamps look, once a refresh interval has passed since the last read.
        assert!(due(held, current, Some(refresh)));
        assert!(!due(
            held,
            current,
            Some(refresh - Duration::from_millis(1))
        ));
        // Stamps order by epoch, then version.
        assert!(stamp(5, 1) > stamp(4, 9));
        // What confirms a held limit for /ready is exactly what spares the read.
        let confirms = |s| {
            stamp_confirms(
                stamp(4, 7),
                SeenCoordinator {
                    epoch: 4,
                    limit_stamp: s,
                    lease_stamp: None,
                },
            )
        };
        assert!(confirms(Some(stamp(4, 7))) && confirms(Some(stamp(4, 6))));
        assert!(!confirms(Some(stamp(4, 8))) && !confirms(Some(stamp(3, 7))) && !confirms(None));
    }

    #[test]
    fn only_a_lease_stamp_of_the_rows_own_term_counts() {
        let seen = |epoch, lease_stamp| SeenCoordinator {
            epoch,
            limit_stamp: None,
            lease_stamp,
        };
        let stamp = |epoch, generation| Some(LeaseStamp { epoch, generation });
        assert_eq!(seen(4, stamp(4, 2)).lease_generation(), stamp(4, 2));
        // The previous owner's stamp, before this one's first lease round: nothing known.
        assert_eq!(seen(5, stamp(4, 2)).lease_generation(), None);
        assert_eq!(seen(4, None).lease_generation(), None);
    }

    #[test]
    fn u64_max_parses_and_the_next_version_never_overflows() {
        let mut item = good_item();
        item.insert("version".into(), n(u64::MAX));
        let r = parse_limit(&item).unwrap();
        assert_eq!(r.version, u64::MAX);
        // A new epoch starts again at 1 once the version is beyond MAX_VERSION.
        assert_eq!(next_version(Some(&r), 8), 1);
        // Within its own epoch it saturates (publish_limit replaces an item stuck there).
        assert_eq!(next_version(Some(&r), 7), u64::MAX);
        let mut r2 = r.clone();
        r2.version = 41;
        assert_eq!(next_version(Some(&r2), 8), 42);
        assert_eq!(next_version(Some(&r2), 7), 42);
        r2.version = MAX_VERSION;
        assert_eq!(next_version(Some(&r2), 8), 1);
        r2.version = MAX_VERSION - 1;
        assert_eq!(next_version(Some(&r2), 8), MAX_VERSION);
        assert_eq!(next_version(None, 3), 1);
    }

    #[test]
    fn heartbeat_rows_carry_instance_and_failover() {
        let mut item = Item::new();
        item.insert("counter".into(), n(5));
        item.insert("instance".into(), s("abc"));
        item.insert("failover_ms".into(), n(1500));
        let row = heartbeat_row("w0", &item);
        assert_eq!(row.instance.as_deref(), Some("abc"));
        assert_eq!(row.failover(), Some(Duration::from_millis(1500)));
        let row = heartbeat_row("w0", &Item::new());
        assert_eq!(
            (row.instance, row.failover_ms, row.counter),
            (None, None, 0)
        );
    }
}
