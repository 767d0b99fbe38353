ALTER TABLE jobs DROP COLUMN media_keys;
