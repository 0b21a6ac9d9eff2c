"""bench/matching — probabilistic record matching: our Fellegi-Sunter matcher against Splink 5 (DuckDB)
on the same generated person records, scored on pairs against the known truth.

Population: 10,000 people from `cdp_testing.people`, 30% of them with 1-3 extra noisy records (typos,
nicknames, swapped names, missing values, address/phone/e-mail variants, moves) and 8% sharing a
household (address, usually surname, sometimes the landline) with someone else: ~13.5k records.

Both sides get the same cleaned input (our normalisers: case/accent folding, e-mail mailbox, national
phone number, address abbreviations; Splink is given the normalised columns, and that preparation is not
counted in its time), the same blocking rules and equivalent comparisons, level for level:

    field       ours (DEFAULT_PERSON_CONFIG)                         Splink 5
    first_name  exact, nickname, swapped, JW>=.92, JW>=.80, else     exact (term frequencies), nickname groups
                                                                     intersect (same table), reversed columns,
                                                                     JW>=.92, JW>=.80, else
    last_name   exact, swapped, JW>=.92, JW>=.80, else               exact (tf), reversed, JW>=.92, JW>=.80, else
    email       exact, same mailbox name, JW>=.88, else              EmailComparison (its recommended levels)
    phone       exact, Levenshtein<=1, else                          LevenshteinAtThresholds([1])
    dob         exact, day/month swap or one part off, <=365 d, else DateOfBirthComparison (its defaults)
    city        exact, JW>=.90, else                                 JaroWinklerAtThresholds([0.9])
    zip         exact, Levenshtein<=1, else                          LevenshteinAtThresholds([1])
    address     exact, JW>=.92, JW>=.80, else                        JaroWinklerAtThresholds([0.92, 0.8])

Training follows each tool's documented workflow. Ours: `fit` (u from random pairs and value
frequencies, m, λ and the u of shareable fields by EM over the candidate pairs). Splink: λ from
deterministic rules with recall 0.7, u by random sampling (1e7 pairs, seeded), m by EM in two sessions
blocked on first+last name and on date of birth (the tutorial's recipe), predict at probability 0.5.
Each side's time covers its own training and prediction.

Also: the same records blocked on date of birth alone on both sides (strangers sharing a birthday fill
the candidates; scored against the true pairs that rule can reach), the best F1 over all thresholds on
each side's scored pairs, and the time of a one-record
MatchRecords scoring step (blocking index lookup and the new pairs only) at pools of ~1.3k, 13k and 100k.

A second, differently shaped data set (`cdp_testing.people_links`, 10,000 people): a CRM export and app
sign-ups to link (link_only on both sides: Splink gets the two tables, as its link-only tutorial does),
with large households (a quarter of people share an address, often the landline), typo rates drawn per
record, and a blocking rule on date of birth alone among the rules (email, phone, dob,
first_name[0:1]+last_name[0:3]+zip). The same comparisons and training recipe as above; precision,
recall and F1 over the true CRM-app pairs at p >= 0.5 and at the best threshold, and each side's time.

And the whole one-record MatchRecords gRPC call against identity in-process (sqlite store, real
nats-server) holding a pool of ~100k records, loaded by MatchRecordsBulk: 200 calls that apply what they
find (resolve the record's identifier, store it, score its candidate pairs, merge or queue; split by
whether a merge happened) and 200 that only score, median, p95 and p99 timed at the client, beside a bare
gRPC echo of the same request (the latency floor) in the same run.

    make bench-matching                            # writes bench/results/matching*.json (several minutes)
    .venv/bin/python bench/bench_matching.py --small   # every part at a few thousand records, nothing written
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from benchlib import bare_server_calls, percentile, write_result

from cdp_identity.matching import DEFAULT_PERSON_CONFIG, MatchConfig, Matcher
from cdp_identity.matching.blocking import BlockingRule
from cdp_identity.matching.nicknames import name_groups
from cdp_testing.people import generate_population, true_pairs
from cdp_testing.people_links import cross_source_pairs, generate_two_files

PEOPLE = 10_000
LINK_PEOPLE = 10_000
CALL_POOL_PEOPLE = 75_000  # ~100k records
DUPLICATES_RATE = 0.3
SEED = 2026
THRESHOLD = 0.5
CALLS = 200
LINK_CONFIG = MatchConfig.from_dict(
    {
        **DEFAULT_PERSON_CONFIG.to_dict(),
        "link_type": "link_only",
        "blocking_rules": ["email", "phone", "dob", "first_name[0:1]+last_name[0:3]+zip"],
    }
)


def pair_key(left: str, right: str) -> tuple[str, str]:
    return (left, right) if left < right else (right, left)


def accuracy(predicted: set[tuple[str, str]], truth: set[tuple[str, str]]) -> dict[str, float]:
    true_positives = len(predicted & truth)
    precision = true_positives / len(predicted) if predicted else 0.0
    recall = true_positives / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "pairs": len(predicted)}


def best_threshold(scored: list[tuple[tuple[str, str], float]], truth: set[tuple[str, str]]) -> dict[str, float]:
    """The threshold with the highest F1 over every scored pair (what a steward tuning the cut could reach)."""
    ranked = sorted(scored, key=lambda item: -item[1])
    best = {"f1": 0.0, "threshold": 1.0, "precision": 0.0, "recall": 0.0}
    true_positives = 0
    for position, (pair, probability) in enumerate(ranked, start=1):
        true_positives += pair in truth
        precision, recall = true_positives / position, true_positives / len(truth)
        f1 = 2 * precision * recall / (precision + recall) if true_positives else 0.0
        if f1 > best["f1"]:
            best = {"f1": f1, "threshold": probability, "precision": precision, "recall": recall}
    return {key: round(value, 4) if key != "threshold" else value for key, value in best.items()}


def run_ours(records: list[dict], config: MatchConfig = DEFAULT_PERSON_CONFIG) -> tuple[float, dict, dict, dict, list]:
    started = time.perf_counter()
    matcher = Matcher(config)
    report = matcher.fit(records)
    scored = matcher.score(records)
    elapsed = time.perf_counter() - started
    at_half = {pair_key(p.left_id, p.right_id) for p in scored if p.probability >= THRESHOLD}
    at_upper = {
        pair_key(p.left_id, p.right_id) for p in scored if p.probability >= DEFAULT_PERSON_CONFIG.upper_threshold
    }
    info = {
        "candidate_pairs": report.candidate_pairs,
        "em_iterations": report.iterations,
        "em_converged": report.converged,
        "lambda": report.random_match_probability,
        "match_share_of_candidates": report.match_probability,
    }
    all_scored = [(pair_key(p.left_id, p.right_id), p.probability) for p in scored]
    return elapsed, at_half, at_upper, info, all_scored


def incremental_call_ms(pool_people: int, calls: int = 200) -> dict[str, float]:
    """One new record scored as MatchRecords does it (the blocking index finds its candidates, only those
    pairs are scored), against a fitted pool of generated records: median and 95th percentile over calls."""
    from cdp_identity.matching_service import MatchingService

    records, _ = generate_population(pool_people, duplicates_rate=DUPLICATES_RATE, seed=SEED + 1)
    pool, newcomers = records[:-calls], records[-calls:]
    matcher = Matcher(DEFAULT_PERSON_CONFIG)
    matcher.fit(pool)
    service = MatchingService(None, None, matcher)  # scoring only: no engine or store is touched
    for record in pool:
        service._add_to_pool({**record, "id": str(record["id"])})
    timings = []
    for record in newcomers:
        doc = {**record, "id": str(record["id"])}
        started = time.perf_counter()
        service._score_new({doc["id"]: doc})
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    return {
        "pool_records": len(pool),
        "median_ms": round(timings[len(timings) // 2], 3),
        "p95_ms": round(timings[int(len(timings) * 0.95)], 3),
    }


def splink_rule(rule: BlockingRule):
    """Our blocking rule as Splink's block_on: field[a:b] becomes substr(field, a+1, b-a)."""
    from splink import block_on

    parts = []
    for part in rule.parts:
        if part.other:
            raise ValueError(f"no Splink block_on equivalent for the unordered pair in {rule.text!r}")
        if not part.sliced:
            parts.append(part.field)
            continue
        start = part.start or 0
        if start < 0 or part.stop is None or part.stop < start:
            raise ValueError(f"no Splink equivalent for the slice in {rule.text!r}")
        parts.append(f"substr({part.field}, {start + 1}, {part.stop - start})")
    return block_on(*parts)


