"""A batch's span and its messages' traces: a recorded span links the traces its messages carry; a span
the sampler dropped costs no header parsing (the links are not read at all)."""

from __future__ import annotations

from engine_toy import CheckedStore, applied, engine, publish_inputs, until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from test_pipeline import run, stop

from cdp_kit.bus import Delivery


async def traced_inputs(bus, keys, positions) -> int:
    """Publish `keys` inside a sampled producer span; its trace id."""
    producer = TracerProvider(sampler=ALWAYS_ON).get_tracer("producer")
    with producer.start_as_current_span("produce") as span:
        await publish_inputs(bus, keys, 1, positions)
        return span.get_span_context().trace_id


async def applied_with(bus, sampler, keys):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    positions: dict = {}
    store = CheckedStore(positions)
    trace_id = await traced_inputs(bus, keys, positions)
    eng, _ = engine(bus, store, 1)
    eng.tracer = provider.get_tracer("engine")
    task = await run(eng)

    async def done():
        return sum(len(v) for v in (await applied(store)).values()) >= len(keys)

    await until(done)
    await stop(task)
    return exporter.get_finished_spans(), trace_id


async def test_a_recorded_batch_span_links_the_traces_of_its_messages(bus):
    spans, trace_id = await applied_with(bus, ALWAYS_ON, ["a", "b", "c"])
    batches = [s for s in spans if s.name.endswith(" apply")]
    assert batches and all(link.context.trace_id == trace_id for s in batches for link in s.links)
    assert sum(len(s.links) for s in batches) == 3


async def test_a_batch_span_the_sampler_dropped_reads_no_message_headers(bus, monkeypatch):
    read = []
    trace_context = Delivery.trace_context

    def counted(delivery):
        read.append(delivery)
        return trace_context(delivery)

    monkeypatch.setattr(Delivery, "trace_context", counted)
    spans, _trace_id = await applied_with(bus, ALWAYS_OFF, ["a", "b", "c"])
    assert not [s for s in spans if s.name.endswith(" apply")]
    assert read == []
