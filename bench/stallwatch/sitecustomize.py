"""Where a process' event loop stalls, for bench_pipeline.py --trace (imported by every Python process
the benchmark and the platform start, through PYTHONPATH=bench/stallwatch; does nothing without
CDP_STALLWATCH_DIR). bench/stall_report.py reads what it writes. With CDP_CPUSAMPLE_DIR it also starts
`cpusample.py`, where each process' CPU goes (one sitecustomize: Python imports only the first on the path).

Six kinds of record, one JSON line each, in `$CDP_STALLWATCH_DIR/<service>-<pid>.jsonl`, stamped with
time.time() (the benchmark's clock, so they line up with each probe's stages):

- `gc`: a collection of generation 1 or 2, or one of generation 0 that took >= 5 ms (its start, wall
  and CPU ms, generation, objects collected).
- `late`: the event loop ran a 10 ms heartbeat >= 40 ms late, i.e. nothing else could run on that loop
  for that long. With it, over the same interval, the main thread's CPU time and the time it waited,
  runnable, for a core (Linux /proc/self/schedstat): wall - cpu - runnable is time the thread slept
  in a syscall (an fsync, a lock, the GIL held by another thread); and the main thread's Python stacks
  a watchdog thread sampled every 10 ms while the heartbeat was overdue, counted (what ran then; a C
  call that holds the GIL shows as the frame that called it, after it returns).
- `commit`: a write of the SQLite store that took >= 20 ms on its writer thread (its ops, the thread's CPU).
- `timed`: a call >= 5 ms of a coroutine function named in CDP_STALLWATCH_TIME (module:function,...).
- `exit`: as the process ends, a full collection with the frozen objects unfrozen: how many it found
  unreachable (cyclic garbage, some of which `gc.freeze` had kept) and how long it took.
- `cpu`: every second, the process' CPU time so far, its collections by generation so far and the
  objects `gc.freeze` has taken out of the collections.
"""

from __future__ import annotations

import os

from procname import process_name

_DIR = os.environ.get("CDP_STALLWATCH_DIR")

if os.environ.get("CDP_CPUSAMPLE_DIR"):
    import cpusample  # where each process' CPU goes (cpusample.py), beside or without the stall records

    cpusample.start(os.environ["CDP_CPUSAMPLE_DIR"], process_name())

