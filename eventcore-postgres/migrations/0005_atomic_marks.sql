-- EventCore event store, version 5: marks that can neither be above the positions they
-- protect nor below what readers already passed, reads that say how far they looked,
-- and idempotency keys that remember which attempt stored them.
-- Unqualified names: applied with search_path set to the store's schema (see 0001).
-- The argument is docs/adr/0003-postgres-global-order.md; in short:
--
-- - Reading the sequence relation as a table (`SELECT last_value FROM seq`) is not
--   atomic against a concurrent nextval: every 32nd call, nextval logs a value 32
--   ahead and, while it does, the page holds that value; a scan copies the tuple
--   after releasing the buffer lock and can see it. A mark taken from such a read is
--   above the positions the append then draws, and readers may pass them while they
--   are uncommitted, for good. pg_sequence_last_value() reads under the buffer lock.
--   Every read of the sequence is now that call (a test checks the installed
--   functions and the statements the store sends).
-- - The single-event statement (src/sql/append_one.sql) read the sequence before
--   queueing for its stream's lock, so its mark could sit below events committed, and
--   returned to readers, while it waited: the horizon moved backwards. It now reads
--   after the lock, as eventcore_append always did.
-- - Both append paths check that the mark is not above the first position drawn, and
--   fail (ECM01) rather than write events a reader could have skipped.
-- - eventcore_read_log_page returns, after the events, the horizon the read stopped
--   at: a reader knows exactly how far it looked, from the same statement, instead of
--   trusting a head read earlier (the horizon can still move back by a few positions
--   while an append sits between its read of the sequence and its lock).
-- - An idempotency key records the attempt (a client-chosen uuid) that stored it, so
--   that after a lost answer the store can tell its own write from an earlier one's.

ALTER TABLE idempotency_keys ADD COLUMN attempt uuid;

-- Never returns (its type lets a plain statement call it inside an expression).
CREATE FUNCTION eventcore_refuse_mark(p_mark bigint, p_position bigint) RETURNS bigint
LANGUAGE plpgsql AS $f$
BEGIN
    RAISE EXCEPTION 'eventcore: the mark % is above the first position drawn, %; refusing the append', p_mark, p_position
        USING ERRCODE = 'ECM01',
              HINT = 'the position sequence must count up by 1; was it altered or reset?';
END;
$f$;

CREATE OR REPLACE FUNCTION eventcore_horizon() RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    marker_class bigint := (hashtext('eventcore.reserved.' || current_schema())::bigint
                            + 4294967296) % 4294967296;
    next_position bigint;
    oldest        bigint;
BEGIN
    PERFORM eventcore_check_session(true);
    -- Atomic against a concurrent nextval (see above); NULL before the first nextval.
    next_position := coalesce(pg_sequence_last_value('global_position_seq'::regclass) + 1, 1);
    -- Mark keys hold positions modulo 2^32. A mark in flight lies within 2^31 of
    -- next_position, below it or (taken after the sequence was read) above it: the
    -- signed distance recovers the full position. Marks above next_position do not
    -- matter, so the horizon is at most next_position.
    SELECT min(next_position
               + ((((l.objid::bigint - next_position + 2147483648) % 4294967296) + 4294967296)
                  % 4294967296)
               - 2147483648)
      INTO oldest
      FROM pg_locks l
     WHERE l.locktype = 'advisory'
       AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
       AND l.classid::bigint = marker_class
       AND l.objsubid = 2
       AND l.granted;
    RETURN least(coalesce(oldest, next_position), next_position);
END;
$$;

-- The global log after p_after, below the horizon, filters before the limit, as
-- eventcore_read_log; then one more row with every column NULL but `horizon`: the
-- horizon this read stopped at. Every event selected by the filters after p_after and
-- below it is among the rows (unless the limit was reached), now and forever.
CREATE FUNCTION eventcore_read_log_page(p_after bigint, p_prefix text, p_types text[], p_limit bigint)
RETURNS TABLE (global_position bigint, event_id uuid, stream_id text, stream_version bigint,
               event_type text, payload text, metadata text, recorded_at timestamptz,
               horizon bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
DECLARE
    stop bigint := eventcore_horizon();
BEGIN
    RETURN QUERY
        SELECT e.global_position, e.event_id, e.stream_id, e.stream_version, e.event_type,
               e.payload::text, e.metadata::text, e.recorded_at, NULL::bigint
          FROM events e
         WHERE e.global_position > p_after
           AND e.global_position < stop
           AND (p_prefix IS NULL OR starts_with(e.stream_id, p_prefix))
           AND (p_types IS NULL OR e.event_type = ANY (p_types))
         ORDER BY e.global_position
         LIMIT p_limit;
    global_position := NULL;
    event_id := NULL;
    stream_id := NULL;
    stream_version := NULL;
    event_type := NULL;
    payload := NULL;
    metadata := NULL;
    recorded_at := NULL;
    horizon := stop;
    RETURN NEXT;
END;
$$;

DROP FUNCTION eventcore_append(text[], bigint[], text, integer[], uuid[], text[], jsonb[], jsonb[]);

-- As version 4 (same arguments, guarantees and errors), plus: p_attempt, stored with
-- the idempotency key; the sequence read atomically; the mark checked against the
-- first position drawn.
CREATE FUNCTION eventcore_append(
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
