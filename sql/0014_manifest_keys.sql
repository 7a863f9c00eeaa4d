-- The manager's manifest key each agent trusts (issue 17: keys that can be rotated), as its last
-- answered poll reported it (`sha256:<hex>`; NULL: an agent from before key rotation, or a host
-- never reached). After `pm-mirror key rotate` the hosts still on an older key follow at their
-- next update; after `--old-key-lost` they need the trust step (docs/keys.md). pm-doctor's
-- `manifest keys` check compares it with the manager's current key:
--   SELECT host, manifest_key FROM host_state ORDER BY host;
ALTER TABLE host_state ADD COLUMN manifest_key VARCHAR;