def splink_settings(rules=DEFAULT_PERSON_CONFIG.blocking_rules, link_type: str = "dedupe_only"):
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl
    from splink import SettingsCreator

    def name_comparison(column: str, *, nicknames: bool):
        levels = [cll.NullLevel(column), cll.ExactMatchLevel(column).configure(tf_adjustment_column=column)]
        if nicknames:
            levels.append(cll.ArrayIntersectLevel("first_name_groups", min_intersection=1))
        levels += [
            cll.ColumnsReversedLevel("first_name", "last_name", symmetrical=True),
            cll.JaroWinklerLevel(column, 0.92),
            cll.JaroWinklerLevel(column, 0.8),
            cll.ElseLevel(),
        ]
        return cl.CustomComparison(levels, output_column_name=column)

    return SettingsCreator(
        link_type=link_type,
        unique_id_column_name="id",
        comparisons=[
            name_comparison("first_name", nicknames=True),
            name_comparison("last_name", nicknames=False),
            cl.EmailComparison("email"),
            cl.LevenshteinAtThresholds("phone", [1]),
            cl.DateOfBirthComparison("dob", input_is_string=True),
            cl.JaroWinklerAtThresholds("city", [0.9]),
            cl.LevenshteinAtThresholds("zip", [1]),
            cl.JaroWinklerAtThresholds("address", [0.92, 0.8]),
        ],
        blocking_rules_to_generate_predictions=[splink_rule(rule) for rule in rules],
    )


