DROP TABLE jobs;
DROP TABLE batches;
DROP TABLE api_keys;
