-- Air-gap imports: which bundle a sync row came from.
ALTER TABLE mirror_syncs ADD COLUMN bundle_sha256 VARCHAR;
