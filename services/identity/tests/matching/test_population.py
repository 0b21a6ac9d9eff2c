"""The synthetic population the matching tests and the benchmark rely on (cdp_testing.people)."""

from __future__ import annotations

from collections import Counter

from cdp_testing.people import FIELDS, generate_population, true_pairs


def test_same_seed_same_population():
    assert generate_population(300, seed=3) == generate_population(300, seed=3)
    assert generate_population(300, seed=3) != generate_population(300, seed=4)


def test_records_and_truth_line_up(population):
    records, truth = population
    assert [record["id"] for record in records] == list(truth)
    assert all(set(record) == {"id", *FIELDS} for record in records)
    people = Counter(truth.values())
    assert len(people) == 3000
    duplicated = sum(count > 1 for count in people.values())
    assert 0.25 < duplicated / len(people) < 0.35


def test_true_pairs_are_every_pair_of_a_persons_records():
    truth = {"r1": "p1", "r2": "p1", "r3": "p1", "r4": "p2", "r5": "p3", "r6": "p3"}
    assert true_pairs(truth) == {("r1", "r2"), ("r1", "r3"), ("r2", "r3"), ("r5", "r6")}


def test_duplicates_carry_realistic_noise(population):
    records, truth = population
    by_person: dict[str, list[dict]] = {}
    for record in records:
        by_person.setdefault(truth[record["id"]], []).append(record)
    groups = [group for group in by_person.values() if len(group) > 1]
    differing = Counter(field for group in groups for field in FIELDS if len({r[field] for r in group}) > 1)
    # Every field is noisy somewhere, but most duplicates keep most fields.
    assert set(differing) == set(FIELDS)
    assert all(count < len(groups) for count in differing.values())
    surnames = Counter(record["last_name"] for record in records)
    assert surnames.most_common(1)[0][1] > 20  # common surnames collide, as in real data
    missing = sum(record[field] in (None, "") for record in records for field in FIELDS)
    assert 0.02 < missing / (len(records) * len(FIELDS)) < 0.2
