-- EventCore event store, version 3: a log read that does not depend on statistics.
-- Unqualified names: applied with search_path set to the store's schema (see 0001).
--
-- Readers page through the log in position order with a LIMIT. The right plan is a walk
-- of the primary key in order that stops at the limit. Without statistics (a table just
-- loaded, before autovacuum analyzed it) the planner chose a bitmap scan of every row
-- after the position, converted each payload to text and sorted them to keep the first
-- page: 38 ms instead of 6 ms for a page of 5,000 out of 30,000 rows, and worse as the
-- log grows. Turning those two plan shapes off inside the function keeps the ordered
-- walk whatever the statistics say.
ALTER FUNCTION eventcore_read_log(bigint, text, text[], bigint)
    SET enable_sort = off;
ALTER FUNCTION eventcore_read_log(bigint, text, text[], bigint)
    SET enable_bitmapscan = off;
