-- Host identity (issue 16): each host's certificate expiry, so that what is coming shows in the
-- inventory, the exporter (`pm_host_certificate_expiry_timestamp_seconds`) and pm-doctor before
-- it happens. pm-activate sets it when it issues a certificate; pm-poll when it renews one or sees
-- the host present a newer one. NULL until then for hosts activated before this migration.
ALTER TABLE hosts ADD COLUMN certificate_expires_at TIMESTAMPTZ;
