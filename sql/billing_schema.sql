-- Schema of billing_db. Idempotent: safe to run with psql -f any number of times.
CREATE TABLE IF NOT EXISTS orders (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         integer NOT NULL CHECK (user_id > 0),
    number_of_items integer NOT NULL CHECK (number_of_items > 0),
    total_amount    numeric(12, 2) NOT NULL CHECK (total_amount >= 0),
    -- The AMQP message_id; a redelivered message is stored once.
    message_id      text UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Ids were integer before: ON CONFLICT DO NOTHING consumes one on every
-- duplicate, so they could run out. Widen them in place (this rewrites the table
-- once, under a lock; the identity sequence becomes bigint with it); a no-op
-- once they are bigint.
DO $$
BEGIN
    IF (SELECT atttypid = 'integer'::regtype FROM pg_attribute
        WHERE attrelid = 'orders'::regclass AND attname = 'id') THEN
        ALTER TABLE orders ALTER COLUMN id TYPE bigint;
    END IF;
END $$;
