"""cdp identity service."""
