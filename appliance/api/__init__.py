"""HTTP API: handlers parse and serialize; the data plane does the work."""
