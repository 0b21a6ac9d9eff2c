"""A home keeps the partition count it started with; a new home starts with 2.

Every partitioned service keeps its stream positions, snapshots and state per partition of `CDP_PARTITIONS`,
and the collector and identity route each event by it: a platform started again on the same data with
another count would read and write its partitions under another split. `cdpctl up` records the count in
the home (`partitions.json`) the first time, and refuses to start with another one. (The streams record it
too, and every partitioned service checks it at start: `cdp_kit.bus.partition_count`.)

Which count a home runs with (`home_partitions`):
- a home that records one runs with it; CDP_PARTITIONS, when set, must say the same;
- a home with data but no record was made before cdpctl recorded it, when every home ran with the
  services' default, 8: it keeps 8, or CDP_PARTITIONS when set (a home started with another count). The
  provisioner then checks that count against what the home's streams show (their partition consumers and
  stored subjects) and refuses another, naming the one they show; the record is written only once it
  agreed (`record`), so a refused start leaves nothing to undo;
- a new home takes CDP_PARTITIONS, or `NEW_HOME`: 2. `cdpctl up` runs one process per service on one
  machine, where every partition costs per batch (each service splits its batches per partition) and buys
  nothing; 2 leaves room for a second replica. The services' own default stays 8 (the chart's, with room
  for 8 replicas).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import click

RECORD = "partitions.json"
NEW_HOME = 2
# The count of every home made before the record: the services' default then (cdp_kit.settings).
BEFORE_THE_RECORD = 8


def asked(environ: Mapping[str, str]) -> int | None:
    """CDP_PARTITIONS when it is set (None: not set); ClickException naming it when it is not a count."""
    raw = environ.get("CDP_PARTITIONS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise click.ClickException(f"CDP_PARTITIONS={raw!r} is invalid: must be a whole number, at least 1")
    return int(raw)


def holds_data(places: Iterable[Path]) -> bool:
    """Whether any of `places` (the home's JetStream store, its services' stores) holds a file."""
    return any(path.is_file() for place in places if place.is_dir() for path in place.rglob("*"))


def recorded(root: Path) -> int | None:
    """The count the home at `root` records (None: no record yet)."""
    record = root / RECORD
    try:
        kept = json.loads(record.read_text())["partitions"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        kept = None
    if not isinstance(kept, int) or isinstance(kept, bool) or kept < 1:
        raise click.ClickException(
            f"{record} is not cdpctl's record of the home's partition count; write "
            f'{{"partitions": N}} with the count the home was started with'
        )
    return kept


def home_partitions(root: Path, environ: Mapping[str, str], *, data: Iterable[Path]) -> int:
    """The partition count the home at `root` runs with (see the module docstring), recorded the first
    time (for a home with data from before the record: once the provisioner agreed, `record`); a
    CDP_PARTITIONS that differs from the home's recorded count is refused, naming both and the way out.
    `data`: where the home keeps data (a home without a record but with data is from before the record)."""
    wanted = asked(environ)
    kept = recorded(root)
    if kept is None:
        if holds_data(data):
            return BEFORE_THE_RECORD if wanted is None else wanted
        kept = NEW_HOME if wanted is None else wanted
        record(root, kept)
        return kept
    if wanted is not None and wanted != kept:
        raise click.ClickException(
            f"this home ({root}) was started with CDP_PARTITIONS={kept}, not {wanted}: its services keep "
            f"their positions and state per partition, so it runs with {kept} (set CDP_PARTITIONS={kept}, or "
            "unset it); for another count start a new home (--home or CDP_HOME)"
        )
    return kept


def record(root: Path, partitions: int) -> None:
    """Write the home's record of its partition count (nothing when it has one)."""
    path = root / RECORD
    if not path.exists():
        path.write_text(json.dumps({"partitions": partitions}) + "\n")
        path.chmod(0o600)


def keep_partitions(root: Path, partitions: int) -> None:
    """Record `partitions` in the home at `root` the first time; refuse a start with another count, naming
    both and the way out (`home_partitions` with CDP_PARTITIONS set to `partitions`, a home without data)."""
    home_partitions(root, {"CDP_PARTITIONS": str(partitions)}, data=())
