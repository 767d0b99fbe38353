-- Completion estimates (`estimated_completion_at` on a batch) measure each inference type's
-- throughput from its newest finishes. Without this index that read scans every job ever run.
-- Only PROCESSED and FAILED rows are in it (cancelled jobs did no work), and a row enters it
-- once, when its job finishes: one more index entry on batch-state's batched write, whose
-- change of `status` already writes new entries in the primary key and `jobs_by_batch`.
CREATE INDEX jobs_finished ON jobs (inference_type, finished_at)
    WHERE status IN ('PROCESSED', 'FAILED');
