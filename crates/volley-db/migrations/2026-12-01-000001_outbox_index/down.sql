DROP INDEX jobs_outbox;