if _DIR:
    import asyncio
    import gc
    import json
    import sys
    import threading
    import time
    from collections import Counter

    _TICK = 0.01
    _LATE = 0.04

    _name = process_name()
    _path = os.path.join(_DIR, f"{_name}-{os.getpid()}.jsonl")
    _out: list[str] = []
    _lock = threading.Lock()
    _gc_started = [0.0, 0.0, 0.0]  # perf_counter, time.time, thread_time
    _main = threading.main_thread().ident
    _state = {"last": None, "samples": Counter()}

    def _emit(record: dict) -> None:
        with _lock:
            _out.append(json.dumps(record))

    _collections = [0, 0, 0]
    _collected_ms = [0.0, 0.0, 0.0]

    def _gc(phase: str, info: dict) -> None:
        if phase == "start":
            _gc_started[0] = time.perf_counter()
            _gc_started[1] = time.time()
            _gc_started[2] = time.thread_time()
            return
        ms = (time.perf_counter() - _gc_started[0]) * 1000
        cpu_ms = (time.thread_time() - _gc_started[2]) * 1000
        _collections[info.get("generation", 0)] += 1
        _collected_ms[info.get("generation", 0)] += ms
        if info.get("generation", 0) >= 1 or ms >= 5.0:
            _emit({"kind": "gc", "at": _gc_started[1], "ms": round(ms, 2), "cpu_ms": round(cpu_ms, 2), "gen": info.get("generation"),
                   "collected": info.get("collected")})  # fmt: skip

    gc.callbacks.append(_gc)

    def _schedstat(path: str = "/proc/thread-self/schedstat") -> tuple[float, float]:
        try:
            with open(path) as f:
                run, wait, _ = f.read().split()
            return int(run) / 1e6, int(wait) / 1e6
        except (OSError, ValueError):
            return 0.0, 0.0

    def _stack(frame) -> str:
        parts = []
        while frame is not None and len(parts) < 14:
            code = frame.f_code
            parts.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(parts)

    def _beat(loop) -> None:
        now = time.perf_counter()
        last = _state["last"]
        run, wait = _schedstat()
        if last is not None:
            late = now - last[0] - _TICK
            if late >= _LATE:
                with _lock:
                    samples, _state["samples"] = _state["samples"], Counter()
                _emit({"kind": "late", "at": time.time() - (now - last[0]), "wall_ms": round((now - last[0]) * 1000, 1),
                       "late_ms": round(late * 1000, 1), "cpu_ms": round(run - last[1], 1),
                       "runnable_ms": round(wait - last[2], 1),
                       "stacks": samples.most_common(6)})  # fmt: skip
            elif _state["samples"]:
                with _lock:
                    _state["samples"] = Counter()
        _state["last"] = (now, run, wait)
        loop.call_later(_TICK, _beat, loop)

    def _patch_store() -> bool:
        """Once the service has imported the SQLite store: time every write on its writer thread (records
        `commit`: its start, ms, the thread's CPU ms in it - the rest is I/O or waiting for the GIL - and its
        ops) when it takes >= 20 ms. False while the module is not imported yet."""
        module = sys.modules.get("cdp_kit.storage.sqlite")
        cls = getattr(module, "SqliteStore", None)  # None too while the module is being imported
        if cls is None:
            return False
        if getattr(cls._write_sync, "_stallwatch", False):
            return True
        original = cls._write_sync

        def _write_sync(self, ops):
            started, at, cpu = time.perf_counter(), time.time(), time.thread_time()
            try:
                return original(self, ops)
            finally:
                ms = (time.perf_counter() - started) * 1000
                if ms >= 20:
                    _emit({"kind": "commit", "at": at, "ms": round(ms, 1), "ops": len(ops),
                           "cpu_ms": round((time.thread_time() - cpu) * 1000, 1), "db": self.path.name})  # fmt: skip

        _write_sync._stallwatch = True
        cls._write_sync = _write_sync
        return True

    # CDP_STALLWATCH_TIME="module:function,...": coroutine functions to time (`timed` records, calls >= 5 ms),
    # patched on the module once it is imported (a caller that reads the module's attribute sees it).
    _timed = [tuple(item.split(":", 1)) for item in os.environ.get("CDP_STALLWATCH_TIME", "").split(",") if ":" in item]

    def _patch_timed() -> None:
        for module_name, function in list(_timed):
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, function):  # not imported, or still being imported
                continue
            _timed.remove((module_name, function))
            original = getattr(module, function)

            async def timed(*args, _original=original, _name=f"{module_name}:{function}", **kwargs):
                started, at = time.perf_counter(), time.time()
                try:
                    return await _original(*args, **kwargs)
                finally:
                    ms = (time.perf_counter() - started) * 1000
                    if ms >= 5:
                        _emit({"kind": "timed", "name": _name, "at": at, "ms": round(ms, 1)})

            setattr(module, function, timed)

    def _watch() -> None:
        flushed = time.monotonic()
        patched = False
        while True:
            time.sleep(0.01)
            if not patched and _state["last"] is not None:
                patched = _patch_store()
            if _timed and _state["last"] is not None:
                _patch_timed()
            last = _state["last"]
            if last is not None and time.perf_counter() - last[0] > _TICK + _LATE / 2:
                frame = sys._current_frames().get(_main)
                if frame is not None:
                    key = _stack(frame)
                    with _lock:
                        _state["samples"][key] += 1
            if time.monotonic() - flushed >= 1.0:
                flushed = time.monotonic()
                _emit({"kind": "cpu", "at": time.time(), "process_cpu_s": round(time.process_time(), 3),
                       "gcs": list(_collections), "gc_ms": [round(ms, 1) for ms in _collected_ms],
                       "frozen": gc.get_freeze_count()})  # fmt: skip
                with _lock:
                    lines, _out[:] = list(_out), []
                if lines:
                    with open(_path, "a") as f:
                        f.write("\n".join(lines) + "\n")

    def _wrap(factory):
        def new_event_loop(*args, **kwargs):
            loop = factory(*args, **kwargs)
            if threading.get_ident() == _main:
                loop.call_soon(_beat, loop)
            return loop

        new_event_loop._stallwatch = True
        return new_event_loop

    if not getattr(asyncio.new_event_loop, "_stallwatch", False):
        wrapped = _wrap(asyncio.events.new_event_loop)
        asyncio.events.new_event_loop = wrapped
        asyncio.new_event_loop = wrapped
    try:
        import uvloop

        uvloop.new_event_loop = _wrap(uvloop.new_event_loop)
    except ImportError:
        pass

    def _at_exit() -> None:
        """What a full collection finds as the process ends, frozen objects included (`exit`: the objects
        frozen, those found unreachable, and its wall ms): cyclic garbage that `gc.freeze` kept."""
        frozen = gc.get_freeze_count()
        gc.unfreeze()
        started = time.perf_counter()
        found = gc.collect()
        record = {"kind": "exit", "at": time.time(), "frozen": frozen, "unreachable": found,
                  "ms": round((time.perf_counter() - started) * 1000, 1)}  # fmt: skip
        with open(_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    import atexit

    atexit.register(_at_exit)
    threading.Thread(target=_watch, name="stallwatch", daemon=True).start()
