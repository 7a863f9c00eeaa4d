-- `pm-mirror status` tells the truth (issue 17).

-- What the last sync that contacted upstream learnt of each component, failed or not: JSON
-- {"daily": {"version": "27430"}, "main": {"error": "`.../main.cvd` is not found upstream"}}.
-- upstream_versions keeps what upstream last offered when a sync ended well (the exporter's
-- gauge); this says what the last try saw, database by database.
ALTER TABLE mirror_products ADD COLUMN upstream_components VARCHAR;
