-- The mirror's day-2 repairs (issue 16).

-- What a sync noted without failing, one note per line: a cdiff damaged upstream and left out
-- (clients at the version before it download the whole CVD), a cool-down, ... `pm-mirror
-- status` shows the notes of the sync that brought each product's current content.
ALTER TABLE mirror_syncs ADD COLUMN warnings VARCHAR;

-- Components per product: two products may both have a component named `test` (ClamAV's test
-- database and a feed's file `test`); compared by name alone, one product's dist version was
-- taken for the other's and `behind_by` was wrong. dist_components now has one row per product
-- and component, and host_versions says which product an installed component came from.

-- The revision dist serves now and its components (one row per product and component, newest
-- version).
CREATE OR REPLACE VIEW dist_components AS
WITH dist AS (
    SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1
)
SELECT f.revision,
       f.product,
       f.component,
       arg_max(f.version, coalesce(TRY_CAST(f.version AS BIGINT), 0)) AS version,
       max(f.build_time) AS build_time
FROM revision_files f JOIN dist USING (revision)
WHERE f.version IS NOT NULL
GROUP BY f.revision, f.product, f.component;

-- Each host's components next to dist: how far behind each one is. behind_by is the version
-- difference for numeric versions (ClamAV), else 0 or 1; NULL when dist has no such component.
-- An agent reports a component by name; its product is the one whose file in the revision the
-- host installed is the database of that name (`<product>/<component>.cvd` of a ClamAV
-- product before `<product>/<component>` of a feed; a revision may not install two files of
-- one name), else the same in dist.
-- A component of dist the agent would install and the host lacks (a product added after its
-- last install) is a row too: `missing`, no installed version, behind_by 1. What an agent
-- installs is what `manifest::engine_loads` says (a unit test holds this view to it): a ClamAV
-- product's `.cvd` databases and a feed's plain signature files named as the engine's directory
-- takes them, never an `agent` package, a cdiff, a `.sign` file or a feed's README. A host that
-- never installed a revision lacks nothing here (fleet_status: red, nothing to compare).
CREATE OR REPLACE VIEW host_versions AS
WITH origins AS (
    SELECT revision,
           component,
           arg_min(product, CASE WHEN path = product || '/' || component || '.cvd' THEN 0 ELSE 1 END) AS product
    FROM revision_files
    WHERE path = product || '/' || component || '.cvd' OR path = product || '/' || component
    GROUP BY revision, component
),
dist AS (
    SELECT revision FROM dist_history ORDER BY id DESC LIMIT 1
),
installed AS (
    SELECT h.host,
           h.host_group AS grp,
           coalesce(o.product, od.product) AS product,
           c.component,
           c.version,
           c.build_time
    FROM hosts h
    JOIN installed_components c ON c.host = h.host
    LEFT JOIN origins o ON o.revision = c.revision AND o.component = c.component
    LEFT JOIN origins od ON od.revision = (SELECT revision FROM dist) AND od.component = c.component
    WHERE h.state = 'active'
),
dist_installs AS (
    SELECT DISTINCT f.product, f.component
    FROM revision_files f
    WHERE f.revision = (SELECT revision FROM dist)
      AND f.version IS NOT NULL
      AND (f.path = f.product || '/' || f.component || '.cvd'
           OR (f.path = f.product || '/' || f.component
               AND regexp_full_match(lower(f.path),
                   '(.*/)?[a-z0-9_-][a-z0-9_.-]*\.(hdb|hdu|hsb|hsu|mdb|mdu|msb|msu|ndb|ndu|ldb|ldu|cdb|idb|fp|sfp|ign|ign2|pdb|gdb|wdb|ftm|cbc|crb|cat|pwdb|yar|yara)')))
),
missing AS (
    SELECT i.host, i.grp, d.product, d.component
    FROM (SELECT DISTINCT i.host, i.grp
          FROM installed i JOIN host_state s ON s.host = i.host
          WHERE s.installed_revision IS NOT NULL) i
    CROSS JOIN dist_installs d
    WHERE NOT EXISTS (SELECT 1 FROM installed j
                      WHERE j.host = i.host AND j.product = d.product AND j.component = d.component)
)
SELECT i.host,
       i.grp,
       i.product,
       i.component,
       i.version AS installed_version,
       i.build_time AS installed_build_time,
       d.version AS dist_version,
       d.build_time AS dist_build_time,
       CASE
           WHEN d.version IS NULL THEN NULL
           WHEN i.version IS NULL THEN 1
           WHEN TRY_CAST(i.version AS BIGINT) IS NOT NULL AND TRY_CAST(d.version AS BIGINT) IS NOT NULL
               THEN greatest(TRY_CAST(d.version AS BIGINT) - TRY_CAST(i.version AS BIGINT), 0)
           WHEN i.version = d.version THEN 0
           ELSE 1
       END AS behind_by,
       false AS missing
FROM installed i
LEFT JOIN dist_components d ON d.product = i.product AND d.component = i.component
UNION ALL
SELECT m.host, m.grp, m.product, m.component, NULL, NULL, d.version, d.build_time, 1, true
FROM missing m
JOIN dist_components d ON d.product = m.product AND d.component = m.component;

-- Hosts per product and component version across the active fleet, and whether that is
-- dist's version.
CREATE OR REPLACE VIEW version_drift AS
SELECT product,
       component,
       installed_version AS version,
       count(*) AS hosts,
       -- NULL: dist has no such component; false with no version: the hosts that lack it
       bool_or(CASE WHEN missing THEN false ELSE installed_version = dist_version END) AS is_dist
FROM host_versions
GROUP BY product, component, installed_version;
