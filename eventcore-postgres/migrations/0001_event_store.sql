-- EventCore event store, version 1: the append-only events table, the global position
-- sequence, idempotency keys, and the functions that append and read the log.
--
-- Names are unqualified on purpose: the migrator runs with search_path set to the
-- store's schema only, so two stores in two schemas of one database never meet.
-- Functions pin that search_path (SET search_path FROM CURRENT) for the same reason.
-- Why appends mark the positions they are about to take and readers stop below the
-- oldest mark still held: docs/adr/0003-postgres-global-order.md.

CREATE SEQUENCE global_position_seq AS bigint MINVALUE 1;

CREATE TABLE events (
    global_position bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_type      text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    -- Also the index behind reading a stream and finding its version.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_idempotency_key_idx ON events (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE idempotency_keys (
    idempotency_key text        PRIMARY KEY,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- Stored events are immutable: the database itself refuses to change or remove them.
CREATE FUNCTION eventcore_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'ECI01';
END;
$$;

CREATE TRIGGER events_are_immutable
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION eventcore_refuse_change();

CREATE TRIGGER events_are_not_truncated
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION eventcore_refuse_change();

-- The ordering argument holds for READ COMMITTED sessions on the primary only: each
-- statement must see every transaction that ended before it started, and the marks
-- must be this server's locks. Refuse anything else loudly rather than skip events.
CREATE FUNCTION eventcore_check_session(p_reading boolean) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'eventcore needs READ COMMITTED; this transaction runs %',
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'ECS01';
    END IF;
    IF p_reading AND pg_is_in_recovery() THEN
        RAISE EXCEPTION 'eventcore reads the global log on the primary only, not on a standby'
            USING ERRCODE = 'ECS02';
    END IF;
END;
$$;

-- The first position no reader may pass yet. Every position below it belongs to a
-- transaction that has ended (committed and visible to any later snapshot, or rolled
-- back), so reading below it in a later statement returns a prefix of the final order.
--
-- Before taking positions, an appender reads the sequence's last value t and takes a
-- transaction-scoped shared advisory lock keyed by t + 1: a marker at or below every
-- position it will take, visible in pg_locks until its commit is visible (PostgreSQL
-- releases a transaction's locks only after that). Here the sequence is read first and
-- the markers second, so every position taken by the time of the first read is either
-- covered by a marker still held, or belongs to a transaction that has ended.
CREATE FUNCTION eventcore_horizon() RETURNS bigint
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
    SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END
      INTO next_position FROM global_position_seq s;
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

-- The global log after p_after, below the horizon, filters before the limit. The
-- horizon is taken first; the query then runs in a newer snapshot that sees every
-- transaction that ended before it.
CREATE FUNCTION eventcore_read_log(p_after bigint, p_prefix text, p_types text[], p_limit bigint)
RETURNS TABLE (global_position bigint, event_id uuid, stream_id text, stream_version bigint,
               event_type text, payload text, metadata text, recorded_at timestamptz)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    horizon bigint := eventcore_horizon();
BEGIN
    RETURN QUERY
        SELECT e.global_position, e.event_id, e.stream_id, e.stream_version, e.event_type,
               e.payload::text, e.metadata::text, e.recorded_at
          FROM events e
         WHERE e.global_position > p_after
           AND e.global_position < horizon
           AND (p_prefix IS NULL OR starts_with(e.stream_id, p_prefix))
           AND (p_types IS NULL OR e.event_type = ANY (p_types))
         ORDER BY e.global_position
         LIMIT p_limit;
END;
$$;

-- The last position readers may see, and the last committed one (higher while an
-- older mark is still held).
CREATE FUNCTION eventcore_heads(OUT visible bigint, OUT committed bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    horizon bigint := eventcore_horizon();
BEGIN
    SELECT max(e.global_position) INTO visible FROM events e WHERE e.global_position < horizon;
    SELECT max(e.global_position) INTO committed FROM events e;
END;
$$;

-- What the append that stored a key wrote (possibly nothing).
CREATE FUNCTION eventcore_outcome(
    p_idempotency_key text,
    OUT deduplicated boolean,
    OUT event_ids    uuid[],
    OUT stream_ids   text[],
    OUT versions     bigint[],
    OUT positions    bigint[]
)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT true,
           coalesce(array_agg(e.event_id ORDER BY e.global_position), '{}'),
           coalesce(array_agg(e.stream_id ORDER BY e.global_position), '{}'),
           coalesce(array_agg(e.stream_version ORDER BY e.global_position), '{}'),
           coalesce(array_agg(e.global_position ORDER BY e.global_position), '{}')
      FROM events e
     WHERE e.idempotency_key = p_idempotency_key;
$$;

-- Where events with these ids landed, after waiting (shared) for the streams' locks:
-- an append whose client connection died may still be running, and queues ahead of us.
CREATE FUNCTION eventcore_find_events(p_streams text[], p_event_ids uuid[])
RETURNS TABLE (event_id uuid, stream_id text, stream_version bigint, global_position bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    stream_lock bigint;
BEGIN
    FOR stream_lock IN
        SELECT DISTINCT hashtextextended('eventcore.stream.' || current_schema() || '/' || s, 0)
          FROM unnest(p_streams) AS s
         ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock_shared(stream_lock);
    END LOOP;
    RETURN QUERY
        SELECT e.event_id, e.stream_id, e.stream_version, e.global_position
          FROM events e
         WHERE e.event_id = ANY (p_event_ids)
         ORDER BY e.global_position;
END;
$$;

-- Appends events to several streams in one transaction (the caller's statement).
--
-- p_streams:       the participating streams, each once, in request order
-- p_expected:      per stream: -1 any version, -2 no stream, n >= 0 exactly version n
-- p_event_streams: per event, the 1-based index of its stream in p_streams; events come
--                  grouped by stream, in request order, and get increasing positions in
--                  that order
--
-- Returns one row. On a version conflict it raises SQLSTATE ECV01 with a JSON array
-- [{"index": i, "actual": v}, ...] as DETAIL; nothing has been written by then.
CREATE FUNCTION eventcore_append(
    p_streams         text[],
    p_expected        bigint[],
    p_idempotency_key text,
    p_event_streams   integer[],
    p_event_ids       uuid[],
    p_event_types     text[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    OUT deduplicated  boolean,
    OUT event_ids     uuid[],
    OUT stream_ids    text[],
    OUT versions      bigint[],
    OUT positions     bigint[]
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    n_streams      integer := coalesce(cardinality(p_streams), 0);
    n_events       integer := coalesce(cardinality(p_event_ids), 0);
    counts         integer[] := array_fill(0, ARRAY[n_streams]);
    actual         bigint[];
    next_position  bigint;
    slot           bigint;
    assigned       bigint[];
    conflicts      jsonb := '[]'::jsonb;
    marker_class   integer := hashtext('eventcore.reserved.' || current_schema());
    stream_lock    bigint;
    exclusive      boolean;
    idx            integer;
    expected       bigint;
    at_version     bigint;
BEGIN
    PERFORM eventcore_check_session(false);
    FOREACH idx IN ARRAY coalesce(p_event_streams, '{}') LOOP
        counts[idx] := counts[idx] + 1;
    END LOOP;

    -- Lock every participant until commit: written streams exclusively, streams only
    -- read in shared mode (a writer then waits for us, or we wait and see its events).
    -- Locks are taken in key order so overlapping appends queue instead of deadlocking;
    -- advisory locks write nothing, so a conflict below costs no WAL and no fsync.
    FOR stream_lock, exclusive IN
        SELECT hashtextextended('eventcore.stream.' || current_schema() || '/' || o.s, 0),
               bool_or(counts[o.i] > 0)
          FROM unnest(p_streams) WITH ORDINALITY AS o(s, i)
         GROUP BY 1
         ORDER BY 1
    LOOP
        IF exclusive THEN
            PERFORM pg_advisory_xact_lock(stream_lock);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(stream_lock);
        END IF;
    END LOOP;

    -- The key is checked before any version: a retried request whose first try
    -- committed must get that outcome back, not a conflict with itself. (Checked after
    -- the locks: a concurrent append with the same key over one of our streams may have
    -- committed while we waited.)
    IF p_idempotency_key IS NOT NULL
       AND EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.idempotency_key = p_idempotency_key)
    THEN
        SELECT * INTO deduplicated, event_ids, stream_ids, versions, positions
          FROM eventcore_outcome(p_idempotency_key);
        RETURN;
    END IF;

    -- One indexed lookup per stream (a plain loop plans and runs several times faster
    -- here than one query over the array).
    actual := array_fill(0::bigint, ARRAY[n_streams]);
    FOR idx IN 1 .. n_streams LOOP
        SELECT coalesce(max(e.stream_version), 0) INTO at_version FROM events e
         WHERE e.stream_id = p_streams[idx];
        actual[idx] := at_version;
        expected := p_expected[idx];
        IF (expected = -2 AND at_version <> 0) OR (expected >= 0 AND at_version <> expected) THEN
            conflicts := conflicts || jsonb_build_object('index', idx, 'actual', at_version);
        END IF;
    END LOOP;
    IF conflicts <> '[]'::jsonb THEN
        RAISE EXCEPTION 'eventcore: version conflict'
            USING ERRCODE = 'ECV01', DETAIL = conflicts::text;
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        -- Waits for a concurrent transaction holding the same key (over other streams);
        -- if that one commits, its outcome is ours.
        INSERT INTO idempotency_keys (idempotency_key) VALUES (p_idempotency_key)
            ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO deduplicated, event_ids, stream_ids, versions, positions
              FROM eventcore_outcome(p_idempotency_key);
            RETURN;
        END IF;
    END IF;

    deduplicated := false;
    IF n_events = 0 THEN
        event_ids := '{}';
        stream_ids := '{}';
        versions := '{}';
        positions := '{}';
        RETURN;
    END IF;

    -- Mark the positions about to be taken as in flight (see eventcore_horizon), then
    -- take them. Nothing is serialized here: concurrent appends take interleaved
    -- positions, each append's in request order, and their commits share WAL flushes.
    SELECT CASE WHEN s.is_called THEN s.last_value + 1 ELSE s.last_value END
      INTO next_position FROM global_position_seq s;
    slot := next_position % 4294967296;
    IF slot >= 2147483648 THEN
        slot := slot - 4294967296;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(marker_class, slot::integer);
    IF n_events = 1 THEN
        assigned := ARRAY[nextval('global_position_seq')];
    ELSE
        SELECT array_agg(p ORDER BY p) INTO assigned
          FROM (SELECT nextval('global_position_seq') AS p FROM generate_series(1, n_events)) g;
    END IF;

    WITH input AS (
        SELECT u.ord, u.sidx, u.eid, u.etype, u.payload, u.meta,
               actual[u.sidx] + row_number() OVER (PARTITION BY u.sidx ORDER BY u.ord) AS version
          FROM unnest(p_event_streams, p_event_ids, p_event_types, p_payloads, p_metadata)
               WITH ORDINALITY AS u(sidx, eid, etype, payload, meta, ord)
    ), inserted AS (
        INSERT INTO events (global_position, event_id, stream_id, stream_version,
                            event_type, payload, metadata, idempotency_key)
        SELECT assigned[i.ord], i.eid, p_streams[i.sidx], i.version,
               i.etype, i.payload, i.meta, p_idempotency_key
          FROM input i
        RETURNING events.global_position, events.event_id, events.stream_id, events.stream_version
    )
    SELECT array_agg(ins.event_id ORDER BY ins.global_position),
           array_agg(ins.stream_id ORDER BY ins.global_position),
           array_agg(ins.stream_version ORDER BY ins.global_position),
           array_agg(ins.global_position ORDER BY ins.global_position)
      INTO event_ids, stream_ids, versions, positions
      FROM inserted ins;
END;
$$;
