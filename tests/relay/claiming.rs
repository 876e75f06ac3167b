use outbox::testing::TestExchange;
use std::collections::HashSet;
use std::thread;
use std::time::Duration;

use diesel::prelude::*;
use outbox::TestDatabase;
use outbox::relay::store::{self, PublishFailure};

use crate::support::{
    OpenWriter, RunningRelay, Ticked, count, eventually, index_reads_after, record_interleaved, record_ticks,
    relay_config,
};

#[test]
fn concurrent_claims_are_disjoint_and_keep_aggregates_whole() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_interleaved(&mut conn, 10, 10);
    let claims: Vec<Vec<store::ClaimedEvent>> = (0..4)
        .map(|n| {
            let url = db.url().to_owned();
            thread::spawn(move || {
                let mut conn = outbox::connect(&url).unwrap();
                store::claim_batch(&mut conn, &format!("relay-{n}"), 30, 30.0).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut seqs = HashSet::new();
    let mut owner_of_aggregate = std::collections::HashMap::new();
    for (relay, rows) in claims.iter().enumerate() {
        for row in rows {
            assert!(seqs.insert(row.seq), "row {} claimed twice", row.seq);
            let owner = owner_of_aggregate
                .entry(row.aggregate_id.clone())
                .or_insert(relay);
            assert_eq!(
                *owner, relay,
                "aggregate {} split between relays",
                row.aggregate_id
            );
        }
        // Each relay's rows of one aggregate form a run of consecutive events.
        for aggregate in rows.iter().map(|r| &r.aggregate_id).collect::<HashSet<_>>() {
            let ns: Vec<i64> = rows
                .iter()
                .filter(|r| &r.aggregate_id == aggregate)
                .map(|r| serde_json::from_str::<Ticked>(&r.payload).unwrap().n)
                .collect();
            assert_eq!(
                ns,
                (0..ns.len() as i64).collect::<Vec<_>>(),
                "{aggregate}: {ns:?}"
            );
        }
    }
    // Nothing more is claimable while those leases live: every aggregate's
    // head is held by someone.
    assert!(
        store::claim_batch(&mut conn, "late", 100, 30.0)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn claims_racing_round_after_round_never_overlap() {
    // A claim locks rows only for its own statement and records the claim
    // as a lease row. A relay whose claim statement began before another
    // relay's claim committed must still not take those rows: its snapshot
    // cannot see the new lease, and the row locks are gone by then.
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_interleaved(&mut conn, 20, 5);
    let relays = 6;
    for round in 0..15 {
        diesel::sql_query("DELETE FROM outbox_leases")
            .execute(&mut conn)
            .unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(relays));
        let claims: Vec<Vec<i64>> = (0..relays)
            .map(|n| {
                let (url, start) = (db.url().to_owned(), std::sync::Arc::clone(&start));
                thread::spawn(move || {
                    let mut conn = outbox::connect(&url).unwrap();
                    start.wait();
                    store::claim_batch(&mut conn, &format!("relay-{n}"), 10, 30.0)
                        .unwrap()
                        .into_iter()
                        .map(|row| row.seq)
                        .collect()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let mut seen = HashSet::new();
        for seq in claims.iter().flatten() {
            assert!(
                seen.insert(*seq),
                "round {round}: row {seq} claimed by two relays: {claims:?}"
            );
        }
    }
}

#[test]
fn an_expired_lease_cannot_mark_or_fail_and_the_rows_are_claimable_again() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "z", 0..3);
    let held = store::claim_batch(&mut conn, "zombie", 10, 30.0).unwrap();
    assert_eq!(held.len(), 3);
    let seqs: Vec<i64> = held.iter().map(|r| r.seq).collect();
    let zombie_rows: Vec<(i64, i64)> = held.iter().map(|r| (r.seq, r.lease_id)).collect();
    // While the lease lives, nobody else gets them.
    assert!(
        store::claim_batch(&mut conn, "other", 10, 30.0)
            .unwrap()
            .is_empty()
    );
    // The zombie's lease runs out (set, not waited for: a short lease could
    // run out on a loaded machine before the check above).
    diesel::sql_query(
        "UPDATE outbox_leases SET expires_at = now() - interval '1 second' WHERE owner = 'zombie'",
    )
    .execute(&mut conn)
    .unwrap();
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_leases WHERE expires_at > now()",
        ),
        0
    );
    assert!(
        store::mark_published(&mut conn, "zombie", &zombie_rows, false)
            .unwrap()
            .is_empty()
    );
    let failure = PublishFailure {
        seq: seqs[0],
        lease_id: held[0].lease_id,
        error: "late".into(),
        retry_in: Duration::ZERO,
    };
    assert_eq!(
        store::record_failures(&mut conn, "zombie", &[failure], 5).unwrap(),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) AS n FROM outbox_events WHERE published_at IS NOT NULL OR attempts > 0"
        ),
        0
    );
    let reclaimed = store::claim_batch(&mut conn, "other", 10, 30.0).unwrap();
    assert_eq!(reclaimed.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs);
    let other_rows: Vec<(i64, i64)> = reclaimed.iter().map(|r| (r.seq, r.lease_id)).collect();
    // The new holder can mark; the zombie still cannot, neither through its
    // own lease nor through the new holder's.
    for rows in [&zombie_rows, &other_rows] {
        assert!(
            store::mark_published(&mut conn, "zombie", rows, false)
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        store::mark_published(&mut conn, "other", &other_rows, false)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_renewed_lease_outlives_its_first_term_and_an_ended_one_is_not_revived() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "kept", 0..2);
    record_ticks(&mut conn, "lost", 0..2);
    let kept = store::claim_batch(&mut conn, "alive", 2, 1.0).unwrap();
    let lost = store::claim_batch(&mut conn, "frozen", 2, 0.3).unwrap();
    assert_eq!((kept.len(), lost.len()), (2, 2));
    // The frozen relay never renews; its lease ends.
    outbox::testing::eventually_blocking(
        "the frozen relay's lease to expire",
        Duration::from_secs(10),
        || {
            count(
                &mut conn,
                "SELECT count(*) AS n FROM outbox_leases WHERE owner = 'frozen' AND expires_at > now()",
            ) == 0
        },
    );
    // A renewal finds only live leases of its own relay.
    assert!(
        store::renew_leases(&mut conn, "frozen", &[lost[0].lease_id], 30.0)
            .unwrap()
            .is_empty()
    );
    // Naming another relay's lease renews nothing either.
    assert!(
        store::renew_leases(&mut conn, "frozen", &[kept[0].lease_id], 30.0)
            .unwrap()
            .is_empty()
    );
    let renewed = store::renew_leases(&mut conn, "alive", &[kept[0].lease_id], 30.0).unwrap();
    assert_eq!(renewed, vec![kept[0].lease_id]);
    // Past its first term (1 s) the renewed lease still holds its rows.
    let first_term_over = format!(
        "SELECT count(*) AS n FROM outbox_leases WHERE id = {} AND created_at + interval '1100 ms' < now()",
        kept[0].lease_id
    );
    outbox::testing::eventually_blocking(
        "the renewed lease's first term to end",
        Duration::from_secs(10),
        || count(&mut conn, &first_term_over) > 0,
    );
    let reclaimed = store::claim_batch(&mut conn, "other", 10, 30.0).unwrap();
    assert_eq!(
        reclaimed
            .iter()
            .map(|r| r.aggregate_id.as_str())
            .collect::<Vec<_>>(),
        vec!["lost", "lost"]
    );
    let rows: Vec<(i64, i64)> = kept.iter().map(|r| (r.seq, r.lease_id)).collect();
    assert_eq!(
        store::mark_published(&mut conn, "alive", &rows, false)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_lease_an_earlier_session_left_blocks_its_aggregate_and_is_not_renewed() {
    // A relay session that ended without giving back its lease (the
    // database was unreachable), or a claim that reached the server after
    // its session had ended, leaves a live lease in the relay's name that
    // no session publishes. The next session of the same relay must not
    // take the rows queued behind it (they would go out first), and its
    // heartbeat must not keep that lease alive.
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "stale", 0..3);
    record_ticks(&mut conn, "fresh", 0..2);
    let orphaned = store::claim_batch(&mut conn, "relay-x", 1, 60.0).unwrap();
    assert_eq!(orphaned.len(), 1);
    assert_eq!(orphaned[0].aggregate_id, "stale");
    let claimed = store::claim_batch_holding(&mut conn, "relay-x", &[], 10, 30.0).unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|r| r.aggregate_id.as_str())
            .collect::<Vec<_>>(),
        vec!["fresh", "fresh"]
    );
    let renewed = store::renew_leases(&mut conn, "relay-x", &[claimed[0].lease_id], 30.0).unwrap();
    assert_eq!(renewed, vec![claimed[0].lease_id]);
    // Holding the lease, the session may take the rows behind it.
    let behind = store::claim_batch_holding(
        &mut conn,
        "relay-x",
        &[orphaned[0].lease_id, claimed[0].lease_id],
        10,
        30.0,
    )
    .unwrap();
    assert_eq!(
        behind
            .iter()
            .map(|r| serde_json::from_str::<Ticked>(&r.payload).unwrap().n)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_relays_rows_are_published_once_its_lease_ends() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    let broker = TestExchange::new().await.unwrap();
    record_ticks(&mut conn, "crash", 0..5);
    // A relay claims and dies without publishing or releasing.
    assert_eq!(
        store::claim_batch(&mut conn, "crashed-relay", 10, 1.0)
            .unwrap()
            .len(),
        5
    );
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(5, Duration::from_secs(30)).await;
    relay.stop().await;
    assert_eq!(broker.first_arrival_order("n")["crash"], vec![0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_committing_transaction_is_not_skipped_and_does_not_stall_others() {
    let db = TestDatabase::create().unwrap();
    let broker = TestExchange::new().await.unwrap();
    // T1: records an event and stays open.
    let open = OpenWriter::start(&db, "slow");
    // T2: a later id, committed first.
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "fast", 0..3);
    assert!(
        count(&mut conn, "SELECT min(seq) AS n FROM outbox_events") > 1,
        "T1's row holds the lower seq"
    );
    let relay = RunningRelay::start(relay_config(&db, &broker));
    broker.wait_for_distinct(3, Duration::from_secs(20)).await;
    assert!(!broker.first_arrival_order("n").contains_key("slow"));
    open.commit();
    broker.wait_for_distinct(4, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(broker.first_arrival_order("n")["slow"], vec![0]);
    eventually("all rows marked", Duration::from_secs(5), || {
        crate::support::unpublished(&mut conn) == 0
    })
    .await;
}

fn ns(rows: &[store::ClaimedEvent]) -> Vec<(String, i64)> {
    rows.iter()
        .map(|r| {
            let n = serde_json::from_str::<Ticked>(&r.payload).unwrap().n;
            (r.aggregate_id.clone(), n)
        })
        .collect()
}

fn leased(rows: &[store::ClaimedEvent]) -> Vec<(i64, i64)> {
    rows.iter().map(|r| (r.seq, r.lease_id)).collect()
}

/// Each lease names the aggregates it holds: a claim learns what other
/// relays hold from those keys and reads none of their rows, so it costs
/// the same with one relay or many.
#[test]
fn a_claim_reads_none_of_the_rows_other_relays_hold() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    diesel::sql_query("SET stats_fetch_consistency = none")
        .execute(&mut conn)
        .unwrap();
    record_interleaved(&mut conn, 50, 20);
    for _ in 0..2 {
        assert_eq!(
            store::claim_batch(&mut conn, "other", 500, 60.0).unwrap().len(),
            500
        );
    }
    for aggregate in 0..10 {
        record_ticks(&mut conn, &format!("free-{aggregate}"), 0..1);
    }
    let before = index_reads_after(&mut conn, 0);
    let rows = store::claim_batch(&mut conn, "relay", 500, 30.0).unwrap();
    let after = index_reads_after(&mut conn, before.0 + 1);
    assert_eq!(
        rows.len(),
        10,
        "only the aggregates nobody holds: {:?}",
        ns(&rows)
    );
    assert!(rows.iter().all(|r| r.aggregate_id.starts_with("free-")));
    // The backlog scan, the retry and floor reads, one lookup per row
    // claimed: a few dozen. One lookup per row others hold is 1,000.
    let scans = after.0 - before.0;
    assert!(
        scans < 100,
        "a claim made {scans} index scans while others held 1,000 rows"
    );
}

/// A lease written by a relay of an earlier release names no aggregates;
/// its rows are looked up, so both releases can run side by side.
#[test]
fn a_lease_without_aggregate_keys_still_blocks_what_it_holds() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "old", 0..3);
    record_ticks(&mut conn, "new", 0..1);
    let held = store::claim_batch(&mut conn, "old-relay", 1, 60.0).unwrap();
    assert_eq!(ns(&held), vec![("old".to_owned(), 0)]);
    diesel::sql_query("UPDATE outbox_leases SET aggregate_keys = NULL")
        .execute(&mut conn)
        .unwrap();
    let claimed = store::claim_batch(&mut conn, "relay", 10, 30.0).unwrap();
    assert_eq!(ns(&claimed), vec![("new".to_owned(), 0)]);
}

/// Rows a relay releases (it will not publish them after all) free their
/// aggregate for every other relay at once; the rest of the lease keeps
/// its aggregates.
#[test]
fn released_rows_free_their_aggregate_and_only_theirs() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "kept", 0..2);
    record_ticks(&mut conn, "released", 0..2);
    let held = store::claim_batch(&mut conn, "relay-x", 10, 60.0).unwrap();
    assert_eq!(held.len(), 4);
    let released: Vec<store::ClaimedEvent> = held
        .iter()
        .filter(|r| r.aggregate_id == "released")
        .cloned()
        .collect();
    assert_eq!(
        store::release_leases(&mut conn, "relay-x", &leased(&released)).unwrap(),
        1
    );
    let claimed = store::claim_batch(&mut conn, "relay-y", 10, 30.0).unwrap();
    assert_eq!(
        ns(&claimed),
        vec![("released".to_owned(), 0), ("released".to_owned(), 1)]
    );
}

/// An aggregate stays with the relay whose live lease names it, even once
/// its rows there are published, until that lease is dropped: another
/// relay takes the aggregate's next rows only then.
#[test]
fn an_aggregate_stays_with_its_lease_until_the_lease_is_dropped() {
    let db = TestDatabase::create().unwrap();
    let mut conn = db.connect().unwrap();
    record_ticks(&mut conn, "a", 0..1);
    let first = store::claim_batch(&mut conn, "relay-x", 10, 60.0).unwrap();
    record_ticks(&mut conn, "a", 1..2);
    assert_eq!(
        store::mark_published(&mut conn, "relay-x", &leased(&first), false)
            .unwrap()
            .len(),
        1
    );
    assert!(
        store::claim_batch(&mut conn, "relay-y", 10, 30.0)
            .unwrap()
            .is_empty()
    );
    store::drop_leases(&mut conn, "relay-x", &[first[0].lease_id]).unwrap();
    let next = store::claim_batch(&mut conn, "relay-y", 10, 30.0).unwrap();
    assert_eq!(ns(&next), vec![("a".to_owned(), 1)]);
}
