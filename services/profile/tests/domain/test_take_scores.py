"""`Profile.take_scores` (the scores stream's path) decides as `Profile.set_scores` does: the same scores
held, the same values reported as moved, on a one-part profile and on a merged one."""

from __future__ import annotations

import random

from cdp_profile.domain import ComputedTraits, Profile

NO_DEFS = ComputedTraits()
NOW = 1000.0


def _calls(seed: int) -> list[tuple[dict[str, float], str, str, float]]:
    rng = random.Random(seed)
    calls = []
    for _ in range(200):
        names = rng.sample(["churn", "clv", "fraud", "cluster"], rng.randint(1, 3))
        # Few distinct values and times: repeats, ties and older scores all happen.
        scores = {name: rng.choice([0.0, 0.25, 0.5, 1.0]) for name in names}
        calls.append((scores, rng.choice(["m", "n"]), rng.choice(["1", "2"]), float(rng.randint(0, 20))))
    return calls


def _held(profile: Profile) -> dict:
    return {origin: dict(part.scores) for origin, part in profile.parts.items()}


def _merged(person: str) -> Profile:
    survivor, loser = Profile.new(person), Profile.new("lost")
    loser.set_scores({"churn": 0.5, "clv": 0.25}, model="m", version="1", at=10.0)
    survivor.set_scores({"churn": 0.25}, model="m", version="1", at=5.0)
    survivor.merge(loser, merge_id="mg1", at=11.0, defs=NO_DEFS, now=NOW)
    return survivor


def test_take_scores_holds_and_reports_what_set_scores_does_one_part_and_merged():
    for make in (Profile.new, _merged):
        for seed in range(5):
            by_set, by_take = make("p"), make("p")
            for scores, model, version, at in _calls(seed):
                change = by_set.set_scores(scores, model=model, version=version, at=at)
                moved: dict[str, float] = {}
                by_take.take_scores(scores, model, version, at, moved)
                assert moved == change.scores
                assert _held(by_take) == _held(by_set)
                # The stored form is made again after a score came (as after set_scores).
                assert by_take.to_json() == by_set.to_json()


def test_take_scores_adds_to_what_the_batch_moved_before():
    profile = Profile.new("p")
    moved: dict[str, float] = {}
    profile.take_scores({"churn": 0.5}, "m", "1", 10.0, moved)
    profile.take_scores({"clv": 2.0, "churn": 0.5}, "n", "1", 10.0, moved)  # churn: same value, not a move
    profile.take_scores({"fraud": 0.1}, "f", "1", 9.0, moved)
    assert moved == {"churn": 0.5, "clv": 2.0, "fraud": 0.1}
