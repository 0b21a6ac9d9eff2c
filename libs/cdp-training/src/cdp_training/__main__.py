"""python -m cdp_training [--seed 7] [--population 16000] [--holdout 8000] [--out DIR] [--workers N]

Trains every shipped model and writes services/scoring/src/cdp_scoring/models/<model>.onnx and report.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cdp_training.pipeline import DEFAULT_HOLDOUT, DEFAULT_POPULATION, DEFAULT_SEED, MODELS_DIR, train_all


def main(argv: list[str] | None = None) -> int:
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
