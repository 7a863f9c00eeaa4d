-- Hosts enrolled by `pm-activate host` (DESIGN.md sections 3-5). History is kept: a
-- deactivation changes `state`, a row is never deleted.
CREATE TABLE hosts (
    host                    VARCHAR PRIMARY KEY,   -- the name in its certificate
    address                 VARCHAR NOT NULL,      -- host:port of its pm-agent API
    host_group              VARCHAR NOT NULL DEFAULT 'default',
    profile                 VARCHAR NOT NULL DEFAULT 'default',
    labels                  VARCHAR NOT NULL DEFAULT '{}',  -- JSON object of label -> value
    certificate_serial      VARCHAR,               -- lowercase hex
    certificate_fingerprint VARCHAR,               -- sha256:<hex>
    agent_version           VARCHAR,
    engine                  VARCHAR,
    activated_at            TIMESTAMPTZ,
    activation_key_id       VARCHAR,
    state                   VARCHAR NOT NULL DEFAULT 'active',  -- active | deactivated
    deactivated_at          TIMESTAMPTZ
);

-- Agent certificate serials never accepted again (deactivated hosts).
CREATE TABLE revoked_certificates (
    serial     VARCHAR PRIMARY KEY,   -- lowercase hex
    host       VARCHAR,
    revoked_at TIMESTAMPTZ NOT NULL,
    reason     VARCHAR
);
