"""The platform kit every service is built on (bus, engine, storage, service runtime, telemetry).

Importing it installs one import rule: nats-py's transport module imports aiohttp (for its WebSocket
transport, which the platform never uses: every service speaks NATS over TCP) when aiohttp is installed, and
aiohttp is ~0.15 s of CPU to import. Only the collector and the CRM connector serve or call HTTP with it, so
for the other services, and at each of their starts, that import is waste: the rule lets nats' transport
find no aiohttp while it loads (it then leaves its WebSocket transport unavailable, as it does where aiohttp
is not installed). A later `import aiohttp` anywhere imports it as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_NATS_TRANSPORT = "nats.aio.transport"


class _TransportLoader(importlib.abc.Loader):
    """nats' transport module, loaded with aiohttp hidden (a None in sys.modules makes its import fail)."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hidden = "aiohttp" not in sys.modules
        if hidden:
            sys.modules["aiohttp"] = None  # type: ignore[assignment]
        try:
            self.inner.exec_module(module)
        finally:
            if hidden and sys.modules.get("aiohttp", 0) is None:
                del sys.modules["aiohttp"]


class _NatsWithoutWebSockets(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != _NATS_TRANSPORT:
            return None
        sys.meta_path.remove(self)  # once: the module is then in sys.modules
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _TransportLoader(spec.loader)
        return spec


if _NATS_TRANSPORT not in sys.modules and not any(isinstance(f, _NatsWithoutWebSockets) for f in sys.meta_path):
    sys.meta_path.insert(0, _NatsWithoutWebSockets())
