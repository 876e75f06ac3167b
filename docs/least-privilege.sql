-- Least privilege for the outbox's Postgres roles.
--
-- Run as the owner of the outbox tables, in the service's database, after
-- `outbox migrate` (the migrating role owns the tables; it is not one of
-- these). Replace the passwords, or use another authentication method.
-- The relay's privileges are tested by tests/relay/least_privilege.rs,
-- which runs this file with the role name made unique.
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
-- Claims are leases: one row per claimed batch.
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_leases TO outbox_relay;
-- The pause switch (`outbox pause`/`resume` need UPDATE; the relay only reads).
GRANT SELECT ON outbox_control TO outbox_relay;

-- A write-path service records events in its own transactions: on top of
-- its domain grants it needs only
--   GRANT INSERT ON outbox_events TO <service role>;
-- (the seq identity column needs no separate sequence grant).
--
-- A worker (consumer) reads and writes the consumer tables, plus whatever
-- tables its listeners write:
--   GRANT SELECT, INSERT, UPDATE, DELETE ON failed_jobs, processed_events,
--         listener_attempts TO <worker role>;
