"""The stream table the provisioner uses is the services' own: their retention variables and defaults,
and the configurations they verify at start."""

from __future__ import annotations

import dataclasses

import pytest

from cdp_kit.bus import streams as kit
from cdp_kit.bus import subjects
from cdp_kit.streamtable import (
    BY_NAME,
    KNOBS,
    STREAMS,
    crm_input_stream,
    model_bucket,
    needed,
    orchestration_input_stream,
    orchestration_timers_stream,
    stream_config,
    stream_configs,
)


def _settings_classes():
    from cdp_collector.settings import CollectorSettings
    from cdp_crm.settings import CrmSettings
    from cdp_identity.settings import IdentitySettings
    from cdp_orchestration.settings import OrchestrationSettings
    from cdp_profile.settings import ProfileSettings
    from cdp_scoring.settings import ScoringSettings
    from cdp_segmentation.settings import SegmentationSettings

    return (
        CollectorSettings,
        CrmSettings,
        IdentitySettings,
        OrchestrationSettings,
        ProfileSettings,
        ScoringSettings,
        SegmentationSettings,
    )


def _variables() -> dict[str, object]:
    found: dict[str, object] = {}
    for cls in _settings_classes():
        for field in dataclasses.fields(cls):
            variable = field.metadata.get("env")
            if variable:
                found[variable] = field.default
    return found


def test_every_knob_is_a_service_setting_with_the_same_default():
    declared = _variables()
    if not declared:
        pytest.fail("cannot read the services' settings variables (cdp_kit.settings.env metadata changed?)")
    for knob in KNOBS:
        assert knob.variable in declared, f"{knob.variable} is no service's setting"
        assert declared[knob.variable] == knob.default, knob.variable


def test_the_sourced_streams_are_the_services_own():
    from cdp_crm import streams as crm
    from cdp_orchestration import streams as orchestration

    assert orchestration_timers_stream() == orchestration.timers_stream()
    assert orchestration_input_stream(max_age=3 * 86_400) == orchestration.input_stream(max_age=3 * 86_400)
    assert crm_input_stream(max_age=2 * 86_400) == crm.input_stream(max_age=2 * 86_400)
    assert stream_config(subjects.ACTIONS, {}) == orchestration.actions_stream() == crm.actions_stream()


def test_each_stream_follows_its_services_retention_variable():
    environ = {
        "CDP_EVENTS_RETENTION_DAYS": "3",
        "CDP_EVENTS_DEDUP_WINDOW": "120",
        "CDP_PROFILE_CHANGES_RETENTION_DAYS": "4",
        "CDP_SCORING_SCORES_RETENTION_DAYS": "5",
        "CDP_SEGMENTATION_RETENTION_DAYS": "6",
        "CDP_ORCHESTRATION_RETENTION_DAYS": "8",
        "CDP_CRM_RETENTION_DAYS": "9",
    }
    day = 86_400
    assert (
        stream_config(subjects.EVENTS_RAW, environ)
        == kit.events_raw_stream(max_age=3 * day, duplicate_window=120).config()
    )
    assert stream_config(subjects.EVENTS_RESOLVED, environ) == kit.events_resolved_stream(max_age=3 * day).config()
    assert stream_config(subjects.PROFILES, environ) == kit.profiles_stream(max_age=4 * day).config()
    assert stream_config(subjects.SCORES, environ) == kit.scores_stream(max_age=5 * day).config()
    assert stream_config(subjects.SEGMENTS, environ) == kit.segments_stream(max_age=6 * day).config()
    assert stream_config(subjects.ACTIONS, environ) == kit.actions_stream(max_age=8 * day).config()
    assert stream_config(subjects.ORCHESTRATION, environ) == orchestration_input_stream(max_age=8 * day)
    assert stream_config(subjects.CRM, environ) == crm_input_stream(max_age=9 * day)
    with pytest.raises(ValueError, match="CDP_CRM_RETENTION_DAYS='soon' is invalid"):
        stream_config(subjects.CRM, {"CDP_CRM_RETENTION_DAYS": "soon"})


def test_every_stream_of_the_vocabulary_is_provisioned_after_what_it_sources():
    assert set(BY_NAME) == set(subjects.STREAM_SUBJECTS)
    order = [entry.name for entry in STREAMS]
    for entry in STREAMS:
        for source in entry.build({}).sources or []:
            assert order.index(source.name) < order.index(entry.name), (entry.name, source.name)


def test_only_the_streams_of_the_deployed_services_are_made():
    assert needed() == [entry.name for entry in STREAMS]
    collector_only = needed(["collector"])
    assert collector_only == [subjects.EVENTS_RAW, subjects.PRIVACY]
    with_crm = needed(["crm"])
    assert subjects.CRM in with_crm and subjects.PROFILES in with_crm and subjects.ORCHESTRATION not in with_crm
    assert [c.name for c in stream_configs({}, ["collector"])] == collector_only
    with pytest.raises(ValueError, match="'billing' is not a cdp service"):
        needed(["billing"])


def test_the_model_bucket_is_made_only_for_a_nats_model_store():
    assert model_bucket({"CDP_SCORING_MODEL_STORE": "nats://cdp-models"}) == "cdp-models"
    assert model_bucket({"CDP_SCORING_MODEL_STORE": "/var/lib/cdp/models"}) is None
    assert model_bucket({}) is None
