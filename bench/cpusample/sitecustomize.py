"""Where each process of the platform spends its CPU, sampled while it runs in the pipeline benchmark
(imported by every Python process the benchmark starts, through PYTHONPATH=bench/cpusample; does nothing
without CDP_CPUSAMPLE_DIR). bench/cpusample_report.py reads what it writes.

Every CDP_CPUSAMPLE_MS milliseconds of the process' CPU time (default 5; ITIMER_PROF), SIGPROF's handler
counts the Python stack the main thread runs when it takes the signal, one line per distinct stack. A
process asleep in its event loop's poll uses no CPU and takes no signal, so the counts are CPU, not wall
time. (A thread sampling with sys._current_frames() does not work here: it gets the GIL only when uvloop
releases it around its poll, so every sample lands there.) CPU of other threads (the SQLite store's writer,
onnxruntime's) also raises the signal, and is counted against what the main thread runs next; C code the
loop runs between Python callbacks is counted against the next callback.

Every 5 s, and as the process ends, `$CDP_CPUSAMPLE_DIR/<service>-<pid>.json` is written again whole:
{"name", "pid", "interval_ms", "samples", "cpu_s", "stacks": {"file:function;...": count}}.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("CDP_CPUSAMPLE_DIR")

if _DIR:
    import atexit
    import json
    import signal
    import sys
    import threading
    import time
    from collections import Counter

    _INTERVAL = float(os.environ.get("CDP_CPUSAMPLE_MS", "5")) / 1000
    _FLUSH_EVERY = 5.0

    def _named() -> str:
        """The service's name, or the module a `python -m` process runs, or the script's."""
        if os.environ.get("OTEL_SERVICE_NAME"):
            return os.environ["OTEL_SERVICE_NAME"]
        args = sys.argv
        try:
            with open("/proc/self/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            pass
        if "-m" in args and args.index("-m") + 1 < len(args):
            return args[args.index("-m") + 1]
        return os.path.basename(args[1] if len(args) > 1 else args[0]) or "python"

    _name = _named()
    _path = os.path.join(_DIR, f"{_name}-{os.getpid()}.json")
    _stacks: Counter[str] = Counter()
    _counted = [0]
    _codes: dict[object, str] = {}

    def _label(code) -> str:
        label = _codes.get(code)
        if label is None:
            path = code.co_filename
            short = (
                path.split("/site-packages/", 1)[1] if "/site-packages/" in path else "/".join(path.rsplit("/", 2)[-2:])
            )
            label = _codes[code] = f"{short}:{code.co_name}"
        return label

    def _stack(frame) -> str:
        names = []
        while frame is not None:
            names.append(_label(frame.f_code))
            frame = frame.f_back
        return ";".join(reversed(names))

    def _write() -> None:
        try:
            cpu = time.process_time()
            record = {"name": _name, "pid": os.getpid(), "interval_ms": _INTERVAL * 1000, "samples": _counted[0],
                      "cpu_s": round(cpu, 3), "stacks": dict(_stacks)}  # fmt: skip
            staged = f"{_path}.{os.getpid()}.tmp"
            with open(staged, "w") as f:
                json.dump(record, f)
            os.replace(staged, _path)
        except Exception:  # a benchmark's tool must never take the service down
            pass

    def _sampled(signum, frame) -> None:
        if frame is not None:
            _stacks[_stack(frame)] += 1
            _counted[0] += 1

    def _last() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)  # the default action of a late SIGPROF ends the process
        _write()

    def _flushing() -> None:
        while True:
            time.sleep(_FLUSH_EVERY)
            _write()

    signal.signal(signal.SIGPROF, _sampled)
    signal.siginterrupt(signal.SIGPROF, False)
    signal.setitimer(signal.ITIMER_PROF, _INTERVAL, _INTERVAL)
    threading.Thread(target=_flushing, name="cpusample", daemon=True).start()
    atexit.register(_last)
