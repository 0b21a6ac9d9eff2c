"""What the whole-pipeline benchmark (bench_pipeline.py) measures beside the platform: the physical
baselines of its stages, and the services' own metrics.

Baselines, each measured in the same run on the same machine, before the platform starts:

- `bare_http_latency`: a bare aiohttp server answering 200 to POST /v1/batch (no parsing, no auth, no
  storage), posted the same Segment batch bodies at the same pace as the collector is: the edge's floor.
- `bench_hop` (benchlib): one bare JetStream hop at the same rate: the floor of every stream a probe
  crosses (events.raw, events.resolved, profiles.changed, segments.entered, the ORCHESTRATION stream
  that sources it, actions.webhook).
- `bare_http_throughput` / `bare_jetstream_throughput`: events/s of the same batches through the bare
  HTTP server as fast as the client posts them, and through one JetStream stream (publish, a pull
  consumer fetches and acknowledges) at the same batch size: the throughput floor of one stage each.

`backlog` / `settle`: every durable consumer's messages not yet handled (not delivered, or delivered
and not acknowledged), and a bounded wait until there are none: a step starts on a platform that has
caught up.

Metrics: every service serves Prometheus text on its metrics endpoint (run.json's `metrics`). `scrape`
parses one, `window` turns two scrapes into what happened between them: each engine stage per batch
(mean exact, p50 / p99 interpolated within the histogram's buckets), the freshness histograms, and the
process' CPU seconds (cores used over the window). `schedstat` reads a process' CPU time (and its time
runnable but waiting for a CPU) from Linux, for nats-server too, which serves no metrics.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import ENGINE_STAGES, bucket_quantile, percentile

# Service-specific histograms worth reading beside the engine's (name -> what it measures).
SERVICE_HISTOGRAMS = {
    "cdp_profile_freshness_milliseconds": "collector acceptance to the profile change visible, per batch",
    "cdp_scoring_freshness_milliseconds": "profile change to its scores computed, per batch",
    "cdp_segmentation_freshness_milliseconds": "profile change to its batch applied, per batch",
    "cdp_scoring_inference_duration_milliseconds": "one model's inference call",
    "cdp_profile_commit_duration_milliseconds": "profile's store commit",
    "cdp_bus_handle_duration_milliseconds": "a consumer's handler, per batch (dispatchers, crm)",
}


# --- metrics ---------------------------------------------------------------------------------------


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def scrape(url: str) -> dict:
    """One service's histograms (by name and `service` label, summed over the rest: partitions, models)
    and its CPU seconds: {"hist": {(name, service): (buckets {le: cumulative}, sum, count)}, "cpu": s,
    "page_bytes": the size of its /metrics page (what every scrape costs the service to build)}."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {*ENGINE_STAGES.values(), *SERVICE_HISTOGRAMS}
    hist: dict[tuple[str, str], list] = {}
    cpu = 0.0
    page = fetch(url)
    for family in text_string_to_metric_families(page):
        if family.name == "process_cpu_seconds":
            cpu = sum(s.value for s in family.samples)
            continue
        if family.name not in wanted:
            continue
        for sample in family.samples:
            key = (family.name, sample.labels.get("service", ""))
            entry = hist.setdefault(key, [{}, 0.0, 0.0])
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                entry[0][bound] = entry[0].get(bound, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                entry[1] += sample.value
            elif sample.name.endswith("_count"):
                entry[2] += sample.value
    return {"hist": hist, "cpu": cpu, "at": time.monotonic(), "page_bytes": len(page.encode())}


def window(before: dict, after: dict) -> dict:
    """What one service did between two scrapes: {"cores": CPU used / wall, "stages": {label: {...}},
    "metrics_page_kb": its /metrics page at the end}.
    Engine stages are keyed `<service label>.<stage>` (profile runs two engines: `profile` for events and
    `profile-scores` for scores), other histograms by their short name."""
    stages = {}
    short = {v: k for k, v in ENGINE_STAGES.items()}
    for key, (b1, s1, c1) in after["hist"].items():
        b0, s0, c0 = before["hist"].get(key, [{}, 0.0, 0.0])
        count = c1 - c0
        if count <= 0:
            continue
        name, service = key
        cumulative = sorted((bound, n - b0.get(bound, 0.0)) for bound, n in b1.items())
        label = f"{service}.{short[name]}" if name in short else name.removeprefix("cdp_").removesuffix("_milliseconds")
        stages[label] = {
            "mean_ms": round((s1 - s0) / count, 2),
            "p50_ms": bucket_quantile(cumulative, count, 0.5),
            "p99_ms": bucket_quantile(cumulative, count, 0.99),
            "batches": int(count),
        }
    wall = after["at"] - before["at"]
    return {
        "cores": round((after["cpu"] - before["cpu"]) / wall, 2) if wall > 0 else None,
        "stages": stages,
        "metrics_page_kb": round(after.get("page_bytes", 0) / 1000, 1),
    }


def schedstat(pid: int | None) -> tuple[float, float, int] | None:
    """A process' threads summed, from Linux's /proc/<pid>/task/*/schedstat: seconds on a CPU, seconds
    runnable but waiting for one (the run queue), and the number of times it was given a CPU."""
    if not pid:
        return None
    on_cpu = waiting = 0.0
    slices = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                run_ns, wait_ns, count = (task / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
            on_cpu += int(run_ns) / 1e9
            waiting += int(wait_ns) / 1e9
            slices += int(count)
    except OSError:
        return None
    return on_cpu, waiting, slices


COUNTER_LINE = re.compile(r"^(cdp_collector_events_total|cdp_profile_events_total)\{([^}]*)\} ([0-9.e+]+)$", re.M)


def counted(collector_url: str, profile_url: str) -> tuple[float, float]:
    """(events the collector accepted, events the profile service handled), each summed over sources and
    outcomes, from the two services' counters (a regular expression: this runs every second)."""
    accepted = handled = 0.0
    for name, labels, value in COUNTER_LINE.findall(fetch(collector_url)):
        if name == "cdp_collector_events_total" and 'outcome="accepted"' in labels:
            accepted += float(value)
    for name, _labels, value in COUNTER_LINE.findall(fetch(profile_url)):
        if name == "cdp_profile_events_total":
            handled += float(value)
    return accepted, handled


# --- baselines -------------------------------------------------------------------------------------


class BareHttpServer:
    """An aiohttp server on its own thread and loop answering 200 to every POST: no parsing, no auth."""

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        async def accept(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=200, text='{"success":true}', content_type="application/json")

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/{path:.*}", accept)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(serve())

    def __enter__(self) -> BareHttpServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self._loop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def paced_posts(url: str, bodies: list[bytes], per_second: float, headers: dict) -> dict:
    """POST `bodies` at `per_second`, each in its own task (at most 64 in flight): latencies and statuses."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one(body: bytes) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        await answer.read()
                        status = answer.status
                except aiohttp.ClientError:
                    status = 0
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

        tasks = []
        started = time.perf_counter()
        for i, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, started + i / per_second - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "statuses": statuses}


async def bare_http_latency(bodies: list[bytes], per_second: float) -> dict:
    with BareHttpServer() as server:
        return await paced_posts(
            f"http://127.0.0.1:{server.port}/v1/batch", bodies, per_second, {"Content-Type": "application/json"}
        )


async def bare_http_throughput(bodies: list[bytes], events_per_body: int, in_flight: int = 8) -> float:
    """Events/s of `bodies` posted to the bare server as fast as `in_flight` senders go."""
    import aiohttp

    with BareHttpServer() as server:
        url = f"http://127.0.0.1:{server.port}/v1/batch"
        queue = list(bodies)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

            async def sender() -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as a:
                        await a.read()

            started = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(in_flight)))
            elapsed = time.perf_counter() - started
    return len(bodies) * events_per_body / elapsed


async def bare_jetstream_throughput(nats_url: str, payload: bytes, events_per_message: int, messages: int) -> float:
    """Events/s through one bare JetStream stream: `messages` of `payload` published (64 in flight) while
    a pull consumer fetches (batches of 64) and acknowledges them; until the last is acknowledged."""
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="BARE", subjects=["bare.>"])
    try:
        sub = await js.pull_subscribe("bare.>", durable="bare")
        done = 0

        async def consume() -> None:
            nonlocal done
            while done < messages:
                try:
                    batch = await sub.fetch(64, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for msg in batch:
                    await msg.ack()
                done += len(batch)

        started = time.perf_counter()
        consumer = asyncio.create_task(consume())
        for start in range(0, messages, 64):
            await asyncio.gather(
                *(js.publish(f"bare.{i % 8}", payload) for i in range(start, min(messages, start + 64)))
            )
        await consumer
        elapsed = time.perf_counter() - started
    finally:
        await js.delete_stream("BARE")
        await nc.close()
    return messages * events_per_message / elapsed


async def backlog(js) -> dict[str, int]:
    """Every durable consumer on the bus with messages it has not finished: durable -> messages not yet
    delivered plus delivered and not acknowledged (the dead-letter stream's readers left out)."""
    out: dict[str, int] = {}
    for stream in await js.streams_info():
        if stream.config.name == "DLQ":
            continue
        for consumer in await js.consumers_info(stream.config.name):
            behind = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
            if behind and consumer.config.durable_name:
                out[consumer.config.durable_name] = behind
    return out


async def settle(js, limit: float, *, ignore: tuple[str, ...] = ()) -> tuple[float | None, dict[str, int]]:
    """Wait until no durable consumer (but those starting with `ignore`) has a backlog: the seconds it
    took (None: not within `limit`) and what was still behind then."""
    started = time.monotonic()
    while True:
        behind = {name: n for name, n in (await backlog(js)).items() if not name.startswith(ignore)}
        if not behind:
            return time.monotonic() - started, {}
        if time.monotonic() - started > limit:
            return None, behind
        await asyncio.sleep(0.5)
