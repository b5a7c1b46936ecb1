-- Named queries of inventory.py. Movies come back as JSON text built by
-- PostgreSQL, so the service never decodes and re-encodes rows.

-- name: page_movies
-- Up to %(limit)s movies with id > %(after)s (after skipping %(offset)s), as one
-- JSON array, with the row count and the last id (where the next page starts).
SELECT coalesce(json_agg(m ORDER BY m.id), '[]')::text, count(*), max(m.id)
FROM (
    SELECT id, title, description FROM movies
    WHERE id > %(after)s
    ORDER BY id
    LIMIT %(limit)s OFFSET %(offset)s
) AS m;

-- name: page_movies_by_title
-- The same, for titles matching an ILIKE pattern (served by the trigram index;
-- run unprepared, see Database.pages).
SELECT coalesce(json_agg(m ORDER BY m.id), '[]')::text, count(*), max(m.id)
FROM (
    SELECT id, title, description FROM movies
    WHERE id > %(after)s AND title ILIKE %(pattern)s
    ORDER BY id
    LIMIT %(limit)s OFFSET %(offset)s
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
