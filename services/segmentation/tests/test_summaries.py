"""The per-partition percentile summaries replicas share (summaries.py): exact while every partition is
small, within the stated bound otherwise, whatever the distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdp_kit.bus import Bus
from cdp_kit.natsauth import ROLES, NatsClientSettings, authorization_config, new_password, write_credentials
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import as_operator
from cdp_segmentation.stream import SERVICE
from cdp_segmentation.summaries import SUMMARY_POINTS, SharedPercentiles, merged_percentile, summarise

PERCENTS = (0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100)


def split(values: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(values, np.cumsum(sizes)[:-1])


def test_partitions_of_at_most_a_summary_each_give_the_exact_percentile():
    rng = np.random.default_rng(3)
    values = rng.lognormal(3.0, 1.0, 3000)
    parts = split(values, [1001, 999, 700, 300])
    summaries = [summarise(part) for part in parts]
    for percent in PERCENTS:
        assert merged_percentile(summaries, percent) == np.percentile(values, percent)


@pytest.mark.parametrize(
    "values",
    [
        np.random.default_rng(1).lognormal(3.0, 1.5, 40_000),
        np.random.default_rng(2).integers(0, 7, 40_000).astype(float),  # many ties
        np.concatenate([np.zeros(30_000), np.random.default_rng(4).normal(100, 5, 10_000)]),
    ],
    ids=["lognormal", "ties", "mostly-zero"],
)
def test_larger_partitions_stay_within_the_stated_bound(values):
    rng = np.random.default_rng(5)
    values = rng.permutation(values)
    parts = split(values, [20_000, 12_000, 5_000, 3_000])
    summaries = [summarise(part) for part in parts]
    assert all(len(s["points"]) == SUMMARY_POINTS for s in summaries)
    n = values.size
    slack = 0.1 + 100 * len(parts) / (n - 1)  # percentile points, at most, above the exact value
    for percent in PERCENTS:
        estimate = merged_percentile(summaries, percent)
        assert np.percentile(values, percent) <= estimate <= np.percentile(values, min(100, percent + slack))


def test_numbers_only():
    assert merged_percentile([summarise(np.array([np.nan])), summarise(np.array([]))], 50) is None
    assert merged_percentile([summarise(np.array([np.nan, 4.0])), summarise(np.array([2.0]))], 50) == 3.0


async def test_replicas_share_summaries_and_decide_each_round_once_as_segmentations_own_nats_user(tmp_path):
    passwords = {name: new_password() for name in ROLES}
    write_credentials(tmp_path / "segmentation.json", "segmentation", passwords["segmentation"])
    operator = new_password()
    config = authorization_config(passwords, operator_password=operator)
    with NatsServer(store_dir=tmp_path / "nats", config=config) as server:
        # The ownership bucket, as the provisioner makes it for segmentation with more than one pod.
        await as_operator(server.url, operator, {"CDP_PROVISION_OWNERSHIP_BUCKET": "true"})
        security = NatsClientSettings(credentials_file=Path(tmp_path) / "segmentation.json")
        async with Bus.connect(server.url, name="segmentation", security=security) as bus:
            shared = await SharedPercentiles.open(bus.js, SERVICE)
            summary = summarise(np.arange(5.0))
            await shared.put_summaries({0: {"scores.clv@90": summary}})
            assert await shared.summaries([0, 1]) == {0: {"scores.clv@90": summary}}
            assert await shared.decided() is None
            assert await shared.decide(1000, {"scores.clv@90": 3.6}, None)
            first = await shared.decided()
            assert (first.round, first.values) == (1000, {"scores.clv@90": 3.6})
            assert not await shared.decide(1000, {"scores.clv@90": 9.0}, None)  # decided by another replica
            assert await shared.decide(2000, {"scores.clv@90": 4.0}, first)
            assert not await shared.decide(3000, {"scores.clv@90": 5.0}, first)  # someone wrote since `first`
            assert (await shared.decided()).values == {"scores.clv@90": 4.0}
        log = server.log_path.read_text()
    assert " Violation " not in log
