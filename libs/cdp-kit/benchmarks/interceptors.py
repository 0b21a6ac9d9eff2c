"""Interceptor micro-benchmark: what the server interceptors cost per unary call on a real grpc.aio server.

    .venv/bin/python libs/cdp-kit/benchmarks/interceptors.py                  # every configuration, 3 rounds
    .venv/bin/python libs/cdp-kit/benchmarks/interceptors.py --configs bare,fused+auth --rounds 5

Each configuration starts its own grpc.aio server on 127.0.0.1 with one generic unary method answering
~450 bytes, warms it up, then a client in the same process and event loop drives `--calls` calls with
`--in-flight` outstanding. Configurations are interleaved over `--rounds` so drift on a busy machine hits them
all alike; it prints each configuration's best round (req/s, relative to bare, wall time per call over bare),
the medians of req/s and p99, and the least CPU time per call.

    bare              no interceptors: the ceiling
    fused             CdpInterceptor, auth off                                         (what service.py builds)
    fused+auth        CdpInterceptor with bearer-token auth
    …+tp              the client also sends a W3C traceparent, as a traced caller does

`--telemetry exported` (the default) is what a deployed service runs: spans go through a BatchSpanProcessor
(to an exporter that drops them, so no collector is needed) and the latency histogram has a metric reader.
`--telemetry local` is what a service gets with neither OTEL_EXPORTER_OTLP_ENDPOINT nor CDP_METRICS_PORT
(and what bench/bench_profile.py measures): spans are created but not exported, metrics are not read.

CPU time per call is the whole process's (client, server and gRPC's threads together).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from cdp_kit.auth import TokenAuthenticator, new_token, write_tokens_file
from cdp_kit.interceptors import CdpInterceptor
from cdp_kit.telemetry import Telemetry

METHOD = "/bench.Echo/Call"
SCOPES = {METHOD: "bench:read"}
ANSWER = bytes(range(256)) + bytes(194)  # 450 bytes, about a GetProfile answer
REQUEST = b"\n\x0fp_000123_person"
TRACEPARENT = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
CONFIGS = ("bare", "fused", "fused+auth", "fused+auth+tp")


class _DroppingExporter(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def bench_telemetry(mode: str) -> Telemetry:
    tracer_provider = TracerProvider()
    if mode == "exported":
        tracer_provider.add_span_processor(BatchSpanProcessor(_DroppingExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()] if mode == "exported" else [])
    return Telemetry(
        service_name="bench",
        tracer=tracer_provider.get_tracer("cdp.bench"),
        meter=meter_provider.get_meter("cdp.bench"),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )


def interceptors_for(config: str, telemetry: Telemetry, tokens: Path) -> list[grpc.aio.ServerInterceptor]:
    auth = TokenAuthenticator(tokens) if "+auth" in config else None
    if config == "bare":
        return []
    return [CdpInterceptor(telemetry, authenticator=auth, method_scopes=SCOPES)]


async def run_config(config: str, telemetry: Telemetry, tokens: Path, token: str, calls: int, in_flight: int):
    async def echo(request: bytes, context) -> bytes:
        return ANSWER

    server = grpc.aio.server(interceptors=interceptors_for(config, telemetry, tokens))
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    metadata: list[tuple[str, str]] = []
    if "+auth" in config:
        metadata.append(("authorization", f"Bearer {token}"))
    if config.endswith("+tp"):
        metadata.append(TRACEPARENT)
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)

            async def drive(n: int, record: bool) -> None:
                remaining = [n]

                async def worker() -> None:
                    while remaining[0] > 0:
                        remaining[0] -= 1
                        started = time.perf_counter()
                        answer = await call(REQUEST, metadata=metadata)
                        if record:
                            latencies.append((time.perf_counter() - started) * 1000)
                        assert len(answer) == len(ANSWER)

                await asyncio.gather(*(worker() for _ in range(in_flight)))

            await drive(min(2_000, calls), record=False)
            started, cpu_started = time.perf_counter(), time.process_time()
            await drive(calls, record=True)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await server.stop(None)
    latencies.sort()
    return calls / elapsed, latencies[int(len(latencies) * 0.99) - 1], cpu / calls * 1e6


async def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--telemetry", choices=("exported", "local"), default="exported")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")

    telemetry = bench_telemetry(args.telemetry)
    token = new_token()
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        write_tokens_file(tokens, [("bench", token, ["bench:read"])])
        for round_ in range(args.rounds):
            for config in configs:
                run = await run_config(config, telemetry, tokens, token, args.calls, args.in_flight)
                results[config].append(run)
                print(f"  round {round_ + 1} {config:<14} {run[0]:6.0f} req/s  p99 {run[1]:6.2f} ms", file=sys.stderr)
    assert telemetry.tracer_provider is not None
    telemetry.tracer_provider.shutdown()

    def median(config: str, column: int) -> float:
        return statistics.median(run[column] for run in results[config])

    def best(config: str) -> tuple[float, float, float]:
        return max(results[config])  # the round with the most req/s: the least disturbed by other work

    bare = best("bare")[0] if "bare" in results else None
    print(
        f"{args.calls} unary calls, {args.in_flight} in flight, telemetry {args.telemetry}, {args.rounds} rounds; "
        f"load average at the end {os.getloadavg()[0]:.2f} (other work on the machine skews the medians)"
    )
    print(
        f"{'config':<14} {'best req/s':>10} {'vs bare':>8} {'µs/call over bare':>18} {'median req/s':>13} "
        f"{'median p99 ms':>14} {'min CPU µs/call':>16}"
    )
    for config in results:
        rps = best(config)[0]
        ratio = f"{rps / bare:8.2f}" if bare else f"{'':8}"
        extra = f"{(1 / rps - 1 / bare) * 1e6:18.1f}" if bare else f"{'':18}"
        cpu = min(run[2] for run in results[config])
        print(
            f"{config:<14} {rps:10.0f} {ratio} {extra} {median(config, 0):13.0f} {median(config, 1):14.2f} {cpu:16.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
