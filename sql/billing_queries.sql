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
