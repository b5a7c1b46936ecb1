-- Named queries of inventory.py. Each returns JSON text built by PostgreSQL,
-- so the service never decodes and re-encodes rows.

-- name: list_movies
-- One page of movies (or of those whose title contains the escaped pattern),
-- ordered by id, as a JSON array.
SELECT coalesce(json_agg(m ORDER BY m.id), '[]')::text
FROM (
    SELECT id, title, description FROM movies
    WHERE %(pattern)s::text IS NULL OR title ILIKE %(pattern)s
    ORDER BY id
    LIMIT %(limit)s OFFSET %(offset)s
) AS m;

-- name: stream_movies
-- The same rows one JSON object each, for streaming a list of any size.
SELECT row_to_json(m)::text
FROM (
    SELECT id, title, description FROM movies
    WHERE %(pattern)s::text IS NULL OR title ILIKE %(pattern)s
    ORDER BY id
    OFFSET %(offset)s
) AS m;

-- name: get_movie
SELECT row_to_json(m)::text
FROM (SELECT id, title, description FROM movies WHERE id = %(id)s) AS m;

-- name: insert_movie
WITH m AS (
    INSERT INTO movies (title, description)
    VALUES (%(title)s, %(description)s)
    RETURNING id, title, description
)
SELECT id, row_to_json(m)::text FROM m;

-- name: update_movie
-- A NULL parameter keeps the current value (partial update).
WITH m AS (
    UPDATE movies
    SET title = coalesce(%(title)s, title),
        description = coalesce(%(description)s, description)
    WHERE id = %(id)s
    RETURNING id, title, description
)
SELECT row_to_json(m)::text FROM m;

-- name: delete_movie
DELETE FROM movies WHERE id = %(id)s RETURNING id;

-- name: delete_all_movies
WITH gone AS (DELETE FROM movies RETURNING 1)
SELECT count(*) FROM gone;
