//! Pure lease assignment: from one snapshot of the lease table, the live workers and the
//! published limit, what should *this* worker take and release this round?
//!
//! Every worker computes the same targets from the same snapshot, so their independent rounds
//! agree: an even spread (max − min ≤ 1 where the limit allows), nobody above the limit, and
//! every readable shard owned once capacity allows. No I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::leases::Lease;

/// One round's inputs.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub leases: &'a [Lease],
    /// Workers judged alive (the caller includes itself).
    pub live: &'a BTreeSet<String>,
    /// The published `max_leases_per_worker`.
    pub limit: u64,
}

/// What one worker does this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Leases to take, conditional on them being unchanged since the snapshot.
    pub take: Vec<String>,
    /// Leases to hand straight to another worker (checkpoint, then transfer ownership): the
    /// shard is never unowned during a rebalance.
    pub hand_off: Vec<(String, String)>,
    /// Leases to give up (checkpoint, then release) when nobody has room for them.
    pub release: Vec<String>,
}

/// A shard may be read once it is not finished and each parent is finished or has no lease.
pub fn readable_shards(leases: &[Lease]) -> BTreeSet<&str> {
    let by_id: HashMap<&str, &Lease> = leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();
    leases
        .iter()
        .filter(|l| !l.is_finished())
        .filter(|l| {
            l.parents.iter().all(|p| {
                by_id
                    .get(p.as_str())
                    .is_none_or(|parent| parent.is_finished())
            })
        })
        .map(|l| l.shard_id.as_str())
        .collect()
}

/// Closed shards not yet read to the end whose children wait for them. They come first:
/// reading them is finite work that unblocks their children, and left unowned at the cap they
/// would block those children for ever.
pub fn blocking_parents(leases: &[Lease]) -> BTreeSet<&str> {
    let unfinished: BTreeSet<&str> = leases
        .iter()
        .filter(|l| !l.is_finished())
        .map(|l| l.shard_id.as_str())
        .collect();
    leases
        .iter()
        .flat_map(|l| l.parents.iter().map(String::as_str))
        .filter(|p| unfinished.contains(p))
        .collect()
}

/// Readable leases held by each live worker.
fn holdings<'a>(snap: &Snapshot<'a>, readable: &BTreeSet<&str>) -> BTreeMap<&'a str, Vec<&'a str>> {
    let mut held: BTreeMap<&str, Vec<&str>> =
        snap.live.iter().map(|w| (w.as_str(), Vec::new())).collect();
    for l in snap.leases {
        if let Some(owner) = &l.owner
            && let Some(list) = held.get_mut(owner.as_str())
            && readable.contains(l.shard_id.as_str())
        {
            list.push(l.shard_id.as_str());
        }
    }
    held
}

/// How many leases each live worker should hold: `min(readable, workers × limit)` spread as
/// evenly as possible; the extra ones go to the workers holding most now (fewest moves).
pub fn targets(snap: &Snapshot) -> BTreeMap<String, u64> {
    let readable = readable_shards(snap.leases);
    let held = holdings(snap, &readable);
    let n = snap.live.len() as u64;
    if n == 0 {
        return BTreeMap::new();
    }
    let total = (readable.len() as u64).min(n.saturating_mul(snap.limit));
    let (base, extra) = (total / n, total % n);
    let mut order: Vec<(&str, usize)> = held.iter().map(|(w, l)| (*w, l.len())).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    order
        .iter()
        .enumerate()
        .map(|(i, (w, _))| ((*w).to_owned(), base + u64::from((i as u64) < extra)))
        .collect()
}

