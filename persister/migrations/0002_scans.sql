-- Columns of the final scan record (bus::wire::ScanRecord) that 0001 lacked.
-- A scan row can be replaced by a later record of the same scan (a job
-- redelivered, or a failed scan reprocessed from the DLQ): the persister's
-- upsert keeps the record with the later completed_at, `done` beating
-- `failed` at the same instant.

ALTER TABLE scans
    ADD COLUMN labels       jsonb NOT NULL DEFAULT '[]'::jsonb,  -- the model's top classes, best first
    ADD COLUMN vision_model text;                                 -- which provider/model classified it

ALTER TABLE scans
    ADD CONSTRAINT scans_status_known CHECK (status IN ('queued', 'running', 'done', 'failed'));
