"""A store file restored from before a deletion does not bring the deleted person back.

architecture.md's recovery for a damaged store is "stop the service, restore the file (with its -wal),
start it". Scoring learns of a deletion from profile's `removed` change on profiles.changed; a
`scoring.db` copied before it brings back the person's fields (traits, computed traits, consent, the
scores last published), and that change may have aged out of PROFILES, and scoring's consumers are past
it anyway. The deletion's `privacy.deleted` notice is still in PRIVACY (kept without an age limit): at
start, and for each partition it takes, scoring reads it and erases every person it names that the store
still holds, publishing nothing (not even the scores its outbox still held for them)."""

from __future__ import annotations

import base64
import logging
from types import SimpleNamespace

import pytest

from cdp.privacy.v1 import privacy_pb2
from cdp.profile.v1 import profile_pb2
from cdp.scoring.v1 import scoring_pb2
from cdp_kit.bus import (
    Bus,
    OutMessage,
    partition_for,
    privacy_stream,
    profiles_stream,
    scores_stream,
    subjects,
)
from cdp_kit.engine.outbox import put_record
from cdp_kit.service import serving
from cdp_kit.storage import open_store
from cdp_scoring.__main__ import setup
from cdp_scoring.notices import scrub_outbox
from cdp_testing.profile_changes import change
from cdp_testing.profile_changes import publish_change as publish
from cdp_testing.store_files import copy_store, store_bytes
from cdp_testing.waiting import until

from .conftest import settings

PARTITIONS = 2
EMAIL = "ada-scoring-restored-qv-5521@example.com"  # values found nowhere else
OLD_EMAIL = "ada-old-scoring-restored-qv-5521@example.com"
BOB_EMAIL = "bob-scoring-restored-qv-5521@example.com"
CITY = "ada-city-scoring-restored-qv-5521"
PERSONS = {"p_ada": EMAIL, "p_ada_old": OLD_EMAIL, "p_bob": BOB_EMAIL}
# A person of Ada's partition.
MARKER = next(
    f"p_marker_{n}"
    for n in range(100)
    if partition_for(f"p_marker_{n}", PARTITIONS) == partition_for("p_ada", PARTITIONS)
)


async def publish_change(bus: Bus, message: profile_pb2.ProfileChanged) -> int:
    return await publish(bus, message, partitions=PARTITIONS)


def leftover_scores(persons: list[str], n: int) -> OutMessage:
    """A scores.updated message as an outbox record holds it until it is published: one model version's
    columns for `persons`, and another version's in `more`."""
    batch = scoring_pb2.ScoresUpdatedBatch(model="churn_risk", version="1.1.0", scores=["churn_risk"])
    batch.person_ids.extend(persons)
    batch.values.extend(0.25 + i / 10 for i in range(len(persons)))
    batch.at_ms.extend(1_700_000_000_000 + i for i in range(len(persons)))
    more = batch.more.add(model="clusters", version="1.0.0", scores=["cluster", "distance"])
    more.person_ids.extend(persons)
    more.values.extend(v for i in range(len(persons)) for v in (float(i), 0.5 + i))
    more.at_ms.extend(1_700_000_000_000 + i for i in range(len(persons)))
    subject = subjects.scores_updated(partition_for(persons[0], PARTITIONS))
    return OutMessage(subject, batch.SerializeToString(), f"leftover-scores-{n}")


async def scores_after(bus: Bus, seq: int) -> list[scoring_pb2.ScoresUpdatedBatch]:
    last = (await bus.js.stream_info(subjects.SCORES)).state.last_seq
    return [
        scoring_pb2.ScoresUpdatedBatch.FromString((await bus.js.get_msg(subjects.SCORES, n)).data)
        for n in range(seq + 1, last + 1)
    ]


