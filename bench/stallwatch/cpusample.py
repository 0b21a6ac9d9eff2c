"""Where each process of the platform spends its CPU, sampled while it runs in the pipeline benchmark
(started by bench/stallwatch/sitecustomize.py in every Python process the benchmark starts, with
PYTHONPATH=bench/stallwatch and CDP_CPUSAMPLE_DIR set). bench/cpusample_report.py reads what it writes.

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

import atexit
import json
import os
import signal
import threading
import time
from collections import Counter

_FLUSH_EVERY = 5.0


def start(folder: str, name: str) -> None:
    """Count this process' stacks on its CPU-time timer and write them to `folder` (see the module docstring)."""
    interval = float(os.environ.get("CDP_CPUSAMPLE_MS", "5")) / 1000
    path = os.path.join(folder, f"{name}-{os.getpid()}.json")
    stacks: Counter[str] = Counter()
    labels: dict[object, str] = {}

    def label(code) -> str:
        found = labels.get(code)
        if found is None:
            where = code.co_filename
            short = (
                where.split("/site-packages/", 1)[1]
                if "/site-packages/" in where
                else "/".join(where.rsplit("/", 2)[-2:])
            )
            found = labels[code] = f"{short}:{code.co_name}"
        return found

    def sampled(signum, frame) -> None:
        names = []
        while frame is not None:
            names.append(label(frame.f_code))
            frame = frame.f_back
        if names:
            stacks[";".join(reversed(names))] += 1

    def write() -> None:
        try:
            counted = dict(stacks)
            record = {"name": name, "pid": os.getpid(), "interval_ms": interval * 1000, "samples": sum(counted.values()),
                      "cpu_s": round(time.process_time(), 3), "stacks": counted}  # fmt: skip
            staged = f"{path}.{os.getpid()}.tmp"
            with open(staged, "w") as f:
                json.dump(record, f)
            os.replace(staged, path)
        except Exception:  # a benchmark's tool must never take the service down
            pass

    def last() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)  # the default action of a late SIGPROF ends the process
        write()

    def flushing() -> None:
        while True:
            time.sleep(_FLUSH_EVERY)
            write()

    signal.signal(signal.SIGPROF, sampled)
    signal.siginterrupt(signal.SIGPROF, False)
    signal.setitimer(signal.ITIMER_PROF, interval, interval)
    threading.Thread(target=flushing, name="cpusample", daemon=True).start()
    atexit.register(last)
