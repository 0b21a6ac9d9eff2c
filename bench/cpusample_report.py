"""Where each service's main thread spent its CPU in a benchmark run under bench/stallwatch/cpusample.py.

    PYTHONPATH=bench/stallwatch CDP_CPUSAMPLE_DIR=/tmp/cpu .venv/bin/python bench/bench_pipeline.py ...
    .venv/bin/python bench/cpusample_report.py /tmp/cpu [--service profile] [--top 25] [--folded]

Per service (processes of one name added up): its samples and, for the functions at the top of the counts,
the share of samples where the function was running itself (`self`) and where it was anywhere on the
stack (`total`, each stack counted once). Samples taken while a module was being imported (the process starting) are left out unless
`--with-imports`. `--folded` prints the service's stacks in the folded format
flame-graph tools read.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import Counter, defaultdict

#: A frame of Python's import machinery: the process starting, not its steady work.
IMPORTING = "_find_and_load"


def _load(folder: pathlib.Path, with_imports: bool) -> dict[str, tuple[Counter[str], float]]:
    by_service: dict[str, tuple[Counter[str], float]] = defaultdict(lambda: (Counter(), 0.0))
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stacks, cpu = by_service[record["name"]]
        stacks.update({k: v for k, v in record["stacks"].items() if with_imports or IMPORTING not in k})
        by_service[record["name"]] = (stacks, cpu + record.get("cpu_s", 0.0))
    return dict(by_service)


def _report(name: str, stacks: Counter[str], cpu: float, top: int) -> None:
    samples = sum(stacks.values())
    print(f"== {name}: {samples} samples of the main thread on CPU, the process' CPU {cpu:.1f} s")
    if not samples:
        return
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for stack, count in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"  {'self %':>7} {'total %':>8}  function")
    shown = [f for f, _ in own.most_common(top)]
    for frame in shown:
        print(f"  {100 * own[frame] / samples:7.1f} {100 * total[frame] / samples:8.1f}  {frame}")
    print(f"  -- by total (top {top}) --")
    for frame, count in total.most_common(top):
        print(f"  {100 * own[frame] / samples:7.1f} {100 * count / samples:8.1f}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=pathlib.Path)
    parser.add_argument("--service", help="only this service (its name in the file names)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--with-imports", action="store_true", help="keep the samples taken while importing")
    parser.add_argument("--folded", action="store_true", help="print the stacks in the folded format")
    args = parser.parse_args()
    for name, (stacks, cpu) in sorted(_load(args.folder, args.with_imports).items()):
        if args.service and name != args.service:
            continue
        if args.folded:
            for stack, count in stacks.most_common():
                print(f"{stack} {count}")
        else:
            _report(name, stacks, cpu, args.top)


if __name__ == "__main__":
    main()
