"""python -m cdp_training [--seed 7] [--population 16000] [--holdout 8000] [--out DIR] [--workers N]

Trains every shipped model and writes services/scoring/src/cdp_scoring/models/<model>.onnx and report.json.

python -m cdp_training train MODEL --store URL --cutoff 2025-03-01 [--evaluate-at T] [--label FILE.json]
                       [--live FILE.onnx | --no-live] [--margin 0.005] [--out DIR]

A training run on the platform's own customers (`cdp_training.learn`): a point-in-time set from the profile
store at the cut-off, judged with the live version (default: the shipped file) on the later slice; writes
<model>-<version>.onnx and its record to --out. `cdpctl models train` runs the same and registers it.
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[1:])
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