/// Spreads simultaneous takers over different leases: each worker tries the available leases
/// in its own pseudo-random (but deterministic) order.
fn take_order(me: &str, shard: &str) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike std's RandomState.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in me.bytes().chain([0]).chain(shard.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// This worker's plan. `max_balance_moves` bounds hand-offs made only for evenness
/// (giving up leases above the limit is never bounded: the limit must be obeyed).
///
/// Every worker computes the same global matching of surplus leases (workers in id order,
/// their highest shard ids first) to deficits (workers in id order, after the unowned leases
/// they will take), and carries out only its own part. The matching is order-preserving, so
/// hand-offs already done by others do not change anyone else's part.
pub fn plan(snap: &Snapshot, me: &str, max_balance_moves: usize) -> Plan {
    let readable = readable_shards(snap.leases);
    let held = holdings(snap, &readable);
    let targets = targets(snap);
    let target = |w: &str| targets.get(w).copied().unwrap_or(0) as usize;
    let limit = snap.limit as usize;
    let parents = blocking_parents(snap.leases);
    // Shed children before parents, highest shard ids first (deterministic).
    let shed_order =
        |a: &&str, b: &&str| parents.contains(a).cmp(&parents.contains(b)).then(b.cmp(a));
    let mut plan = Plan::default();

    // Leases this worker owns that must not be read now (a child whose parent is unfinished,
    // or a finished shard still marked as owned) are given back.
    for l in snap.leases {
        if l.owner.as_deref() == Some(me) && !readable.contains(l.shard_id.as_str()) {
            plan.release.push(l.shard_id.clone());
        }
    }

    let available: Vec<&Lease> = snap
        .leases
        .iter()
        .filter(|l| readable.contains(l.shard_id.as_str()))
        .filter(|l| l.owner.as_ref().is_none_or(|o| !snap.live.contains(o)))
        .collect();

    // Deficits left after the unowned leases are spread over the workers short of target.
    let mut supply = available.len();
    let mut deficits: Vec<(&str, usize)> = Vec::new();
    for (w, leases) in &held {
        let short = target(w).saturating_sub(leases.len());
        let from_supply = short.min(supply);
        supply -= from_supply;
        if short > from_supply {
            deficits.push((*w, short - from_supply));
        }
    }

    let mut receivers = deficits
        .into_iter()
        .flat_map(|(w, n)| std::iter::repeat_n(w, n));
    for (w, leases) in &held {
        let surplus = leases.len().saturating_sub(target(w));
        if surplus == 0 {
            continue;
        }
        let mandatory = leases.len().saturating_sub(limit);
        let mut shed = leases.clone();
        shed.sort_unstable_by(shed_order);
        for (i, shard) in shed.into_iter().take(surplus).enumerate() {
            let receiver = if i < mandatory + max_balance_moves {
                receivers.next()
            } else {
                None
            };
            if *w != me {
                continue;
            }
            match receiver {
                Some(r) => plan.hand_off.push((shard.to_owned(), r.to_owned())),
                // Above the limit with nobody to take it: give it up all the same.
                None if i < mandatory => plan.release.push(shard.to_owned()),
                None => {}
            }
        }
    }

    let mine = held.get(me).map_or(0, Vec::len);
    let mut room = target(me).saturating_sub(mine);
    // At the cap with parents nobody reads: swap one child for one parent per round (only
    // as many workers as there are such parents, lowest ids first).
    let orphan_parents = available
        .iter()
        .filter(|l| parents.contains(l.shard_id.as_str()))
        .count();
    if room == 0 && orphan_parents > 0 && plan.hand_off.is_empty() {
        let rank = held.keys().position(|w| *w == me).unwrap_or(usize::MAX);
        let my_child = held
            .get(me)
            .and_then(|l| l.iter().filter(|s| !parents.contains(**s)).max().copied());
        if rank < orphan_parents
            && let Some(child) = my_child
        {
            plan.release.push(child.to_owned());
            room = 1;
        }
    }
    if room > 0 {
        let mut candidates = available;
        candidates.sort_by_key(|l| {
            (
                !parents.contains(l.shard_id.as_str()),
                take_order(me, &l.shard_id),
            )
        });
        plan.take.extend(
            candidates
                .into_iter()
                .take(room)
                .map(|l| l.shard_id.clone()),
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::{SHARD_END, TRIM_HORIZON};
    use proptest::prelude::*;

    fn lease(id: &str, owner: Option<&str>) -> Lease {
        Lease {
            shard_id: id.into(),
            owner: owner.map(Into::into),
            counter: 0,
            checkpoint: TRIM_HORIZON.into(),
            owner_switches_since_checkpoint: 0,
            parents: vec![],
        }
    }

    fn live(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn shards(n: usize) -> Vec<Lease> {
        (0..n)
            .map(|i| lease(&format!("shard-{i:04}"), None))
            .collect()
    }

    /// Applies one round in which every live worker plans from the same snapshot; releases
    /// land first, then takes, and a take of a lease already changed this round loses (as the
    /// conditional write would).
    fn round(leases: &mut [Lease], live: &BTreeSet<String>, limit: u64, max_moves: usize) {
        let snap_leases = leases.to_vec();
        let snap = Snapshot {
            leases: &snap_leases,
            live,
            limit,
        };
        let plans: Vec<(String, Plan)> = live
            .iter()
            .map(|w| (w.clone(), plan(&snap, w, max_moves)))
            .collect();
        let mut changed = BTreeSet::new();
        for (w, p) in &plans {
            for id in &p.release {
                let l = leases.iter_mut().find(|l| &l.shard_id == id).unwrap();
                assert_eq!(
                    l.owner.as_deref(),
                    Some(w.as_str()),
                    "released a lease it did not own"
                );
                l.owner = None;
                l.counter += 1;
                changed.insert(id.clone());
            }
        }
        for (w, p) in &plans {
            for (id, to) in &p.hand_off {
                let l = leases.iter_mut().find(|l| &l.shard_id == id).unwrap();
                assert_eq!(
                    l.owner.as_deref(),
                    Some(w.as_str()),
                    "handed off a lease it did not own"
                );
                assert!(live.contains(to), "handed off to a dead worker");
                l.owner = Some(to.clone());
                l.counter += 1;
                changed.insert(id.clone());
            }
        }
        for (w, p) in &plans {
            for id in &p.take {
                if changed.contains(id) {
                    continue;
                }
                let l = leases.iter_mut().find(|l| &l.shard_id == id).unwrap();
                l.owner = Some(w.clone());
                l.counter += 1;
                changed.insert(id.clone());
            }
        }
    }

    fn counts(leases: &[Lease], live: &BTreeSet<String>) -> BTreeMap<String, usize> {
        let readable = readable_shards(leases);
        let mut c: BTreeMap<String, usize> = live.iter().map(|w| (w.clone(), 0)).collect();
        for l in leases {
            if let Some(o) = &l.owner
                && readable.contains(l.shard_id.as_str())
                && let Some(n) = c.get_mut(o)
            {
                *n += 1;
            }
        }
        c
    }

    #[test]
    fn thirty_shards_three_workers_ten_each() {
        let mut leases = shards(30);
        let workers = live(&["a", "b", "c"]);
        for _ in 0..5 {
            round(&mut leases, &workers, 10, 2);
        }
        assert!(counts(&leases, &workers).values().all(|&n| n == 10));
    }

    #[test]
    fn new_workers_get_even_share_and_old_ones_shed() {
        let mut leases = shards(30);
        let three = live(&["a", "b", "c"]);
        for _ in 0..3 {
            round(&mut leases, &three, 10, 2);
        }
        let five = live(&["a", "b", "c", "d", "e"]);
        // The limit drops to 6: over-limit workers hand everything above it straight to the
        // newcomers in one round; no shard is ever unowned.
        round(&mut leases, &five, 6, 2);
        assert!(counts(&leases, &five).values().all(|&n| n <= 6));
        assert!(leases.iter().all(|l| l.owner.is_some()));
        for _ in 0..3 {
            round(&mut leases, &five, 6, 2);
            assert!(leases.iter().all(|l| l.owner.is_some()));
        }
        assert!(
            counts(&leases, &five).values().all(|&n| n == 6),
            "{:?}",
            counts(&leases, &five)
        );
    }

    #[test]
    fn children_wait_for_parents() {
        let mut parent = lease("p", Some("a"));
        let mut child = lease("c", None);
        child.parents = vec!["p".into()];
        let all = [parent.clone(), child.clone()];
        assert_eq!(readable_shards(&all), BTreeSet::from(["p"]));
        parent.checkpoint = SHARD_END.into();
        parent.owner = None;
        let all = [parent, child.clone()];
        assert_eq!(readable_shards(&all), BTreeSet::from(["c"]));
        // A parent without a lease (expired) does not block.
        assert_eq!(readable_shards(&[child]), BTreeSet::from(["c"]));
    }

    #[test]
    fn at_the_cap_parents_are_swapped_in_and_drained() {
        // 3 workers at limit 2 hold six open shards; two closed parents (whose children wait)
        // are unowned. Without a swap they would never be read.
        let mut leases = vec![lease("p1", None), lease("p2", None)];
        for (i, owner) in ["a", "a", "b", "b", "c", "c"].iter().enumerate() {
            leases.push(lease(&format!("o{i}"), Some(owner)));
        }
        for (i, p) in ["p1", "p2"].iter().enumerate() {
            let mut child = lease(&format!("k{i}"), None);
            child.parents = vec![(*p).into()];
            leases.push(child);
        }
        let workers = live(&["a", "b", "c"]);
        for _ in 0..4 {
            round(&mut leases, &workers, 2, 2);
            assert!(counts(&leases, &workers).values().all(|&n| n <= 2));
        }
        let parents_owned = leases
            .iter()
            .filter(|l| l.shard_id.starts_with('p') && l.owner.is_some())
            .count();
        assert_eq!(parents_owned, 2, "{leases:#?}");
    }

    #[test]
    fn dead_owners_leases_are_taken() {
        let leases = vec![lease("s1", Some("dead")), lease("s2", Some("a"))];
        let workers = live(&["a", "b"]);
        let p = plan(
            &Snapshot {
                leases: &leases,
                live: &workers,
                limit: 1,
            },
            "b",
            1,
        );
        assert_eq!(p.take, vec!["s1".to_owned()]);
    }

    #[test]
    fn cap_leaves_a_deficit_unowned() {
        let mut leases = shards(300);
        let workers = live(&["a", "b", "c"]);
        for _ in 0..3 {
            round(&mut leases, &workers, 80, 5);
        }
        let c = counts(&leases, &workers);
        assert!(c.values().all(|&n| n == 80));
        assert_eq!(leases.iter().filter(|l| l.owner.is_none()).count(), 60);
    }

    #[test]
    fn balanced_fleet_is_left_alone() {
        let mut leases = shards(31);
        let workers = live(&["a", "b", "c"]);
        for _ in 0..4 {
            round(&mut leases, &workers, 11, 2);
        }
        let before = leases.clone();
        round(&mut leases, &workers, 11, 2);
        assert_eq!(before, leases, "a balanced fleet must not move leases");
    }

    fn arb_state() -> impl Strategy<Value = (Vec<Lease>, BTreeSet<String>, u64)> {
        (1usize..60, 1usize..7, 1u64..30)
            .prop_flat_map(|(n_shards, n_workers, limit)| {
                let owners = proptest::collection::vec(
                    proptest::option::of(0usize..n_workers + 2),
                    n_shards,
                );
                (Just(n_shards), Just(n_workers), Just(limit), owners)
            })
            .prop_map(|(n_shards, n_workers, limit, owners)| {
                let workers: BTreeSet<String> = (0..n_workers).map(|i| format!("w{i}")).collect();
                let leases = (0..n_shards)
                    .map(|i| {
                        // Owners beyond n_workers are dead workers.
                        let owner = owners[i].map(|o| format!("w{o}"));
                        lease(&format!("s{i:03}"), owner.as_deref())
                    })
                    .collect();
                (leases, workers, limit)
            })
    }

    proptest! {
        #[test]
        fn one_round_never_exceeds_the_limit_nor_double_assigns((mut leases, workers, limit) in arb_state()) {
            // Even from an arbitrary start (workers above the limit, dead owners), every round
            // ends with everybody within the limit.
            for _ in 0..4 {
                round(&mut leases, &workers, limit, 3);
                for (w, n) in counts(&leases, &workers) {
                    prop_assert!(n as u64 <= limit, "{w} holds {n} > {limit}");
                }
                let ids: BTreeSet<_> = leases.iter().map(|l| &l.shard_id).collect();
                prop_assert_eq!(ids.len(), leases.len());
            }
        }

        #[test]
        fn rounds_converge_to_full_even_coverage((mut leases, workers, limit) in arb_state()) {
            for _ in 0..40 {
                round(&mut leases, &workers, limit, 2);
            }
            let c = counts(&leases, &workers);
            let owned: usize = c.values().sum();
            let capacity = workers.len() * limit as usize;
            prop_assert_eq!(owned, leases.len().min(capacity), "coverage: {:?}", c);
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            prop_assert!(max - min <= 1, "uneven: {:?}", c);
            // Converged means stable.
            let before = leases.clone();
            round(&mut leases, &workers, limit, 2);
            prop_assert_eq!(before, leases);
        }
    }
}
