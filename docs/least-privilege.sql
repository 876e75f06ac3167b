-- Least privilege for the outbox's Postgres roles.
--
-- Run as the owner of the outbox tables, in the service's database, after
-- `outbox migrate` (the migrating role owns the tables; it is not one of
-- these). Replace the passwords, or use another authentication method.
-- Tested by tests/relay/least_privilege.rs (relay, writer) and
-- tests/consumer/least_privilege.rs (worker), which run this file with the
-- role names made unique.
--
-- CONNECT on the database and USAGE on the schema are granted to PUBLIC by
-- default; grant them explicitly where PUBLIC's were revoked.

-- The relay (`outbox relay`): reads, claims, marks and prunes events. It
-- can read no domain table and cannot insert events.
CREATE ROLE outbox_relay LOGIN PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO outbox_relay;
-- SELECT ... FOR UPDATE SKIP LOCKED (claim), UPDATE (mark published or
-- failed), DELETE (prune, or retention 0).
GRANT SELECT, UPDATE, DELETE ON outbox_events TO outbox_relay;
-- The event log: published rows past the retention are moved there
-- (DELETE above, INSERT here; SELECT for replays). Its monthly partitions
-- are created by `outbox migrate` (this month and the next three) as the
-- owner: run it at least every three months, or the relay's moves fail
-- (logged, counted, nothing lost) until it runs.
GRANT SELECT, INSERT ON outbox_event_log TO outbox_relay;
-- Claims are leases: one row per claimed batch. (The claim floor's
-- helpers, outbox_claim_floor*, outbox_commit_tick, run as the tables'
-- owner and need no grant; raising the floor requires UPDATE on
-- outbox_events, granted above.)
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_leases TO outbox_relay;
-- The pause switch (`outbox pause`/`resume` need UPDATE; the relay only reads).
GRANT SELECT ON outbox_control TO outbox_relay;
-- Relays alive: each relay heartbeats its row and deletes it when it stops,
-- and deletes rows of relays gone for an hour (the dashboard reads them).
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relays TO outbox_relay;

-- A write-path service records events in its own transactions: besides its
-- domain grants it needs only INSERT (the seq identity needs no sequence
-- grant). In practice grant this to the service's own role.
CREATE ROLE outbox_writer LOGIN PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO outbox_writer;
GRANT INSERT ON outbox_events TO outbox_writer;

-- A worker (consumer): try counts, failed jobs, the inbox; plus whatever
-- tables its listeners write (grant those separately). Operators' `outbox
-- failed retry|forget|flush|prune` and `outbox pause|resume` need more
-- (DELETE on failed_jobs, UPDATE on outbox_control): run them as an
-- operator role, not as the worker.
CREATE ROLE outbox_worker LOGIN PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO outbox_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON listener_attempts TO outbox_worker;
GRANT SELECT, INSERT ON failed_jobs, processed_events TO outbox_worker;
-- DELETE on the inbox: the worker prunes rows past its inbox retention
-- (WorkerConfig::prune_interval, inbox_retention; 7 days by default).
-- Without it, set prune_interval to None and prune from an operator's job
-- (outbox::inbox::prune); a worker left pruning without the grant logs
-- the refusal and goes on.
GRANT DELETE ON processed_events TO outbox_worker;
-- The listener registry: each worker records the listeners and queues it
-- runs when it starts (`outbox status` lists them from there).
GRANT SELECT, INSERT, UPDATE ON outbox_listeners TO outbox_worker;
