-- Named queries of inventory.py. Movies come back as JSON text built by
-- PostgreSQL, so the service never decodes and re-encodes rows.

-- name: page_movies
-- Up to %(limit)s movies with id > %(after)s (after skipping %(offset)s), if
-- their JSON cannot pass %(budget)s bytes: %(lead)s followed by their JSON
-- objects joined by commas, how many there are, the last id (where the next
-- page starts) and how many movies were read. A page that could pass the budget
-- comes back empty with its rows read counted: cut_movies cuts it. A movie's
-- JSON is at most 6 bytes per byte of text (a control character becomes
-- \u00XX) plus 64 for the rest, so the budget holds whatever the text. The row
-- type `movies` gives the JSON the table's column names as keys; the rows reach
-- string_agg in id order (the subquery's ORDER BY, kept under its LIMIT).
WITH page AS (
    SELECT sum(6 * (octet_length(title) + octet_length(description)) + 64) AS bytes,
           count(*) AS read
    FROM (
        SELECT title, description FROM movies
        WHERE id > %(after)s
        ORDER BY id
        LIMIT %(limit)s OFFSET %(offset)s
    ) AS m
)
SELECT %(lead)s || string_agg(
           row_to_json(ROW(m.id, m.title, m.description)::movies)::text, ','
       ),
       count(*),
       max(m.id),
       (SELECT read FROM page)
FROM (
    SELECT id, title, description FROM movies
    WHERE id > %(after)s
    ORDER BY id
    LIMIT %(limit)s OFFSET %(offset)s
) AS m
WHERE (SELECT bytes FROM page) <= %(budget)s;

-- name: cut_movies
-- The same page, cut before the movie that would pass %(budget)s bytes (the
-- first is always kept; rows past the cut are never encoded): the same columns,
-- with fewer movies kept than read. The rows reach string_agg in id order, from
-- the window's ORDER BY. The window costs more than page_movies' sum (about
-- 0.3 ms per 1,000 movies), so a plain list only runs it for pages that need it.
SELECT %(lead)s || string_agg(
           row_to_json(ROW(p.id, p.title, p.description)::movies)::text, ','
       ) FILTER (WHERE p.before < %(budget)s),
       count(*) FILTER (WHERE p.before < %(budget)s),
       max(p.id) FILTER (WHERE p.before < %(budget)s),
       count(*)
FROM (
    SELECT id, title, description,
           sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before
    FROM (
        SELECT id, title, description,
               6 * (octet_length(title) + octet_length(description)) + 64 AS size
        FROM movies
        WHERE id > %(after)s
        ORDER BY id
        LIMIT %(limit)s OFFSET %(offset)s
    ) AS m
) AS p;

-- name: cut_movies_by_title
-- The same, for titles matching an ILIKE pattern (served by the trigram index;
-- run unprepared, see Database.pages). Searches always cut: a window over the
-- matches costs less than running the search twice.
SELECT %(lead)s || string_agg(
           row_to_json(ROW(p.id, p.title, p.description)::movies)::text, ','
       ) FILTER (WHERE p.before < %(budget)s),
       count(*) FILTER (WHERE p.before < %(budget)s),
       max(p.id) FILTER (WHERE p.before < %(budget)s),
       count(*)
FROM (
    SELECT id, title, description,
           sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before
    FROM (
        SELECT id, title, description,
               6 * (octet_length(title) + octet_length(description)) + 64 AS size
        FROM movies
        WHERE id > %(after)s AND title ILIKE %(pattern)s
        ORDER BY id
        LIMIT %(limit)s OFFSET %(offset)s
    ) AS m
) AS p;

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
