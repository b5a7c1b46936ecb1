-- Named queries of billing.py.

-- name: insert_orders
-- One row per element of the arrays; a message_id seen before is skipped.
-- Returns the rows actually stored.
INSERT INTO orders (user_id, number_of_items, total_amount, message_id)
SELECT * FROM unnest(
    %(user_ids)s::integer[],
    %(numbers_of_items)s::integer[],
    %(total_amounts)s::numeric[],
    %(message_ids)s::text[]
)
ON CONFLICT (message_id) DO NOTHING
RETURNING id, user_id, number_of_items, total_amount, message_id;
