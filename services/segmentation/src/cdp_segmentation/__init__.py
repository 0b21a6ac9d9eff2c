"""cdp segmentation service."""

# Before anything imports nats (__main__ does, first): the kit's import rule keeps nats from importing aiohttp,
# which nothing here uses (cdp_kit/__init__.py).
import cdp_kit  # noqa: F401
