-- Schema of movies_db. Idempotent: safe to run with psql -f any number of times.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE IF NOT EXISTS movies (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title       text NOT NULL,
    description text NOT NULL DEFAULT ''
);

-- Serves ILIKE '%x%' title searches without a sequential scan.
CREATE INDEX IF NOT EXISTS movies_title_trgm
    ON movies USING gin (title gin_trgm_ops);
