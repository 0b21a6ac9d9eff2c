"""Profile rules as plain Python: no gRPC, no NATS, no store."""
