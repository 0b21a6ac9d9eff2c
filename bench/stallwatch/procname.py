"""The name a benchmark tool's record files take for this process (stallwatch, cpusample)."""

from __future__ import annotations

import os
import sys


def process_name() -> str:
    """The service's name, or the module a `python -m` companion runs, or the script's."""
    if os.environ.get("OTEL_SERVICE_NAME"):
        return os.environ["OTEL_SERVICE_NAME"]
    try:
        with open("/proc/self/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        args = sys.argv
    if "-m" in args and args.index("-m") + 1 < len(args):
        return args[args.index("-m") + 1]
    return os.path.basename(args[1] if len(args) > 1 else args[0]) or "python"
