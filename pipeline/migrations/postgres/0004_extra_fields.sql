-- Every stored row now ends with the `extra_fields` field (the fields beyond
-- the header's width; empty for most rows), so that the export is rectangular.
-- Rows stored before it get an empty one. The load's warnings (ragged rows,
-- replaced bytes, rows spanning lines) are kept for the summary and status.
UPDATE points SET fields = fields || ',';
ALTER TABLE imports ADD COLUMN warnings TEXT;
