ALTER TABLE dispatch_holds DROP COLUMN released_upto, DROP COLUMN released_jobs;
