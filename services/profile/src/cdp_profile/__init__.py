"""cdp profile service."""