def splink_rows(records: list[dict]) -> list[dict]:
    """The same cleaned values our matcher compares, plus the nickname groups of the first name."""
    rows = Matcher(DEFAULT_PERSON_CONFIG).normalise(records)
    for row in rows:
        row["first_name_groups"] = sorted(name_groups(row["first_name"])) if row["first_name"] else None
    return rows


def run_splink(
    records: list[dict], rules=DEFAULT_PERSON_CONFIG.blocking_rules, *, link_with: list[dict] | None = None
) -> tuple[float, set, set, dict, list]:
    """Splink's documented workflow on `records` (dedupe), or linking them with `link_with` (link_only:
    the two tables registered apart, as its link-only tutorial does)."""
    from splink import DuckDBAPI, Linker, block_on

    tables = [splink_rows(records)] + ([splink_rows(link_with)] if link_with is not None else [])
    started = time.perf_counter()
    db_api = DuckDBAPI()
    registered = [db_api.register(rows) for rows in tables]
    link_type = "link_only" if link_with is not None else "dedupe_only"
    linker = Linker(
        registered if link_with is not None else registered[0],
        splink_settings(rules, link_type),
        log_level=logging.WARNING,
    )
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "last_name", "dob"), block_on("email")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e7, seed=SEED)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("first_name", "last_name"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("dob"))
    predictions = linker.inference.predict().as_dict()
    elapsed = time.perf_counter() - started
    scored = list(zip(predictions["id_l"], predictions["id_r"], predictions["match_probability"], strict=True))
    at_half = {pair_key(left, right) for left, right, probability in scored if probability >= THRESHOLD}
    upper = DEFAULT_PERSON_CONFIG.upper_threshold
    at_upper = {pair_key(left, right) for left, right, probability in scored if probability >= upper}
    all_scored = [(pair_key(left, right), probability) for left, right, probability in scored]
    info = {"u_sample_pairs": 1e7, "em_sessions": ["first_name+last_name", "dob"]}
    return elapsed, at_half, at_upper, info, all_scored


