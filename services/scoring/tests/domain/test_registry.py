"""Versions and roles: one live version, shadows beside it, a stable canary share, promote and rollback,
score names unique across models, no model reading its own output through others."""

from __future__ import annotations

import pytest

from cdp_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cdp_scoring.domain import ModelSpec
from cdp_scoring.domain.registry import CANARY, INACTIVE, LIVE, SHADOW, Registry, canary_bucket


def spec(name="churn_risk", version="1", score=None, reads=()):
    features = [{"name": "orders", "path": "computed.orders_90d"}]
    features += [{"name": f"s{i}", "path": f"scores.{s}"} for i, s in enumerate(reads)]
    return ModelSpec.from_dict(
        {"name": name, "version": version, "features": features, "outputs": [{"score": score or name, "output": "p"}]}
    )


def deploy(registry, s, role=None, sha=None, percent=0.0):
    return registry.deploy(s, sha256=sha or f"sha-{s.key}", size_bytes=1, role=role, canary_percent=percent, now=1.0)


def test_the_first_version_goes_live_and_later_ones_wait():
    registry = Registry()
    first, created = deploy(registry, spec(version="1"))
    assert created and first.role == LIVE
    second, _ = deploy(registry, spec(version="2"))
    assert second.role == INACTIVE
    assert registry.get("churn_risk").live is first


def test_the_same_file_twice_changes_nothing_but_a_changed_file_needs_a_new_version():
    registry = Registry()
    deploy(registry, spec(), sha="abc")
    again, created = deploy(registry, spec(), sha="abc")
    assert not created and again.role == LIVE
    with pytest.raises(AlreadyExists, match="new version"):
        deploy(registry, spec(), sha="def")


def test_promote_and_rollback():
    registry = Registry()
    deploy(registry, spec(version="1"))
    deploy(registry, spec(version="2"), role=SHADOW)
    registry.promote("churn_risk", "2")
    entry = registry.get("churn_risk")
    assert entry.live.version == "2" and entry.versions["1"].role == INACTIVE
    registry.rollback("churn_risk")
    assert entry.live.version == "1" and entry.versions["2"].role == INACTIVE
    with pytest.raises(FailedPrecondition, match="no earlier live version"):
        registry.rollback("churn_risk")


def test_shadow_and_canary_need_a_live_version_and_a_canary_a_share():
    registry = Registry()
    with pytest.raises(FailedPrecondition, match="no live version"):
        deploy(registry, spec(), role=SHADOW)
    deploy(registry, spec(version="1"))
    with pytest.raises(InvalidArgument) as caught:
        deploy(registry, spec(version="2"), role=CANARY, percent=0)
    assert caught.value.field == "canary_percent"
    deploy(registry, spec(version="2"), role=CANARY, percent=25)
    deploy(registry, spec(version="3"), role=CANARY, percent=10)
    entry = registry.get("churn_risk")
    assert entry.canary.version == "3" and entry.versions["2"].role == INACTIVE


def test_the_canary_share_is_stable_and_about_the_size_asked():
    registry = Registry()
    deploy(registry, spec(version="1"))
    deploy(registry, spec(version="2"), role=CANARY, percent=20)
    entry = registry.get("churn_risk")
    persons = [f"p{i}" for i in range(5000)]
    first = [registry.route(entry, p).version for p in persons]
    assert first == [registry.route(entry, p).version for p in persons]
    share = first.count("2") / len(persons)
    assert 0.17 < share < 0.23
    assert all((canary_bucket(p, "churn_risk") < 20) == (v == "2") for p, v in zip(persons, first, strict=True))


def test_score_names_are_unique_across_models():
    registry = Registry()
    deploy(registry, spec(name="churn_risk"))
    with pytest.raises(InvalidArgument, match="already produced by model 'churn_risk'"):
        deploy(registry, spec(name="churn_v2", score="churn_risk"))


def test_a_model_may_read_other_scores_but_not_its_own_through_a_cycle():
    registry = Registry()
    deploy(registry, spec(name="a", score="a_score"))
    deploy(registry, spec(name="b", score="b_score", reads=["a_score"]))
    with pytest.raises(InvalidArgument, match="cycle: a -> b -> a"):
        deploy(registry, spec(name="a", version="2", score="a_score", reads=["b_score"]))


def test_unknown_models_and_versions_are_named():
    registry = Registry()
    with pytest.raises(NotFound, match="no model named 'nope'"):
        registry.get("nope")
    deploy(registry, spec())
    with pytest.raises(NotFound, match="has no version '9'"):
        registry.promote("churn_risk", "9")


def test_entries_survive_their_stored_form():
    registry = Registry()
    deploy(registry, spec(version="1"))
    deploy(registry, spec(version="2"), role=CANARY, percent=5)
    entry = registry.get("churn_risk")
    from cdp_scoring.domain.registry import ModelEntry

    again = ModelEntry.from_doc(entry.to_doc())
    assert again.to_doc() == entry.to_doc()
