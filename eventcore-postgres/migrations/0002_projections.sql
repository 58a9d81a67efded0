-- EventCore event store, version 2: projection checkpoints and parked events.
-- Unqualified names: applied with search_path set to the store's schema (see 0001).

CREATE TABLE projection_checkpoints (
    projection text        PRIMARY KEY,
    -- 0: claimed by a transactional runner that has not processed anything yet.
    position   bigint      NOT NULL CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events a projection could not process and parked, to be looked at and replayed.
CREATE TABLE projection_parked_events (
    projection      text        NOT NULL,
    event_id        uuid        NOT NULL,
    global_position bigint      NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL,
    event_type      text        NOT NULL,
    error           text        NOT NULL,
    parked_at       timestamptz NOT NULL,
    PRIMARY KEY (projection, event_id)
);
