//! The DynamoDB emulator is linearizable where the worker relies on it: conditional writes and
//! CreateTable calls racing through the real SDK over HTTP have exactly one winner, and
//! transactions are all-or-nothing. Threaded `moto_server` fails this, which is why
//! xtask/src/emulators.rs serves moto one request at a time through lab/moto_serial.py; if
//! these tests fail, the election and lease tests prove nothing. Run with `cargo xtask test`,
//! which starts the emulators and exports their endpoints.
//!
//! A race that an unsafe emulator loses only sometimes needs repeating: each case runs many
//! trials and reports every broken one, and the conditional writes carry a longer condition
//! than the worker's (same meaning) so that the emulator spends longer between its read and
//! its write, where a thread switch makes a threaded server lose.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::support::*;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, KeySchemaElement, KeyType,
    Put, ScalarAttributeType, TransactWriteItem, Update,
};
use tokio::sync::Barrier;

/// Conditional writes in flight at once in each race, and how many races. Against threaded
/// moto 5.2.5 roughly one race in five has two or more winners.
const RACERS: usize = 8;
const TRIALS: usize = 30;
/// `attribute_not_exists` clauses on attributes nobody writes, added to each racing condition.
const CONDITION_PADDING: usize = 16;
/// Concurrent CreateTable calls of one name, and how many names. (Threaded moto 5.2.5 does
/// little between its existence check and its insert, and this race has not broken it in our
/// runs; it stays because every worker start runs it.)
const TABLE_RACERS: usize = 8;
const TABLE_TRIALS: usize = 10;
/// Conflicting transactions in flight at once, and how many races.
const TXN_RACERS: usize = 4;
const TXN_TRIALS: usize = 30;

/// A DynamoDB client for the emulator without retries: every request the test counts is one
/// request the emulator answered (a retried write could hide or invent a winner).
async fn dynamodb() -> Client {
    let aws = aws().await;
    let conf = aws
        .dynamodb
        .config()
        .to_builder()
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(conf)
}

/// A fresh table with the string hash key `pk`.
async fn table(prefix: &str) -> String {
    let name = unique(prefix);
    kds_worker::schema::ensure_table(&aws().await, &name, "pk")
        .await
        .expect("create table");
    name
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// `condition` and `CONDITION_PADDING` clauses that hold for every item the tests write.
fn padded(condition: &str) -> String {
    let mut c = condition.to_owned();
    for k in 0..CONDITION_PADDING {
        c.push_str(&format!(" AND attribute_not_exists(unused{k})"));
    }
    c
}

/// Runs `n` requests built by `request(i)` so that all of them are in flight together: each
/// racer waits at a barrier, then sends. Results in racer order.
async fn race<T, F, Fut>(n: usize, request: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let request = request(i);
            tokio::spawn(async move {
                barrier.wait().await;
                request.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for h in handles {
        results.push(h.await.expect("racer task"));
    }
    results
}

/// The racers whose request succeeded, every other one having failed with the error code
/// `loss`; or, if one failed any other way (a 500, a timeout), why the trial is broken.
fn winners<T, E>(
    results: &[Result<T, SdkError<E, HttpResponse>>],
    loss: &str,
) -> Result<Vec<usize>, String>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut won = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => won.push(i),
            Err(e) if e.code() == Some(loss) => {}
            Err(e) => return Err(format!("racer {i}: {}", unexpected(e, loss))),
        }
    }
    Ok(won)
}

/// An error that is neither success nor `expected`, briefly (moto's 500 is a whole HTML page).
fn unexpected<E>(e: &SdkError<E, HttpResponse>, expected: &str) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let got = match (e.code(), e.raw_response()) {
        (Some(code), _) => code.to_owned(),
        (None, Some(response)) => format!("HTTP {} without an error code", response.status()),
        (None, None) => DisplayErrorContext(e).to_string(),
    };
    format!("expected success or {expected}, got {got}")
}

/// `pk` -> `owner` of every item in `table` (a strongly consistent scan).
async fn owners(db: &Client, table: &str) -> HashMap<String, String> {
    let mut pages = db
        .scan()
        .table_name(table)
        .consistent_read(true)
        .into_paginator()
        .items()
        .send();
    let mut owners = HashMap::new();
    while let Some(item) = pages.next().await {
        let item = item.expect("Scan");
        let get = |a: &str| item.get(a).and_then(|v| v.as_s().ok()).cloned();
        if let (Some(pk), Some(owner)) = (get("pk"), get("owner")) {
            owners.insert(pk, owner);
        }
    }
    owners
}

