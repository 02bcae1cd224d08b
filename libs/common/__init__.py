"""Shared building blocks of every imagestream service: settings, messages, key layout,
the Redis Streams consumer loop, the PostgreSQL ledger, logging, metrics and shutdown."""
