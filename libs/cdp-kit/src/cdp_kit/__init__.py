"""The platform kit every service is built on (bus, engine, storage, service runtime, telemetry).

Importing it installs one import rule: nats-py's transport module imports aiohttp (for its WebSocket
transport, which the platform never uses: every service speaks NATS over TCP) when aiohttp is installed, and
aiohttp is ~0.15 s of CPU to import. Only the collector and the CRM connector serve or call HTTP with it, so
for the other services, and at each of their starts, that import is waste: the rule lets nats' transport
find no aiohttp while it loads (it then leaves its WebSocket transport unavailable, as it does where aiohttp
is not installed). Only that import in that thread: another thread importing aiohttp meanwhile, and any
`import aiohttp` later, imports it as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType

_NATS_TRANSPORT = "nats.aio.transport"
# Set in the thread loading nats' transport, while it loads: aiohttp is hidden from that thread only (another
# thread importing aiohttp meanwhile imports it as usual).
_loading = threading.local()


class _TransportLoader(importlib.abc.Loader):
    """nats' transport module, loaded with aiohttp hidden from its thread (`_NatsWithoutWebSockets`)."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _loading.transport = "aiohttp" not in sys.modules  # imported already: the transport uses it
        try:
            self.inner.exec_module(module)
        finally:
            _loading.transport = False


class _NatsWithoutWebSockets(importlib.abc.MetaPathFinder):
    """Stays installed (sys.meta_path is not changed while another thread may be walking it): one comparison
    for each module not imported yet."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name == "aiohttp" and getattr(_loading, "transport", False):
            raise ModuleNotFoundError("aiohttp is not imported for nats' WebSocket transport (cdp_kit)", name=name)
        if name != _NATS_TRANSPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _TransportLoader(spec.loader)
        return spec


if _NATS_TRANSPORT not in sys.modules and not any(isinstance(f, _NatsWithoutWebSockets) for f in sys.meta_path):
    sys.meta_path.insert(0, _NatsWithoutWebSockets())
