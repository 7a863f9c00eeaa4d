-- Activation keys (DESIGN.md section 4): single-use, or reusable until an expiry of at most
-- 24 hours. Only a hash of the secret is kept; the key is shown once when created.
CREATE TABLE activation_keys (
    id            VARCHAR PRIMARY KEY,       -- public part, e.g. 3f9a1c2e (safe to log)
    secret_sha256 VARCHAR NOT NULL,          -- sha256 of the secret part
    created_at    TIMESTAMPTZ NOT NULL,
    created_by    VARCHAR,
    expires_at    TIMESTAMPTZ NOT NULL,
    max_uses      INTEGER,                   -- NULL: any number of uses until expires_at
    uses          INTEGER NOT NULL DEFAULT 0,
    revoked_at    TIMESTAMPTZ,
    comment       VARCHAR
);
