-- The newest manifest serial accepted from each bundle signer, so that replaying an older
-- signed bundle is recognised as a downgrade even when its versions are not numbers.
CREATE TABLE accepted_bundles (
    signer      VARCHAR PRIMARY KEY,   -- sha256:<hex> of the exporter's key
    serial      INTEGER NOT NULL,      -- the exporter's revision serial
    revision    VARCHAR NOT NULL,      -- the exporter's revision name
    accepted_at TIMESTAMPTZ NOT NULL
);
