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
  less, and what it publishes is derived from the stream and the person's stamps (same fields,
  same messages, same ids, unless an update outside the stream - a ScoreAll - stamped them later).
- **ScoreAll** publishes outside the partitions' pipelines: it first raises the stored epoch
  (`scoring_snapshots/$published_epoch`), so no entry written before it counts after a restart or a
  move (an entry is valid only under the epoch it was written with), then records what JetStream
  stored. While a person's update is in flight their entry of the model is dropped (the stream path
  publishes whatever it scores meanwhile), and it is recorded only if the stream path published no
  update of theirs since: that one, stamped later and computed on fields as new, is what the profile
  keeps.
- **The profile says otherwise.** A `scores.<name>` value arriving on `profiles.changed` that is not
  the entry's (a merge brought another person's newer score, an older update landed late) drops the
  model's entry: the next update is published. Comparing with the profile's copy alone would not do:
  it lags the updates in flight.
- **A new version is news**: the profile keeps each score's model version, so a promotion, a rollback
  or a person moving into a canary's share publishes even equal values.

**Stamps never go backwards.** The profile keeps a score only if its `(at, model, version)` is not older
than the one it holds. A score is stamped with the time of the change it scores (the stream path) or with
scoring's clock (`ScoreAll`, and the persons held scored when a version is made live or a canary moves
persons: deployments.py). Those two clocks cross: a change the profile applied at t1 that scoring had
not applied yet when a promotion published the person's score at t2 > t1 would be scored, on fields that
now hold it, at t1 - and refused, the person keeping the promotion's score, computed without the change,
until their next change. So each person's fields keep, per model, the last stamp handed to an update of
theirs (`$stamp.<model>`: milliseconds, as `at_ms` carries it), and an update is stamped
max(its own time, that stamp + 1 ms): a person's updates reach the profile in the order scoring computed
them. The stamp is a plain field: outside the epoch (it is a lower bound, still true when what was
published is not known), kept by `forget`, snapshotted with the fields (a ScoreAll marks the persons it
stamps and snapshots them before it publishes any of their updates: a version made live all at once, a
ScoreAll run by hand a block of chunks at a time), and absent in fields written before it (their next
update keeps its own time). A ScoreAll takes its persons' stamps before it reads their fields (`reserve`):
a change scored after that is stamped after it, one scored before is in the fields it reads.

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
# A person's field holding the last stamp (ms) handed to an update of the model: STAMP + model name.
STAMP = "$stamp."
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

    def news(self, person: str, model: str, entry: Entry, at_ms: int, key: str) -> int | None:
        """The stamp to publish `entry` with, if it is news for the person's model (not the entry last
        published; it is then recorded as `record` does, and so is the stamp: `at_ms`, or the person's last
        one (field `key`: STAMP + model) + 1 ms if that is not older); None if it is not news. One lookup of
        the person: the stream path asks for every person of every model it scored."""
        fields = self.persons.get(person)
        if fields is None:
            return at_ms  # removed meanwhile: nothing to remember it by
        published = fields.get(PUBLISHED)
        if published is None or published.get(EPOCH) != self.epoch:
            fields[PUBLISHED] = {EPOCH: self.epoch, model: entry}
        elif published.get(model) == entry:
            return None
        else:
            fields[PUBLISHED] = {**published, model: entry}  # a new dict: a snapshot's copy shares the old one
        last = fields.get(key)
        if last is not None and at_ms <= last:
            at_ms = last + 1
        fields[key] = at_ms
        return at_ms

    def reserve(self, person: str, key: str, at_ms: int) -> int | None:
        """The stamp of an update of the person's model published whatever it holds (ScoreAll): `at_ms`, or
        their last stamp + 1 ms if that is not older; recorded at once, so that an update the stream path
        computes from now on is stamped after it. None: the person is not held."""
        fields = self.persons.get(person)
        if fields is None:
            return None
        last = fields.get(key)
        if last is not None and at_ms <= last:
            at_ms = last + 1
        fields[key] = at_ms
        return at_ms

    def carry(self, epoch: int) -> None:
        """The epoch was just raised (from `epoch`) by updates published outside the stream path that leave
        most persons' scores as they were (a version made live, a canary deployed: only the persons whose
        version moves are published, and their entries of the model were dropped first). What is held here
        under `epoch` is still what was published: it counts under the new one too. A snapshot written
        before the raise still holds the old epoch's entries, which count no more after a restart."""
        current = self.epoch
        for fields in self.persons.values():
            published = fields.get(PUBLISHED)
            if published is not None and published.get(EPOCH) == epoch:
                fields[PUBLISHED] = {**published, EPOCH: current}

    def forget(self, person: str, model: str | None = None) -> None:
        """What was published for the person (one model, or all) is unknown: the next update goes out. Their
        stamps stay: a lower bound of what was published is still one."""
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
