"""The provisioner: creates every stream and bucket cdp runs on and brings each to its spec
(`cdp_kit.streamtable`), with an identity that may: `cdpctl up` runs it as its operator user before it
starts the services; the Helm chart runs it as a Job (pre-install, pre-upgrade hook) with a NATS user of
its own (`PROVISIONER`), `python -m cdp_kit.provision`.

No service's NATS user may create, update, delete or purge a stream (cdp_kit.natsauth): nats-server
applies a stream's sources, mirror, republish and subject transform inside the account without checking
the requesting user's permissions, so configuring any stream would open every subject. A service
verifies at start what is here instead (`Bus.ensure_streams`), and refuses to start, naming the stream and
the setting, when it differs.

A stream that exists and differs from its spec in a compared setting (retention, limits, subjects,
sources, mirror, republish, subject transform) is updated: a republish or an extra source someone added is
removed. The ownership key-value bucket (when a service uses it: `wants_ownership_bucket`) and scoring's
object store (when CDP_SCORING_MODEL_STORE is nats://<bucket>) are created when missing and lose any
source, republish or transform they were given.

The partition count (CDP_PARTITIONS, as the services get it) is recorded in each partitioned stream's
metadata when the stream is made, and in an existing one that records none yet (`cdp_kit.bus.
partition_count`: a stream made before cdp recorded it, unless what it holds shows another count). Every
partitioned service checks it at start. Streams that record another count are refused, naming both, before
anything is created or changed: a platform keeps the count its data was made with.

Environment: CDP_NATS_URL (and the kit's CDP_NATS_CREDENTIALS_FILE, CDP_NATS_TLS_*), CDP_PARTITIONS, the
services' retention variables (`streamtable.KNOBS`), CDP_SCORING_MODEL_STORE, CDP_PROVISION_OWNERSHIP_BUCKET
(or CDP_OWNERSHIP=nats) and CDP_PROVISION_SERVICES: the services deployed, comma-separated (default: every
one); only the streams they use are made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Iterable, Mapping

from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from cdp_kit.bus import partition_count
from cdp_kit.bus import streams as kit
from cdp_kit.natsauth import PROVISIONER, default_partitions
from cdp_kit.natsroles import OWNERSHIP_BUCKET
from cdp_kit.streamtable import model_bucket, stream_configs

log = logging.getLogger("cdp.provision")

SERVICES_VARIABLE = "CDP_PROVISION_SERVICES"
# How many copies nats-server keeps of every stream and bucket (JetStream's replicas): 1 on a single
# server; 3 on a three-node cluster, so a node lost loses no stream (PRIVACY's notices are kept for ever).
REPLICAS_VARIABLE = "CDP_NATS_STREAM_REPLICAS"
OWNERSHIP_VARIABLE = "CDP_PROVISION_OWNERSHIP_BUCKET"
OWNERSHIP_DESCRIPTION = "cdp partition ownership"  # as cdp_kit.ownership.nats_kv opens it
MODELS_DESCRIPTION = "cdp ONNX models"  # as cdp_scoring.modelstore opens it


async def _stream(js: JetStreamContext, wanted: api.StreamConfig, current: api.StreamConfig | None) -> str | None:
    if current is None:
        await js.add_stream(wanted)
        return f"created stream {wanted.name}"
    # Each setting as it was and as it is now: an operator sees a retention that grew (an upgrade run
    # without the variable an older start was given) as well as one that shrank. The replicas are the
    # provisioner's alone (a service's own copy of a spec does not say them, so it does not compare them).
    changed = [
        f"{name} {kit._shown(current, name)} -> {kit._shown(wanted, name)}"
        for name in kit._differs(current, wanted, (*kit._COMPARED, "num_replicas"))
    ]
    if wanted.metadata and partition_count.recorded(current) is None:
        changed.append("partition count recorded")
    if not changed:
        return None
    # Metadata someone else gave the stream stays; the server's own is not ours to send.
    kept = {k: v for k, v in (current.metadata or {}).items() if not k.startswith("_nats.")}
    await js.update_stream(dataclasses.replace(wanted, metadata={**kept, **(wanted.metadata or {})} or None))
    return f"updated stream {wanted.name} ({', '.join(changed)})"


async def _counts_agree(js: JetStreamContext, partitions: int, existing: Mapping[str, api.StreamConfig]) -> None:
    """Every existing partitioned stream records `partitions`, or shows nothing against it when it records
    none (made before the count was recorded: `partition_count.evidence`); PartitionsMismatch otherwise,
    before anything is changed."""
    for name, current in existing.items():
        if name not in partition_count.PARTITIONED:
            continue
        made = partition_count.recorded(current)
        if made is None:
            seen = await partition_count.evidence(js, name)
            if seen.refuses(partitions):
                raise partition_count.unrecorded(name, seen, partitions, who="the provisioner")
        elif made != partitions:
            raise partition_count.mismatch(name, made, partitions, who="the provisioner")


async def _bucket(
    js: JetStreamContext, stream: str, create, *, wanted: bool = True, settings: Mapping[str, object] | None = None
) -> str | None:
    """A bucket's stream: created when missing (and `wanted`); otherwise stripped of any routing it was given
    and brought to `settings` (stream configuration fields)."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        if not wanted:
            return None
        await create()
        return f"created stream {stream}"
    current = info.config
    settings = dict(settings or {})
    clean = dataclasses.replace(current, **dict.fromkeys(kit.ROUTING), **settings)
    # A setting the server leaves out of its answer is unset: False for a flag.
    changed = kit._differs(current, clean, kit.ROUTING) + [
        name for name, value in settings.items() if (getattr(current, name) or False) != value
    ]
    if not changed:
        return None
    if "mirror" in changed:
        raise RuntimeError(
            f"stream {stream} was made a mirror, which nats-server does not let an update undo: delete the "
            "stream (its contents are rebuilt by the services) and run the provisioner again"
        )
    await js.update_stream(clean)
    return f"updated stream {stream} ({', '.join(changed)})"


