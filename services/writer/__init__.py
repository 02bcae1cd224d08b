"""writer: records item results in the ledger in bulk, idempotently."""
