-- A batch's list read from a URL (s3://, gs://, https://) instead of an upload: ingest
-- reads it from there, and can read it again after a crash (like upload_parts). Only the
-- URL is kept; credentials stay in the readers' environment. A signed URL's query is the
-- caller's own credential: the api never shows it.
ALTER TABLE batches ADD COLUMN list_url text;
