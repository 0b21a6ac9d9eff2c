"""python -m cdp_training [--seed 7] [--population 16000] [--holdout 8000] [--out DIR] [--workers N]

Trains every shipped model and writes services/scoring/src/cdp_scoring/models/<model>.onnx and report.json.

python -m cdp_training train MODEL --store URL --cutoff 2025-03-01 [--evaluate-at T] [--label FILE.json]
                       [--live FILE.onnx | --no-live] [--margin 0.005] [--out DIR]

A training run on the platform's own customers (`cdp_training.learn`): a point-in-time set from the profile
store at the cut-off, judged with the live version (default: the shipped file) on the later slice; writes
<model>-<version>.onnx and its record to --out. `cdpctl models train` runs the same and registers it.

python -m cdp_training clusters describe [--model FILE.onnx] [--json]
python -m cdp_training clusters train --store URL --cutoff 2025-03-01 [--k 6] [--live FILE.onnx] [--out DIR]

Behavioural clusters (`cdp_training.clusters`): what each cluster of a clusters file is (its share and the
three features that set its centroid apart), or a clustering of the profile store's persons at a cut-off.

python -m cdp_training uplift-data --orchestration-store URL --journey ID [--node SPLIT] [--store URL]
                       [--outcome JSON] [--model FILE.onnx] [--out FILE.csv]

A journey's split with a control group as uplift data (`cdp_training.feedback`): one row per person
assigned, treatment or control, and the outcome (the journey's goal, or events on the profile within a
window), optionally with a model's features as known at the assignment.

python -m cdp_training clv (--transactions FILE | --store URL) [--unit weeks|days] [--calibration-end DATE]
                       [--end DATE] [--horizon N] [--json FILE] [--predictions FILE.csv] ...

BG/NBD + Gamma-Gamma on real transactions (`cdp_training.clvfit`): a calibration / holdout split with the
paper's diagnostics as text tables (and JSON with --json), then a fit on everything and each customer's
expected transactions, P(alive) and CLV over the horizon (--predictions).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cdp_training.pipeline import DEFAULT_HOLDOUT, DEFAULT_POPULATION, DEFAULT_SEED, MODELS_DIR, train_all


def train(argv: list[str]) -> int:
    import asyncio
    import json

    from cdp_kit.errors import CdpError
    from cdp_training import learn

    parser = argparse.ArgumentParser(prog="python -m cdp_training train", description="a training run (see --help)")
    parser.add_argument("model", help=f"one of {', '.join(learn.TRAINABLE)} (or any model with --label and --live)")
    parser.add_argument("--store", required=True, help="the profile service's store (CDP_STORE_URL), read only")
    parser.add_argument("--cutoff", required=True, help="train on what was known at this time (ISO date/time)")
    parser.add_argument("--evaluate-at", help="the later slice's cut-off (default: cutoff + the label window)")
    parser.add_argument("--label", type=Path, help="a JSON file with the label spec (default: the model's)")
    parser.add_argument("--live", type=Path, help="the version to beat, as an ONNX file (default: the shipped one)")
    parser.add_argument("--no-live", action="store_true", help="no version to beat (a model's first version)")
    parser.add_argument("--margin", type=float, default=learn.DEFAULT_MARGIN, help="AUC gain needed to promote")
    parser.add_argument("--out", type=Path, default=Path("training-runs"), help="where the file and record go")
    args = parser.parse_args(argv)
    try:
        cutoff = learn.parse_time(args.cutoff, "cutoff")
        evaluate_at = learn.parse_time(args.evaluate_at, "evaluate_at") if args.evaluate_at else None
        label = json.loads(args.label.read_text()) if args.label else None
        live_file = None if args.no_live else args.live or MODELS_DIR / f"{args.model}.onnx"
        live = learn.live_from_onnx(live_file.read_bytes()) if live_file and live_file.exists() else None
        profiles = asyncio.run(learn.read_store(args.store))
        result = learn.train_run(
            args.model, profiles, cutoff=cutoff, evaluate_at=evaluate_at, label=label, live=live, margin=args.margin
        )
    except CdpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    onnx_path, record_path = learn.write_run(result, args.out)
    decision = result.decision
    print(
        f"{result.built.spec.name} {result.version}: {'promote' if decision['promote'] else 'keep in shadow'}: {decision['reason']}"
    )
    print(f"wrote {onnx_path} and {record_path}")
    return 0


def clv(argv: list[str]) -> int:
    import asyncio
    import csv
    import json

    from cdp_kit.errors import CdpError
    from cdp_training import clvfit, transactions
    from cdp_training.bgnbd import FitRejected

    parser = argparse.ArgumentParser(
        prog="python -m cdp_training clv", description="BG/NBD + Gamma-Gamma on real transactions, with diagnostics"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--transactions", type=Path, help="a transaction export, one order a row (CSV or Parquet)")
    source.add_argument("--store", help="the profile service's store (CDP_STORE_URL): its orders, read only")
    parser.add_argument("--format", choices=transactions.FORMATS, help="of --transactions (default: by suffix)")
    parser.add_argument("--customer-column", default="customer_id", help="column naming the customer")
    parser.add_argument("--date-column", default="date", help="column with the order's date or time")
    parser.add_argument("--value-column", default="value", help="column with the order's value")
    parser.add_argument("--no-value", action="store_true", help="the export has no values: BG/NBD only")
    parser.add_argument("--date-format", help="strptime format of the dates (default: ISO 8601)")
    parser.add_argument("--event", default=transactions.ORDER_EVENT, help="with --store: the order event's name")
    parser.add_argument(
        "--value-property", default=transactions.ORDER_VALUE_PROPERTY, help="with --store: the property with the value"
    )
    parser.add_argument("--unit", choices=tuple(clvfit.UNITS), default="weeks", help="the time unit of the models")
    parser.add_argument("--calibration-end", help="last day of the calibration period (default: mid-way)")
    parser.add_argument("--end", help="last day of the data used (default: the last transaction's)")
    parser.add_argument("--horizon", type=float, help="prediction horizon in --unit (default: 365 days)")
    parser.add_argument("--censor", type=int, default=clvfit.DEFAULT_CENSOR, help="last group of the holdout table")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--predictions", type=Path, help="write each customer's predictions as CSV here")
    args = parser.parse_args(argv)
    try:
        if args.transactions is not None:
            tx = transactions.read_transactions(
                args.transactions,
                customer_column=args.customer_column,
                date_column=args.date_column,
                value_column=None if args.no_value else args.value_column,
                date_format=args.date_format,
                file_format=args.format,
            )
        else:
            from cdp_training.learn import read_store

            profiles = asyncio.run(read_store(args.store))
            value_property = None if args.no_value else args.value_property
            tx = transactions.orders_from_profiles(profiles, event=args.event, value_property=value_property)
        report, predictions = clvfit.analyse(
            tx,
            unit=args.unit,
            calibration_end=args.calibration_end,
            end=args.end,
            horizon=args.horizon,
            censor=args.censor,
        )
    except CdpError as error:
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, FitRejected) and "Gamma-Gamma" in str(error):
            print("(--no-value fits BG/NBD alone: expected transactions and P(alive) without values)", file=sys.stderr)
        return 2
    print(clvfit.render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.predictions:
        rows = predictions.rows()
        with args.predictions.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["customer_id"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.predictions}")
    return 0


def reference(argv: list[str]) -> int:
    from cdp_training.drift import shipped_references, write_references

    parser = argparse.ArgumentParser(prog="python -m cdp_training reference", description="shipped drift references")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the shipped models' training seed")
    parser.add_argument("--population", type=int, default=DEFAULT_POPULATION, help="their training population")
    parser.add_argument("--workers", type=int, default=None, help="processes for the profile pass")
    args = parser.parse_args(argv)
    references = shipped_references(seed=args.seed, population=args.population, workers=args.workers)
    print(f"wrote {write_references(references)}")
    return 0


def clusters(argv: list[str]) -> int:
    import asyncio
    import json

    from cdp_kit.errors import CdpError
    from cdp_scoring.runtime import load_model
    from cdp_training import clusters as clustering
    from cdp_training import learn

    parser = argparse.ArgumentParser(prog="python -m cdp_training clusters", description="behavioural clusters")
    commands = parser.add_subparsers(dest="command", required=True)
    describe = commands.add_parser("describe", help="each cluster's share and distinguishing features")
    describe.add_argument("--model", type=Path, default=MODELS_DIR / f"{clustering.NAME}.onnx", help="a clusters file")
    describe.add_argument("--json", action="store_true", help="the descriptions as JSON")
    train = commands.add_parser("train", help="a clustering of the profile store's persons at a cut-off")
    train.add_argument("--store", required=True, help="the profile service's store (CDP_STORE_URL), read only")
    train.add_argument("--cutoff", required=True, help="cluster behaviour as known at this time (ISO date/time)")
    train.add_argument("--k", type=int, default=clustering.DEFAULT_K, help="how many clusters")
    train.add_argument("--live", type=Path, help="the live clusters file: numbers are matched to its clusters")
    train.add_argument("--out", type=Path, default=Path("training-runs"), help="where the file and record go")
    args = parser.parse_args(argv)
    try:
        if args.command == "describe":
            spec = load_model(args.model.read_bytes()).spec
            clustering.from_spec(spec)  # refuses a file that is not a clustering
            descriptions = spec.training.get("clusters", [])
            print(json.dumps(descriptions, indent=2) if args.json else f"{spec.key}\n{clustering.render(descriptions)}")
            return 0
        cutoff = learn.parse_time(args.cutoff, "cutoff")
        live = load_model(args.live.read_bytes()).spec if args.live else None
        profiles = asyncio.run(learn.read_store(args.store))
        result = clustering.train_run(profiles, cutoff=cutoff, k=args.k, live=live)
    except CdpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{clustering.NAME}-{result.version}"
    stem.with_suffix(".onnx").write_bytes(result.data)
    stem.with_suffix(".json").write_text(json.dumps(result.record, indent=2) + "\n")
    print(
        f"{result.spec.key}: {'promote' if result.decision['promote'] else 'keep in shadow'}: {result.decision['reason']}"
    )
    print(clustering.render(result.spec.training["clusters"]))
    print(f"wrote {stem}.onnx and {stem}.json")
    return 0


def uplift_data(argv: list[str]) -> int:
    import asyncio
    import csv
    import json

    from cdp_kit.errors import CdpError, InvalidArgument
    from cdp_scoring.runtime import load_model
    from cdp_training import feedback

    parser = argparse.ArgumentParser(
        prog="python -m cdp_training uplift-data", description="a journey's split with a control group as uplift data"
    )
    parser.add_argument("--orchestration-store", required=True, help="orchestration's store (its CDP_STORE_URL)")
    parser.add_argument("--journey", required=True, help="the journey id")
    parser.add_argument("--node", help="the split node (default: the journey's one split with a control group)")
    parser.add_argument("--store", help="the profile service's store: for --outcome and --model")
    parser.add_argument(
        "--outcome",
        help='JSON: {"events": [{"name": "Order Completed"}], "window": "7d"} (default: the journey\'s goal)',
    )
    parser.add_argument("--model", type=Path, help="an ONNX file whose features are added, as known at assignment")
    parser.add_argument("--out", type=Path, help="write the rows as CSV here")
    args = parser.parse_args(argv)
    try:
        try:
            outcome = json.loads(args.outcome) if args.outcome else None
        except ValueError as exc:
            raise InvalidArgument("outcome", f"is not JSON: {exc}") from None
        features = load_model(args.model.read_bytes()).spec if args.model else None
        data = asyncio.run(
            feedback.export(
                args.orchestration_store,
                args.journey,
                store_url=args.store,
                node=args.node,
                outcome=outcome,
                features=features,
            )
        )
    except CdpError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(data.summary()))
    if args.out:
        rows = data.table()
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["uplift-data"]:
        return uplift_data(argv[1:])
    if argv[:1] == ["clusters"]:
        return clusters(argv[1:])
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["reference"]:
        return reference(argv[1:])
    if argv[:1] == ["clv"]:
        return clv(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m cdp_training", description=__doc__.splitlines()[2])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="training population seed (held-out: seed + 1)")
    parser.add_argument("--population", type=int, default=DEFAULT_POPULATION, help="people to train on")
    parser.add_argument("--holdout", type=int, default=DEFAULT_HOLDOUT, help="people to measure on")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="where the .onnx files and report.json go")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes for the profile pass (default: CPUs, at most 4)"
    )
    parser.add_argument(
        "--recovery-customers", type=int, default=50_000, help="simulated customers for the BG/NBD recovery check"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = train_all(
        seed=args.seed,
        population=args.population,
        holdout=args.holdout,
        out_dir=args.out,
        workers=args.workers,
        recovery_customers=args.recovery_customers,
    )
    print()
    for key, floor in report["floors"].items():
        bound = f"{'>=' if 'min' in floor else '<='} {floor.get('min', floor.get('max'))}"
        print(f"  {'ok  ' if floor['met'] else 'FAIL'} {key:<62} {floor['value']!s:<12} ({bound})")
    print(f"\ndone in {time.perf_counter() - started:.0f}s")
    return 0 if all(f["met"] for f in report["floors"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
