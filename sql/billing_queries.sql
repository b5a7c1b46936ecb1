-- Named queries of billing.py.

-- name: insert_orders
-- One row per element of the arrays; a message_id seen before is skipped.
-- Returns one log line per order actually stored (message_id JSON-quoted, so a
-- line break in it stays on its line), joined by newlines; NULL if none was.
WITH stored AS (
    INSERT INTO orders (user_id, number_of_items, total_amount, message_id)
    SELECT * FROM unnest(
        %(user_ids)s::integer[],
        %(numbers_of_items)s::integer[],
        %(total_amounts)s::numeric[],
        %(message_ids)s::text[]
    )
    ON CONFLICT (message_id) DO NOTHING
    RETURNING id, user_id, number_of_items, total_amount, message_id
)
SELECT string_agg(
    'stored order ' || id || ': user ' || user_id || ', ' || number_of_items
    || ' items, ' || total_amount || ', message_id '
    || coalesce(to_json(message_id)::text, 'null'),
    E'\n' ORDER BY id)
FROM stored;

-- name: lock_message_ids
-- Before insert_orders, in its transaction: one transaction-level lock per
-- message_id, taken in one order for every consumer (by the id's hash), so two
-- consumers storing the same messages wait for each other, never in a cycle.
SELECT count(pg_advisory_xact_lock(hash))
FROM (
    SELECT DISTINCT hashtextextended(message_id, 0) AS hash
    FROM unnest(%(message_ids)s::text[]) AS message_id
    ORDER BY hash
) AS ordered;
