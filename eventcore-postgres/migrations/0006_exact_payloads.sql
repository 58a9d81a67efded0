-- EventCore event store, version 6: payloads and metadata kept exactly as written, and
-- rows at positions no reader reaches made impossible.
-- Unqualified names: applied with search_path set to the store's schema (see 0001).
-- The argument is docs/adr/0004-exact-payloads.md; in short:
--
-- - `jsonb` re-prints what it stores: `-0.0` loses its sign, `1E2` comes back as
--   `100`, `{"a":1,"a":2}` as `{"a": 2}`, keys are reordered, and `1.7976931348623157e308`
--   comes back as a 309-digit integer serde_json cannot read. `json` keeps the text as
--   given (and still checks that it is JSON), so a read returns the very bytes the
--   append sent, as the in-memory store does. Reading is cheaper too (no re-printing).
--   Querying inside payloads takes a cast, `payload::jsonb`.
-- - Rows written before keep jsonb's text of them (the conversion prints them).
-- - Positions start at 1: a row at 0 or below would be skipped by every reader (they
--   read after 0), so the database refuses it. The check joins the version check in one
--   constraint: PostgreSQL prepares every CHECK expression again for each INSERT
--   statement, a few microseconds each (measured: ~10% of a one-event command with four
--   more checks), so the rules the read path can handle itself are left to it. A row with
--   an invalid stream id, type name or metadata (written by hand) reads back as a
--   damaged event in its place (RecordedEvent::damage), never as a failed read.
-- - ALTER TABLE rewrites the table under an exclusive lock: appends and reads wait for
--   the migration (plan it for a large store).

ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    DROP CONSTRAINT events_stream_version_check,
    ADD CONSTRAINT events_positions_positive CHECK (stream_version > 0 AND global_position > 0);

ALTER TABLE projection_parked_events
    ADD CONSTRAINT projection_parked_events_positions_positive
        CHECK (global_position > 0 AND stream_version > 0);