def run_link(people: int) -> dict:
    """The second data set: a CRM export and app sign-ups, linked by both sides."""
    crm, app, truth = generate_two_files(people, seed=SEED)
    truth_pairs = cross_source_pairs(truth)
    ours_seconds, ours_half, _, ours_info, ours_scored = run_ours(crm + app, LINK_CONFIG)
    splink_seconds, splink_half, _, splink_info, splink_scored = run_splink(
        crm, LINK_CONFIG.blocking_rules, link_with=app
    )
    reachable = truth_pairs & {pair for pair, _ in ours_scored}
    return {
        "people": people,
        "crm_records": len(crm),
        "app_records": len(app),
        "true_pairs": len(truth_pairs),
        "true_pairs_reachable": len(reachable),
        "blocking_rules": [rule.text for rule in LINK_CONFIG.blocking_rules],
        "ours": {**accuracy(ours_half, truth_pairs), "seconds": round(ours_seconds, 3), **ours_info},
        "splink": {**accuracy(splink_half, truth_pairs), "seconds": round(splink_seconds, 3), **splink_info},
        "ours_best_threshold": best_threshold(ours_scored, truth_pairs),
        "splink_best_threshold": best_threshold(splink_scored, truth_pairs),
    }


def match_record(record: dict):
    from cdp.identity.v1 import identity_pb2

    return identity_pb2.MatchRecord(
        id=str(record["id"]),
        source="crm",
        identifiers=[identity_pb2.Identifier(type="salesforce_id", value=f"SF-{record['id']}")],
        fields={name: str(value) for name, value in record.items() if name != "id" and value},
    )