/// Fails the test naming every bad trial, after all trials ran (so the count is reported).
fn assert_no_bad_trials(case: &str, trials: usize, bad: &[String], started: Instant) {
    assert!(
        bad.is_empty(),
        "{case}: {} of {trials} trials broke linearizability:\n  {}",
        bad.len(),
        bad.join("\n  ")
    );
    eprintln!(
        "{case}: {trials} trials, all linearizable ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
}

/// Checks races of conditional writes that each try to make racer `i` the `owner` of item
/// `item-{trial}`: exactly one winner per trial, and the item names it.
fn check_one_winner_each(
    winners_by_trial: &BTreeMap<usize, Result<Vec<usize>, String>>,
    stored: &HashMap<String, String>,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (trial, winners) in winners_by_trial {
        let owner = stored.get(&format!("item-{trial}"));
        match winners {
            Ok(w) if w.len() == 1 && owner == Some(&format!("racer-{}", w[0])) => {}
            Ok(w) => bad.push(format!(
                "trial {trial}: winners {w:?}, stored owner {owner:?}"
            )),
            Err(why) => bad.push(format!("trial {trial}: {why}")),
        }
    }
    bad
}

/// Leader election's write: UpdateItem `attribute_not_exists(owner)` on one fresh item from
/// `RACERS` requests at once has exactly one winner, and the item names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_update_item_race_has_exactly_one_winner() {
    let db = dynamodb().await;
    let table = table("conf-update").await;
    let started = Instant::now();
    let mut winners_by_trial = BTreeMap::new();
    for trial in 0..TRIALS {
        let pk = format!("item-{trial}");
        let results = race(RACERS, |i| {
            db.update_item()
                .table_name(&table)
                .key("pk", s(&pk))
                .update_expression("SET #o = :me")
                .condition_expression(padded("attribute_not_exists(#o)"))
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":me", s(format!("racer-{i}")))
                .send()
        })
        .await;
        winners_by_trial.insert(trial, winners(&results, "ConditionalCheckFailedException"));
    }
    let bad = check_one_winner_each(&winners_by_trial, &owners(&db, &table).await);
    assert_no_bad_trials("conditional UpdateItem", TRIALS, &bad, started);
}

/// The same race with PutItem `attribute_not_exists(pk)` (creating a heartbeat or lease row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_put_item_race_has_exactly_one_winner() {
    let db = dynamodb().await;
    let table = table("conf-put").await;
    let started = Instant::now();
    let mut winners_by_trial = BTreeMap::new();
    for trial in 0..TRIALS {
        let pk = format!("item-{trial}");
        let results = race(RACERS, |i| {
            db.put_item()
                .table_name(&table)
                .item("pk", s(&pk))
                .item("owner", s(format!("racer-{i}")))
                .condition_expression(padded("attribute_not_exists(pk)"))
                .send()
        })
        .await;
        winners_by_trial.insert(trial, winners(&results, "ConditionalCheckFailedException"));
    }
    let bad = check_one_winner_each(&winners_by_trial, &owners(&db, &table).await);
    assert_no_bad_trials("conditional PutItem", TRIALS, &bad, started);
}

/// Workers starting together all create the tables: exactly one CreateTable of a name
/// succeeds, every other one gets ResourceInUseException.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_table_has_exactly_one_success() {
    let db = dynamodb().await;
    let started = Instant::now();
    let mut bad = Vec::new();
    for trial in 0..TABLE_TRIALS {
        let name = unique("conf-create");
        // The worker's table shape (kds_worker::schema::ensure_table), raced raw.
        let results = race(TABLE_RACERS, |_| {
            db.create_table()
                .table_name(&name)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name("pk")
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .unwrap(),
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name("pk")
                        .key_type(KeyType::Hash)
                        .build()
                        .unwrap(),
                )
                .send()
        })
        .await;
        match winners(&results, "ResourceInUseException") {
            Ok(w) if w.len() == 1 => {}
            Ok(w) => bad.push(format!(
                "trial {trial}: {} of {TABLE_RACERS} CreateTable calls succeeded",
                w.len()
            )),
            Err(why) => bad.push(format!("trial {trial}: {why}")),
        }
        // Leave the emulator as we found it.
        let _ = db.delete_table().table_name(&name).send().await;
    }
    assert_no_bad_trials("concurrent CreateTable", TABLE_TRIALS, &bad, started);
}