-- As version 5 (same arguments, guarantees and errors), with payloads and metadata as
-- json: the text the client sent is what is stored.
CREATE FUNCTION eventcore_append(
    p_streams         text[],
    p_expected        bigint[],
    p_idempotency_key text,
    p_event_streams   integer[],
    p_event_ids       uuid[],
    p_event_types     text[],
    p_payloads        json[],
    p_metadata        json[],
    p_attempt         uuid DEFAULT NULL,
    OUT deduplicated  boolean,
    OUT event_ids     uuid[],
    OUT stream_ids    text[],
    OUT versions      bigint[],
    OUT positions     bigint[],
    OUT recorded_at   timestamptz[]
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    n_streams      integer := coalesce(cardinality(p_streams), 0);
    n_events       integer := coalesce(cardinality(p_event_ids), 0);
    counts         integer[] := array_fill(0, ARRAY[n_streams]);
    actual         bigint[] := array_fill(0::bigint, ARRAY[n_streams]);
    lock_keys      bigint[] := '{}';
    lock_modes     boolean[] := '{}';
    next_position  bigint;
    slot           bigint;
    conflicts      jsonb;
    idx            integer;
    j              integer;
    k              bigint;
    m              boolean;
    expected       bigint;
    at_version     bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'eventcore needs READ COMMITTED; this transaction runs %',
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'ECS01';
    END IF;
    FOREACH idx IN ARRAY coalesce(p_event_streams, '{}') LOOP
        counts[idx] := counts[idx] + 1;
    END LOOP;

    -- Lock every participant until commit: written streams exclusively, streams only
    -- read in shared mode. In key order, so overlapping appends queue instead of
    -- deadlocking; two streams whose keys collide share one lock, exclusive if either
    -- is written. A few keys are sorted here (insertion sort, all expressions); many by
    -- a query.
    IF n_streams <= 16 THEN
        FOR idx IN 1 .. n_streams LOOP
            k := hashtextextended('eventcore.stream.' || current_schema() || '/' || p_streams[idx], 0);
            m := counts[idx] > 0;
            j := idx - 1;
            lock_keys[idx] := k;
            lock_modes[idx] := m;
            WHILE j >= 1 AND lock_keys[j] > k LOOP
                lock_keys[j + 1] := lock_keys[j];
                lock_modes[j + 1] := lock_modes[j];
                j := j - 1;
            END LOOP;
            lock_keys[j + 1] := k;
            lock_modes[j + 1] := m;
        END LOOP;
    ELSE
        SELECT array_agg(g.key ORDER BY g.key), array_agg(g.written ORDER BY g.key)
          INTO lock_keys, lock_modes
          FROM (SELECT hashtextextended('eventcore.stream.' || current_schema() || '/' || o.s, 0) AS key,
                       counts[o.i] > 0 AS written
                  FROM unnest(p_streams) WITH ORDINALITY AS o(s, i)) g;
    END IF;
    idx := 1;
    WHILE idx <= n_streams LOOP
        k := lock_keys[idx];
        m := lock_modes[idx];
        WHILE idx < n_streams AND lock_keys[idx + 1] = k LOOP
            idx := idx + 1;
            m := m OR lock_modes[idx];
        END LOOP;
        IF m THEN
            PERFORM pg_advisory_xact_lock(k);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(k);
        END IF;
        idx := idx + 1;
    END LOOP;

    -- The key is checked before any version: a retried request whose first try
    -- committed must get that outcome back, not a conflict with itself. (Checked after
    -- the locks: a concurrent append with the same key over one of our streams may have
    -- committed while we waited.)
    IF p_idempotency_key IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM idempotency_keys ik WHERE ik.idempotency_key = p_idempotency_key) THEN
            SELECT * INTO deduplicated, event_ids, stream_ids, versions, positions, recorded_at
              FROM eventcore_outcome(p_idempotency_key);
            RETURN;
        END IF;
    END IF;

    -- One indexed lookup per stream.
    FOR idx IN 1 .. n_streams LOOP
        SELECT coalesce(max(e.stream_version), 0) INTO at_version FROM events e
         WHERE e.stream_id = p_streams[idx];
        actual[idx] := at_version;
        expected := p_expected[idx];
        IF (expected = -2 AND at_version <> 0) OR (expected >= 0 AND at_version <> expected) THEN
            conflicts := coalesce(conflicts, '[]'::jsonb)
                         || jsonb_build_object('index', idx, 'actual', at_version);
        END IF;
    END LOOP;
    IF conflicts IS NOT NULL THEN
        RAISE EXCEPTION 'eventcore: version conflict'
            USING ERRCODE = 'ECV01', DETAIL = conflicts::text;
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        -- Waits for a concurrent transaction holding the same key (over other streams);
        -- if that one commits, its outcome is ours.
        INSERT INTO idempotency_keys (idempotency_key, attempt)
             VALUES (p_idempotency_key, p_attempt)
            ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO deduplicated, event_ids, stream_ids, versions, positions, recorded_at
              FROM eventcore_outcome(p_idempotency_key);
            RETURN;
        END IF;
    END IF;

    deduplicated := false;
    event_ids := coalesce(p_event_ids, '{}');
    stream_ids := '{}';
    versions := '{}';
    positions := '{}';
    recorded_at := '{}';
    IF n_events = 0 THEN
        RETURN;
    END IF;
    recorded_at := array_fill(now(), ARRAY[n_events]);

    -- Each event's stream and version, in request order (events come grouped by
    -- stream, so a stream's versions follow on from its actual one).
    FOR idx IN 1 .. n_events LOOP
        j := p_event_streams[idx];
        actual[j] := actual[j] + 1;
        stream_ids[idx] := p_streams[j];
        versions[idx] := actual[j];
    END LOOP;

    -- Mark the positions about to be taken as in flight (see eventcore_horizon), then
    -- take them, increasing in request order. The sequence is read after the stream
    -- locks (a value read before a wait would mark below positions readers have already
    -- passed) and atomically (pg_sequence_last_value reads under the buffer lock).
    -- Nothing is serialized here: concurrent appends take interleaved positions and
    -- their commits share WAL flushes.
    next_position := coalesce(pg_sequence_last_value('global_position_seq'::regclass) + 1, 1);
    slot := next_position % 4294967296;
    IF slot >= 2147483648 THEN
        slot := slot - 4294967296;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.' || current_schema()),
                                         slot::integer);
    FOR idx IN 1 .. n_events LOOP
        positions[idx] := nextval('global_position_seq');
    END LOOP;
    -- The mark must not be above the first position taken, or readers could pass it
    -- while this transaction runs. Cannot happen with the sequence as created; refuse
    -- rather than write events a reader may already have skipped.
    IF next_position > positions[1] THEN
        PERFORM eventcore_refuse_mark(next_position, positions[1]);
    END IF;

    INSERT INTO events (global_position, event_id, stream_id, stream_version,
                        event_type, payload, metadata, idempotency_key)
    SELECT u.position, u.eid, u.stream, u.version, u.etype, u.payload, u.meta,
           p_idempotency_key
      FROM unnest(positions, p_event_ids, stream_ids, versions, p_event_types,
                  p_payloads, p_metadata)
           AS u(position, eid, stream, version, etype, payload, meta);
END;
$$;

-- Version 5's signature, for processes still running the previous release while the
-- next one is rolled out: their payloads arrive as jsonb (already re-printed).
CREATE OR REPLACE FUNCTION eventcore_append(
    p_streams         text[],
    p_expected        bigint[],
    p_idempotency_key text,
    p_event_streams   integer[],
    p_event_ids       uuid[],
    p_event_types     text[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    p_attempt         uuid DEFAULT NULL,
    OUT deduplicated  boolean,
    OUT event_ids     uuid[],
    OUT stream_ids    text[],
    OUT versions      bigint[],
    OUT positions     bigint[],
    OUT recorded_at   timestamptz[]
)
LANGUAGE sql
SET search_path FROM CURRENT
AS $$
    SELECT * FROM eventcore_append(p_streams, p_expected, p_idempotency_key, p_event_streams,
                                   p_event_ids, p_event_types, p_payloads::json[],
                                   p_metadata::json[], p_attempt);
$$;
