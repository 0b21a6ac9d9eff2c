"""cdp segmentation service."""
