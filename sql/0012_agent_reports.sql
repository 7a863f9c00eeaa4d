-- Where pm-poll stands in each agent's report stream (issue 16: install reports were lost after
-- an agent's clock stepped back, because the cursor was the agent's own timestamp in the report
-- id). An agent numbers its scan reports and install runs in a stream of its own (a random id
-- made once per state directory, and numbers that only grow, whatever its clock does); the
-- manager keeps, per host, the stream and the highest number recorded of each kind, and asks
-- for reports above it (`scans_after=seq:STREAM:N`). A host without a row here, or whose agent
-- answers from another stream (a new state directory) or without one (an agent from before the
-- numbers), is asked by report id as before (host_state.last_scan_id / last_update_id, which
-- keep growing as the highest id recorded). One row per host that answered a poll; a rename
-- moves it with the host's other rows (the host registry renames every table with a `host`
-- column).
CREATE TABLE report_cursors (
    host              VARCHAR NOT NULL,
    stream            VARCHAR NOT NULL,
    scans_after_seq   BIGINT,     -- NULL: no numbered scan report recorded from this stream
    updates_after_seq BIGINT,     -- NULL: no numbered install run recorded from this stream
    -- The report ids recorded under those numbers, sent with them (`seq:STREAM:N:ID`): an agent
    -- whose state was restored from a snapshot gives the numbers again to other reports, and
    -- answers with every report it keeps when its report N is not this one. NULL: not known.
    scans_after_id    VARCHAR,
    updates_after_id  VARCHAR
);