def rows(batch: scoring_pb2.ScoresUpdatedBatch) -> list[tuple[str, str, list[float], int]]:
    width = len(batch.scores)
    return [
        (batch.model, person, list(batch.values[i * width : (i + 1) * width]), batch.at_ms[i])
        for i, person in enumerate(batch.person_ids)
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ownership", ["static", "nats"])
@pytest.mark.parametrize("consumers", ["kept", "lost"])
async def test_a_store_restored_from_before_a_deletion_does_not_bring_the_person_back(
    nats_server, tmp_path, caplog, ownership, consumers
):
    caplog.set_level(logging.WARNING, logger="cdp.scoring.privacy")
    data, backup = tmp_path / "data", tmp_path / "backup"
    data.mkdir()
    config = settings(
        nats_server, tmp_path, partitions=PARTITIONS, store_url=f"sqlite:///{data / 'scoring.db'}",
        ownership=ownership, ownership_ttl=3.0,
    )  # fmt: skip
    async with Bus.connect(nats_server.url, name="restore-test") as bus:
        await bus.ensure_streams(profiles_stream(), privacy_stream(), scores_stream())
        # 1. Ada, the person later merged into her (held apart here), and Bob; snapshotted; the store copied.
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            for person, email in PERSONS.items():
                await publish_change(bus, change(person, cause="event", created=True))
                message = change(person, cause="event")
                message.traits["email"].string_value = email
                await publish_change(bus, message)
            await until(
                lambda: all(engine.fields.get(p, {}).get("traits.email") == e for p, e in PERSONS.items()), "fields"
            )
            await runtime.parts["stream"].snapshot_now()
        copy_store(data, backup, "scoring.db")
        assert EMAIL.encode() in store_bytes(backup, "scoring.db") and OLD_EMAIL.encode() in store_bytes(
            backup, "scoring.db"
        )

        # 2. Ada moves (a change after the copy's checkpoint). Ada-old merged into Ada, then Ada deleted, as
        # profile publishes them: the merge's and the deletion's `removed` changes on profiles.changed, the
        # notice (naming the merged person) on PRIVACY.
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            await until(lambda: "p_bob" in engine.fields, "the partitions restored")
            moved = change("p_ada", cause="event")
            moved.traits["city"].string_value = CITY
            await publish_change(bus, moved)
            await until(lambda: engine.fields["p_ada"].get("traits.city") == CITY, "Ada moved")
            await publish_change(bus, change("p_ada_old", cause="merge", removed=True))
            notice = privacy_pb2.PrivacyDeleted(
                request_id="req-ada-1", person_id="p_ada", merged_person_ids=["p_ada_old"]
            )
            notice.at.GetCurrentTime()
            await bus.publisher.publish_batch(
                [OutMessage(subjects.PRIVACY_DELETED, notice.SerializeToString(), "privacy:req-ada-1")]
            )
            removed_at = await publish_change(bus, change("p_ada", cause="delete", removed=True))
            await until(lambda: "p_ada" not in engine.fields and "p_ada_old" not in engine.fields, "the removals")
            await runtime.parts["stream"].snapshot_now()
        assert EMAIL.encode() not in store_bytes(data, "scoring.db")  # the deletion as it happens: erased
        # The removed change ages out of PROFILES (its retention is days; the notice's is for ever).
        await bus.js.delete_msg(subjects.PROFILES, removed_at)
        if consumers == "lost":  # created again at the restored checkpoint: Ada's move is delivered anew
            for partition in range(PARTITIONS):
                await bus.js.delete_consumer(subjects.PROFILES, subjects.partition_durable("scoring", partition))

        # 3. The store from before the deletion restored (copied while the service ran, its outbox still
        # holding scores not yet published: Ada's and Bob's, in one message); started.
        copy_store(backup, data, "scoring.db")
        async with open_store(config.store_url) as store:
            leftovers = [leftover_scores(["p_ada", "p_bob"], 1), leftover_scores(["p_ada"], 2)]
            record = put_record("scoring_engine_outbox", partition_for("p_ada", PARTITIONS), 1, leftovers)
            await store.put(record.collection, record.key, record.doc)
        published = (await bus.js.stream_info(subjects.SCORES)).state.last_seq
        notices = (await bus.js.stream_info(subjects.PRIVACY)).state.messages
        async with serving(config, setup) as runtime:
            engine = runtime.parts["engine"]
            await until(lambda: engine.ready == {0, 1}, "every partition restored")
            # A change after everything the partition's consumer delivers: once it is held, so is what came
            # before it (Ada's move too, when the consumer was created again).
            await publish_change(bus, change(MARKER, cause="event", created=True))
            await until(lambda: MARKER in engine.fields, "the partition's stream applied")
            assert "p_ada" not in engine.fields and "p_ada_old" not in engine.fields
            assert engine.fields["p_bob"]["traits.email"] == BOB_EMAIL
            await runtime.parts["stream"].wait_ready()
            await runtime.parts["stream"].snapshot_now()
        # Nothing published again: no notice; of the outbox, Bob's scores only (both versions'), the
        # message holding Ada's alone not at all.
        assert (await bus.js.stream_info(subjects.PRIVACY)).state.messages == notices
        after = [row for batch in await scores_after(bus, published) for b in (batch, *batch.more) for row in rows(b)]
        assert after == [
            ("churn_risk", "p_bob", [pytest.approx(0.35)], 1_700_000_000_001),
            ("clusters", "p_bob", [1.0, 1.5], 1_700_000_000_001),
        ]
        # Said at WARNING with the request ids, never the persons or their values.
        said = [r.getMessage() for r in caplog.records if r.name == "cdp.scoring.privacy"]
        assert said and all("req-ada-1" in line for line in said)
        assert not any("p_ada" in line or "@" in line for line in said)
        # Idempotent: started again, nothing left to erase, nothing said.
        caplog.clear()
        async with serving(config, setup) as runtime:
            await until(lambda: runtime.parts["engine"].ready == {0, 1}, "every partition taken")
            assert "p_bob" in runtime.parts["engine"].fields and "p_ada" not in runtime.parts["engine"].fields
        assert [r for r in caplog.records if r.name == "cdp.scoring.privacy"] == []
    # Nor left in the files.
    held = store_bytes(data, "scoring.db")
    assert EMAIL.encode() not in held and OLD_EMAIL.encode() not in held and CITY.encode() not in held
    assert b"p_ada" not in held
    assert BOB_EMAIL.encode() in held


async def test_a_version_whose_rows_were_all_the_deleted_persons_leaves_the_message_to_the_next():
    """The outbox scrub: a message whose first version's columns held only deleted persons keeps the
    other versions' columns (the next one first), rows and times aligned, under the same message id."""
    batch = scoring_pb2.ScoresUpdatedBatch(model="churn_risk", version="1.1.0", scores=["churn_risk"])
    batch.person_ids.append("p_ada")
    batch.values.append(0.9)
    batch.at_ms.append(1)
    more = batch.more.add(model="clusters", version="1.0.0", scores=["cluster", "distance"])
    more.person_ids.extend(["p_ada", "p_bob", "p_cy"])
    more.values.extend([1.0, 0.1, 2.0, 0.2, 3.0, 0.3])
    more.at_ms.extend([1, 2, 3])
    other = batch.more.add(model="clv", version="2.0.0", scores=["clv"])
    other.person_ids.append("p_ada")
    other.values.append(100.0)
    other.at_ms.append(1)
    message = OutMessage(subjects.scores_updated(0), batch.SerializeToString(), "scores-1")
    async with open_store("memory://") as store:
        record = put_record("scoring_engine_outbox", 0, 7, [message])
        await store.put(record.collection, record.key, record.doc)
        engine = SimpleNamespace(store=store)
        [(op, taken)] = await scrub_outbox(engine, "scoring_engine_outbox", 0, {"p_ada": "req-1"})
    assert taken == {"p_ada"} and op.key == record.key
    [kept] = op.doc["messages"]
    assert kept["id"] == "scores-1"
    left = scoring_pb2.ScoresUpdatedBatch.FromString(base64.b64decode(kept["payload"]))
    assert (left.model, list(left.person_ids), list(left.values), list(left.at_ms)) == (
        "clusters",
        ["p_bob", "p_cy"],
        [2.0, 0.2, 3.0, 0.3],
        [2, 3],
    )
    assert list(left.more) == []