/// TransactWriteItems is all-or-nothing: when its ConditionCheck fails, neither its Update of
/// an existing item nor its Put of a new one is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_with_failing_condition_check_writes_nothing() {
    const TRIALS: usize = 5;
    let db = dynamodb().await;
    let table = table("conf-txn-check").await;
    let started = Instant::now();
    let mut bad = Vec::new();
    for trial in 0..TRIALS {
        let (guard, existing, new) = (
            format!("guard-{trial}"),
            format!("existing-{trial}"),
            format!("new-{trial}"),
        );
        for pk in [&guard, &existing] {
            db.put_item()
                .table_name(&table)
                .item("pk", s(pk))
                .item("owner", s("before"))
                .send()
                .await
                .expect("PutItem");
        }
        let result = db
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(
                        ConditionCheck::builder()
                            .table_name(&table)
                            .key("pk", s(&guard))
                            .condition_expression("#o = :other")
                            .expression_attribute_names("#o", "owner")
                            .expression_attribute_values(":other", s("somebody else"))
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .update(
                        Update::builder()
                            .table_name(&table)
                            .key("pk", s(&existing))
                            .update_expression("SET #o = :after")
                            .expression_attribute_names("#o", "owner")
                            .expression_attribute_values(":after", s("after"))
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&table)
                            .item("pk", s(&new))
                            .item("owner", s("after"))
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(_) => bad.push(format!("trial {trial}: the transaction succeeded")),
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                    let codes: Vec<_> = c
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().unwrap_or("-"))
                        .collect();
                    if codes
                        .first()
                        .is_some_and(|c| *c != "ConditionalCheckFailed")
                    {
                        bad.push(format!("trial {trial}: cancellation reasons {codes:?}"));
                    }
                }
                _ => bad.push(format!(
                    "trial {trial}: {}",
                    unexpected(&e, "TransactionCanceledException")
                )),
            },
        }
    }
    let stored = owners(&db, &table).await;
    for trial in 0..TRIALS {
        let existing = stored.get(&format!("existing-{trial}"));
        let new = stored.get(&format!("new-{trial}"));
        if existing.map(String::as_str) != Some("before") || new.is_some() {
            bad.push(format!(
                "trial {trial}: after the cancelled transaction, the updated item's owner is \
                 {existing:?} (want \"before\") and the new item's {new:?} (want none)"
            ));
        }
    }
    assert_no_bad_trials("cancelled TransactWriteItems", TRIALS, &bad, started);
}

/// `TXN_RACERS` concurrent transactions each claim one shared item (`attribute_not_exists`)
/// and write their own side item: no two conditions can both hold, so at most one applies,
/// wholly (claim and side item), and it is the one reported successful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_concurrent_transactions_at_most_one_applies() {
    let db = dynamodb().await;
    let table = table("conf-txn-race").await;
    let started = Instant::now();
    let mut bad = Vec::new();
    let mut succeeded_by_trial = BTreeMap::new();
    for trial in 0..TXN_TRIALS {
        let shared = format!("shared-{trial}");
        let results = race(TXN_RACERS, |i| {
            db.transact_write_items()
                .transact_items(
                    TransactWriteItem::builder()
                        .update(
                            Update::builder()
                                .table_name(&table)
                                .key("pk", s(&shared))
                                .update_expression("SET #o = :me")
                                .condition_expression("attribute_not_exists(#o)")
                                .expression_attribute_names("#o", "owner")
                                .expression_attribute_values(":me", s(format!("racer-{i}")))
                                .build()
                                .unwrap(),
                        )
                        .build(),
                )
                .transact_items(
                    TransactWriteItem::builder()
                        .put(
                            Put::builder()
                                .table_name(&table)
                                .item("pk", s(format!("side-{trial}-{i}")))
                                .item("owner", s(format!("racer-{i}")))
                                .build()
                                .unwrap(),
                        )
                        .build(),
                )
                .send()
        })
        .await;
        match winners(&results, "TransactionCanceledException") {
            Ok(w) => {
                succeeded_by_trial.insert(trial, w);
            }
            Err(why) => bad.push(format!("trial {trial}: {why}")),
        }
    }
    let stored = owners(&db, &table).await;
    let mut by_successes: BTreeMap<usize, usize> = BTreeMap::new();
    for (trial, succeeded) in &succeeded_by_trial {
        let applied: Vec<_> = (0..TXN_RACERS)
            .filter(|i| stored.contains_key(&format!("side-{trial}-{i}")))
            .collect();
        let owner = stored.get(&format!("shared-{trial}")).cloned();
        let expected = applied.first().map(|i| format!("racer-{i}"));
        *by_successes.entry(succeeded.len()).or_default() += 1;
        if succeeded.len() > 1 || applied != *succeeded || owner != expected {
            bad.push(format!(
                "trial {trial}: reported successful {succeeded:?}, side items written by \
                 {applied:?}, shared item owner {owner:?}"
            ));
        }
    }
    eprintln!("conflicting transactions: trials by number of successes {by_successes:?}");
    assert_no_bad_trials("conflicting TransactWriteItems", TXN_TRIALS, &bad, started);
    // Real DynamoDB may cancel every conflicting transaction; an emulator that runs them one
    // at a time lets one through, or the race above tested nothing.
    assert!(
        by_successes.get(&1).is_some_and(|n| *n > 0),
        "no trial had a successful transaction: {by_successes:?}"
    );
}