async def grpc_call_ms(pool_people: int, calls: int = CALLS) -> dict:
    """The whole one-record MatchRecords call (apply: resolve, store, score the new pairs, merge or queue)
    through gRPC against identity in-process with a sqlite store and a real nats-server, its pool loaded
    by MatchRecordsBulk; beside a bare gRPC echo of the same request."""
    import grpc

    from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
    from cdp_identity.__main__ import setup as identity_setup
    from cdp_identity.settings import IdentitySettings
    from cdp_kit.natsserver import NatsServer
    from cdp_kit.service import serving

    records, _ = generate_population(pool_people, duplicates_rate=DUPLICATES_RATE, seed=SEED + 1)
    pool = [match_record(r) for r in records[: -2 * calls]]
    newcomers = [match_record(r) for r in records[-2 * calls :]]
    # Per call: (milliseconds, whether it asked to apply, whether it merged).
    timings: list[tuple[float, bool, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        try:
            settings = IdentitySettings(
                nats_url=server.url,
                grpc_host="127.0.0.1",
                grpc_port=0,
                auth_mode="none",
                store_url=f"sqlite:///{Path(tmp) / 'identity.db'}",
                log_level="WARNING",
            )
            async with serving(settings, identity_setup) as runtime:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc.port}") as channel:
                    stub = identity_pb2_grpc.IdentityServiceStub(channel)
                    started = time.perf_counter()

                    async def batches():
                        for first in range(0, len(pool), 5000):
                            yield identity_pb2.MatchRecordsBulkRequest(records=pool[first : first + 5000])

                    async for _ in stub.MatchRecordsBulk(batches(), timeout=3600):
                        pass
                    load_seconds = time.perf_counter() - started
                    model = await stub.GetMatchingModel(identity_pb2.GetMatchingModelRequest())
                    # Half the calls only score (apply: false), half apply what they find, as a steward's
                    # feed would; a newcomer that is a duplicate of a pooled record then merges.
                    for position, record in enumerate(newcomers):
                        apply = position % 2 == 1
                        started = time.perf_counter()
                        reply = await stub.MatchRecords(identity_pb2.MatchRecordsRequest(records=[record], apply=apply))
                        timings.append(((time.perf_counter() - started) * 1000, apply, bool(reply.merges)))
        finally:
            server.stop()
    request = identity_pb2.MatchRecordsRequest(records=[newcomers[0]], apply=True).SerializeToString()
    echo = await bare_server_calls(None, lambda: request, calls=2 * calls, in_flight=1)

    def figures(selected: list[float]) -> dict:
        return {
            "calls": len(selected),
            "median_ms": round(percentile(selected, 50), 3),
            "p95_ms": round(percentile(selected, 95), 3),
            "p99_ms": round(percentile(selected, 99), 3),
        }

    applied = [ms for ms, apply, _ in timings if apply]
    return {
        "pool_records": len(pool),
        **figures(applied),
        "score_only": figures([ms for ms, apply, _ in timings if not apply]),
        "applied_without_merge": figures([ms for ms, apply, merged in timings if apply and not merged]),
        "applied_with_merge": figures([ms for ms, apply, merged in timings if apply and merged]),
        "bulk_load_seconds": round(load_seconds, 1),
        "fitted_on_records": model.fitted_on_records,
        "echo_median_ms": round(echo["p50_ms"], 3),
        "echo_p95_ms": round(echo["p95_ms"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="every part at a few thousand records; nothing written")
    small = parser.parse_args().small
    people, link_people = (2_000, 2_000) if small else (PEOPLE, LINK_PEOPLE)
    call_pool, pools = (3_000, (1_000,)) if small else (CALL_POOL_PEOPLE, (1_000, 10_000, 75_000))

    records, truth = generate_population(people, duplicates_rate=DUPLICATES_RATE, seed=SEED)
    truth_pairs = true_pairs(truth)
    print(f"{len(records)} records of {people} people, {len(truth_pairs)} true pairs")

    ours_seconds, ours_half, ours_upper, ours_info, ours_scored = run_ours(records)
    splink_seconds, splink_half, splink_upper, splink_info, splink_scored = run_splink(records)
    ours_best, splink_best = best_threshold(ours_scored, truth_pairs), best_threshold(splink_scored, truth_pairs)
    incremental = {f"{pool}_people": incremental_call_ms(pool) for pool in pools}
    # The same records blocked on date of birth alone (a rule splink's tutorial uses): strangers sharing a
    # birthday fill the candidates, and neither side may call them matches.
    dob_config = MatchConfig.from_dict({**DEFAULT_PERSON_CONFIG.to_dict(), "blocking_rules": ["dob"]})
    _, dob_ours_half, _, _, dob_ours_scored = run_ours(records, dob_config)
    _, dob_splink_half, _, _, dob_splink_scored = run_splink(records, dob_config.blocking_rules)
    dob_reachable = truth_pairs & {pair for pair, _ in dob_ours_scored}
    dob_blocked = {
        "true_pairs_reachable": len(dob_reachable),
        "ours": accuracy(dob_ours_half, dob_reachable),
        "splink": accuracy(dob_splink_half, dob_reachable),
        "ours_best_threshold": best_threshold(dob_ours_scored, dob_reachable),
        "splink_best_threshold": best_threshold(dob_splink_scored, dob_reachable),
    }

    ours, splink = accuracy(ours_half, truth_pairs), accuracy(splink_half, truth_pairs)
    ours_at_upper, splink_at_upper = accuracy(ours_upper, truth_pairs), accuracy(splink_upper, truth_pairs)
    link = run_link(link_people)
    call = asyncio.run(grpc_call_ms(call_pool))
    params = {
        "records": len(records),
        "people": people,
        "duplicates_rate": DUPLICATES_RATE,
        "seed": SEED,
        "true_pairs": len(truth_pairs),
        "threshold": THRESHOLD,
        "ours": {**ours, "seconds": round(ours_seconds, 3), **ours_info},
        "ours_at_upper_threshold": {"threshold": DEFAULT_PERSON_CONFIG.upper_threshold, **ours_at_upper},
        "splink": {**splink, "seconds": round(splink_seconds, 3), "version": _splink_version(), **splink_info},
        "splink_at_upper_threshold": {"threshold": DEFAULT_PERSON_CONFIG.upper_threshold, **splink_at_upper},
        "ours_best_threshold": ours_best,
        "splink_best_threshold": splink_best,
        "incremental_one_record_scoring_step": incremental,
        "blocked_on_dob_only": dob_blocked,
        "two_file_link": link,
        "incremental_one_record_grpc_call": call,
    }
    results = (
        ("matching", ours_seconds, "s", splink_seconds, False),
        ("matching-f1", ours["f1"], "F1", splink["f1"], True),
        ("matching-link-f1", link["ours"]["f1"], "F1", link["splink"]["f1"], True),
        ("matching-link", link["ours"]["seconds"], "s", link["splink"]["seconds"], False),
        # The whole call against the latency floor of a bare gRPC echo of the same request.
        ("matching-call", call["p95_ms"], "ms", call["echo_p95_ms"], False),
    )
    for name, value, unit, baseline, higher in results:
        if small:
            print(f"{name}: {value} {unit} (baseline {baseline}) - --small: not written")
        else:
            write_result(name, value=value, unit=unit, baseline=baseline, higher_is_better=higher, params=params)

    print(f"\n{'':<26}{'precision':>10}{'recall':>9}{'F1':>8}{'pairs':>8}{'seconds':>9}")
    for name, result, seconds in (
        (f"ours  p>={THRESHOLD}", ours, ours_seconds),
        (f"ours  p>={DEFAULT_PERSON_CONFIG.upper_threshold}", ours_at_upper, None),
        (f"splink p>={THRESHOLD}", splink, splink_seconds),
        (f"splink p>={DEFAULT_PERSON_CONFIG.upper_threshold}", splink_at_upper, None),
    ):
        shown = f"{seconds:>9.2f}" if seconds is not None else f"{'':>9}"
        print(
            f"{name:<26}{result['precision']:>10.4f}{result['recall']:>9.4f}{result['f1']:>8.4f}{result['pairs']:>8}{shown}"
        )
    for name, best in (("ours", ours_best), ("splink", splink_best)):
        print(
            f"{name + ' best threshold':<26}{best['precision']:>10.4f}{best['recall']:>9.4f}{best['f1']:>8.4f}"
            f"   at p>={best['threshold']:.4g}"
        )
    print(f"blocked on dob alone ({dob_blocked['true_pairs_reachable']} true pairs reachable):")
    for name in ("ours", "splink"):
        at_half, best = dob_blocked[name], dob_blocked[f"{name}_best_threshold"]
        print(
            f"  {name:<8} p>={THRESHOLD}: precision {at_half['precision']:.4f} recall {at_half['recall']:.4f} "
            f"F1 {at_half['f1']:.4f}; best F1 {best['f1']:.4f} at p>={best['threshold']:.4g}"
        )
    for label, timing in incremental.items():
        print(
            f"one-record scoring step, pool of {timing['pool_records']:>6} records: "
            f"median {timing['median_ms']} ms, p95 {timing['p95_ms']} ms"
        )
    print(
        f"two files ({link['crm_records']} CRM, {link['app_records']} app records; {link['true_pairs']} true pairs, "
        f"{link['true_pairs_reachable']} reachable by blocking):"
    )
    for name in ("ours", "splink"):
        at_half, best = link[name], link[f"{name}_best_threshold"]
        print(
            f"  {name:<8} p>={THRESHOLD}: precision {at_half['precision']:.4f} recall {at_half['recall']:.4f} "
            f"F1 {at_half['f1']:.4f}; best F1 {best['f1']:.4f} at p>={best['threshold']:.4g}; "
            f"{at_half['seconds']:.2f} s"
        )
    print(
        f"one-record MatchRecords gRPC call, pool of {call['pool_records']} records (loaded in "
        f"{call['bulk_load_seconds']} s; bare gRPC echo p95 {call['echo_p95_ms']} ms):"
    )
    for label, key in (("apply: true", None), ("  of which no merge", "applied_without_merge"),
                       ("  of which a merge", "applied_with_merge"), ("apply: false", "score_only")):  # fmt: skip
        timing = call[key] if key else call
        print(
            f"  {label:<22} {timing['calls']:>4} calls: median {timing['median_ms']} ms, "
            f"p95 {timing['p95_ms']} ms, p99 {timing['p99_ms']} ms"
        )


def _splink_version() -> str:
    import splink

    return splink.__version__


if __name__ == "__main__":
    main()