async def provision(
    js: JetStreamContext, environ: Mapping[str, str] | None = None, services: Iterable[str] | None = None
) -> list[str]:
    """Create every stream and bucket `services` (every service when None) use and bring each to its spec
    under `environ` (the process environment when None). Returns what was done, one line each."""
    environ = os.environ if environ is None else environ
    services = None if services is None else list(services)
    partitions = default_partitions(environ)
    replicas = stream_replicas(environ)
    configs = [
        dataclasses.replace(
            partition_count.recording(config, partitions) if config.name in partition_count.PARTITIONED else config,
            num_replicas=replicas,
        )
        for config in stream_configs(environ, services)
    ]
    existing = {}
    for config in configs:
        try:
            existing[config.name] = (await js.stream_info(config.name)).config
        except NotFoundError:
            pass
    await _counts_agree(js, partitions, existing)
    done = []
    for config in configs:
        done.append(await _stream(js, config, existing.get(config.name)))
    # The ownership bucket without direct gets: a direct get's answer goes to whatever reply subject its
    # request names, and streams store it (cdp_kit.natsauth.permissions); each service reads its keys by a
    # scan instead (cdp_kit.ownership.group_kv). A bucket made with them before loses them here.
    done.append(
        await _bucket(
            js,
            f"KV_{OWNERSHIP_BUCKET}",
            lambda: js.create_key_value(
                bucket=OWNERSHIP_BUCKET, history=1, description=OWNERSHIP_DESCRIPTION, direct=False, replicas=replicas
            ),
            wanted=wants_ownership_bucket(environ),
            settings={"allow_direct": False},
        )
    )
    bucket = model_bucket(environ)
    if bucket and (services is None or "scoring" in services):
        config = api.ObjectStoreConfig(bucket=bucket, description=MODELS_DESCRIPTION, replicas=replicas)
        done.append(await _bucket(js, f"OBJ_{bucket}", lambda: js.create_object_store(bucket, config=config)))
    for line in filter(None, done):
        log.info("%s", line)
    return [line for line in done if line]


def stream_replicas(environ: Mapping[str, str]) -> int:
    """CDP_NATS_STREAM_REPLICAS: 1 to 5 (JetStream's range), 1 when unset."""
    raw = environ.get(REPLICAS_VARIABLE, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 5:
        raise ValueError(
            f"{REPLICAS_VARIABLE}={raw!r} is invalid: must be a whole number from 1 to 5 (JetStream's range)"
        )
    return value


def wants_ownership_bucket(environ: Mapping[str, str]) -> bool:
    """Whether the ownership bucket is made: some service keeps leases in it (CDP_OWNERSHIP=nats) or shares
    its figures through it (segmentation with more than one replica): CDP_PROVISION_OWNERSHIP_BUCKET says
    so (the chart sets it from the components' values), or CDP_OWNERSHIP=nats in the environment the
    services inherit (`cdpctl up`). An existing bucket is always stripped of routing it was given."""
    flag = environ.get(OWNERSHIP_VARIABLE, "").strip().lower()
    return flag in ("1", "true", "yes", "on") or environ.get("CDP_OWNERSHIP", "").strip() == "nats"


def services_of(environ: Mapping[str, str]) -> list[str] | None:
    raw = environ.get(SERVICES_VARIABLE, "").strip()
    return [s.strip() for s in raw.split(",") if s.strip()] or None if raw else None


async def run(url: str, *, environ: Mapping[str, str] | None = None, security=None, timeout: float = 30.0) -> list[str]:
    """Connect to NATS at `url` (credentials and TLS from `security`, or from the environment) and provision."""
    from cdp_kit.bus import Bus

    environ = os.environ if environ is None else environ
    services = services_of(environ)
    async with Bus.connect(url, name=PROVISIONER, security=security, connect_timeout=timeout) as bus:
        return await provision(bus.js, environ, services)


async def as_operator(url: str, password: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Provision the nats-server at `url` as cdpctl's operator user (`natsauth.OPERATOR`) with `password`,
    every service's streams with their default settings unless `environ` says otherwise: what `cdpctl up`
    does, for tests that run services as their own users against a nats-server of their own."""
    from cdp_kit.natsauth import OPERATOR, NatsClientSettings

    operator_url = url.replace("nats://", f"nats://{OPERATOR}:{password}@", 1)
    return await run(operator_url, environ={} if environ is None else environ, security=NatsClientSettings())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = os.environ.get("CDP_NATS_URL", "").strip()
    if not url:
        print("CDP_NATS_URL is required: the NATS server(s) to provision, e.g. nats://nats:4222", file=sys.stderr)
        return 2
    try:
        done = asyncio.run(run(url))
    except Exception as exc:  # one line naming what failed, for the Job's log
        print(f"provisioning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"provisioned: {len(done)} change(s)" if done else "provisioned: every stream was already as specified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
