"""cdp profile service."""

# The name in durable consumer and collection names: fixed, unlike OTEL_SERVICE_NAME (renaming a
# deployment's service in telemetry must not restart its consumers from the first message).
SERVICE = "profile"
