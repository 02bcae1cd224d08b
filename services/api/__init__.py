"""api: REST API, dashboard, exports, health and metrics."""
