"""ingest: reads uploaded lists into the ledger and feeds the fetch stream from it."""
