"""What each person's scores were when last published, so that a score update that changes nothing is
not published: every update costs a `scores.updated` entry and the profile's apply (one that moves the
value, however little, also a profile write, a `profiles.changed` entry and work in every service
downstream), and over 40 % of a busy platform's repeat updates are bitwise the value the profile
already holds (a model whose inputs moved but whose answer did not: a tree ensemble, a cluster).

Per person, the held fields (engine.py) keep `$published`: for each model, the version and the values of
its last update that is durable on `scores.updated` (`[version, value, ...]`, in the version's score
order). The stream path (rounds.py) publishes a person's scores of a model only when the version or a
value differs from that entry (bitwise: equal floats, after the resolution below), and then records
them. Because the entry lives in the fields it is snapshotted with them, erased with a deleted person,
and dropped with a partition that leaves. What keeps it true:

- **A batch not made durable** (a failed round or commit, a crash) never leaves an entry behind: the
  partition is rebuilt from the snapshot (taken only where every applied batch is durable, so its
  entries are) plus the stream up to the checkpoint, and the replay drops the entry of every person it
  touches (`forget`), whose scores may have been published after the snapshot. Such a person's next
  update is published whatever it holds: a replay may publish more than the first attempt did, never
  less, and what it publishes is derived from the stream alone (same fields, same messages, same ids).
- **ScoreAll** publishes outside the partitions' pipelines: it first raises the stored epoch
  (`scoring_snapshots/$published_epoch`), so no entry written before it counts after a restart or a
  move (an entry is valid only under the epoch it was written with), then records what JetStream
  stored.
- **The profile says otherwise.** A `scores.<name>` value arriving on `profiles.changed` that is not
  the entry's (a merge brought another person's newer score, an older update landed late) drops the
  model's entry: the next update is published. Comparing with the profile's copy alone would not do:
  it lags the updates in flight.
- **A new version is news**: the profile keeps each score's model version, so a promotion, a rollback
  or a person moving into a canary's share publishes even equal values.

`CDP_SCORING_RESOLUTION` (decimal places; empty: off) rounds published scores first: probabilities to
4 places, CLV to 1e-4 currency units. A threshold segment then decides on the rounded value - exactly, so
a crossing is never missed - and drift below the resolution is not news.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

PUBLISHED = "$published"
EPOCH = "$epoch"
# The epoch record's key in the snapshots collection.
EPOCH_KEY = "$published_epoch"

Entry = list[Any]  # [version, value, ...]


class LastPublished:
    """The `$published` entries of the held fields (`persons`), under the current epoch."""

    def __init__(self, persons: dict[str, dict[str, Any]], *, decimals: int | None = None) -> None:
        self.persons = persons
        self.decimals = decimals
        self.epoch = 0

    def rows(self, scores: np.ndarray) -> list[list[float]]:
        """The values to publish, one list per person: rounded to the resolution when there is one."""
        values = np.asarray(scores, dtype=np.float64)
        if self.decimals is not None:
            values = np.round(values, self.decimals)
        return values.reshape(len(values), -1).tolist()

    def entry(self, person: str, model: str) -> Entry | None:
        fields = self.persons.get(person)
        published = fields.get(PUBLISHED) if fields is not None else None
        if published is None or published.get(EPOCH) != self.epoch:
            return None
        return published.get(model)

    def record(self, person: str, model: str, entry: Entry) -> None:
        """`entry` is durable on scores.updated (or is committed with the batch that publishes it)."""
        fields = self.persons.get(person)
        if fields is None:
            return  # removed meanwhile: nothing to remember it by
        published = fields.get(PUBLISHED)
        # A new dict, never changed in place: a snapshot's copy of the fields shares the old one.
        if published is None or published.get(EPOCH) != self.epoch:
            fields[PUBLISHED] = {EPOCH: self.epoch, model: entry}
        else:
            fields[PUBLISHED] = {**published, model: entry}

    def news(self, person: str, model: str, entry: Entry) -> bool:
        """Whether `entry` is news for the person's model (`entry` is not the one last published); if it
        is, it is recorded as `record` does. One lookup of the person where `entry` then `record` take two:
        the stream path asks for every person of every model it scored."""
        fields = self.persons.get(person)
        if fields is None:
            return True  # removed meanwhile: nothing to remember it by
        published = fields.get(PUBLISHED)
        if published is None or published.get(EPOCH) != self.epoch:
            fields[PUBLISHED] = {EPOCH: self.epoch, model: entry}
        elif published.get(model) == entry:
            return False
        else:
            fields[PUBLISHED] = {**published, model: entry}  # a new dict: a snapshot's copy shares the old one
        return True

    def forget(self, person: str, model: str | None = None) -> None:
        """What was published for the person (one model, or all) is unknown: the next update goes out."""
        fields = self.persons.get(person)
        published = fields.get(PUBLISHED) if fields is not None else None
        if published is None:
            return
        if model is None:
            del fields[PUBLISHED]
        elif model in published:
            fields[PUBLISHED] = {k: v for k, v in published.items() if k != model}

    def check_echo(
        self,
        person: str,
        fields: Mapping[str, Any],
        paths: Iterable[str],
        model_of: Mapping[str, str],
        positions_of: Callable[[str, str], Mapping[str, int] | None],
    ) -> None:
        """`paths` of the person changed on `profiles.changed`: each `scores.<name>` among them must hold
        the value last published for its model (`model_of`: score name -> model; `positions_of(model,
        version)`: that version's score names -> their place in its order), or the model's entry is
        dropped. `fields` are the person's held fields. About half the changes a busy platform delivers
        are such echoes of scores just published, several scores each: the entry is found once per
        change, and a name's place by a lookup."""
        published = fields.get(PUBLISHED)
        if published is None or published.get(EPOCH) != self.epoch:
            return  # nothing published under the current epoch: nothing to check
        for path in paths:
            if not path.startswith("scores."):
                continue
            name = path[7:]
            model = model_of.get(name)
            entry = published.get(model) if model is not None else None
            if entry is None:
                continue
            positions = positions_of(model, entry[0])
            at = positions.get(name) if positions else None
            value = entry[1 + at] if at is not None and len(entry) > len(positions) else None
            if value is None or fields.get(path) != value:
                self.forget(person, model)
                published = fields.get(PUBLISHED)  # a new dict, without the model's entry
                if published is None:
                    return
