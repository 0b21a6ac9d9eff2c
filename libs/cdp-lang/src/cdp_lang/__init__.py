"""cdp's condition language (being moved here from segmentation's domain)."""
