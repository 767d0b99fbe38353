-- The media a job's worker stored for its successful attempt. The gateway turns only these
-- keys into links: everything else in a result is provider text, and a `volley-media:` string
-- there is never a reference. NULL: no media.
ALTER TABLE jobs ADD COLUMN media_keys TEXT[];
-- Results stored before this column keep their links: media workers stored sits in
-- `data[i].url` of non-LLM results, under the job's own prefix (provider text never reaches
-- those slots, and the prefix keeps any other job's media out).
UPDATE jobs j SET media_keys = k.keys
    FROM (SELECT id, ARRAY(
              SELECT substr(e->>'url', length('volley-media:') + 1)
              FROM jsonb_array_elements(result->'data') AS e
              WHERE jsonb_typeof(e) = 'object'
                AND e->>'url' LIKE 'volley-media:batches/' || batch_id || '/' || id || '-a%'
          ) AS keys
          FROM jobs
          WHERE status = 'PROCESSED' AND inference_type <> 'LLM'
            AND jsonb_typeof(result->'data') = 'array') AS k
    WHERE j.id = k.id AND cardinality(k.keys) > 0;
