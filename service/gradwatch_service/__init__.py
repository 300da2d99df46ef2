"""gradwatch service: ingest, storage, detection and query API."""
