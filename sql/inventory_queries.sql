-- Named queries of inventory.py. Movies come back as JSON text built by
-- PostgreSQL, so the service never decodes and re-encodes rows.

-- name: page_movies
-- Up to %(limit)s movies with id > %(after)s (after skipping %(offset)s), cut
-- before the movie whose JSON could pass %(budget)s bytes (the first is always
-- kept): %(lead)s followed by their JSON objects joined by commas, how many
-- were kept, the last id kept (where the next page starts) and how many were
-- read (more than kept: the page was cut). A movie's JSON is at most 6 bytes
-- per byte of text (a control character becomes \u00XX) plus 64 for the rest,
-- so the budget holds whatever the text; rows past the cut are never encoded.
SELECT %(lead)s || string_agg(row_to_json(s.m)::text, ',' ORDER BY (s.m).id)
           FILTER (WHERE s.before < %(budget)s),
       count(*) FILTER (WHERE s.before < %(budget)s),
       max((s.m).id) FILTER (WHERE s.before < %(budget)s),
       count(*)
FROM (
    SELECT m, sum(size) OVER (ORDER BY m.id) - size AS before
    FROM (
        SELECT id, title, description FROM movies
        WHERE id > %(after)s
        ORDER BY id
        LIMIT %(limit)s OFFSET %(offset)s
    ) AS m,
    LATERAL (SELECT 6 * (octet_length(m.title) + octet_length(m.description)) + 64)
        AS z (size)
) AS s;

-- name: page_movies_by_title
-- The same, for titles matching an ILIKE pattern (served by the trigram index;
-- run unprepared, see Database.pages).
SELECT %(lead)s || string_agg(row_to_json(s.m)::text, ',' ORDER BY (s.m).id)
           FILTER (WHERE s.before < %(budget)s),
       count(*) FILTER (WHERE s.before < %(budget)s),
       max((s.m).id) FILTER (WHERE s.before < %(budget)s),
       count(*)
FROM (
    SELECT m, sum(size) OVER (ORDER BY m.id) - size AS before
    FROM (
        SELECT id, title, description FROM movies
        WHERE id > %(after)s AND title ILIKE %(pattern)s
        ORDER BY id
        LIMIT %(limit)s OFFSET %(offset)s
    ) AS m,
    LATERAL (SELECT 6 * (octet_length(m.title) + octet_length(m.description)) + 64)
        AS z (size)
) AS s;

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

-- name: ping
-- /health: the database answers.
SELECT 1;
