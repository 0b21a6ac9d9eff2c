"""The wire vocabulary: every subject a builder makes lands in the stream the table says, and the
names other processes already rely on (durables with stored positions, the DLQ layout) stay as they are."""

import nats.errors
import pytest
from nats.js.errors import NoStreamResponseError

from cdp_kit.bus import (
    dead_letter_stream,
    ensure_stream,
    events_raw_stream,
    events_resolved_stream,
    identity_stream,
    privacy_stream,
    profiles_stream,
    scores_stream,
    segments_stream,
    subjects,
)

ALL_STREAMS = (
    events_raw_stream,
    events_resolved_stream,
    identity_stream,
    profiles_stream,
    scores_stream,
    segments_stream,
    privacy_stream,
    dead_letter_stream,
)


async def test_each_subject_is_stored_by_its_stream(nats_client):
    js = nats_client.jetstream()
    for spec in ALL_STREAMS:
        await ensure_stream(js, spec())
    expected = {
        subjects.events_raw(3): subjects.EVENTS_RAW,
        subjects.events_resolved(3): subjects.EVENTS_RESOLVED,
        subjects.IDENTITY_MERGED: subjects.IDENTITY,
        subjects.IDENTITY_UNMERGED: subjects.IDENTITY,
        subjects.IDENTITY_QUARANTINED: subjects.IDENTITY,
        subjects.identity_merged(3): subjects.IDENTITY,
        subjects.identity_unmerged(3): subjects.IDENTITY,
        subjects.profiles_changed(3): subjects.PROFILES,
        subjects.scores_updated(3): subjects.SCORES,
        subjects.segments_entered(3): subjects.SEGMENTS,
        subjects.segments_exited(3): subjects.SEGMENTS,
        subjects.PRIVACY_DELETED: subjects.PRIVACY,
        subjects.dead_letter(subjects.EVENTS_RAW, subjects.partition_durable("identity", 3)): subjects.DLQ,
    }
    for subject, stream in expected.items():
        ack = await js.publish(subject, b"x")
        assert ack.stream == stream, subject


async def test_announcements_are_not_stored_by_any_stream(nats_client):
    """Replica-to-replica announcements travel on core NATS: no stream may capture them."""
    js = nats_client.jetstream()
    for spec in ALL_STREAMS:
        await ensure_stream(js, spec())
    for subject in (subjects.SCORING_MODELS_CHANGED, subjects.SEGMENTATION_SEGMENTS_CHANGED):
        with pytest.raises((nats.errors.NoRespondersError, NoStreamResponseError, nats.errors.TimeoutError)):
            await js.publish(subject, b"x", timeout=0.5)


def test_names_that_hold_stored_positions_do_not_change():
    # Durable consumers and checkpoints on disk are found by these names: renaming one loses a position.
    assert subjects.partition_durable("identity", 3) == "identity-p3"
    assert subjects.partition_durable("profile", 2, input="scores") == "profile-scores-p2"
    assert subjects.replica_durable("identity", "privacy", 1) == "identity-privacy-1"
    assert subjects.checkpoints_collection("scoring") == "scoring_checkpoints"
    assert subjects.events_raw(7) == "events.raw.7"
    assert subjects.PRIVACY_DELETED == "privacy.deleted"


def test_partition_of_reads_back_the_partition():
    for build in (subjects.events_raw, subjects.profiles_changed, subjects.segments_exited):
        assert subjects.partition_of(build(12)) == 12
    with pytest.raises(ValueError, match="partition number"):
        subjects.partition_of(subjects.PRIVACY_DELETED)


def test_dead_letter_filters():
    assert subjects.dead_letter_filter() == "dlq.>"
    assert subjects.dead_letter_filter(subjects.PROFILES) == "dlq.PROFILES.*"
    assert subjects.dead_letter_filter(subjects.PROFILES, "scoring-p0") == subjects.dead_letter(
        "PROFILES", "scoring-p0"
    )
