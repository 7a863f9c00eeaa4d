-- What the manager sets up on hosts after activation (DESIGN.md sections 3-5): scan profiles,
-- engine licenses, and per host which setup steps have not been applied yet.
CREATE TABLE profiles (
    name       VARCHAR PRIMARY KEY,
    mode       VARCHAR NOT NULL,      -- form | file
    body       VARCHAR NOT NULL,      -- the profile as JSON, exactly what agents receive
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
INSERT INTO profiles
VALUES ('default', 'form', '{"name":"default","mode":"form","options":{}}', now(), now());

-- Registered license files (`pm-activate license add`); the newest is the one hosts get. The
-- content is in PM_HOME/licenses/<sha256> (0600), not here.
CREATE TABLE licenses (
    sha256     VARCHAR PRIMARY KEY,
    file_name  VARCHAR NOT NULL,
    size_bytes BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    added_at   TIMESTAMPTZ NOT NULL
);

-- Setup steps (`profile`, `group`, `license`) a host has not confirmed yet, comma separated;
-- '' when its setup is complete. And the license it holds.
ALTER TABLE hosts ADD COLUMN setup_failed VARCHAR DEFAULT '';
ALTER TABLE hosts ADD COLUMN license_sha256 VARCHAR;
