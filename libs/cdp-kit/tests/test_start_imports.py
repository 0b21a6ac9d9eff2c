"""What a service imports to start: nats without aiohttp (cdp_kit's import rule), and no X.509 parser until
a certificate is read. Each is CPU at every start of every replica, and each test platform's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_bus_imports_nats_without_aiohttp_and_aiohttp_still_imports_after():
    out = _run(
        """
        import sys
        import cdp_kit.bus
        import nats.aio.transport as transport
        print("aiohttp" in sys.modules, transport.aiohttp is None)
        import aiohttp
        print(aiohttp.ClientSession.__name__)
        """
    )
    assert out.splitlines() == ["False True", "ClientSession"]


def test_nats_imported_after_aiohttp_keeps_its_websocket_transport():
    """A process that already has aiohttp (the collector, the CRM connector) loses nothing by the rule."""
    out = _run(
        """
        import aiohttp
        import cdp_kit
        import nats.aio.transport as transport
        print(transport.aiohttp is aiohttp)
        """
    )
    assert out == "True"


@pytest.mark.parametrize("service", ["cdp_identity", "cdp_profile", "cdp_scoring", "cdp_segmentation"])
def test_a_service_without_http_clients_starts_without_aiohttp_or_x509(service):
    out = _run(
        f"""
        import sys
        import {service}.__main__
        print(sorted(m for m in ("aiohttp", "cryptography.x509") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_another_thread_imports_aiohttp_while_nats_transport_loads():
    """The rule hides aiohttp from the import of nats' transport only: a thread importing aiohttp at that
    moment (a library's worker thread, an exporter) imports it. The transport's module code is held at its
    first line (a trace of the loading thread) until the other thread has tried."""
    out = _run(
        """
        import sys, threading
        import cdp_kit

        loading, tried = threading.Event(), threading.Event()

        def trace(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.endswith("transport.py") and "nats" in frame.f_code.co_filename:
                loading.set()
                tried.wait(10)
            return None

        def load():
            sys.settrace(trace)
            import nats.aio.transport
            sys.settrace(None)

        got = []

        def other():
            assert loading.wait(10), "nats' transport never loaded"
            try:
                import aiohttp
                got.append(aiohttp.__name__)
            except ImportError as exc:
                got.append(type(exc).__name__)
            tried.set()

        threads = [threading.Thread(target=other), threading.Thread(target=load)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(got)
        """
    )
    assert out == "['aiohttp']"
