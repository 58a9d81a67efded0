-- EventCore event store, version 7: what the one-statement append of several streams
-- (src/sql/append_many.sql) needs from the database.
-- Unqualified names: applied with search_path set to the store's schema (see 0001).
--
-- A plain statement reads in one snapshot, taken when it starts. A stream it writes is
-- safe however old that snapshot is: the unique index on (stream_id, stream_version)
-- refuses a version a concurrent append took meanwhile. A stream it only reads has no
-- such arbiter: a writer that committed after the snapshot and before the statement got
-- the stream's (shared) lock would go unseen, and the decision would be committed on a
-- stale read. So the statement takes a read-only participant's lock through this
-- function, which then reads the stream's version again: a VOLATILE function's queries
-- take a fresh snapshot in READ COMMITTED, and the lock is held before that snapshot is
-- taken, so no writer of the stream can commit between the two.

CREATE FUNCTION eventcore_lock_shared_version(p_stream text, p_key bigint) RETURNS bigint
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    at_version bigint;
BEGIN
    -- Under REPEATABLE READ or SERIALIZABLE the query below would see the transaction's
    -- first snapshot, not the state after the lock.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'eventcore needs READ COMMITTED; this transaction runs %',
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'ECS01';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(p_key);
    SELECT coalesce(max(e.stream_version), 0) INTO at_version
      FROM events e
     WHERE e.stream_id = p_stream;
    RETURN at_version;
END;
$$;
