-- Events published per minute over the last hour (the dashboard's chart).
-- BRIN: published_at follows the physical order of rows closely (a row is
-- marked soon after it is written), so a few block ranges answer the last
-- hour, and the index costs marks next to nothing (a B-tree would add an
-- index insertion to every mark).
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_events_published_at ON outbox_events USING brin (published_at) WITH (autosummarize = on)
